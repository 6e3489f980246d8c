//! A fork pool's warm processes forked by a zygote of the real VM-process executable:
//! they are not the pool's children, they share the executable's relocated pages with
//! the zygote (less private memory than an exec'd one), a dead one is replaced, and
//! nothing outlives the pool. No guest runs: a warm-up that cannot make a KVM VM only
//! logs it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use forkvm_test_support::{is_running, parent_of, running_children};
use forkvm_vmm::pool::{ChildPool, Maker};
use forkvm_vmm::warm::Warmup;

const VMM: &str = env!("CARGO_BIN_EXE_forkvm-vmm");

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The live processes whose parent is this test process and that run `forkvm-vmm`.
fn vmm_children() -> Vec<u32> {
    running_children(std::process::id())
        .into_iter()
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "forkvm-vmm"))
        })
        .collect()
}

fn private_dirty_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Private_Dirty:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Private_Dirty in smaps_rollup")
}

fn warmup() -> Warmup {
    Warmup {
        vcpus: 1,
        stage: None,
        jail: None,
        places: Default::default(),
        memory: None,
        devices: None,
    }
}

fn full_pool(maker: Maker, size: usize) -> ChildPool {
    let pool = ChildPool::start(size as u32, warmup(), maker).unwrap();
    wait_until("the pool to fill", || pool.pids().len() == size);
    pool
}

#[test]
fn a_zygote_forks_the_warm_processes_and_nothing_outlives_the_pool() {
    let before = vmm_children();
    let pool = full_pool(Maker::Zygote(PathBuf::from(VMM)), 2);
    let warm = pool.pids();
    // Forked by the zygote's helper, which exited: not this process's children.
    for &pid in &warm {
        assert!(is_running(pid));
        assert_ne!(
            parent_of(pid),
            Some(std::process::id()),
            "{pid} was exec'd by the pool"
        );
    }
    let zygotes: Vec<u32> = vmm_children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(zygotes.len(), 1, "one zygote per pool: {zygotes:?}");
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm(zygotes[0]).trim(), "forkvm-zygote");
    assert_eq!(comm(warm[0]).trim(), "forkvm-vmm");

    // A warm process that dies is replaced by a new fork of the same zygote.
    forkvm_test_support::sigkill(warm[0]);
    wait_until("the dead process to go", || !is_running(warm[0]));
    let taken = pool.take().expect("the live warm process");
    assert_eq!(taken.pid(), warm[1]);
    pool.refill();
    wait_until("the pool to refill", || pool.pids().len() == 2);
    assert!(pool.pids().iter().all(|p| !warm.contains(p)));
    assert!(is_running(zygotes[0]), "the zygote was replaced");

    // A taken process ends when its launcher drops it without a launch.
    let taken_pid = taken.pid();
    drop(taken);
    wait_until("the abandoned process to exit", || !is_running(taken_pid));

    let left = pool.pids();
    drop(pool);
    for pid in left.iter().chain(&zygotes) {
        wait_until("a pool's process to end with it", || !is_running(*pid));
    }

    // (In the same test: another test's pool would be one more child of this process.)
    a_forked_warm_process_shares_what_an_execd_one_holds_alone();
}

fn a_forked_warm_process_shares_what_an_execd_one_holds_alone() {
    let forked = full_pool(Maker::Zygote(PathBuf::from(VMM)), 1);
    let execd = full_pool(Maker::Exec(PathBuf::from(VMM)), 1);
    // Both have done their warm-up (or given up on it) by now.
    std::thread::sleep(Duration::from_millis(500));
    let (f, e) = (
        private_dirty_kib(forked.pids()[0]),
        private_dirty_kib(execd.pids()[0]),
    );
    eprintln!("private dirty: forked {f} KiB, exec'd {e} KiB");
    assert!(
        f + 128 < e,
        "a forked warm process holds {f} KiB private, an exec'd one {e} KiB"
    );
}
