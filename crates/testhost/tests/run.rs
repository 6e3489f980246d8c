//! Owns the `run_in_kvm_host` integration tests: exit code and output of a
//! command in the virtual host, the timeout path (QEMU killed, nothing left
//! behind), and the same contract in direct mode.

use std::fs;
use std::time::{Duration, Instant};

use forkvm_testhost::{run_in_kvm_host, Error, HostChoice, Mode, TestHostOptions};

/// Held by each test that counts this process's QEMU children: virtual hosts run
/// several at once where the machine has the CPUs, and another test's QEMU is not a
/// leftover.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Child processes of this process whose command name contains `qemu`.
fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) && comm.contains("qemu") {
            found.push(pid);
        }
    }
    found
}

#[test]
fn virtual_host_reports_exit_code_and_output() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if forkvm_testhost::in_test_host() {
        return; // nested virtual hosts are not a thing
    }
    let opts = TestHostOptions {
        host: HostChoice::Virtual,
        timeout: Duration::from_secs(300),
        envs: vec![("FORKVM_TEST_VAR".into(), "it's here".into())],
        ..TestHostOptions::default()
    };
    let script = "echo hello; echo \"$FORKVM_TEST_VAR\"; pwd; \
                  test \"$FORKVM_IN_TESTHOST\" = 1 || echo not-in-testhost; \
                  grep -qw svm /proc/cpuinfo && test -c /dev/kvm && echo svm-kvm; \
                  echo oops >&2; exit 3";
    let out = run_in_kvm_host(&["sh", "-c", script], &opts).expect("virtual host run");
    println!(
        "virtual host round trip: {:.1?}, log {}",
        out.wall,
        out.log_path.display()
    );
    assert_eq!(out.mode, Mode::Virtual);
    assert_eq!(out.exit_code, 3, "{out:?}");
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        out.stdout,
        format!("hello\nit's here\n{}\nsvm-kvm\n", cwd.display()),
        "{out:?}"
    );
    assert_eq!(out.stderr, "oops\n");
    let log = fs::read_to_string(&out.log_path).unwrap();
    assert!(
        log.contains("Linux version"),
        "kernel console missing from the log"
    );
    assert!(qemu_children().is_empty());
}

#[test]
fn virtual_host_timeout_kills_qemu() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if forkvm_testhost::in_test_host() {
        return;
    }
    let opts = TestHostOptions {
        host: HostChoice::Virtual,
        timeout: Duration::from_secs(2),
        ..TestHostOptions::default()
    };
    let start = Instant::now();
    let err = run_in_kvm_host(&["sleep", "1000"], &opts).expect_err("must time out");
    match &err {
        Error::TimedOut { log_path, .. } => assert!(log_path.exists(), "{err}"),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    // Lock wait for other tests may come first; the run itself must stop soon.
    assert!(start.elapsed() < Duration::from_secs(290));
    assert_eq!(qemu_children(), Vec::<u32>::new(), "qemu left running");
}

/// A virtual host that stops writing its heartbeat is killed as stalled, long before
/// the timeout.
#[test]
fn virtual_host_without_a_heartbeat_is_stalled() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if forkvm_testhost::in_test_host() {
        return;
    }
    let opts = TestHostOptions {
        host: HostChoice::Virtual,
        timeout: Duration::from_secs(600),
        stall_after: Duration::from_secs(20),
        ..TestHostOptions::default()
    };
    // Stops the heartbeat's shell, as a frozen virtual host would.
    let cmd = [
        "sh",
        "-c",
        "echo before the stall; pkill -STOP -f /bin/[h]eartbeat; sleep 1000",
    ];
    let start = Instant::now();
    let err = run_in_kvm_host(&cmd, &opts).expect_err("must stall");
    match &err {
        Error::Stalled { silent, log_path } => {
            assert!(*silent > Duration::from_secs(20), "{err}");
            let log = fs::read_to_string(log_path).unwrap();
            assert!(log.contains("no heartbeat"), "{log}");
            // What the command printed, what QEMU's vCPU thread was doing and its
            // registers (from QEMU's monitor).
            assert!(log.contains("before the stall"), "{log}");
            assert!(log.contains("CPU 0/TCG"), "{log}");
            assert!(log.contains("RIP="), "{log}");
            // Woken by an NMI first (this host is not frozen, its heartbeat stopped:
            // the NMI changes nothing and it is killed after the wait).
            assert!(log.contains("NMI sent (ok)"), "{log}");
            assert!(log.contains("after the NMI either"), "{log}");
        }
        other => panic!("expected Stalled, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(400),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(qemu_children(), Vec::<u32>::new(), "qemu left running");
}

#[test]
fn direct_mode_same_contract() {
    let opts = TestHostOptions {
        host: HostChoice::Direct,
        timeout: Duration::from_secs(30),
        envs: vec![("X".into(), "y".into())],
        ..TestHostOptions::default()
    };
    let out = run_in_kvm_host(&["sh", "-c", "echo $X; echo e >&2; exit 7"], &opts).unwrap();
    assert_eq!(
        (
            out.mode,
            out.exit_code,
            out.stdout.as_str(),
            out.stderr.as_str()
        ),
        (Mode::Direct, 7, "y\n", "e\n")
    );
    let opts = TestHostOptions {
        timeout: Duration::from_millis(300),
        ..opts
    };
    let start = Instant::now();
    let err = run_in_kvm_host(&["sh", "-c", "sleep 100; sleep 100"], &opts).unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        run_in_kvm_host::<&str>(&[], &opts),
        Err(Error::EmptyCommand)
    ));
}

#[test]
fn test_path_names_the_test() {
    assert_eq!(forkvm_testhost::test_path!(), "test_path_names_the_test");
}

#[test]
fn on_kvm_host_rejects_a_filter_matching_nothing() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if forkvm_testhost::decide_mode(HostChoice::Auto) == Mode::Direct {
        return; // the body would simply run here; the re-run check needs the virtual host
    }
    let result = std::panic::catch_unwind(|| {
        forkvm_testhost::on_kvm_host("no_such_test_anywhere", || unreachable!("runs inside only"));
    });
    let err = result.expect_err("a filter matching nothing must fail");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(msg.contains("did not run"), "{msg}");
}
