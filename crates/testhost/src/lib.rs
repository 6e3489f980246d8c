//! Owns the virtual KVM test host: run a command where a hardware-accelerated
//! `/dev/kvm` exists — directly when this machine has one, otherwise inside a
//! QEMU/TCG machine emulating an AMD EPYC with SVM, booting Debian's kernel,
//! in which `/dev/kvm` is a genuine (nested) SVM KVM.
//!
//! # Virtual host
//!
//! The L1 kernel is Debian's `linux-image-amd64` (fetched into the forkvm cache
//! by [`forkvm_guest_kernel::ensure_kernel`]); a busybox initramfs (cached by
//! content hash) loads the virtio-pci, 9p and `kvm_amd` module chains, mounts the
//! host's `/` read-only over 9p, mounts `proc`, `sys`, `dev`, and tmpfs on
//! `/tmp` and `/run` in it, mounts a per-run host scratch directory read-write
//! at the same absolute path, moves that root onto `/` (so that a process joining
//! a mount namespace lands on the host's files, as on a host) and chroots into
//! it, `cd`s to the working directory and runs
//! the command with this process's environment plus `FORKVM_IN_TESTHOST=1` and the
//! requested variables. Output goes to files in the scratch directory, which
//! the host reads (and tails live with [`TestHostOptions::stream`]); the kernel
//! console goes to a per-run log under `<cache>/testhost/logs/`.
//! At most one virtual host per CPU of this machine runs at a time, as far as its memory
//! holds 7 GiB per host (flocks on `<cache>/testhost/lock.<n>`;
//! `FORKVM_TESTHOST_SLOTS` sets another number).
//!
//! The virtual host writes a heartbeat every 10 s. One silent for 45 s has
//! frozen (under QEMU 7.2, every 15 to 30 minutes of nested-VM work on some days; none
//! seen yet under QEMU 10, which `scripts/setup.sh` installs): its log gets what QEMU's
//! threads and vCPU were doing, it is sent an NMI, then killed, and [`on_kvm_host`]
//! runs the test again.
//!
//! `FORKVM_TESTHOST=force` forces the virtual host even with hardware KVM;
//! `FORKVM_TESTHOST=never` always runs directly.
//!
//! # Integration tests that need KVM
//!
//! In another crate, add `forkvm-testhost = { workspace = true }` under
//! `[dev-dependencies]`, then wrap the test body:
//!
//! ```no_run
//! #[test]
//! fn boots_a_guest() {
//!     forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
//!         let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
//!         // ... the real test, with a hardware-accelerated KVM ...
//!         # let _ = kvm;
//!     });
//! }
//! ```
//!
//! On a machine with hardware KVM (or inside the virtual host) the body runs
//! right away. Otherwise the test executable re-runs itself in the virtual
//! host with `<test path> --exact --include-ignored --nocapture --test-threads=1`; the outer
//! test prints the inner output and fails if the inner test failed or did not
//! run at all. The inner run sees `/` read-only except `/tmp`, `/run`, `/dev/shm`
//! (guest tmpfs); use `tempfile` for scratch files. [`test_path!`] names the
//! enclosing test function as libtest does; a literal like `"my_test"` or
//! `"module::my_test"` works too.

mod caps;
mod error;
mod run;
mod stall;
mod virt;

use std::time::Duration;

pub use caps::{in_test_host, parse_cpu_flags, Capabilities, CpuFlags};
pub use error::Error;
pub use run::{
    decide_mode, run_in_kvm_host, HostChoice, Mode, Outcome, TestHostOptions, DEFAULT_SMP,
};
pub use virt::{prepare_initramfs, virtual_host_slots, TESTHOST_MODULES};

