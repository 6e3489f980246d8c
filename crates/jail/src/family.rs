//! A VM family's pid namespace: the first VM process of a family (a booted VM, a
//! container's VM) starts in a pid namespace of its own, and the VMs it forks, its warm
//! pool and their forks start in it too. A VM process taken over by its guest can then
//! name no process but its family's: it cannot signal (or open a pidfd of) the host's
//! processes or another family's, although it runs as root.
//!
//! A pid namespace dies with its init, and fork children must outlive their parent; so
//! the VM process is not the init. [`split`], called between the launcher's `fork` and
//! the VM process's `exec` (in `pre_exec`), turns that one process into three:
//!
//! - **the VM process** (pid 2 of the new namespace), which goes on to `exec`;
//! - **the family's init** (pid 1, named [`INIT_NAME`]): it reaps the family's orphans
//!   (a fork child whose parent VM ended is reparented to it) and exits once the VM
//!   process and every orphan have ended, which ends the namespace;
//! - **the VM process's stand-in** (named [`STAND_IN_NAME`]), in the launcher's
//!   namespace, the process the launcher started: it waits for the VM process and ends
//!   as it ended (its exit code, or the same signal), and the VM process dies with it
//!   (`PR_SET_PDEATHSIG`). So the launcher waits for, kills and reads the exit status of
//!   its child as before, and a VM that dies with its launcher still does, while its
//!   fork children live on under the init.
//!
//! The init and the stand-in never `exec`: they close every descriptor and run only
//! system calls (no allocation, no lock) on the stack they were forked with.
//!
//! The VM process learns its host pid from the launcher's `/proc` before its jail,
//! and its root holds that procfs, read-only (see [`crate::root`]), so that the
//! processes it starts learn theirs too: the registry names VMs by host pids.
//!
//! Without the right to make a pid namespace (no `CAP_SYS_ADMIN`: forkvm run by a user;
//! `user.max_pid_namespaces` of 0) the VM process stays in its launcher's, as before;
//! [`in_a_family`] says which.
//!
//! A launcher that starts VM processes itself (`forkvm template fork`) makes their
//! family with [`start_here`] and starts each in it ([`spawning`]): its init waits for
//! the launcher, then until none of them is left.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The name (`comm`) of a family's init.
pub const INIT_NAME: &core::ffi::CStr = c"forkvm-family";
/// The name (`comm`) of a VM process's stand-in.
pub const STAND_IN_NAME: &core::ffi::CStr = c"forkvm-vm-wait";

/// What a family's init holds while the family lives and undoes when it ends: the lock
/// of the family's uid ([`crate::uid::allot`]), kept open, and the family's cgroup (its
/// `exited` leaf, then itself), removed.
#[derive(Debug, Default)]
pub struct Ending {
    lock: std::sync::atomic::AtomicI32,
    exited: Option<std::ffi::CString>,
    group: Option<std::ffi::CString>,
}

impl Ending {
    /// Nothing to hold or undo (a VM of no family's own uid and group).
    pub fn none() -> Self {
        Self {
            lock: std::sync::atomic::AtomicI32::new(-1),
            ..Self::default()
        }
    }

    /// The ending of the family `allotted` names; the descriptor of its lock must stay
    /// open until the family's init is forked.
    pub fn of(allotted: &crate::uid::Allotted) -> Self {
        let dir = allotted
            .spec
            .group_dir(std::path::Path::new(crate::cgroup::ROOT));
        Self::holding(allotted.lock_fd(), &dir)
    }

    /// The ending of a family whose lock is the open descriptor `lock` and whose group
    /// is the directory `group` (with its `exited` leaf).
    pub fn holding(lock: i32, group: &std::path::Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
        Self {
            lock: std::sync::atomic::AtomicI32::new(lock),
            exited: c(&group.join("exited")),
            group: c(group),
        }
    }

    /// Moves the lock's descriptor above `min`, out of the way of the descriptors a
    /// launcher places between fork and exec (async-signal-safe).
    pub fn lift_lock(&self, min: i32) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let fd = self.lock.load(Relaxed);
        if fd >= 0 {
            // SAFETY: fcntl takes plain integers.
            let lifted = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
            if lifted < 0 {
                return Err(io::Error::last_os_error());
            }
            self.lock.store(lifted, Relaxed);
        }
        Ok(())
    }

    /// Removes the family's cgroup where nothing is left in it: a family whose launcher
    /// could make no pid namespace, and so no init to do it when it ends.
    pub fn undo(&self) {
        for dir in [&self.exited, &self.group].into_iter().flatten() {
            // SAFETY: rmdir reads a NUL-terminated path.
            unsafe { libc::rmdir(dir.as_ptr()) };
        }
    }
}

