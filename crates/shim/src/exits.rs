//! Exit statuses of this process's children, collected by one reaper and claimed by pid.
//!
//! The shim is a child subreaper: the runtime's `create` and `exec` leave a process
//! behind (the container's, or an exec's, pid-file pid) that reparents to the shim when
//! the runtime exits, and the shim must collect its exit status. Exactly one thread may
//! call `waitpid(-1)`, so every other
//! wait in the shim, including for the runtime commands the shim itself spawns, goes
//! through an [`Exits`] table that the reaper ([`reap_children`]) feeds: [`Exits::mark`]
//! before spawning, [`Exits::spawned`] after, [`Exits::wait`] for that pid. An exit that arrives before anyone asks for it
//! is kept, and marks keep a recycled pid from matching an older exit.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How many unclaimed exits are kept (children nobody waits for: a runtime's helpers
/// that reparent to the shim). The oldest go first.
const MAX_UNCLAIMED: usize = 1024;

/// One child's exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The child's pid.
    pub pid: i32,
    /// Its exit code, or 128 + the signal that killed it.
    pub code: i32,
    /// When it was reaped.
    pub at: SystemTime,
    seq: u64,
}

/// A point in the exit history: [`Exits::wait`] only returns exits recorded after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(u64);

#[derive(Default)]
struct Table {
    seq: u64,
    exits: Vec<Exit>,
    /// Bumped by [`Exits::spawned`].
    spawns: u64,
}

/// The table of reaped children (see the module docs).
#[derive(Default)]
pub struct Exits {
    table: Mutex<Table>,
    changed: Condvar,
}

impl Exits {
    /// An empty table, shared between the reaper and the waiters.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The current point in the history; take it before spawning the child to wait for.
    pub fn mark(&self) -> Mark {
        Mark(self.lock().seq)
    }

    /// Records that `pid` exited with `code` (called by the reaper).
    pub fn record(&self, pid: i32, code: i32) {
        let mut t = self.lock();
        t.seq += 1;
        let seq = t.seq;
        t.exits.push(Exit {
            pid,
            code,
            at: SystemTime::now(),
            seq,
        });
        if t.exits.len() > MAX_UNCLAIMED {
            let extra = t.exits.len() - MAX_UNCLAIMED;
            t.exits.drain(..extra);
        }
        self.changed.notify_all();
    }

    /// Takes the exit of `pid` recorded after `since`, waiting for it up to `timeout`
    /// (forever when `None`). `None` when it did not exit in time.
    pub fn wait(&self, pid: i32, since: Mark, timeout: Option<Duration>) -> Option<Exit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut t = self.lock();
        loop {
            if let Some(i) = t.exits.iter().position(|e| e.pid == pid && e.seq > since.0) {
                return Some(t.exits.remove(i));
            }
            match deadline {
                None => t = self.changed.wait(t).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    t = self
                        .changed
                        .wait_timeout(t, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Says that a child was just spawned, waking a reaper that found none.
    pub fn spawned(&self) {
        self.lock().spawns += 1;
        self.changed.notify_all();
    }

    fn generation(&self) -> u64 {
        self.lock().spawns
    }

    /// Sleeps until a spawn after generation `seen` (at most 100 ms, for children
    /// spawned by code that does not call [`Exits::spawned`]).
    fn wait_for_spawn(&self, seen: u64) {
        let t = self.lock();
        let _ = self
            .changed
            .wait_timeout_while(t, Duration::from_millis(100), |t| t.spawns == seen);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The exit code containerd reports for a raw `waitpid` status: the code for a normal
/// exit, 128 + the signal number for a process killed by a signal (as a shell does);
/// the guest agent reports its processes' exits the same way.
pub use forkvm_agent_proto::exit_code;

/// Reaps every child of this process into `exits`, forever, on a thread of its own:
/// the shim's one reaper. Nothing else in the process may wait for children; exits are
/// also passed to the containerd-shim crate's exit monitor, through which its own
/// helpers wait. When the process has no children it sleeps until [`Exits::spawned`]
/// says one may exist.
pub fn reap_children(exits: Arc<Exits>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            let seen = exits.generation();
            match rustix::process::wait(rustix::process::WaitOptions::empty()) {
                Ok(Some((pid, status))) => {
                    let code = exit_code(status.as_raw());
                    tracing::debug!(pid = pid.as_raw_nonzero().get(), code, "child exited");
                    exits.record(pid.as_raw_nonzero().get(), code);
                    // The containerd-shim crate's helpers (its rootfs mount forks a
                    // child) wait through its own exit monitor.
                    let _ = containerd_shim::monitor::monitor_notify_by_pid(
                        pid.as_raw_nonzero().get(),
                        code,
                    );
                }
                Err(rustix::io::Errno::CHILD) => exits.wait_for_spawn(seen),
                // EINTR, or a status that is not an exit.
                _ => {}
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_recorded_before_the_wait_is_kept() {
        let exits = Exits::new();
        let mark = exits.mark();
        exits.record(42, 3);
        let e = exits.wait(42, mark, Some(Duration::ZERO)).unwrap();
        assert_eq!((e.pid, e.code), (42, 3));
        // Claimed once only.
        assert_eq!(exits.wait(42, mark, Some(Duration::ZERO)), None);
    }

    #[test]
    fn a_recycled_pid_does_not_match_an_older_exit() {
        let exits = Exits::new();
        exits.record(7, 1); // an earlier process with pid 7, never claimed
        let mark = exits.mark();
        assert_eq!(exits.wait(7, mark, Some(Duration::from_millis(10))), None);
        exits.record(7, 0);
        assert_eq!(exits.wait(7, mark, None).unwrap().code, 0);
    }

    #[test]
    fn a_waiter_wakes_when_its_pid_exits() {
        let exits = Exits::new();
        let mark = exits.mark();
        let e2 = exits.clone();
        let t = std::thread::spawn(move || e2.wait(9, mark, Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(20));
        exits.record(8, 1);
        exits.record(9, 2);
        assert_eq!(t.join().unwrap().unwrap().code, 2);
        // The other exit is still there for its own waiter.
        assert_eq!(exits.wait(8, mark, Some(Duration::ZERO)).unwrap().code, 1);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let exits = Exits::new();
        let mark = exits.mark();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            exits.record(pid, 0);
        }
        assert_eq!(exits.lock().exits.len(), MAX_UNCLAIMED);
        assert_eq!(
            exits.wait(0, mark, Some(Duration::ZERO)),
            None,
            "oldest dropped"
        );
        assert!(exits
            .wait(MAX_UNCLAIMED as i32 + 9, mark, Some(Duration::ZERO))
            .is_some());
    }
}
