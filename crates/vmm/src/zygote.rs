//! The maker of a fork pool's warm processes: one `forkvm-vmm` per pool that forks each
//! warm process from itself instead of the pool exec'ing a new one.
//!
//! Why: an exec'd process relocates its own copy of the executable's read-only data
//! (the executable is position-independent; 384 KiB measured), and builds its own heap
//! and loader state: about 0.8 MiB that every fork child held alone. A process forked
//! from a zygote that did all of that once shares those pages copy-on-write with the
//! zygote and every sibling, and starts without exec or dynamic loading.
//!
//! On the zygote's launch socket the pool sends [`Message::Zygote`](crate::launch)
//! once, then one empty blob per process with one end of a new socket pair as its only
//! descriptor. The zygote forks a helper, which forks the warm process, sends back its
//! process ID and a pidfd (taken while the helper is still its parent, so it cannot name
//! a recycled ID), and exits; the zygote reaps the helper. The warm process, orphaned, is
//! reaped by init or the nearest subreaper when it ends. It starts a session of its own,
//! takes the received socket as its launch socket and goes on as any VM process: it
//! waits for its warm-up, then for its launch, and exits if the socket closes first.
//!
//! The zygote (named `forkvm-zygote` in `ps`) stays single-threaded (fork copies only
//! the calling thread) and exits when the pool's socket closes, as a pool's warm
//! processes do.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::launch::{LaunchError, ProcessOptions, VmProcess, LAUNCH_FD};

/// How long the pool waits for the zygote to answer one request.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// The pool's side: a running zygote.
#[derive(Debug)]
pub(crate) struct Zygote {
    process: VmProcess,
}

impl Zygote {
    /// Starts `exe` as a zygote.
    pub(crate) fn start(exe: &Path) -> std::io::Result<Self> {
        let blob = crate::launch::encode_zygote()?;
        let process = VmProcess::spawn_encoded(exe, &blob, &[], ProcessOptions::daemon())?;
        process.socket().set_read_timeout(Some(ANSWER_DEADLINE))?;
        Ok(Self { process })
    }

    /// Its process ID.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Has the zygote fork a new VM process, waiting for its launch on the socket
    /// returned with it.
    pub(crate) fn fork(&mut self) -> std::io::Result<VmProcess> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = File::from(OwnedFd::from(theirs));
        self.process.send(&[], std::slice::from_ref(&theirs))?;
        drop(theirs);
        let mut pid = [0u8; 4];
        let mut fds = [-1 as RawFd; 1];
        let mut iov = [libc::iovec {
            iov_base: pid.as_mut_ptr().cast(),
            iov_len: pid.len(),
        }];
        // SAFETY: the iovec points at `pid`, which lives across the call and is as long
        // as the iovec says.
        let (n, nfds) = unsafe { self.process.socket().recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| std::io::Error::other(format!("the zygote did not answer: {e}")))?;
        // SAFETY: recvmsg installed this descriptor in this process; nothing else owns it.
        let pidfd = (nfds == 1).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
        let pid = u32::from_le_bytes(pid);
        match (n, pidfd) {
            (4, Some(pidfd)) if pid != 0 => Ok(VmProcess::forked(pid, pidfd, ours)),
            (0, _) => Err(std::io::Error::other("the zygote exited")),
            _ => Err(std::io::Error::other("the zygote could not fork")),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.process.kill_and_reap();
    }
}

/// Names the process (its `comm`, as `ps` shows it): a zygote is told apart from the
/// VM processes it forks.
fn set_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string that outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Answers the pool that the fork failed (a zero process ID, no descriptor).
fn answer_failure(sock: &UnixStream) {
    let _ = sock.send_with_fds(&[&0u32.to_le_bytes()[..]], &[]);
}

/// The zygote's side, in the zygote process: forks a VM process per request on `sock`
/// until the pool closes it ([`LaunchError::Abandoned`]). Returns only in a forked VM
/// process, with its launch socket (now on [`LAUNCH_FD`]).
///
/// Must run while the process has a single thread.
pub(crate) fn serve(sock: UnixStream) -> Result<UnixStream, LaunchError> {
    set_name(c"forkvm-zygote");
    // The warm processes it forks hold guest memory from their launch on: they start
    // not dumpable (and their jail says so again).
    if let Err(e) = forkvm_jail::not_dumpable() {
        tracing::warn!("the zygote stays dumpable: {e}");
    }
    // Every warm process it forks starts with the seccomp filters built.
    forkvm_jail::seccomp::prepare();
    // And without transparent huge pages: each is a fork child.
    if let Err(e) = forkvm_jail::limits::no_huge_pages() {
        tracing::warn!("the zygote's warm processes may take huge pages: {e}");
    }
    loop {
        let (_, mut files) = match forkvm_snapshot::recv_blob(&sock, 0) {
            Err(forkvm_snapshot::TransferError::Closed) => return Err(LaunchError::Abandoned),
            other => other?,
        };
        let Some(launch) = files.pop().filter(|_| files.is_empty()) else {
            answer_failure(&sock);
            continue;
        };
        // SAFETY: the process has one thread (the caller's contract), so the child's
        // copy of it holds no lock another thread held.
        match unsafe { libc::fork() } {
            -1 => answer_failure(&sock),
            0 => {
                let launch = helper(&sock, launch);
                // The zygote's socket was on LAUNCH_FD, where the new one is now.
                std::mem::forget(sock);
                return Ok(launch);
            }
            helper => {
                drop(launch);
                let mut status = 0;
                // SAFETY: waits for our own child; `status` outlives the call.
                unsafe { libc::waitpid(helper, &mut status, 0) };
            }
        }
    }
}

/// In the helper: forks the VM process, answers the pool with its ID and pidfd and
/// exits; returns only in the VM process, with `launch` as its launch socket.
fn helper(sock: &UnixStream, launch: File) -> UnixStream {
    // SAFETY: the helper has the zygote's single thread only.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: setsid and dup2 take no pointers; dup2 replaces the zygote's socket on
        // LAUNCH_FD (the caller forgets its handle) and `launch`'s descriptor is closed
        // when it drops below.
        unsafe {
            if libc::setsid() < 0 || libc::dup2(launch.as_raw_fd(), LAUNCH_FD) < 0 {
                libc::_exit(1);
            }
        }
        drop(launch);
        set_name(c"forkvm-vmm");
        // SAFETY: LAUNCH_FD is the socket pair end just duplicated there, owned by nobody
        // else in this process.
        return unsafe { UnixStream::from_raw_fd(LAUNCH_FD) };
    }
    if pid > 0 {
        // SAFETY: pidfd_open takes a process ID and flags; it returns a new fd or -1. The
        // child cannot have been reaped yet: this process, its parent, has not waited.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if fd >= 0 {
            let _ = sock.send_with_fds(&[&(pid as u32).to_le_bytes()[..]], &[fd]);
            // SAFETY: leaving at once, without running the zygote's destructors or
            // atexit handlers, which belong to the zygote.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: kill takes no pointers; the process never got its socket's answer.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    answer_failure(sock);
    // SAFETY: as above.
    unsafe { libc::_exit(1) }
}
