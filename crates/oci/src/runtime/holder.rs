//! The container's **holder**: its process on the host when the spec gives it pid,
//! cgroup or user namespaces of its own.
//!
//! A container's processes run in its VM, in the namespaces the guest's kernel makes
//! for them. On the host, the state's `pid` is what engines and hooks look at:
//! `/proc/<pid>/ns/*` for its namespaces, its exit for the container's. The monitor
//! ([`super::create`]) can stand there for the namespaces it lives in (mount, UTS, IPC,
//! network), but it cannot live in a pid, cgroup or user namespace of its own: it
//! starts the VM process, whose fork children are named by host pids; the VM process
//! moves into the container's `cgroupsPath`; and the monitor needs the host's
//! privileges (TAPs, mounts, `/dev/kvm`). So where the spec lists any of those three
//! without a path, `create` starts the holder, a process that does nothing but be the
//! container on the host, as runc's container process is:
//!
//! - it starts in a new pid namespace (it is its init) or the one the spec names by
//!   path and `exec`s this binary (`__hold`) first, in the runtime's mount namespace
//!   (a namespace joined by path holds another root, whose loader and libraries must
//!   never run as the host's root); then it joins the monitor's mount, UTS, IPC and
//!   network namespaces (those the spec makes or names) and makes the cgroup and user
//!   namespaces the spec lists; `create` writes the user namespace's maps, the spec's,
//!   from outside. The joined namespaces are owned by the host's user namespace, not
//!   the container's (the monitor made them first);
//! - it is `create`'s child, so once `create` returns it is the engine's (its shim,
//!   conmon), which waits for it; its pid is the state's and the `--pid-file`'s;
//! - it blocks every signal (SIGKILL and SIGSTOP stay: as an init's, whether or not it
//!   is one), starts a session of its own in `/`, closes every descriptor but its end of a
//!   socket pair whose other end only the monitor holds ([`MonitorLink`]), and exits
//!   with the exit code the monitor writes there ([`MonitorLink::exit`]) — the
//!   container's — or with [`EXIT_MONITOR_GONE`] when the monitor ends without one;
//! - a SIGKILL ends it (SIGKILL reaches a namespace's init from outside), and the
//!   monitor follows it ([`MonitorLink::follow`]: its end of the pair reads end of
//!   file): killing the state's pid kills the container, as with runc. Other signals
//!   are the monitor's to forward into the guest (`kill` sends them there).
//!
//! Between the `clone(2)` and the `exec` it runs only system calls that are safe after
//! a fork of a threaded process (descriptor flags, the `exec`), on values prepared
//! before it; after the `exec` it holds this binary's pages (shared with every other)
//! and little else.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::IdMapping;

use crate::bundle::HolderNamespaces;

/// The holder's exit code when the monitor ended without writing the container's
/// (it was killed, or crashed): the code of a VM that failed.
pub const EXIT_MONITOR_GONE: i32 = super::create::EXIT_VM_FAILED;

/// The holder, `create`'s child until `create` returns.
#[derive(Debug)]
pub struct Holder {
    pid: libc::pid_t,
}

/// Steps of the holder's set-up, as it reports a failure.
const STEP_SETNS: u8 = 1;
const STEP_EXEC: u8 = 2;
const STEP_UNSHARE: u8 = 3;
/// A set-up that went well.
const STEP_DONE: u8 = 0;

