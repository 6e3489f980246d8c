//! The runtime's helper processes: copies of this binary that stand for a process on
//! the host, the container's monitor (started by `create`) and a detached exec's relay
//! (started by `exec --detach`). Both are started, given a terminal and waited for the
//! same way:
//!
//! * [`command`] runs this binary with the caller's global flags;
//! * [`give_terminal`] makes a host pty's slave its stdio and sends the master to the
//!   engine's `--console-socket`; [`own_session`] (in the helper) makes that pty its
//!   controlling terminal, so resizes arrive as SIGWINCH;
//! * the helper reports once it is ready with [`write_report`] (atomically: a reader sees
//!   the whole report or none) and the caller waits with [`wait_report`], which also
//!   fails when the helper dies first or takes too long.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Global;
use crate::term::Pty;

/// Whether descriptor `fd` is past stdio and of file type `kind` (`S_IFIFO`,
/// `S_IFSOCK`): a helper takes over only the kind of descriptor its caller passes, so
/// that a wrong number cannot make it close another file.
pub fn passed_fd_is(fd: i32, kind: libc::mode_t) -> bool {
    // SAFETY: fstat(2) on a descriptor number only reads its metadata into `st`, plain
    // data for which all-zero is valid.
    fd > 2
        && unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == kind
        }
}

/// What a helper reports: it is ready (with what the caller needs), or why it failed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Report<T> {
    /// Ready.
    Ok(T),
    /// Failed, with the message for the engine.
    Error(String),
}

/// This binary with the caller's `--root`, `--log`, `--log-format` and `--debug`, then
/// `args`.
pub fn command(g: &Global, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe().context("cannot find this executable")?);
    cmd.arg("--root").arg(&g.root);
    if let Some(log) = &g.log {
        cmd.arg("--log").arg(log);
    }
    cmd.args(["--log-format", &g.log_format]);
    if g.debug {
        cmd.arg("--debug");
    }
    cmd.args(args);
    Ok(cmd)
}

/// Gives `cmd` a new host pty's slave as stdin, stdout and stderr, and sends its master
/// to the engine's console socket.
pub fn give_terminal(cmd: &mut Command, console_socket: &Path) -> Result<()> {
    let pty = Pty::open().context("cannot open a pseudo-terminal")?;
    crate::term::send_console(console_socket, &pty.master)
        .with_context(|| format!("cannot send the terminal to {}", console_socket.display()))?;
    cmd.stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave));
    Ok(())
}

/// In the helper: a session of its own (the caller's terminal signals are not the
/// container's) and, with `tty`, stdin's pty as its controlling terminal.
pub fn own_session(tty: bool) -> Result<()> {
    let _ = rustix::process::setsid();
    if tty {
        rustix::process::ioctl_tiocsctty(std::io::stdin())
            .context("cannot make the pty the controlling terminal")?;
    }
    Ok(())
}

/// Writes `report` to `path` atomically: a reader sees all of it or none. Not
/// `forkvm_registry::write_atomic`, which also fsyncs the directory after the rename:
/// a caller may delete the directory as soon as it has read the report.
pub fn write_report<T: Serialize>(path: &Path, report: &Report<T>) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, serde_json::to_vec(report)?)?;
    std::fs::rename(&tmp, path)
}

/// Waits for `child`'s report at `path`: its value when ready, its message when it
/// failed. `what` names the helper and `until` what it was waiting for, in errors;
/// `detail` adds to the error when the helper died first (its log, say).
///
/// It sleeps until the report is renamed into place or the helper exits
/// ([`ReportWaker`]), not on a timer: `create` waits here through the guest's whole
/// boot, and a 5 ms poll took a tenth of the virtual test host's one CPU from it.
pub fn wait_report<T: DeserializeOwned>(
    path: &Path,
    child: &mut Child,
    limit: Duration,
    (what, until): (&str, &str),
    detail: impl FnOnce() -> String,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    // Before the first look: a report renamed in after it wakes the wait below.
    let waker = ReportWaker::new(path, child.id());
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            return match serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt", path.display()))?
            {
                Report::Ok(value) => Ok(value),
                Report::Error(msg) => bail!("{msg}"),
            };
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before {until}\n{}", detail());
        }
        let now = Instant::now();
        if now > deadline {
            bail!("{what} did not report that {until} within {limit:?}");
        }
        waker.wait(deadline - now);
    }
}

