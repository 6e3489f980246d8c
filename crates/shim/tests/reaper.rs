//! The shim's reaper, in a test process of its own (it waits for every child of the
//! process, which would disturb other tests) and in one test (one reaper per process).

// The reaper under test waits for every child; `Child::wait` would race it.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::Duration;

use forkvm_shim::exits::{reap_children, Exits};

#[test]
fn the_reaper_collects_children_and_orphans() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let exits = Exits::new();
    reap_children(exits.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(50)); // the reaper finds no child and sleeps

    // Children spawned after that: exit codes, and 128 + signo for a signal.
    for (script, code) in [("exit 0", 0), ("exit 7", 7), ("kill -9 $$", 137)] {
        let mark = exits.mark();
        let child = Command::new("/bin/sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        exits.spawned();
        let e = exits.wait(child.id() as i32, mark, Some(Duration::from_secs(10)));
        assert_eq!(e.map(|e| e.code), Some(code), "{script}");
    }

    // What a runtime's `create` does: start the container's process, write its pid,
    // exit. The process outlives its parent, reparents to this subreaper, exits 3 later.
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    let mark = exits.mark();
    let runtime = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "sh -c 'sleep 0.3; exit 3' & echo $! > {}",
            pid_file.display()
        ))
        .spawn()
        .unwrap();
    exits.spawned();
    let e = exits
        .wait(runtime.id() as i32, mark, Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(e.code, 0);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let e = exits
        .wait(pid, mark, Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(e.code, 3);
}