impl Holder {
    /// Starts the holder of the container whose monitor is `monitor`, in the monitor's
    /// namespaces of the kinds in `join` (`CLONE_NEW*` flags) and new ones as `ns` says;
    /// `link` is its end of the socket pair whose other end the monitor holds. A pid
    /// namespace joined by path is `pid_ns`: the holder is started in it. It runs `exe`,
    /// `forkvm-runtime` (opened: the holder's mount namespace may not show its path),
    /// named `exe_name` and container `id` on its command line (for `ps`).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        (exe, exe_name): (&std::fs::File, &str),
        id: &str,
        monitor: u32,
        join: &[libc::c_int],
        ns: &HolderNamespaces,
        link: OwnedFd,
        pid_ns: Option<&OwnedFd>,
    ) -> Result<Self> {
        let mut files = Vec::with_capacity(join.len());
        for &kind in join {
            let name = match kind {
                libc::CLONE_NEWNS => "mnt",
                libc::CLONE_NEWUTS => "uts",
                libc::CLONE_NEWIPC => "ipc",
                libc::CLONE_NEWNET => "net",
                _ => bail!("the holder cannot join namespace type {kind:#x}"),
            };
            let path = format!("/proc/{monitor}/ns/{name}");
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open the monitor's namespace {path}"))?;
            files.push((OwnedFd::from(file), kind));
        }
        // The mount namespace last: joining it changes the root and working directory.
        files.sort_by_key(|&(_, kind)| kind == libc::CLONE_NEWNS);
        let joins: Vec<String> = files
            .iter()
            .map(|(f, k)| format!("{}:{k}", f.as_raw_fd()))
            .collect();
        let mut unshare = 0;
        if ns.cgroup {
            unshare |= libc::CLONE_NEWCGROUP;
        }
        if ns.user.is_some() {
            unshare |= libc::CLONE_NEWUSER;
        }
        let clone_flags = if ns.pid { libc::CLONE_NEWPID } else { 0 };
        let (status_rx, status_tx) = std::io::pipe().context("cannot make a pipe")?;
        let arg = |s: &str| CString::new(s).context("a NUL byte in the holder's arguments");
        let args = [
            arg(exe_name)?,
            arg(HOLD_VERB)?,
            arg(&link.as_raw_fd().to_string())?,
            arg(&status_tx.as_raw_fd().to_string())?,
            arg(&unshare.to_string())?,
            arg(&joins.join(","))?,
            arg(id)?,
        ];
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        let keep: Vec<RawFd> = [link.as_raw_fd(), status_tx.as_raw_fd()]
            .into_iter()
            .chain(files.iter().map(|(f, _)| f.as_raw_fd()))
            .collect();
        let setup = Setup {
            keep: &keep,
            status_tx: status_tx.as_raw_fd(),
            exe: exe.as_raw_fd(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
        };
        let pid = match pid_ns {
            None => clone_holder(clone_flags, &setup),
            Some(pid_ns) => std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: setns(2) on an open namespace descriptor: it changes the
                    // pid namespace this thread's children start in, and nothing else;
                    // the thread ends after the one clone below.
                    if unsafe { libc::setns(pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    clone_holder(clone_flags, &setup)
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the cloning thread panicked")))
            }),
        }
        .context("cannot start the container's holder process")?;
        let holder = Holder { pid };
        drop((status_tx, link, files));
        if let Err(e) = read_status(&status_rx) {
            holder.kill();
            return Err(e);
        }
        if let Some(user) = &ns.user {
            let written = write_map(pid, "uid_map", &user.uid_mappings)
                .and_then(|()| write_map(pid, "gid_map", &user.gid_mappings));
            if let Err(e) = written {
                holder.kill();
                return Err(e);
            }
        }
        Ok(holder)
    }

    /// Its host pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Kills and reaps it (a `create` that failed).
    pub fn kill(&self) {
        // SAFETY: kill(2) and waitpid(2) on our own child's pid, which no one else reaps
        // while `create` runs; they touch no memory of ours but `status`.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}

/// Reads the holder's report of its set-up: [`STEP_DONE`], or a step and an errno. The
/// holder closes its end once it reported (or ends): end of file before a report is an
/// error too.
fn read_status(rx: &std::io::PipeReader) -> Result<()> {
    let mut report = Vec::new();
    rx.take(5)
        .read_to_end(&mut report)
        .context("cannot read the container's holder's report")?;
    let what = match report.as_slice() {
        [STEP_DONE] => return Ok(()),
        [STEP_SETNS, ..] => "join the monitor's namespaces",
        [STEP_EXEC, ..] => "run this binary",
        [STEP_UNSHARE, ..] => "make its cgroup and user namespaces",
        _ => bail!("the container's holder process ended while setting up"),
    };
    let errno = match report[1..] {
        [e0, e1, e2, e3] => i32::from_ne_bytes([e0, e1, e2, e3]),
        _ => 0,
    };
    Err(std::io::Error::from_raw_os_error(errno))
        .with_context(|| format!("the container's holder process cannot {what}"))
}

/// Writes one id map of process `pid`'s user namespace.
fn write_map(pid: libc::pid_t, file: &str, ranges: &[IdMapping]) -> Result<()> {
    let mut text = String::new();
    for r in ranges {
        text.push_str(&format!("{} {} {}\n", r.container_id, r.host_id, r.size));
    }
    let path = format!("/proc/{pid}/{file}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| {
            format!(
                "cannot give the container's holder process its user namespace's {file} ({})",
                text.trim_end().replace('\n', ", ")
            )
        })
}

/// What the cloned holder does before its `exec`, prepared by its parent.
struct Setup<'a> {
    /// Descriptors the `exec` keeps: its end of the link, the status pipe's, the
    /// namespaces it joins.
    keep: &'a [RawFd],
    status_tx: RawFd,
    exe: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
}

