//! Bad input to `forkvm boot`: each mistake ends the process with a non-zero exit and
//! exactly one `forkvm: ...` line on stderr that names the offending path or value,
//! leaving no process behind.

mod common;

use std::io::Write;
use std::time::Duration;

use common::run_forkvm;

/// Errors come before any guest runs; this is only a guard against a hang.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `forkvm ARGS` and checks the failure contract; `names` must all appear in the
/// error line.
fn rejects(args: &[&str], names: &[&str]) {
    let out = run_forkvm(args, TIMEOUT);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "expected a non-zero exit\n{out}"
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{out}");
    assert!(
        lines[0].starts_with("forkvm: "),
        "the error line does not start with `forkvm: `\n{out}"
    );
    for name in names {
        assert!(
            lines[0].contains(name),
            "the error does not name {name:?}\n{out}"
        );
    }
    assert!(out.stdout.is_empty(), "no guest output expected\n{out}");
}

/// Runs `body` where `/dev/kvm` can be opened: here if it can, else in the virtual KVM
/// host. The checks these tests reach come after the VMM creates its KVM VM.
fn with_kvm(test_path: &str, body: impl FnOnce()) {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if kvm.is_ok() {
        body();
    } else {
        common::warm_default_guest();
        forkvm_testhost::on_kvm_host(test_path, body);
    }
}

#[test]
fn unknown_option() {
    rejects(&["boot", "--frobnicate"], &["--frobnicate"]);
}

#[test]
fn bad_disk_spec() {
    rejects(&["boot", "--disk", "a.img,rx"], &["--disk", "rx"]);
    rejects(&["boot", "--disk", ",ro"], &["--disk", "no file"]);
}

#[test]
fn zero_vcpus() {
    rejects(&["boot", "--vcpus", "0"], &["0 vCPUs"]);
}

#[test]
fn too_little_memory() {
    rejects(&["boot", "--mem", "1"], &["1 MiB"]);
}

#[test]
fn too_much_memory() {
    rejects(&["boot", "--mem", "99999999999"], &["99999999999 MiB"]);
}

#[test]
fn missing_kernel() {
    with_kvm(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("no-such-vmlinuz");
        let kernel = kernel.to_str().unwrap();
        rejects(&["boot", "--kernel", kernel], &[kernel]);
    });
}

#[test]
fn corrupt_kernel() {
    with_kvm(forkvm_testhost::test_path!(), || {
        let mut kernel = tempfile::NamedTempFile::new().unwrap();
        // 1 MiB of noise: neither a bzImage nor an ELF.
        let mut x: u32 = 0x1234_5678;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        kernel.write_all(&noise).unwrap();
        let path = kernel.path().to_str().unwrap();
        rejects(&["boot", "--kernel", path], &[path, "not a bootable"]);
    });
}

#[test]
fn initrd_larger_than_memory() {
    with_kvm(forkvm_testhost::test_path!(), || {
        // Room for the default (uncompressed) kernel, none for the initrd.
        let initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.as_file().set_len(160 << 20).unwrap();
        let path = initrd.path().to_str().unwrap();
        rejects(
            &["boot", "--mem", "128", "--initrd", path],
            &[path, "does not fit"],
        );
    });
}

#[test]
fn kernel_larger_than_memory() {
    with_kvm(forkvm_testhost::test_path!(), || {
        rejects(
            &["boot", "--mem", "32"],
            &["needs", "32 MiB", "more memory"],
        );
    });
}

#[test]
fn missing_disk_file() {
    with_kvm(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("no-such-disk.img");
        let disk = disk.to_str().unwrap();
        rejects(&["boot", "--disk", disk], &[disk]);
    });
}