/// The pid of a family's first VM process in the family's namespace (its init is 1).
const FIRST_VM_PID: libc::pid_t = 2;

/// Moves the processes the calling process starts into a new pid namespace, and makes
/// it the VM process of a new family (see the module doc): returns `Ok` in the VM
/// process, which is to `exec` next, with the launch socket and stdio the caller set
/// up. Where a pid namespace may not be made (`not_allowed`) it returns `Ok` in the
/// calling process itself, which stays in its namespace.
///
/// The VM process's pid in the launcher's namespace, 4 bytes in native order, with a
/// pidfd of it, is sent on `report` first, before the VM process can write there (the
/// launch socket: the launcher reads it with [`read_report`] before anything else). `families`, if given, is
/// `cgroup.procs` of the group the stand-in and the init move to, out of the
/// launcher's ([`crate::cgroup::families_procs`]).
///
/// # Safety
/// Only between `fork` and `exec` of a child of a possibly multi-threaded process
/// (`CommandExt::pre_exec`): it forks twice and runs only async-signal-safe calls.
pub unsafe fn split(report: i32, families: Option<i32>, ending: &Ending) -> io::Result<()> {
    // SAFETY: raw system calls on values of this stack frame, for the whole function;
    // nothing allocates, locks or touches memory another thread of the launcher could
    // hold (there is none in this process after fork).
    unsafe {
        let tell = |pid: libc::pid_t| -> io::Result<()> { tell_vm_process(report, pid) };
        // Best effort: where it fails, the init or stand-in stays in the launcher's
        // group. (Each moves itself; the VM process joins its own group.)
        let leave_launchers_group = || {
            if let Some(procs) = families {
                libc::write(procs, c"0".as_ptr().cast(), 1);
            }
        };
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            let e = io::Error::last_os_error();
            if !not_allowed(&e) {
                return Err(e);
            }
            // Not allowed here: the VM process is this one.
            return tell(libc::getpid());
        }
        // The launcher's word to the init that the VM process exists, and the init's
        // that it holds it (a pidfd), after which the VM process may be reaped.
        let mut go = [-1; 2];
        let mut held = [-1; 2];
        if libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0
            || libc::pipe2(held.as_mut_ptr(), libc::O_CLOEXEC) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let init = raw_fork();
        if init < 0 {
            return Err(io::Error::last_os_error());
        }
        if init == 0 {
            leave_launchers_group();
            keep_only(
                go[0],
                held[1],
                ending.lock.load(std::sync::atomic::Ordering::Relaxed),
            );
            let mut byte = 0u8;
            while libc::read(0, (&raw mut byte).cast(), 1) < 0 && errno() == libc::EINTR {}
            // The VM process: a zombie until the stand-in hears it is held, so it is not
            // gone yet; none if the launcher failed (then the stand-in closed its end).
            // Without a pidfd, the init looks for the family's processes instead.
            let vm = libc::syscall(libc::SYS_pidfd_open, FIRST_VM_PID, 0) as i32;
            libc::write(1, (&raw const byte).cast(), 1);
            libc::close(0);
            libc::close(1);
            init_main(vm, false, ending)
        }
        let vm = raw_fork();
        if vm < 0 {
            let e = io::Error::last_os_error();
            libc::kill(init, libc::SIGKILL);
            return Err(e);
        }
        if vm == 0 {
            for fd in go.into_iter().chain(held) {
                libc::close(fd);
            }
            // It dies with its stand-in: a launcher that kills its child, or dies with
            // the child set to follow it, ends the VM.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        if let Err(e) = tell(vm) {
            libc::kill(vm, libc::SIGKILL);
            return Err(e);
        }
        leave_launchers_group();
        keep_only(go[1], held[0], -1);
        stand_in_main(vm)
    }
}