/// What wakes [`wait_report`]: an inotify watch on the report's directory (the report
/// is renamed into it) and the helper's pidfd (readable once it exits). Where either
/// cannot be had (a directory on a filesystem without inotify), it wakes every
/// [`ReportWaker::POLL`] as a plain poll would; with both, a wait still ends after
/// [`ReportWaker::BACKSTOP`] to look again.
struct ReportWaker {
    inotify: Option<std::os::fd::OwnedFd>,
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl ReportWaker {
    const POLL: Duration = Duration::from_millis(5);
    const BACKSTOP: Duration = Duration::from_secs(1);

    fn new(path: &Path, pid: u32) -> Self {
        use rustix::fs::inotify;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let inotify = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .ok()
            .filter(|fd| {
                inotify::add_watch(
                    fd,
                    dir,
                    inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::CLOSE_WRITE,
                )
                .is_ok()
            });
        let pidfd = forkvm_vmm::reap::pidfd_open(pid).ok();
        Self { inotify, pidfd }
    }

    /// Sleeps until something may have changed, for at most `left`.
    fn wait(&self, left: Duration) {
        use std::os::fd::AsFd;
        let tick = match (&self.inotify, &self.pidfd) {
            (Some(_), Some(_)) => Self::BACKSTOP,
            _ => Self::POLL,
        };
        let fds: Vec<_> = [&self.inotify, &self.pidfd]
            .into_iter()
            .flatten()
            .map(|fd| fd.as_fd())
            .collect();
        wait_readable(&fds, left.min(tick));
        // Drain the watch: that an event came matters, not what it says.
        if let Some(fd) = &self.inotify {
            let mut buf = [0u8; 4096];
            while rustix::io::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
        }
    }
}

/// Sleeps until one of `fds` is readable (or hung up), for at most `timeout` (at least
/// a millisecond); with no descriptor, for `timeout`.
pub(super) fn wait_readable(fds: &[std::os::fd::BorrowedFd<'_>], timeout: Duration) {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&fd| PollFd::from_borrowed_fd(fd, PollFlags::IN))
        .collect();
    // A limit past what a timespec holds is no limit.
    let limit = rustix::event::Timespec::try_from(timeout.max(Duration::from_millis(1))).ok();
    // A poll that fails at once (not a signal) must not turn its callers' loops into
    // spins: sleep instead.
    if poll(&mut polled, limit.as_ref()).is_err_and(|e| e != rustix::io::Errno::INTR) {
        std::thread::sleep(timeout);
    }
}

/// Runs a monitor process of container `id` (`create`'s `__monitor`, a pod container's
/// `__member`): its log in the container's directory, `run` with the state store, that
/// directory and whether it reported to `create` yet; returns the container process's
/// exit code. An error is logged and, unless `run` reported, reported on `report` (in
/// the container's directory) for `create` to show; the code is then
/// [`EXIT_VM_FAILED`](super::create::EXIT_VM_FAILED).
pub fn monitor_process<T: Serialize>(
    g: &Global,
    log: &super::Log,
    id: &str,
    report: &str,
    run: impl FnOnce(&crate::state::StateStore, &Path, &mut bool) -> Result<i32>,
) -> i32 {
    use super::create::{EXIT_VM_FAILED, MONITOR_LOG};
    let store = match crate::state::StateStore::open(&g.root) {
        Ok(s) => s,
        Err(e) => {
            log.error(&format!("monitor {id}: {e}"));
            return EXIT_VM_FAILED;
        }
    };
    let Ok(dir) = store.container_dir(id) else {
        return EXIT_VM_FAILED;
    };
    log.install_tracing(&dir.join(MONITOR_LOG));
    let mut reported = false;
    match run(&store, &dir, &mut reported) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            log.error(&format!("container {id}: {msg}"));
            tracing::error!("container {id}: {msg}");
            if !reported {
                let _ = write_report::<T>(&dir.join(report), &Report::Error(msg));
            }
            EXIT_VM_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_wait_wakes_for_the_report_or_the_helpers_exit_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let waker = ReportWaker::new(&path, sleeper.id());
        if waker.inotify.is_none() || waker.pidfd.is_none() {
            // A kernel without pidfd_open or inotify here: the wait is the plain poll.
            let t = Instant::now();
            waker.wait(Duration::from_secs(30));
            assert!(t.elapsed() < ReportWaker::BACKSTOP, "{:?}", t.elapsed());
            sleeper.kill().unwrap();
            sleeper.wait().unwrap();
            return;
        }
        // Nothing happens: it sleeps out what it was given.
        let t = Instant::now();
        waker.wait(Duration::from_millis(60));
        assert!(
            t.elapsed() >= Duration::from_millis(60),
            "{:?}",
            t.elapsed()
        );
        // The report renamed in wakes it long before its backstop.
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                write_report(&path, &Report::Ok(1)).unwrap();
            })
        };
        let t = Instant::now();
        waker.wait(Duration::from_secs(30));
        assert!(t.elapsed() < ReportWaker::BACKSTOP, "{:?}", t.elapsed());
        writer.join().unwrap();
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        // So does the helper's exit.
        let mut short = Command::new("sleep").arg("0.1").spawn().unwrap();
        let waker = ReportWaker::new(&dir.path().join("other.json"), short.id());
        let t = Instant::now();
        waker.wait(Duration::from_secs(30));
        assert!(t.elapsed() < ReportWaker::BACKSTOP, "{:?}", t.elapsed());
        short.wait().unwrap();
    }

    #[test]
    fn reports_are_read_whole_and_failures_carry_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report");
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        write_report(&path, &Report::Ok(42)).unwrap();
        let v: i32 = wait_report(
            &path,
            &mut sleeper,
            Duration::from_secs(5),
            ("x", "y"),
            String::new,
        )
        .unwrap();
        assert_eq!(v, 42);
        write_report::<i32>(&path, &Report::Error("no such command".into())).unwrap();
        let e = wait_report::<i32>(
            &path,
            &mut sleeper,
            Duration::from_secs(5),
            ("x", "y"),
            String::new,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "no such command");
        std::fs::remove_file(&path).unwrap();
        let e = wait_report::<i32>(
            &path,
            &mut sleeper,
            Duration::from_millis(50),
            ("the helper", "it was ready"),
            String::new,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("did not report that it was ready within 50ms"),
            "{e}"
        );
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let mut done = Command::new("true").spawn().unwrap();
        done.wait().unwrap();
        let e = wait_report::<i32>(
            &path,
            &mut done,
            Duration::from_secs(5),
            ("the helper", "it was ready"),
            || "its log".into(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the helper exited (exit status: 0) before it was ready\nits log"),
            "{e}"
        );
    }
}