/// Names the enclosing test function the way libtest does (`module::test`,
/// without the crate name), for [`on_kvm_host`].
/// For a test whose body must not run beside another such body on one host (engines
/// that publish the same host ports, checks that count processes host-wide): a guard
/// that makes them take turns where the bodies run directly on this machine (hardware
/// KVM, or inside the virtual host), and `None` where each runs in a virtual host of
/// its own (they may then run side by side). Take it before [`on_kvm_host_with`].
pub fn alone_on_this_host() -> Option<std::sync::MutexGuard<'static, ()>> {
    static DIRECT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    (decide_mode(HostChoice::Auto) == Mode::Direct).then(|| {
        DIRECT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
}

#[macro_export]
macro_rules! test_path {
    () => {{
        fn __forkvm_here() {}
        fn __forkvm_name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let full = __forkvm_name_of(__forkvm_here);
        let full = full.strip_suffix("::__forkvm_here").unwrap_or(full);
        match full.split_once("::") {
            Some((_crate, rest)) => rest,
            None => full,
        }
    }};
}

/// How many times [`on_kvm_host`] starts the virtual host for one test when a run times
/// out or the host dies.
const TESTHOST_ATTEMPTS: u32 = 2;
/// How many times when the virtual host stalls (detected within a minute by its
/// heartbeat, so a third try costs little).
const TESTHOST_STALL_ATTEMPTS: u32 = 3;

/// How many runs a test gets in all when a run fails with `e`.
fn attempts_for(e: &Error) -> u32 {
    match e {
        Error::Stalled { .. } => TESTHOST_STALL_ATTEMPTS,
        Error::TimedOut { .. } | Error::NoExitCode { .. } => TESTHOST_ATTEMPTS,
        _ => 1,
    }
}

/// Runs a test body where hardware KVM exists (see the crate docs).
///
/// `test_path` is the libtest name of the calling test (use [`test_path!`]).
/// The virtual run's timeout is 300 s unless `FORKVM_TESTHOST_TIMEOUT` (seconds)
/// says otherwise; a run that times out, or whose virtual host dies without the test's
/// exit code, is started once more (and reported).
///
/// # Panics
///
/// When the inner run cannot start, times out, exits non-zero, or does not
/// report exactly one passed test.
pub fn on_kvm_host(test_path: &str, body: impl FnOnce()) {
    on_kvm_host_with(test_path, Duration::from_secs(300), None, body)
}

/// [`on_kvm_host`] for a long session: `timeout` for each virtual run (still overridden
/// by `FORKVM_TESTHOST_TIMEOUT`) and, when given, `mem_mib` of virtual host memory (a
/// container engine and the VMs it starts need more than the default).
///
/// # Panics
///
/// As [`on_kvm_host`].
pub fn on_kvm_host_with(
    test_path: &str,
    timeout: Duration,
    mem_mib: Option<u32>,
    body: impl FnOnce(),
) {
    if decide_mode(HostChoice::Auto) == Mode::Direct {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("cannot locate the current test executable");
    let timeout = std::env::var("FORKVM_TESTHOST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(timeout, Duration::from_secs);
    let mut opts = TestHostOptions {
        timeout,
        ..TestHostOptions::default()
    };
    if let Some(mem) = mem_mib {
        opts.mem_mib = mem;
    }
    let cmd = [
        exe.into_os_string(),
        test_path.into(),
        "--exact".into(),
        // The one test this run is for, even one ignored unless asked for by name: this
        // outer run of it was asked for.
        "--include-ignored".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    println!("forkvm-testhost: running `{test_path}` in the virtual KVM host");
    let mut attempt = 1;
    let out = loop {
        match run_in_kvm_host(&cmd, &opts) {
            Ok(out) => break out,
            // The nested, emulated host occasionally stalls or its kernel crashes (seen:
            // kernel stack overflows in page-fault and 9p paths) with no test outcome; a
            // second run, said out loud, tells that apart from a test that hangs or
            // takes the host down, which does it again and fails.
            Err(e) if attempt < attempts_for(&e) => {
                println!(
                    "forkvm-testhost: `{test_path}` attempt {attempt}: {e}; the virtual host \
                     stalled or crashed, or the test hung: running it once more"
                );
                attempt += 1;
            }
            Err(e) => {
                let mut msg = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    msg = format!("{msg}: {c}");
                    cause = c.source();
                }
                panic!("forkvm-testhost: virtual host run of `{test_path}` failed: {msg}")
            }
        }
    };
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    println!(
        "forkvm-testhost: `{test_path}` exited {} in the virtual host after {:.1?}; log: {}",
        out.exit_code,
        out.wall,
        out.log_path.display()
    );
    assert!(
        out.exit_code == 0,
        "forkvm-testhost: `{test_path}` failed in the virtual host (exit code {})\n\
         --- stdout ---\n{}\n--- stderr ---\n{}\n--- log: {}",
        out.exit_code,
        out.stdout,
        out.stderr,
        out.log_path.display()
    );
    assert!(
        out.stdout.contains("test result: ok. 1 passed;"),
        "forkvm-testhost: `{test_path}` did not run in the virtual host (no test matched the filter?)\n\
         --- stdout ---\n{}\n--- stderr ---\n{}\n--- log: {}",
        out.stdout,
        out.stderr,
        out.log_path.display()
    );
}