/// The pid namespace of the family this process starts VM processes in
/// ([`start_here`]).
static FAMILY: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Makes the VM processes this process starts from now on ([`spawning`]) a new family:
/// a pid namespace whose init, forked here, waits until this process has ended, then
/// until no other process is left in the namespace, then ends. (The processes this one
/// started are reparented outside the namespace when it ends, their parent having been
/// outside: the init looks for them once a second, as it gets no word of their end.) For a launcher that
/// starts VM processes itself (`forkvm template fork`: the children of one request are
/// one family). `Ok(false)`: a pid namespace may not be made here (`not_allowed`);
/// they start in this process's.
///
/// `ending`: what the family's init holds and undoes at the family's end.
pub fn start_here(ending: Ending) -> io::Result<bool> {
    if FAMILY.get().is_some() {
        return Ok(true);
    }
    // SAFETY: pidfd_open takes plain integers; its descriptor is owned at once.
    let me = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
    if me < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    let me = unsafe { OwnedFd::from_raw_fd(me) };
    // The init leaves this process's cgroup (see `split`).
    let families = crate::cgroup::families_procs();
    // On a thread of its own: a thread whose children start in another pid namespace
    // than its own may start no thread (`EINVAL`).
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Option<OwnedFd>> {
            // SAFETY: unshare takes plain integers; it changes where this thread's
            // children start. The forked init runs only system calls on its own copy of
            // this stack (see `split`); the other threads of this process do not exist
            // there.
            unsafe {
                if libc::unshare(libc::CLONE_NEWPID) != 0 {
                    let e = io::Error::last_os_error();
                    return match not_allowed(&e) {
                        true => Ok(None),
                        false => Err(e),
                    };
                }
                let init = raw_fork();
                if init == 0 {
                    if let Some(procs) = &families {
                        libc::write(procs.as_raw_fd(), c"0".as_ptr().cast(), 1);
                    }
                    let fd = me.as_raw_fd();
                    keep_only(
                        fd,
                        fd,
                        ending.lock.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    libc::close(1);
                    init_main(0, true, &ending)
                }
                if init < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            std::fs::File::open("/proc/thread-self/ns/pid_for_children").map(|f| Some(f.into()))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread making the namespace panicked")))
    })?;
    Ok(match made {
        Some(ns) => {
            let _ = FAMILY.set(ns);
            true
        }
        None => false,
    })
}

/// Runs `spawn` (which starts a process, and no thread) with the processes the calling
/// thread starts in this process's family ([`start_here`]), if it made one.
pub fn spawning<T>(spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let Some(family) = FAMILY.get() else {
        return spawn();
    };
    /// Sets the thread back to start processes (and threads) in its own namespace,
    /// however `spawn` ends.
    struct Back(std::fs::File);
    impl Drop for Back {
        fn drop(&mut self) {
            // SAFETY: setns takes a descriptor this process holds and a flag.
            if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                // A thread that may start no thread: nothing sane goes on from here.
                eprintln!(
                    "forkvm: a thread stays set to start processes in a VM family's pid \
                     namespace: {}",
                    io::Error::last_os_error()
                );
                std::process::abort();
            }
        }
    }
    let back = Back(std::fs::File::open("/proc/thread-self/ns/pid")?);
    // SAFETY: setns takes a descriptor this process holds and a flag; it changes where
    // this thread's children start.
    if unsafe { libc::setns(family.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let spawned = spawn();
    drop(back);
    spawned
}

/// Whether `unshare(CLONE_NEWPID)` failed because the host does not let this process
/// make a pid namespace, so VM processes stay in their launcher's (and say so at start):
/// no `CAP_SYS_ADMIN` (`EPERM`), or no namespace left to make (`ENOSPC`:
/// `user.max_pid_namespaces` set to 0, or the nesting limit reached).
fn not_allowed(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSPC))
}

/// Whether this process is in a pid namespace below the one of the procfs at `/proc`
/// (its launcher's): a family's.
pub fn in_a_family() -> bool {
    let named = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok());
    named.is_some_and(|pid| pid != std::process::id())
}

/// `fork` without glibc's handlers: a raw `clone` with `SIGCHLD`, as `fork` makes it.
///
/// # Safety
/// As [`split`].
unsafe fn raw_fork() -> libc::pid_t {
    // SAFETY: clone without CLONE_VM copies the address space; the child resumes here
    // with its own copy of this stack, as after fork(2).
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ) as libc::pid_t
    }
}

