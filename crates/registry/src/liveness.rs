//! Is a VMM process still alive? A pid plus the process's start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot), so a pid the kernel reused for another
//! process does not count; zombies count as dead.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// A process, identified across pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// (state character, start time) from the text of `/proc/<pid>/stat`.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may contain anything, ')' too.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

impl ProcessIdentity {
    /// The identity of process `pid`, if it exists and is not a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (state, start_ticks) = parse_stat(&text)?;
        if matches!(state, 'Z' | 'X' | 'x') {
            return None;
        }
        Some(Self { pid, start_ticks })
    }

    /// This process, by its pid on the host: the one `/proc/self` names in the procfs at
    /// `/proc` (the host's, which a process in a container's pid namespace still sees
    /// until a jail mounts its own), else its pid in its own namespace. Read once per
    /// process and kept: call it before a jail replaces `/proc` (`forkvm-vmm` does, first
    /// thing), so that a VM process in a pid namespace of its container's names itself as
    /// the host knows it.
    pub fn current() -> Self {
        static CURRENT: std::sync::Mutex<Option<(u32, ProcessIdentity)>> =
            std::sync::Mutex::new(None);
        let own = std::process::id();
        let mut kept = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        // A process forked without exec (a zygote's) reads its own.
        if let Some((pid, me)) = *kept {
            if pid == own {
                return me;
            }
        }
        let pid = Self::proc_self_pid().unwrap_or(own);
        let me = Self::of(pid).unwrap_or(Self {
            pid,
            start_ticks: 0,
        });
        *kept = Some((own, me));
        me
    }

    /// This process's pid as the procfs at `/proc` names it (`/proc/self`), if it shows
    /// this process at all (a procfs of another pid namespace does not).
    pub fn proc_self_pid() -> Option<u32> {
        std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str()?.parse().ok())
    }

    /// The pid by which the procfs at `/proc` names process `pid` of this process's pid
    /// namespace: `pid` itself where `/proc` names this process by its own pid, else
    /// (this process's namespace is below the one of that procfs: a VM family's, whose
    /// jail holds the launcher's procfs) as [`ProcessIdentity::proc_pid_of_pidfd`] finds
    /// it. `None` if the process is gone or cannot be named so.
    pub fn proc_pid_of(pid: u32) -> Option<u32> {
        if Self::current().pid == std::process::id() {
            return Some(pid);
        }
        Self::proc_pid_of_pidfd(&pidfd_open(pid).ok()?)
    }

    /// The pid by which the procfs at `/proc` names the process `pidfd` refers to,
    /// whatever pid namespace it or this process is in: the `Pid:` of the pidfd's
    /// fdinfo there, which the kernel gives in that procfs's namespace. `None` if the
    /// process is gone (or that procfs does not see it).
    pub fn proc_pid_of_pidfd(pidfd: &impl AsRawFd) -> Option<u32> {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse().ok())
            .filter(|p: &u32| *p > 0)
    }

    /// Whether the processes this one starts learn their host pids
    /// ([`ProcessIdentity::current`]): whether the procfs at `/proc` names this process
    /// by the pid it learnt at its start. So it does in the host's pid namespace, and in
    /// a VM family's, whose jail holds the launcher's procfs; not in a container's pid
    /// namespace joined by path whose procfs the jail mounted.
    pub fn children_learn_host_pids() -> bool {
        Self::proc_self_pid() == Some(Self::current().pid)
    }

    /// Whether this process is in a pid namespace below the host's (the one of the
    /// procfs it read itself from, see [`ProcessIdentity::current`]): the processes it
    /// starts cannot learn their host pids then.
    pub fn in_child_pid_namespace() -> bool {
        Self::current().pid != std::process::id()
    }

    /// Whether this very process still runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now.start_ticks == self.start_ticks)
    }

    /// Sends `signal` if the process is still this one; returns whether it was sent.
    pub fn signal(&self, signal: i32) -> bool {
        if !self.is_alive() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid was
        // checked to be this process (same start time) just above.
        unsafe { libc::kill(pid, signal) == 0 }
    }
}

/// A pidfd of process `pid` (of this process's pid namespace).
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a process ID and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Polls `alive` until it is false or `limit` passes; returns whether it became false
/// (a process that was asked or made to end is gone).
pub fn wait_gone(limit: std::time::Duration, alive: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while alive() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    /// Run as a child in a pid namespace of its own by the test below.
    const IN_PIDNS: &str = "FORKVM_REGISTRY_TEST_IN_PIDNS";

    #[test]
    fn a_process_in_a_child_pid_namespace_names_itself_by_its_host_pid() {
        if std::env::var_os(IN_PIDNS).is_some() {
            // The child: pid 1 of its namespace, under the host's procfs.
            assert_eq!(std::process::id(), 1);
            assert!(ProcessIdentity::in_child_pid_namespace());
            let me = ProcessIdentity::current();
            assert!(me.start_ticks > 0);
            println!("host pid {}", me.pid);
            // Its children learn theirs from the same procfs, and it finds them there by
            // their pidfds.
            assert!(ProcessIdentity::children_learn_host_pids());
            let mut child = std::process::Command::new("sh")
                .args(["-c", "cd -P /proc/self && pwd -P && read x"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            let host: u32 = line.trim().trim_start_matches("/proc/").parse().unwrap();
            assert_ne!(host, child.id(), "the child's pid here is its namespace's");
            assert_eq!(ProcessIdentity::proc_pid_of(child.id()), Some(host));
            drop(child.stdin.take());
            child.wait().unwrap();
            return;
        }
        assert!(!ProcessIdentity::in_child_pid_namespace());
        let (pid, out) = forkvm_test_support::rerun_in_new_pid_namespace(
            "liveness::tests::a_process_in_a_child_pid_namespace_names_itself_by_its_host_pid",
            IN_PIDNS,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(stdout.contains(&format!("host pid {pid}\n")), "{stdout}");
    }

    #[test]
    fn this_process_is_alive_and_a_fake_one_is_not() {
        let me = ProcessIdentity::current();
        assert!(me.start_ticks > 0);
        assert!(me.is_alive());
        let reused = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(
            !reused.is_alive(),
            "a different start time means another process"
        );
        assert!(!ProcessIdentity {
            pid: u32::MAX - 1,
            start_ticks: 1
        }
        .is_alive());
    }

    #[test]
    fn a_reaped_child_is_dead_and_a_zombie_too() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessIdentity::of(child.id());
        // Wait until it is a zombie (exited, not reaped): then it already reads as dead.
        for _ in 0..200 {
            if ProcessIdentity::of(child.id()).is_none() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(ProcessIdentity::of(child.id()).is_none());
        child.wait().unwrap();
        if let Some(id) = id {
            assert!(!id.is_alive());
        }
    }
}
