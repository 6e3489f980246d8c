//! The container's holder (`forkvm_oci::runtime::holder`), started from this test as
//! `create` starts it (this process stands for the monitor): its namespaces, its exit
//! code, its set-up failures. Needs root (it makes pid, cgroup and user namespaces);
//! runs on this host, no VM.

use std::os::fd::{IntoRawFd, OwnedFd};

use forkvm_agent_proto::{IdMapping, UserNamespace};
use forkvm_oci::bundle::HolderNamespaces;
use forkvm_oci::runtime::holder::{Holder, MonitorLink, EXIT_MONITOR_GONE};

const RUNTIME: &str = env!("CARGO_BIN_EXE_forkvm-runtime");

fn user(uid_host: u32, gid_host: u32) -> UserNamespace {
    let map = |host_id| IdMapping {
        container_id: 0,
        host_id,
        size: 1000,
    };
    UserNamespace {
        uid_mappings: vec![map(uid_host)],
        gid_mappings: vec![map(gid_host)],
    }
}

fn ns_link(pid: impl std::fmt::Display, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Starts a holder of this process (as its monitor) and the monitor's end of the link.
fn start(ns: &HolderNamespaces, join: &[libc::c_int]) -> anyhow::Result<(Holder, MonitorLink)> {
    let (ours, its) = std::os::unix::net::UnixStream::pair().unwrap();
    let exe = std::fs::File::open(RUNTIME).unwrap();
    let me = std::process::id();
    let holder = Holder::start(
        (&exe, RUNTIME),
        "c1",
        me,
        join,
        ns,
        OwnedFd::from(its),
        None,
    )?;
    let link = MonitorLink::adopt(OwnedFd::from(ours).into_raw_fd()).unwrap();
    Ok((holder, link))
}

/// Waits for the holder: its exit code, or the signal that ended it (negative).
fn wait(holder: &Holder) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child, writing only `status`.
    let reaped = unsafe { libc::waitpid(holder.pid(), &mut status, 0) };
    assert_eq!(reaped, holder.pid());
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    }
}

/// Field `key` of `/proc/<pid>/status`, split at whitespace.
fn status_field(pid: i32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().skip(1).map(str::to_owned).collect()
}

#[test]
fn a_holder_is_in_new_pid_cgroup_and_user_namespaces_and_exits_with_the_code() {
    let ns = HolderNamespaces {
        pid: true,
        cgroup: true,
        user: Some(user(1000, 2000)),
    };
    let (holder, link) = start(&ns, &[libc::CLONE_NEWUTS]).unwrap();
    let it = holder.pid();
    for kind in ["pid", "cgroup", "user"] {
        assert_ne!(ns_link("self", kind), ns_link(it, kind), "{kind}");
    }
    // The ones it joined (the "monitor"'s, here this process's) and inherited.
    for kind in ["uts", "net", "mnt", "ipc"] {
        assert_eq!(ns_link("self", kind), ns_link(it, kind), "{kind}");
    }
    assert_eq!(
        status_field(it, "NSpid:"),
        [it.to_string(), "1".into()],
        "its pid namespace's init"
    );
    let map = |file: &str| {
        let text = std::fs::read_to_string(format!("/proc/{it}/{file}")).unwrap();
        text.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(map("uid_map"), ["0", "1000", "1000"]);
    assert_eq!(map("gid_map"), ["0", "2000", "1000"]);
    // It runs this binary's hidden verb, in a session of its own, in `/`, holding
    // nothing of ours but its end of the link (its set-up closes the rest: wait for it).
    let cmdline = std::fs::read(format!("/proc/{it}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.starts_with(&format!("{RUNTIME} __hold ")),
        "{cmdline}"
    );
    assert!(cmdline.ends_with(" c1 "), "{cmdline}");
    let fds = || std::fs::read_dir(format!("/proc/{it}/fd")).unwrap().count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fds() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "it holds {} descriptors",
            fds()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(status_field(it, "NSsid:")[0], it.to_string());
    assert_eq!(
        std::fs::read_link(format!("/proc/{it}/cwd")).unwrap(),
        std::path::Path::new("/")
    );
    link.exit(7);
    assert_eq!(wait(&holder), 7);
}

#[test]
fn a_holder_whose_monitor_ends_without_a_code_exits_as_a_failed_vm() {
    let ns = HolderNamespaces {
        pid: true,
        ..Default::default()
    };
    let (holder, link) = start(&ns, &[]).unwrap();
    drop(link);
    assert_eq!(wait(&holder), EXIT_MONITOR_GONE);
    // SIGKILL reaches the init of its namespace from outside.
    let (holder, _link) = start(&ns, &[]).unwrap();
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(holder.pid(), libc::SIGKILL) }, 0);
    assert_eq!(wait(&holder), -libc::SIGKILL);
}

#[test]
fn a_holder_that_is_no_init_takes_no_signal_but_sigkill() {
    // A cgroup namespace only: it stays in this pid namespace, where a SIGTERM would
    // end a process that left it to its default action.
    let ns = HolderNamespaces {
        cgroup: true,
        ..Default::default()
    };
    let (holder, link) = start(&ns, &[libc::CLONE_NEWNET]).unwrap();
    assert_eq!(
        status_field(holder.pid(), "NSpid:").len(),
        1,
        "not in a pid namespace of its own"
    );
    // Its set-up done (it blocked signals before it reported).
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(holder.pid(), sig) }, 0);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    link.exit(5);
    assert_eq!(wait(&holder), 5, "a signal ended it");
}

#[test]
fn a_holder_that_cannot_be_set_up_is_named() {
    // Overlapping ranges: the kernel refuses the map.
    let mut bad = user(1000, 1000);
    bad.uid_mappings.push(IdMapping {
        container_id: 10,
        host_id: 5000,
        size: 1,
    });
    let ns = HolderNamespaces {
        user: Some(bad),
        ..Default::default()
    };
    let e = format!("{:#}", start(&ns, &[]).unwrap_err());
    assert!(
        e.contains("uid_map (0 1000 1000, 10 5000 1): Invalid argument"),
        "{e}"
    );
    let e = format!("{:#}", start(&ns, &[libc::CLONE_NEWPID]).unwrap_err());
    assert!(e.contains("cannot join namespace type"), "{e}");
}