/// Keeps only descriptors `a` and `b`, as 0 and 1, closes every other one (the
/// launcher's, this process never `exec`s), resets every signal's handler (the
/// launcher's are of no use here) and makes the process not dumpable (it holds a copy
/// of the launcher's memory).
///
/// # Safety
/// As [`split`].
unsafe fn keep_only(a: i32, b: i32, c: i32) {
    // SAFETY: dup2, close_range, close and signal take plain integers.
    unsafe {
        // Copies above the stdio first: any may be 0, 1 or 2 (a launcher without stdin).
        let (a, b, c) = (
            libc::fcntl(a, libc::F_DUPFD, 3),
            libc::fcntl(b, libc::F_DUPFD, 3),
            match c {
                ..0 => -1,
                // A lock that cannot be kept: end (the family's launch fails).
                c => match libc::fcntl(c, libc::F_DUPFD, 3) {
                    ..0 => libc::_exit(1),
                    d => d,
                },
            },
        );
        // No descriptor left: end before the handshake (the other side sees it closed).
        if a < 0 || b < 0 || libc::dup2(a, 0) < 0 || libc::dup2(b, 1) < 0 {
            libc::_exit(1);
        }
        // The third (a family's uid lock) on 2, where it is kept: without it the uid
        // would be free for another family while this one lives.
        let first_closed: u32 = match c {
            ..0 => 2,
            c if libc::dup2(c, 2) == 2 => 3,
            _ => libc::_exit(1),
        };
        // A copy of the launcher's memory: no core file of it, nobody's `ptrace`.
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
        if libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32) != 0 {
            // Before Linux 5.9.
            for fd in first_closed as i32..65536 {
                libc::close(fd);
            }
        }
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Names the process `name` in `ps`: its `comm`, and its command line, a copy of the
/// launcher's (in this process's own copy of the launcher's stack), overwritten with
/// the name, so that nothing takes it for its launcher (a container's monitor is found
/// by its command line).
///
/// # Safety
/// As [`split`]: only system calls, and writes to this process's own argument area.
unsafe fn rename(name: &core::ffi::CStr) {
    /// A decimal number, 0 for anything else.
    fn number(digits: &[u8]) -> usize {
        digits
            .iter()
            .try_fold(0usize, |n, &d| {
                d.is_ascii_digit()
                    .then(|| n.checked_mul(10)?.checked_add(usize::from(d - b'0')))
                    .flatten()
            })
            .unwrap_or(0)
    }
    // SAFETY: prctl, open, read and close on values of this frame; the argument area
    // is where the kernel says it is (`arg_start`, `arg_end` of `/proc/self/stat`) and
    // is this process's, mapped for writing (the initial stack).
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        let fd = libc::open(
            c"/proc/self/stat".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 1024];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        let Ok(n) = usize::try_from(n) else { return };
        let text = &buf[..n];
        // Field 3 on follows the command name's closing parenthesis; the argument area
        // is fields 48 and 49.
        let Some(close) = text.iter().rposition(|&b| b == b')') else {
            return;
        };
        let mut fields = text[close + 1..]
            .split(|&b| b == b' ' || b == b'\n')
            .filter(|f| !f.is_empty())
            .skip(48 - 3);
        let (start, end) = match (fields.next(), fields.next()) {
            (Some(s), Some(e)) => (number(s), number(e)),
            _ => return,
        };
        let name = name.to_bytes_with_nul();
        if start == 0 || end < start + name.len() {
            return;
        }
        let area = core::slice::from_raw_parts_mut(start as *mut u8, end - start);
        area.fill(0);
        area[..name.len()].copy_from_slice(name);
    }
}

/// How often the init looks for the family's processes that are not its children
/// once `first` has ended: a launcher's own children ([`start_here`]) that outlived it
/// are its namespace's but were reparented outside it (their parent was outside), so
/// their end sends the init nothing.
static MEMBERS_POLL: libc::timespec = libc::timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

/// The family's init: reaps whatever is reparented to it until the process `first`
/// (a pidfd: the VM process, or the launcher whose children the family's processes
/// are; -1: none could be had) has ended and no child of its own is left, nor, where
/// `others` (a launcher's family, or no pidfd), any other process in its namespace
/// (`kill(-1, 0)`, which from a namespace's init reaches every other process of it,
/// zombies too: whoever they were reparented to reaps them): the family is gone, and
/// the namespace with it. (A VM process's family needs no look: once it ended, every
/// other process of the family descends from the init.)
///
/// # Safety
/// As [`split`].
unsafe fn init_main(first: i32, others: bool, ending: &Ending) -> ! {
    // SAFETY: system calls on values of this frame (see `split`).
    unsafe {
        rename(INIT_NAME);
        // Out of its launcher's session and process group: not a terminal's job, and
        // not among the launcher's processes (which some wait for to be gone).
        libc::setsid();
        // SIGCHLD blocked but while waiting, with a handler that does nothing, so that
        // a child's end interrupts the wait and none is missed between two waits.
        let mut chld: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, core::ptr::null_mut());
        let mut act: libc::sigaction = core::mem::zeroed();
        act.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGCHLD, &act, core::ptr::null_mut());
        let mut waiting: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut waiting);
        let mut first_ended = first < 0;
        loop {
            // Reap every child that ended.
            let children_left = loop {
                let r = libc::waitpid(-1, core::ptr::null_mut(), libc::WNOHANG);
                if r > 0 {
                    continue;
                }
                break r == 0;
            };
            let others = others || first < 0;
            let alone = || !others || (libc::kill(-1, 0) != 0 && errno() == libc::ESRCH);
            if first_ended && !children_left && alone() {
                // The family's groups, empty now (its last VM process left its own for
                // `exited`, and was reaped); its uid's lock goes with this process.
                for dir in [&ending.exited, &ending.group].into_iter().flatten() {
                    libc::rmdir(dir.as_ptr());
                }
                libc::_exit(0);
            }
            let mut fds = [libc::pollfd {
                fd: first,
                events: libc::POLLIN,
                revents: 0,
            }];
            let (n, timeout) = match (first_ended, children_left) {
                (false, _) => (1, core::ptr::null()),
                // Its children's ends wake it.
                (true, true) => (0, core::ptr::null()),
                // Others, not its children, live on.
                (true, false) => (0, &raw const MEMBERS_POLL),
            };
            let r = libc::ppoll(fds.as_mut_ptr(), n, timeout, &waiting);
            if n == 1 && r > 0 && fds[0].revents != 0 {
                first_ended = true;
            }
        }
    }
}