// SAFETY: `argv` and `envp` point to arrays (and strings) owned by the frame of
// `Holder::start`, which outlives every use (the scoped thread that clones, the cloned
// child's copy); nothing writes through them.
unsafe impl Sync for Setup<'_> {}

/// Clones the holder with `flags` (`CLONE_NEW*`) from this thread; returns its pid.
fn clone_holder(flags: libc::c_int, setup: &Setup<'_>) -> std::io::Result<libc::pid_t> {
    // SAFETY: clone(2) without a new stack is fork(2) with namespace flags: the child
    // runs on a copy of this thread's stack and memory and goes straight to
    // `holder_exec`, which never returns and makes only async-signal-safe system calls
    // on values prepared here (no allocation, no lock, no unwinding).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => holder_exec(setup),
        pid => Ok(pid as libc::pid_t),
    }
}

/// Reports failed set-up step `step` with this thread's errno on `status_tx`, and ends
/// the process.
///
/// # Safety
/// Only async-signal-safe calls: fit for a child cloned from a threaded process.
unsafe fn fail(status_tx: RawFd, step: u8) -> ! {
    // SAFETY: errno is this thread's; write(2) of a local buffer; _exit(2).
    unsafe {
        let e = (*libc::__errno_location()).to_ne_bytes();
        let msg = [step, e[0], e[1], e[2], e[3]];
        libc::write(status_tx, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The holder, in the cloned child: runs `__hold`, still in the runtime's mount
/// namespace.
fn holder_exec(setup: &Setup<'_>) -> ! {
    // SAFETY: only system calls on descriptors, flags and strings prepared by the
    // parent (which outlive this call: the child has a copy of them); each failure is
    // reported on the status pipe and ends the process with `_exit`.
    unsafe {
        for &fd in setup.keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                fail(setup.status_tx, STEP_EXEC);
            }
        }
        libc::syscall(
            libc::SYS_execveat,
            setup.exe,
            c"".as_ptr(),
            setup.argv,
            setup.envp,
            libc::AT_EMPTY_PATH,
        );
        fail(setup.status_tx, STEP_EXEC)
    }
}

/// The hidden verb the holder runs as.
pub const HOLD_VERB: &str = "__hold";

/// `forkvm-runtime __hold LINK STATUS UNSHARE JOINS ID`: the holder of container `ID`
/// after its `exec` (see the module's documentation): `JOINS` are the namespaces to
/// join, `FD:CLONE_NEW*` pairs separated by commas (the mount namespace last), then the
/// namespaces `UNSHARE` says are made. Never returns.
pub fn hold(args: &[String]) -> ! {
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<i32>().ok());
    let joins: Option<Vec<(i32, i32)>> = args.get(3).map(|j| {
        j.split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (fd, kind) = p.split_once(':')?;
                Some((fd.parse().ok()?, kind.parse().ok()?))
            })
            .collect()
    });
    let (Some(link), Some(status), Some(unshare), Some(joins)) =
        (number(0), number(1), number(2), joins)
    else {
        eprintln!("forkvm-runtime {HOLD_VERB}: for create's use only");
        std::process::exit(2);
    };
    // SAFETY: system calls on the descriptors `create` passed this process alone and on
    // local buffers; this process is single-threaded here (nothing started a thread).
    unsafe {
        for (fd, kind) in joins {
            if libc::setns(fd, kind) != 0 {
                fail(status, STEP_SETNS);
            }
            libc::close(fd);
        }
        if unshare != 0 && libc::unshare(unshare) != 0 {
            fail(status, STEP_UNSHARE);
        }
        // Signals are the monitor's to forward into the guest; only SIGKILL (and
        // SIGSTOP) end or stop the holder, whether or not it is an init.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        libc::write(status, [STEP_DONE].as_ptr().cast(), 1);
        libc::close(status);
        // Signals for the terminal's session or the engine's process group are not
        // the container's, and its working directory pins nothing.
        libc::setsid();
        libc::chdir(c"/".as_ptr());
        close_all_but(link);
        let mut code = [0u8; 4];
        let mut got = 0usize;
        while got < code.len() {
            match libc::read(link, code[got..].as_mut_ptr().cast(), code.len() - got) {
                n if n > 0 => got += n as usize,
                -1 if *libc::__errno_location() == libc::EINTR => {}
                _ => libc::_exit(EXIT_MONITOR_GONE),
            }
        }
        libc::_exit(i32::from_ne_bytes(code) & 0xff)
    }
}

