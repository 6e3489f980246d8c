//! A VM family's pid namespace ([`forkvm_jail::family`]), with `sh` standing for the
//! VM process: run as root (making a pid namespace needs `CAP_SYS_ADMIN`).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkvm_jail::family;
use forkvm_test_support::running_children;

/// Starts `sh -c script` as the first VM process of a family; stdout piped. Returns
/// the child (its stand-in) and the VM process's pid, as the stand-in reports it.
fn start(script: &str) -> (Child, u32) {
    let (child, pid, _) = start_with_pidfd(script);
    (child, pid)
}

/// [`start`], with the pidfd of the VM process its stand-in sent.
fn start_with_pidfd(script: &str) -> (Child, u32, OwnedFd) {
    start_ending(script, family::Ending::none())
}

/// [`start_with_pidfd`] of a family whose init holds and undoes what `ending` says.
fn start_ending(script: &str, ending: family::Ending) -> (Child, u32, OwnedFd) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let report = theirs.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: `split` is made for `pre_exec` (it forks and makes system calls only).
    unsafe { cmd.pre_exec(move || family::split(report, None, &ending)) };
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let (pid, pidfd) = family::read_report(&ours, Duration::from_secs(10)).unwrap();
    (
        child,
        pid,
        pidfd.expect("no pidfd of the VM process came with its pid"),
    )
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn ns(pid: impl std::fmt::Display) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap()
        .display()
        .to_string()
}

/// Waits up to 10 s for process `pid` to end (a zombie has ended).
fn gone(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while forkvm_test_support::is_running(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn the_vm_process_is_pid_2_of_a_new_namespace_and_its_stand_in_ends_as_it_ends() {
    let (mut child, vm) = start("echo $$ $(readlink /proc/self/ns/pid); exit 7");
    assert_ne!(vm, child.id(), "the stand-in reported itself");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7), "{status}");
    let (pid, pid_ns) = line.trim().split_once(' ').unwrap();
    assert_eq!(pid, "2", "{line}");
    assert_ne!(
        pid_ns,
        ns("self"),
        "the VM process is in the launcher's namespace"
    );
}

#[test]
fn fork_children_outlive_their_parent_and_the_family_ends_with_its_last() {
    // The "VM process" starts a "fork child" (a sleep), says its pid, and waits.
    let (mut child, vm) = start("sleep 300 & echo $!; exec sleep 301");
    let stand_in = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "3", "the fork child's pid in the family");
    assert_eq!(comm(stand_in), family::STAND_IN_NAME.to_str().unwrap());
    // The stand-in's children: the family's init and the VM process.
    let kids = running_children(stand_in);
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert!(kids.contains(&vm), "{kids:?} has no {vm}");
    let init = *kids.iter().find(|&&p| p != vm).unwrap();
    // It names itself (once it runs its loop).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while comm(init) != family::INIT_NAME.to_str().unwrap() {
        assert!(std::time::Instant::now() < deadline, "{}", comm(init));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ns(vm), ns(init));
    assert_ne!(ns(vm), ns("self"));
    // Named in `ps`, command line too (not taken for the launcher), the init in a
    // session of its own (not among the launcher's processes).
    for (pid, name) in [(init, family::INIT_NAME), (stand_in, family::STAND_IN_NAME)] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmdline.starts_with(name.to_bytes())
                && cmdline[name.to_bytes().len()..].iter().all(|&b| b == 0),
            "{pid}: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
    // SAFETY: getsid takes a pid.
    assert_eq!(unsafe { libc::getsid(init as i32) }, init as i32);
    let fork_child = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&c) = running_children(vm).first() {
                break c;
            }
            assert!(std::time::Instant::now() < deadline, "no fork child");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The launcher kills its child, the stand-in: the VM process dies with it.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(gone(vm), "the VM process outlived its stand-in");
    // Its fork child lives on, the init's now, and the init waits for it.
    assert_eq!(forkvm_test_support::parent_of(fork_child), Some(init));
    std::thread::sleep(Duration::from_millis(200));
    assert!(forkvm_test_support::is_running(init), "the init left early");
    // Once it ends too, the init ends, and the namespace with it.
    forkvm_test_support::sigkill(fork_child);
    assert!(gone(fork_child));
    assert!(gone(init), "the family's init outlived its family");
}

