//! Warm child VMs: VM processes a forking VM starts ahead of time, so that a fork does
//! not wait for them.
//!
//! A fork child's start used to be all on the fork's latency: exec the VM-process
//! executable, create the KVM VM with its irqchip and PIT, create and configure each
//! vCPU (CPUID, MSRs), then map memory and restore state. A [`ChildPool`] does the
//! first part before anyone asks: it keeps `size` VM processes started with a
//! [`Warmup`], each of which has made a [`Prepared`](crate::warm::Prepared) VM (KVM VM, irqchip, PIT, the
//! vCPU fds with CPUID and MSRs set; see [`crate::warm`]) and waits on its launch
//! socket. A fork hands a warm
//! process the memory files and the encoded state; it maps memory, writes the state into
//! what it prepared and runs. The pool is refilled after each fork, in the background.
//!
//! A warm process lives only as long as its socket to the pool: when the forking VM
//! ends (or is killed), the socket closes and the waiting process exits. One that dies
//! while waiting is dropped when the pool next looks at it, never handed out.
//!
//! Cost: each waiting process is one idle `forkvm-vmm` (measured: 0.56 MiB private,
//! the rest of its ~4.4 MiB resident shared with every other `forkvm-vmm`) plus the
//! kernel's memory for one empty KVM VM and its vCPUs; no guest memory.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::launch::VmProcess;
use crate::warm::Warmup;

/// Warm processes a VM keeps once it forks, unless configured otherwise.
pub const DEFAULT_FORK_POOL: u32 = 2;
/// Most warm processes one VM may keep (as many as one fork may ask for).
pub const MAX_FORK_POOL: u32 = crate::fork::MAX_CHILDREN;
/// How long the pool waits before trying again after a warm process failed to start.
const RETRY_AFTER: Duration = Duration::from_secs(5);

struct PoolState {
    /// Oldest first.
    ready: VecDeque<VmProcess>,
    closed: bool,
}

struct Shared {
    size: usize,
    warmup: Warmup,
    exe: PathBuf,
    state: Mutex<PoolState>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Warm VM processes waiting to become one VM's fork children (see the module
/// documentation).
pub struct ChildPool {
    shared: Arc<Shared>,
    filler: Option<JoinHandle<()>>,
}

impl ChildPool {
    /// A pool that keeps `size` processes of `exe` warmed up as `warmup` says, and
    /// starts filling it.
    pub fn start(size: u32, warmup: Warmup, exe: PathBuf) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            size: size.min(MAX_FORK_POOL) as usize,
            warmup,
            exe,
            state: Mutex::new(PoolState {
                ready: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fork-pool".into())
                .spawn(move || fill(&shared))?
        };
        Ok(Self {
            shared,
            filler: Some(filler),
        })
    }

    /// The oldest warm process that is still alive (the most surely done preparing), if
    /// one is ready; dead ones are dropped on the way. The pool is not refilled until
    /// [`ChildPool::refill`] (after the fork, so that starting new processes does not
    /// compete with the children's start).
    pub fn take(&self) -> Option<VmProcess> {
        let mut state = self.shared.lock();
        while let Some(mut p) = state.ready.pop_front() {
            if p.is_alive() {
                return Some(p);
            }
            tracing::warn!(pid = p.pid(), "a warm fork process died while waiting");
        }
        None
    }

    /// Starts replacing what was taken (and what died), in the background.
    pub fn refill(&self) {
        self.shared.wake.notify_all();
    }

    /// The process IDs of the warm processes waiting now.
    pub fn pids(&self) -> Vec<u32> {
        self.shared
            .lock()
            .ready
            .iter()
            .map(VmProcess::pid)
            .collect()
    }
}

/// The filler thread: keeps `shared.size` live processes ready until the pool closes.
fn fill(shared: &Shared) {
    loop {
        {
            let mut state = shared.lock();
            state.ready.retain_mut(VmProcess::is_alive);
            while !state.closed && state.ready.len() >= shared.size {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                state.ready.retain_mut(VmProcess::is_alive);
            }
            if state.closed {
                return;
            }
        }
        match VmProcess::spawn_warm(&shared.exe, &shared.warmup) {
            Ok(p) => {
                let mut state = shared.lock();
                if state.closed {
                    drop(state);
                    p.kill();
                    return;
                }
                state.ready.push_back(p);
            }
            Err(e) => {
                tracing::warn!("cannot start a warm fork process: {e}");
                let state = shared.lock();
                let _ = shared
                    .wake
                    .wait_timeout_while(state, RETRY_AFTER, |s| !s.closed);
            }
        }
    }
}

impl Drop for ChildPool {
    fn drop(&mut self) {
        let ready = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.ready)
        };
        self.shared.wake.notify_all();
        for p in ready {
            p.kill();
        }
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use forkvm_test_support::{is_running as running, sigkill as kill};

    use super::*;

    /// A stand-in for the VM-process executable that just waits.
    fn waiter(dir: &std::path::Path) -> PathBuf {
        let exe = dir.join("forkvm-vmm");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_dead_warm_process_is_replaced_and_never_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start(2, Warmup { vcpus: 1 }, waiter(dir.path())).unwrap();
        wait_until("the pool to fill", || pool.pids().len() == 2);
        let before = pool.pids();
        kill(before[1]);
        wait_until("the process to die", || !running(before[1]));

        // Only the live one is handed out.
        let mut taken = pool.take().expect("a live warm process");
        assert_eq!(taken.pid(), before[0]);
        assert!(taken.is_alive());
        assert!(pool.take().is_none(), "the dead process was handed out");

        // A refill replaces both.
        pool.refill();
        wait_until("the pool to refill", || pool.pids().len() == 2);
        let after = pool.pids();
        assert!(
            !after.contains(&before[1]),
            "{after:?} has the dead {}",
            before[1]
        );
        assert!(
            !after.contains(&before[0]),
            "{after:?} has the taken {}",
            before[0]
        );
        taken.kill();
    }

    #[test]
    fn a_dropped_pool_leaves_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start(3, Warmup { vcpus: 1 }, waiter(dir.path())).unwrap();
        wait_until("the pool to fill", || pool.pids().len() == 3);
        let pids = pool.pids();
        drop(pool);
        for pid in pids {
            assert!(!running(pid), "warm process {pid} outlived its pool");
        }
    }

    #[test]
    fn a_pool_that_cannot_start_processes_hands_out_none() {
        let pool = ChildPool::start(
            2,
            Warmup { vcpus: 1 },
            PathBuf::from("/nonexistent/forkvm-vmm"),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(pool.take().is_none());
        assert!(pool.pids().is_empty());
    }
}
