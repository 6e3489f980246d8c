//! End to end, in a KVM host: virtio-blk disks given with `--disk`. The guest reads a
//! read-only disk byte for byte, its writes to a writable disk reach the image file, and
//! it cannot write to the read-only one.

mod common;

use common::{
    assert_clean_guest_run, guest_cmdline, run_forkvm, sh, warm_default_guest, GUEST_TIMEOUT,
};

const DISK_SIZE: usize = 1 << 20;
const MARK: &str = "forkvm-wrote-this";

/// Bytes no filesystem tool would produce by accident.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

#[test]
fn guest_reads_and_writes_disks_and_cannot_write_a_read_only_one() {
    warm_default_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro.img");
        let rw = dir.path().join("rw.img");
        let data = pattern(DISK_SIZE);
        std::fs::write(&ro, &data).unwrap();
        std::fs::write(&rw, vec![0u8; DISK_SIZE]).unwrap();
        let ro_sum = sh("sha256sum", &[ro.to_str().unwrap()]);
        let ro_sum = ro_sum.split_whitespace().next().unwrap().to_owned();

        // vda (read-only): checksum the whole disk; copy its first 64 KiB to vdb at
        // 64 KiB; write a marker at the start of vdb; then try to overwrite vda.
        let script = format!(
            "echo vda-ro=$(cat /sys/block/vda/ro) vdb-ro=$(cat /sys/block/vdb/ro); \
             sha256sum /dev/vda; \
             dd if=/dev/vda of=/dev/vdb bs=4096 count=16 seek=16 conv=fsync && echo copy-ok; \
             printf {MARK} | dd of=/dev/vdb conv=fsync && echo mark-ok; \
             if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync; \
             then echo ro-write-succeeded; else echo ro-write-refused; fi"
        );
        let out = run_forkvm(
            &[
                "boot",
                "--disk",
                &format!("{},ro", ro.display()),
                "--disk",
                rw.to_str().unwrap(),
                "--cmdline",
                &guest_cmdline(&script),
            ],
            GUEST_TIMEOUT,
        );
        assert_clean_guest_run(&out);
        assert!(out.stdout.contains("vda-ro=1 vdb-ro=0"), "{out}");
        assert!(
            out.stdout.contains(&format!("{ro_sum}  /dev/vda")),
            "the guest read different bytes from vda (host sha256 {ro_sum})\n{out}"
        );
        assert!(out.stdout.contains("copy-ok"), "{out}");
        assert!(out.stdout.contains("mark-ok"), "{out}");
        assert!(out.stdout.contains("ro-write-refused"), "{out}");

        let after = std::fs::read(&ro).unwrap();
        assert!(after == data, "the read-only image changed");
        let written = std::fs::read(&rw).unwrap();
        assert_eq!(written.len(), DISK_SIZE, "the writable image changed size");
        assert_eq!(&written[..MARK.len()], MARK.as_bytes(), "marker at 0");
        assert!(
            written[MARK.len()..64 << 10].iter().all(|&b| b == 0),
            "bytes after the marker changed"
        );
        assert!(
            written[64 << 10..128 << 10] == data[..64 << 10],
            "the copy of vda's first 64 KiB is not at 64 KiB in the writable image"
        );
        assert!(
            written[128 << 10..].iter().all(|&b| b == 0),
            "bytes after the copy changed"
        );
    });
}