#[test]
fn the_vm_process_cannot_signal_a_process_outside_its_family() {
    let me = std::process::id();
    let (mut child, _) = start(&format!(
        "kill -0 {me} 2>/dev/null && echo reached || echo unreachable"
    ));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.wait().unwrap();
    assert_eq!(line.trim(), "unreachable");
    // The same shell outside a family reaches it (root signals root).
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("kill -0 {me} 2>/dev/null && echo reached || echo unreachable"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reached");
}

#[test]
fn a_launcher_starts_its_vm_processes_in_one_family_and_still_starts_threads() {
    assert!(
        family::start_here(family::Ending::none()).unwrap(),
        "no pid namespace made"
    );
    let start = || {
        family::spawning(|| {
            Command::new("sh")
                .args(["-c", "echo $$"])
                .stdout(Stdio::piped())
                .spawn()
        })
        .unwrap()
    };
    let (a, b) = (start(), start());
    let (a_pid, b_pid) = (a.id(), b.id());
    let (a_ns, b_ns) = (ns(a_pid), ns(b_pid));
    let a_out = a.wait_with_output().unwrap();
    let b_out = b.wait_with_output().unwrap();
    // Pids of the family's namespace (its init is 1), the same namespace, not ours.
    let own: Vec<u32> = [a_out, b_out]
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
        .collect();
    assert!(own.iter().all(|&p| p > 1 && p < 100), "{own:?}");
    assert_eq!(a_ns, b_ns);
    assert_ne!(a_ns, ns("self"));
    // Its init, a child of this process, in that namespace.
    let init = running_children(std::process::id())
        .into_iter()
        .find(|&p| comm(p) == family::INIT_NAME.to_str().unwrap())
        .expect("the family's init");
    assert_eq!(ns(init), a_ns);
    // This thread starts threads and processes of its own namespace as before.
    std::thread::spawn(|| ()).join().unwrap();
    let out = Command::new("sh")
        .args(["-c", "readlink /proc/self/ns/pid"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ns("self"));
}

#[test]
fn the_stand_in_ends_by_the_signal_that_ended_the_vm_process() {
    // SIGINT: one a terminal sends, which the stand-in itself ignores.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let (mut child, _) = start(&format!("kill -{sig} $$"));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig), "{status}");
        assert!(!status.core_dumped(), "{status}");
    }
}

/// Set for the launcher the test below runs as a process of its own.
const LAUNCHER: &str = "FORKVM_JAIL_TEST_FAMILY_LAUNCHER";

#[test]
fn a_launchers_children_outlive_it_and_its_family_ends_with_them() {
    if std::env::var_os(LAUNCHER).is_some() {
        // The launcher: starts a "VM process" in its family, says its pid and ends.
        assert!(family::start_here(family::Ending::none()).unwrap());
        #[allow(
            clippy::zombie_processes,
            reason = "the launcher ends first, on purpose"
        )]
        let child = family::spawning(|| {
            Command::new("sleep")
                .arg("300")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .unwrap();
        println!("child {}", child.id());
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "--nocapture",
            "a_launchers_children_outlive_it_and_its_family_ends_with_them",
        ])
        .env(LAUNCHER, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let child: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("child "))
        .expect("the launcher's child")
        .parse()
        .unwrap();
    let family_ns = ns(child);
    assert_ne!(family_ns, ns("self"));
    // The family's init, now nobody's child but init's: the one in that namespace.
    let init = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&p| comm(p) == family::INIT_NAME.to_str().unwrap() && ns(p) == family_ns)
        .expect("the family's init");
    // The launcher is gone, its child lives on (reparented outside the namespace), and
    // the init with it: longer than the init's look for its family's processes.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        forkvm_test_support::is_running(child),
        "the child died with its launcher"
    );
    assert!(
        forkvm_test_support::is_running(init),
        "the init left its family"
    );
    forkvm_test_support::sigkill(child);
    assert!(gone(init), "the init outlived its family");
}

#[test]
fn the_launcher_gets_a_pidfd_of_the_vm_process_that_stays_its_own_once_it_ended() {
    let (mut child, vm, pidfd) = start_with_pidfd("read _; exit 3");
    let fdinfo = |fd: &OwnedFd| {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap()
    };
    assert!(
        fdinfo(&pidfd).lines().any(|l| l == format!("Pid:\t{vm}")),
        "the pidfd names another process than {vm}: {}",
        fdinfo(&pidfd)
    );
    assert_eq!(comm(vm), "sh");
    // Closing its stdin ends it (`read` gets end of file).
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(3));
    // Ended and reaped by its stand-in: the pidfd says so, whatever now has its number.
    let mut p = [libc::pollfd {
        fd: pidfd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one pollfd, of a descriptor this test holds.
    assert_eq!(unsafe { libc::poll(p.as_mut_ptr(), 1, 0) }, 1);
    assert!(
        fdinfo(&pidfd).lines().any(|l| l == "Pid:\t-1"),
        "{}",
        fdinfo(&pidfd)
    );
}

#[test]
fn the_init_holds_the_familys_lock_and_removes_its_group_once_the_family_ended() {
    let dir = tempfile::tempdir().unwrap();
    let group = dir.path().join("family-1");
    std::fs::create_dir_all(group.join("exited")).unwrap();
    let lock_path = dir.path().join("lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    // SAFETY: flock on a descriptor this test holds.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let ending = family::Ending::holding(lock.as_raw_fd(), &group);
    let (mut child, _vm, _pidfd) = start_ending("read _; exit 0", ending);
    // This process's copy goes; the family's init holds the lock's on.
    drop(lock);
    let free = || {
        let l = std::fs::File::open(&lock_path).unwrap();
        // SAFETY: flock on a descriptor of this closure (closing it unlocks).
        unsafe { libc::flock(l.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    };
    assert!(!free(), "the lock was free while the family lived");
    assert!(group.exists());
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // (The init removes the group, then ends, which lets the lock go.)
    while (group.exists() || !free()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!group.exists(), "the family's group outlived the family");
    assert!(free(), "the lock stayed held after the family ended");
}