/// Sends the VM process's pid `pid` (4 bytes, native order) on the socket `report`,
/// with a pidfd of it (`SCM_RIGHTS`) where the kernel makes one: opened while the VM
/// process cannot have been reaped (by its parent, which is the caller, or by itself),
/// it names that process even if its pid is reused once it ended, where the launcher's
/// own `pidfd_open` of the number could name another.
///
/// # Safety
/// As [`split`]: async-signal-safe system calls only.
unsafe fn tell_vm_process(report: i32, pid: libc::pid_t) -> io::Result<()> {
    // SAFETY: system calls on values of this frame; the control buffer is aligned for a
    // `cmsghdr` (u64s) and as long as the space one descriptor takes.
    unsafe {
        let bytes = (pid as u32).to_ne_bytes();
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = core::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if pidfd >= 0 {
            let fd_len = core::mem::size_of::<i32>() as u32;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(fd_len) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
            core::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), pidfd);
        }
        let sent = libc::sendmsg(report, &raw const msg, libc::MSG_NOSIGNAL);
        let e = io::Error::last_os_error();
        if pidfd >= 0 {
            libc::close(pidfd);
        }
        match sent {
            4 => Ok(()),
            _ => Err(e),
        }
    }
}

/// Reads what [`split`] sends on the launch socket `sock` before anything else: the
/// first VM process's pid in the launcher's namespace, and a pidfd of it (`None` where
/// the kernel made none). Waits up to `deadline`.
pub fn read_report(
    sock: &std::os::unix::net::UnixStream,
    deadline: std::time::Duration,
) -> io::Result<(u32, Option<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::io::Read;

    let said = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("its stand-in did not say the VM process's pid ({e})"),
        )
    };
    sock.set_read_timeout(Some(deadline))?;
    let mut pid = [0u8; 4];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [io::IoSliceMut::new(&mut pid)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(said(e.into())),
        }
    };
    let mut pidfd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            // One is sent; any other is closed as it drops.
            for fd in fds {
                pidfd.get_or_insert(fd);
            }
        }
    }
    // A stream may deliver the four bytes in parts (never seen); none: it ended.
    if got < pid.len() {
        (&*sock).read_exact(&mut pid[got..]).map_err(said)?;
    }
    sock.set_read_timeout(None)?;
    Ok((u32::from_ne_bytes(pid), pidfd))
}

/// A signal handler that does nothing: its signal interrupts a wait.
extern "C" fn nothing(_: libc::c_int) {}

/// The VM process's stand-in: tells the init the VM process exists, waits for it and
/// ends as it ended.
///
/// # Safety
/// As [`split`]; descriptor 0 is the "go" to the init, 1 its "held" answer.
unsafe fn stand_in_main(vm: libc::pid_t) -> ! {
    // SAFETY: system calls on values of this frame (see `split`).
    unsafe {
        rename(STAND_IN_NAME);
        // A terminal's signals reach the VM process too (one process group): it, not
        // its stand-in, decides how they end it.
        for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGTSTP] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let byte = 1u8;
        libc::write(0, (&raw const byte).cast(), 1);
        let mut answer = 0u8;
        // An init that died answers nothing (end of file); the VM process died with it.
        while libc::read(1, (&raw mut answer).cast(), 1) < 0 && errno() == libc::EINTR {}
        libc::close(0);
        libc::close(1);
        let mut status = 0;
        loop {
            let r = libc::waitpid(vm, &mut status, 0);
            if r == vm {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFSIGNALED(status) {
            // End by the same signal, with its default action (not dumpable: no core).
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// This thread's `errno`.
fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}
