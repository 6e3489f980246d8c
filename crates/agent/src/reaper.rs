//! The one place that collects exited children. As the guest's PID 1 the agent inherits
//! every orphan, so one thread blocks in `waitpid(-1)` and hands each status to whoever
//! registered for that pid; a status that arrives first is kept until someone claims it
//! (or pushed out by newer ones, for orphans nobody asks about). Nothing else in the
//! process may wait for children (no `std::process::Child::wait`): it would race this.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How many unclaimed statuses (orphans, early exits) are remembered.
const MAX_UNCLAIMED: usize = 4096;

/// Collector of all child exit statuses of this process.
pub struct Reaper {
    state: Mutex<ReaperState>,
    changed: Condvar,
}

#[derive(Default)]
struct ReaperState {
    waiters: HashMap<libc::pid_t, Sender<i32>>,
    unclaimed: HashMap<libc::pid_t, i32>,
    unclaimed_order: VecDeque<libc::pid_t>,
    /// Bumped whenever a child may have appeared; wakes a reaper that saw ECHILD.
    generation: u64,
    /// The last `waitpid` found no children and nothing was started since.
    idle: bool,
}

/// A child registered with the reaper: its pid and, once it exits, its wait status.
pub struct ChildHandle {
    pid: libc::pid_t,
    status: Receiver<i32>,
}

impl ChildHandle {
    /// The child's pid.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Blocks until the child exited; returns its raw wait status.
    pub fn wait(&self) -> i32 {
        self.status
            .recv()
            .expect("the reaper lives as long as the process")
    }

    /// [`ChildHandle::wait`] for at most `timeout`; `None` while it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<i32> {
        match self.status.recv_timeout(timeout) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => unreachable!("the reaper never drops a waiter"),
        }
    }
}

pub use forkvm_agent_proto::exit_code;

impl Reaper {
    /// The process's reaper; its thread starts on first use.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                state: Mutex::new(ReaperState::default()),
                changed: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper.run())
                .expect("spawn the reaper thread");
            reaper
        })
    }

    fn lock(&self) -> MutexGuard<'_, ReaperState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) -> ! {
        loop {
            let generation = self.lock().generation;
            let mut status = 0;
            // SAFETY: waitpid writes the status into a valid i32.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                self.deliver(pid, status);
                continue;
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: nothing to wait for until something is started.
            let mut st = self.lock();
            if st.generation == generation {
                st.idle = true;
                self.changed.notify_all();
                // The timeout covers children forked behind the reaper's back.
                drop(
                    self.changed
                        .wait_timeout_while(st, Duration::from_secs(1), |s| {
                            s.generation == generation
                        })
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }

    fn deliver(&self, pid: libc::pid_t, status: i32) {
        let mut st = self.lock();
        st.idle = false;
        if let Some(tx) = st.waiters.remove(&pid) {
            // The handle may be gone: nobody wants this status any more.
            let _ = tx.send(status);
            return;
        }
        if st.unclaimed.insert(pid, status).is_none() {
            st.unclaimed_order.push_back(pid);
        }
        while st.unclaimed_order.len() > MAX_UNCLAIMED {
            if let Some(old) = st.unclaimed_order.pop_front() {
                st.unclaimed.remove(&old);
            }
        }
    }

    fn register(st: &mut ReaperState, pid: libc::pid_t) -> ChildHandle {
        let (tx, rx) = mpsc::channel();
        if let Some(status) = st.unclaimed.remove(&pid) {
            st.unclaimed_order.retain(|&p| p != pid);
            let _ = tx.send(status);
        } else {
            st.waiters.insert(pid, tx);
        }
        st.generation += 1;
        st.idle = false;
        ChildHandle { pid, status: rx }
    }

    /// Registers interest in `pid`, a child forked elsewhere; a status the reaper
    /// already collected is delivered at once.
    pub fn claim(&self, pid: libc::pid_t) -> ChildHandle {
        let handle = Self::register(&mut self.lock(), pid);
        self.changed.notify_all();
        handle
    }

    /// Forks; the child runs `child`, the parent gets the child registered before the
    /// reaper can see it exit.
    ///
    /// # Safety
    ///
    /// `child` runs in the child of a multi-threaded process: it may only make
    /// async-signal-safe calls (no allocation, no locks) and must not return (it ends
    /// in `execve` or `_exit`).
    pub unsafe fn fork(
        &self,
        child: impl FnOnce() -> std::convert::Infallible,
    ) -> std::io::Result<ChildHandle> {
        let mut st = self.lock();
        // SAFETY: fork has no memory preconditions; the child only runs `child`, which
        // the caller guarantees is async-signal-safe (the held lock is never touched).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // Never returns: `Infallible` is uninhabited.
            child();
        }
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let handle = Self::register(&mut st, pid);
        drop(st);
        self.changed.notify_all();
        Ok(handle)
    }

    /// Waits up to `timeout` until this process has no children left; true if so.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| !s.idle)
            .unwrap_or_else(|e| e.into_inner());
        st.idle
    }

    #[cfg(test)]
    fn has_unclaimed(&self, pid: libc::pid_t) -> bool {
        self.lock().unclaimed.contains_key(&pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_status_reaped_before_anyone_registered_is_delivered_on_claim() {
        let reaper = Reaper::global();
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(5) };
        }
        assert!(pid > 0);
        // Wake the reaper without registering, then wait until it has the status.
        {
            reaper.lock().generation += 1;
            reaper.changed.notify_all();
        }
        let start = Instant::now();
        while !reaper.has_unclaimed(pid) {
            assert!(start.elapsed() < Duration::from_secs(10), "never reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
        let handle = reaper.claim(pid);
        let status = handle.wait_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(exit_code(status), 5);
        assert!(!reaper.has_unclaimed(pid));
    }

    #[test]
    fn forked_children_report_exit_codes_and_signals() {
        let reaper = Reaper::global();
        // SAFETY: the child only calls _exit.
        let exited = unsafe { reaper.fork(|| libc::_exit(3)) }.unwrap();
        // SAFETY: the child only closes descriptors and pauses, then is killed.
        let paused = unsafe {
            reaper.fork(|| {
                // What it inherited from tests running beside this one (a file they
                // are writing) must not stay open in it: a read-only remount of their
                // tmpfs would be refused (EBUSY) while it lives.
                libc::syscall(libc::SYS_close_range, 0, u32::MAX, 0);
                loop {
                    libc::pause();
                }
            })
        }
        .unwrap();
        assert_eq!(exit_code(exited.wait()), 3);
        assert!(paused.wait_timeout(Duration::from_millis(50)).is_none());
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(paused.pid(), libc::SIGKILL) }, 0);
        assert_eq!(exit_code(paused.wait()), 137);
    }
}
