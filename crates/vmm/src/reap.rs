//! Children this process started and then leaves to run on their own (the fork
//! children it `exec`'d: [`crate::launch::VmProcess::detach`]), reaped as they end by
//! one thread, however many there are.
//!
//! A thread per child used to wait for each: a VM that forks 1000 children that way
//! held 1000 threads for as long as they ran, against its cgroup's `pids.max`. Now the
//! one thread polls a pidfd per child (and an eventfd that says a child was added) and
//! collects the status of each that ended with a non-blocking wait of that child alone,
//! so the other waits of this process (a pool's processes) keep theirs. A child whose
//! pidfd cannot be opened (no descriptor left) is looked at once a second instead.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Child;
use std::sync::Mutex;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use vmm_sys_util::eventfd::EventFd;

/// How often children without a pidfd are looked at.
const RETRY: Timespec = Timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

struct Reaper {
    added: Mutex<Vec<Child>>,
    wake: EventFd,
}

/// The reaper, once its thread started.
static REAPER: Mutex<Option<&'static Reaper>> = Mutex::new(None);

/// Hands `child` to the reaper thread, started on first use.
pub fn reap_when_done(child: Child) -> std::io::Result<()> {
    let reaper = {
        let mut slot = REAPER.lock().unwrap_or_else(|e| e.into_inner());
        match *slot {
            Some(r) => r,
            None => {
                // One per process, for its whole life.
                let r: &'static Reaper = Box::leak(Box::new(Reaper {
                    added: Mutex::new(Vec::new()),
                    wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                }));
                std::thread::Builder::new()
                    .name("reaper".into())
                    .spawn(move || run(r))?;
                *slot = Some(r);
                r
            }
        }
    };
    reaper
        .added
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
    reaper.wake.write(1)
}

/// The reaper thread: waits for any child to end, or for more to watch.
fn run(reaper: &'static Reaper) -> ! {
    let wake = &reaper.wake;
    let mut watched: Vec<(Child, OwnedFd)> = Vec::new();
    let mut unwatched: Vec<Child> = Vec::new();
    loop {
        let added = std::mem::take(&mut *reaper.added.lock().unwrap_or_else(|e| e.into_inner()));
        for child in added {
            match pidfd_open(child.id()) {
                Ok(fd) => watched.push((child, fd)),
                Err(_) => unwatched.push(child),
            }
        }
        // Those without a pidfd are looked at on every turn.
        unwatched.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        // SAFETY: the eventfd lives in the reaper, which is never dropped.
        let wake_fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
        let mut fds: Vec<PollFd<'_>> = std::iter::once(wake_fd)
            .chain(watched.iter().map(|(_, fd)| fd.as_fd()))
            .map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN))
            .collect();
        let timeout = (!unwatched.is_empty()).then_some(RETRY);
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => {
                // Not a busy loop while the kernel refuses (ENOMEM).
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        }
        let ended: Vec<bool> = fds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(fds);
        if ended[0] {
            let _ = wake.read();
        }
        // A readable pidfd: that child ended; its status is collected, the rest stay.
        let mut i = 0;
        watched.retain_mut(|(child, _)| {
            i += 1;
            !ended[i] || matches!(child.try_wait(), Ok(None))
        });
    }
}

/// A pidfd of process `pid` (the registry's, where liveness is judged).
pub use forkvm_registry::liveness::pidfd_open;

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process named `name`, once at least one is (a new thread takes
    /// its name a moment after it starts), waiting up to 2 s.
    fn threads_named(name: &str) -> usize {
        let count = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while count() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        count()
    }

    /// Whether `pid` is still there (running, or a zombie nobody collected).
    fn exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn one_thread_reaps_every_child_as_it_ends() {
        let spawn = |secs: &str| {
            std::process::Command::new("sleep")
                .arg(secs)
                .spawn()
                .unwrap()
        };
        let quick: Vec<Child> = (0..40).map(|_| spawn("0.2")).collect();
        let slow = spawn("30");
        let pids: Vec<u32> = quick.iter().map(Child::id).collect();
        let slow_pid = slow.id();
        for child in quick {
            reap_when_done(child).unwrap();
        }
        reap_when_done(slow).unwrap();
        assert_eq!(threads_named("reaper"), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pids.iter().any(|&p| exists(p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left: Vec<u32> = pids.into_iter().filter(|&p| exists(p)).collect();
        assert!(left.is_empty(), "not reaped: {left:?}");
        // The one still running is neither reaped nor waited on by another thread.
        assert!(exists(slow_pid));
        assert_eq!(threads_named("reaper"), 1);
        // SAFETY: kill has no memory preconditions; the child is ours and unreaped.
        unsafe { libc::kill(slow_pid as libc::pid_t, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while exists(slow_pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!exists(slow_pid), "the killed child was not reaped");
    }
}