/// Closes every descriptor of this process but `keep`.
fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // SAFETY: close_range(2) and close(2) of descriptors this process alone uses.
    unsafe {
        let below = keep == 0 || libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32) == 0;
        let above = libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32) == 0;
        if !(below && above) {
            // A kernel without close_range (before 5.9): one by one, to the limit.
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 20) as libc::c_uint;
            (0..max).filter(|&fd| fd != keep).for_each(|fd| {
                libc::close(fd as RawFd);
            });
        }
    }
}

/// The monitor's end of the socket pair to its container's holder (`--holder-fd`).
#[derive(Debug)]
pub struct MonitorLink {
    stream: UnixStream,
    /// Set once the exit code is written: the holder's end then is expected.
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MonitorLink {
    /// Takes over descriptor `fd`, the end `create` passed to this process alone
    /// (checked to be a socket), close-on-exec again so that nothing this process starts
    /// holds it.
    pub fn adopt(fd: RawFd) -> Result<Self> {
        if !super::helper::passed_fd_is(fd, libc::S_IFSOCK) {
            bail!("--holder-fd {fd} is not the socket create passes");
        }
        // SAFETY: `fd` is the socket `create` left open across our exec for this link
        // alone (checked to be a socket); nothing else here owns or closes it.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        // SAFETY: fcntl(2) on a descriptor we own, setting its close-on-exec flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot keep --holder-fd");
        }
        Ok(Self {
            stream,
            done: Default::default(),
        })
    }

    /// Ends this process (SIGKILL, which its VM process follows) once the holder is
    /// gone without the exit code written (its end of the pair reads end of file):
    /// the state's pid was killed, so is the container. Watched from a thread of its
    /// own.
    pub fn follow(&self) -> Result<()> {
        let stream = self.stream.try_clone().context("cannot watch the holder")?;
        let done = self.done.clone();
        // The watcher takes no signal: they are the monitor's to forward (a signal this
        // thread left unblocked would end the whole process by its default action).
        // It starts with every signal blocked; this thread's mask is then restored.
        // SAFETY: pthread_sigmask(3) on sigset_t values this function owns.
        let old_mask = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            old
        };
        let spawned = std::thread::Builder::new()
            .name("holder".into())
            .spawn(move || {
                // The holder never writes: any answer, end of file or an error, is its end.
                let mut byte = [0u8; 1];
                loop {
                    match (&stream).read(&mut byte) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        _ => break,
                    }
                }
                if !done.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::warn!("the container's holder process is gone: ending");
                    // SAFETY: kill(2) of this process with SIGKILL.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            });
        // SAFETY: as above, restoring this thread's own mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
        spawned.context("cannot start the holder's watcher")?;
        Ok(())
    }

    /// Hands the container's exit code to the holder, which exits with it.
    pub fn exit(self, code: i32) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = (&self.stream).write_all(&code.to_ne_bytes()) {
            tracing::warn!("cannot hand the exit code {code} to the holder: {e}");
        }
    }
}
