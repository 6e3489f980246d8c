//! A VM family's pid namespace ([`forkvm_jail::family`]), with `sh` standing for the
//! VM process: run as root (making a pid namespace needs `CAP_SYS_ADMIN`).

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkvm_jail::family;
use forkvm_test_support::running_children;

/// Starts `sh -c script` as the first VM process of a family; stdout piped.
fn start(script: &str) -> Child {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]).stdout(Stdio::piped());
    // SAFETY: `split` is made for `pre_exec` (it forks and makes system calls only).
    unsafe { cmd.pre_exec(|| family::split()) };
    cmd.spawn().unwrap()
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
    let mut child = start("echo $$ $(readlink /proc/self/ns/pid); exit 7");
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
    let mut child = start("sleep 300 & echo $!; exec sleep 301");
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
    let init = *kids
        .iter()
        .find(|&&p| comm(p) == family::INIT_NAME.to_str().unwrap())
        .expect("the family's init");
    let vm = *kids.iter().find(|&&p| p != init).unwrap();
    assert_eq!(ns(vm), ns(init));
    assert_ne!(ns(vm), ns("self"));
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
    let mut child = start(&format!(
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
    assert!(family::start_here().unwrap(), "no pid namespace made");
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
