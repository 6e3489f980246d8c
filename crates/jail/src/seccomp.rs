//! Seccomp filters of a VM process's threads, one allow-list per kind of thread
//! ([`ThreadKind`]), built with rust-vmm's `seccompiler`.
//!
//! - [`ThreadKind::Process`]: every thread of a jailed VM process, installed on all of
//!   them at once when the process is launched, before the VM is built: what the event
//!   loop (device queues, backends, the FUSE server), the fork and template code, the
//!   fork pool and the threads they start call ([`PROCESS_SYSCALLS`]). Processes it
//!   starts (its fork children, its pool's zygote) inherit it. Sockets only of the
//!   kinds the VMM uses (Unix, IP for interface ioctls, netlink). No `mount`,
//!   `ptrace`, `unshare`, `setns`, `bpf`, `kexec`, modules, keys, `userfaultfd`,
//!   `io_uring`, clock setting...
//! - [`ThreadKind::Vcpu`]: stacked on each vCPU thread before it first runs the guest:
//!   every MMIO and port access runs device code there. [`VCPU_SYSCALLS`], `ioctl` only
//!   with the requests of [`vcpu_ioctls`] (running and saving the vCPU, NIC
//!   offloads); opening a file is refused with `EACCES` (glibc's
//!   allocator opens `/proc/sys/vm/overcommit_memory` the first time a heap shrinks, and
//!   copes).
//! - [`ThreadKind::Api`]: stacked on the API server's thread (and so on the threads its
//!   runtime starts): it reads requests and the VM's files and hands work to the event
//!   loop ([`API_SYSCALLS`]): no `ioctl`, no new sockets, no process (`clone` only for
//!   threads; `clone3`, whose flags a filter cannot see, answers `ENOSYS` and glibc
//!   falls back to `clone`).
//!
//! vCPU and API threads signal only threads of their own process (`tgkill` with the
//! process's ID; the process filter lets its event loop signal any single process as
//! root may): a device bug on a vCPU thread cannot be made to kill another VM or a host
//! process by a signal of its own. The filters are built once per process, possibly
//! before a zygote forks the process that installs them, so their rule names a
//! stand-in ([`OWN_PROCESS`]) that each installation replaces with its process's ID.
//!
//! A call outside a thread's filter traps: the process writes one line naming the kind
//! of thread and the call's number to its log and ends with exit code 159 (128 + SIGSYS).
//! Stacked filters all apply: the kernel takes the strictest answer.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building the BPF program failed.
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused it.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// The kinds of thread of a VM process, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Any thread of the process (the event loop and the rest): the base filter.
    Process = 0,
    /// A vCPU thread.
    Vcpu = 1,
    /// The API server's threads.
    Api = 2,
}

impl ThreadKind {
    /// Its name in the trap's log line, with its article.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Process => "a VMM",
            ThreadKind::Vcpu => "a vCPU",
            ThreadKind::Api => "an API",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ThreadKind::Vcpu,
            2 => ThreadKind::Api,
            _ => ThreadKind::Process,
        }
    }
}

/// What any thread of a jailed VM process may call (besides the arguments rules of
/// [`process_rules`]).
pub const PROCESS_SYSCALLS: &[(i64, &str)] = &[
    // Files: disks, overlays, the console log, the home's files, templates, shared
    // directories (the FUSE server: every file operation a guest can ask for).
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_preadv2, "preadv2"),
    (libc::SYS_pwritev2, "pwritev2"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_close, "close"),
    (libc::SYS_close_range, "close_range"),
    (libc::SYS_creat, "creat"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_statfs, "statfs"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_access, "access"),
    (libc::SYS_faccessat, "faccessat"),
    (libc::SYS_faccessat2, "faccessat2"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_link, "link"),
    (libc::SYS_linkat, "linkat"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_symlinkat, "symlinkat"),
    (libc::SYS_mknodat, "mknodat"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_fchown, "fchown"),
    (libc::SYS_fchownat, "fchownat"),
    (libc::SYS_utimensat, "utimensat"),
    (libc::SYS_truncate, "truncate"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_sync_file_range, "sync_file_range"),
    (libc::SYS_fadvise64, "fadvise64"),
    (libc::SYS_copy_file_range, "copy_file_range"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_getxattr, "getxattr"),
    (libc::SYS_lgetxattr, "lgetxattr"),
    (libc::SYS_fgetxattr, "fgetxattr"),
    (libc::SYS_setxattr, "setxattr"),
    (libc::SYS_lsetxattr, "lsetxattr"),
    (libc::SYS_fsetxattr, "fsetxattr"),
    (libc::SYS_listxattr, "listxattr"),
    (libc::SYS_llistxattr, "llistxattr"),
    (libc::SYS_flistxattr, "flistxattr"),
    (libc::SYS_removexattr, "removexattr"),
    (libc::SYS_lremovexattr, "lremovexattr"),
    (libc::SYS_fremovexattr, "fremovexattr"),
    // Passed here, refused by the process's first filter ([`PROCESS_REFUSED`]).
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe2, "pipe2"),
    // KVM, TAPs, interface and terminal ioctls.
    (libc::SYS_ioctl, "ioctl"),
    // Memory: guest RAM (memfds, sealed copies), the heap.
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mincore, "mincore"),
    (libc::SYS_msync, "msync"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_membarrier, "membarrier"),
    // Events.
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    // Sockets: the API, vsock backends, launch and fork sockets, the agent, netlink
    // and interface ioctls (the domain is checked: [`process_rules`]).
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_sendmmsg, "sendmmsg"),
    (libc::SYS_recvmmsg, "recvmmsg"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    // Processes: fork children, the pool's zygote and warm processes, their reaping.
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_waitid, "waitid"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
    (libc::SYS_setsid, "setsid"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_getrlimit, "getrlimit"),
    (libc::SYS_arch_prctl, "arch_prctl"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    // Its own confinement (stacking a thread's filter; dropping and raising kept
    // capabilities, which cannot add any) and a shared directory's file server acting
    // as the guest's user (allowed by the kernel only while it has CAP_SETUID/SETGID).
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_capget, "capget"),
    (libc::SYS_capset, "capset"),
    (libc::SYS_setresuid, "setresuid"),
    (libc::SYS_setresgid, "setresgid"),
    (libc::SYS_setfsuid, "setfsuid"),
    (libc::SYS_setfsgid, "setfsgid"),
    // Identity, scheduling, time, signals.
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_getgroups, "getgroups"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_sysinfo, "sysinfo"),
    (libc::SYS_getrusage, "getrusage"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_sched_setscheduler, "sched_setscheduler"),
    (libc::SYS_sched_getscheduler, "sched_getscheduler"),
    (libc::SYS_sched_getparam, "sched_getparam"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_getres, "clock_getres"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_time, "time"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_restart_syscall, "restart_syscall"),
];

/// Socket domains a VM process uses: Unix sockets (API, vsock, launch, agent), IPv4
/// datagram sockets for interface ioctls (bridges), netlink.
pub const SOCKET_DOMAINS: &[i32] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_NETLINK];

/// What a vCPU thread may call (`ioctl` only with [`vcpu_ioctls`]).
pub const VCPU_SYSCALLS: &[(i64, &str)] = &[
    // KVM_RUN and the vCPU state ioctls; queue and NIC registrations (see vcpu_ioctls).
    (libc::SYS_ioctl, "ioctl"),
    // Eventfds (kicks, interrupts, activation), the console log, log lines.
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_close, "close"),
    // Memory.
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    // Synchronisation, time, the kick signal, the thread's end.
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    // Rust's panic message names the working directory's relative paths.
    (libc::SYS_getcwd, "getcwd"),
    // Passed here, refused by the second filter with EACCES ([`VCPU_REFUSED`]).
    (libc::SYS_openat, "openat"),
    (libc::SYS_open, "open"),
];

/// Calls the process's code may make but gets refused (`EOPNOTSUPP`) instead of the
/// process ending: file handles. A share's file server asks a file's mount through
/// `name_to_handle_at` where `statx` does not give it (Linux before 5.8) and does
/// without; `open_by_handle_at` would open any file of a file system the process can
/// see a place of (with a share's `CAP_DAC_READ_SEARCH`), around its root.
pub const PROCESS_REFUSED: &[(i64, &str)] = &[
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
];

/// Calls a vCPU thread's code may make but gets refused (`EACCES`) instead of the
/// process ending: opening files, which glibc's allocator tries and does without.
pub const VCPU_REFUSED: &[(i64, &str)] = &[(libc::SYS_openat, "openat"), (libc::SYS_open, "open")];

/// What the API server's threads may call (`clone` only for threads).
pub const API_SYSCALLS: &[(i64, &str)] = &[
    // Requests and answers on accepted connections; the VM's files (state, console).
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_open, "open"),
    (libc::SYS_close, "close"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_fcntl, "fcntl"),
    // The VM's state file, rewritten (aside, then renamed into place).
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_fchmod, "fchmod"),
    // The runtime: its poller, its wakers, its blocking threads.
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_sched_yield, "sched_yield"),
    // Memory.
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    // Synchronisation, time, signals, the thread's end.
    (libc::SYS_futex, "futex"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    // Who the caller is, against whom the process runs as (its socket's credentials come
    // with accept's getsockopt).
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getuid, "getuid"),
];

/// Calls the API threads may make but get refused: `clone3` with `ENOSYS`, so that
/// glibc starts its threads with `clone`, whose flags the filter checks.
pub const API_REFUSED: &[(i64, &str)] = &[(libc::SYS_clone3, "clone3")];

/// The ioctl requests a vCPU thread makes: running the vCPU, saving its state at a
/// pause, and a NIC's offloads when the guest's register writes activate it (queue
/// eventfds and interrupts are registered by the event loop).
pub fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    use vmm_sys_util::ioctl::{_IOC_READ, _IOC_WRITE};
    const KVMIO: u32 = 0xAE;
    let io = |nr: u32| vmm_sys_util::ioctl::ioctl_expr(0, KVMIO, nr, 0) as u64;
    let ior = |nr: u32, size: usize| {
        vmm_sys_util::ioctl::ioctl_expr(_IOC_READ, KVMIO, nr, size as u32) as u64
    };
    let iowr = |nr: u32, size: usize| {
        vmm_sys_util::ioctl::ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size as u32) as u64
    };
    use std::mem::size_of;
    vec![
        io(0x80),                                // KVM_RUN
        ior(0x81, size_of::<kvm_regs>()),        // KVM_GET_REGS
        ior(0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
        iowr(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
        ior(0x8c, size_of::<kvm_fpu>()),         // KVM_GET_FPU
        ior(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ior(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        ior(0x9f, size_of::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        ior(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        io(0xa3),                                // KVM_GET_TSC_KHZ
        ior(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        ior(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
        libc::TUNSETOFFLOAD,
    ]
}

thread_local! {
    /// The kind of the calling thread, for the trap's log line.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Marks the calling thread as one of `kind` for the trap's log line (a thread that
/// inherited its kind's filter from the thread that started it).
pub fn mark(kind: ThreadKind) {
    KIND.with(|k| k.set(kind as u8));
}

/// An allow-list: the calls of `calls` with no argument rule, plus `rules`.
fn allow_list(
    calls: &[(i64, &str)],
    rules: Vec<(i64, Vec<SeccompRule>)>,
) -> Result<BpfProgram, String> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        calls.iter().map(|&(nr, _)| (nr, vec![])).collect();
    map.extend(rules);
    SeccompFilter::new(
        map,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())
}

/// A refusal filter: the calls of `calls` answer `errno`, everything else passes (to the
/// allow-list it is stacked with).
fn refusals(calls: &[(i64, &str)], errno: i32) -> Result<BpfProgram, String> {
    let map = calls.iter().map(|&(nr, _)| (nr, vec![])).collect();
    SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())
}

/// `syscall` allowed when argument `index` (its low 32 bits) is one of `values`.
fn one_of(syscall: i64, index: u8, values: &[u64]) -> Result<(i64, Vec<SeccompRule>), String> {
    let rules = values
        .iter()
        .map(|&v| all(vec![arg(index, SeccompCmpOp::Eq, v)?]))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((syscall, rules))
}

/// A condition on the low 32 bits of argument `index`.
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

/// A rule of `conditions`, all of which must hold.
fn all(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// The argument rules of the process filter: sockets of [`SOCKET_DOMAINS`] only, IPv4
/// ones only datagram (interface ioctls: no connection anywhere); signals only to a
/// process (a positive ID: not `-1`, every process root may signal, nor a group).
fn process_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, String> {
    let mut sockets = Vec::new();
    for &domain in SOCKET_DOMAINS {
        let mut conditions = vec![arg(0, SeccompCmpOp::Eq, domain as u64)?];
        if domain == libc::AF_INET {
            let kind = SeccompCmpOp::MaskedEq(0xf);
            conditions.push(arg(1, kind, libc::SOCK_DGRAM as u64)?);
        }
        sockets.push(all(conditions)?);
    }
    let positive = all(vec![
        arg(0, SeccompCmpOp::MaskedEq(0x8000_0000), 0)?,
        arg(0, SeccompCmpOp::Ne, 0)?,
    ])?;
    Ok(vec![
        (libc::SYS_socket, sockets),
        (libc::SYS_kill, vec![positive]),
    ])
}

/// Stands for the ID of the process that installs a vCPU or API filter in its `tgkill`
/// rule ([`own_process_signals`]); [`for_this_process`] replaces it. A value no process
/// ID takes (above `PID_MAX_LIMIT`, 2^22) and no other constant of the filters is.
const OWN_PROCESS: u32 = 0x5ec0_0f1d;

/// `tgkill` only to threads of the calling process.
fn own_process_signals() -> Result<(i64, Vec<SeccompRule>), String> {
    let own = arg(0, SeccompCmpOp::Eq, u64::from(OWN_PROCESS))?;
    Ok((libc::SYS_tgkill, vec![all(vec![own])?]))
}

/// `filter` with [`OWN_PROCESS`] replaced by the calling process's ID (in the
/// comparisons that name it); how many it replaced.
fn for_this_process(filter: &BpfProgram) -> (BpfProgram, usize) {
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let mut replaced = 0;
    let program = filter
        .iter()
        .map(|i| {
            let mut i = i.clone();
            if i.code == jeq && i.k == OWN_PROCESS {
                i.k = pid;
                replaced += 1;
            }
            i
        })
        .collect();
    (program, replaced)
}

/// The argument rules of the API filter: `clone` only with `CLONE_THREAD`; `tgkill`
/// only in its own process.
fn api_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, String> {
    let thread = libc::CLONE_THREAD as u64;
    let rule = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| e.to_string())?;
    Ok(vec![(libc::SYS_clone, vec![rule]), own_process_signals()?])
}

/// The filters of `kind`, built once, in the order they are installed.
fn filters(kind: ThreadKind) -> Result<&'static [BpfProgram], SeccompError> {
    type Programs = Result<Vec<BpfProgram>, String>;
    type Built = OnceLock<Programs>;
    static PROCESS: Built = OnceLock::new();
    static VCPU: Built = OnceLock::new();
    static API: Built = OnceLock::new();
    let (cell, build): (&Built, fn() -> Programs) = match kind {
        // The refusals first: once the allow-list is on, installing (seccomp) traps.
        ThreadKind::Process => (&PROCESS, || {
            Ok(vec![
                refusals(PROCESS_REFUSED, libc::EOPNOTSUPP)?,
                allow_list(PROCESS_SYSCALLS, process_rules()?)?,
            ])
        }),
        // The refusals first: once the allow-list is on, installing (seccomp) traps.
        ThreadKind::Vcpu => (&VCPU, || {
            let ioctls = one_of(libc::SYS_ioctl, 1, &vcpu_ioctls())?;
            Ok(vec![
                refusals(VCPU_REFUSED, libc::EACCES)?,
                allow_list(VCPU_SYSCALLS, vec![ioctls, own_process_signals()?])?,
            ])
        }),
        ThreadKind::Api => (&API, || {
            Ok(vec![
                refusals(API_REFUSED, libc::ENOSYS)?,
                allow_list(API_SYSCALLS, api_rules()?)?,
            ])
        }),
    };
    cell.get_or_init(build)
        .as_deref()
        .map_err(|e| SeccompError::Build(e.clone()))
}

/// Builds every kind's filters now (each is built once per process, on first use): in a
/// process that will start a VM later (a fork pool's zygote, a warm process), so that
/// the build is not on the fork's way. Errors wait for the filter's use.
pub fn prepare() {
    for kind in [ThreadKind::Process, ThreadKind::Vcpu, ThreadKind::Api] {
        let _ = filters(kind);
    }
}

/// Puts the calling thread under the filters of `kind`, for good (with `no_new_privs`):
/// [`ThreadKind::Process`] on every thread of the process at once, the others on the
/// calling thread only, stacked on what it has.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    let filters = filters(kind)?;
    if kind == ThreadKind::Process {
        for filter in filters {
            seccompiler::apply_filter_all_threads(filter).map_err(SeccompError::Install)?;
        }
    } else {
        // Each filter with this process's ID in its `tgkill` rule; one that names the
        // stand-in nowhere would let no signal through at all, or (built otherwise)
        // any: refused before anything is installed.
        let own: Vec<(BpfProgram, usize)> = filters.iter().map(for_this_process).collect();
        if own.iter().map(|(_, n)| n).sum::<usize>() != 1 {
            return Err(SeccompError::Build(format!(
                "the {} filters name their process's ID other than once",
                kind.name()
            )));
        }
        for (filter, _) in &own {
            seccompiler::apply_filter(filter).map_err(SeccompError::Install)?;
        }
    }
    mark(kind);
    Ok(())
}

/// Puts the calling thread (a vCPU thread) under the vCPU filters.
pub fn apply_vcpu_filter() -> Result<(), SeccompError> {
    apply(ThreadKind::Vcpu)
}

/// The first fields of a `siginfo_t` for SIGSYS (`_sigsys` of the kernel's union); only
/// `syscall` is read.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// Formats `n` in decimal into `buf`; returns the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The line a trapped call writes (`kind`: the calling thread's, `number`: its system
/// call number).
pub fn trap_message(kind: ThreadKind, number: i64) -> String {
    format!(
        "forkvm: {} thread made system call {number}, which its seccomp filter does not \
         allow: the VM process ends\n",
        kind.name()
    )
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: no allocation, no locks; write(2) and _exit(2).
    // SAFETY: the kernel passes a SIGSYS siginfo, whose layout SigsysInfo mirrors.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    // A const-initialised thread local without a destructor: a plain TLS read.
    let kind = ThreadKind::from_u8(KIND.with(Cell::get)).name();
    let head = b"forkvm: ";
    let middle = b" thread made system call ";
    let tail = b", which its seccomp filter does not allow: the VM process ends\n";
    let mut digits = [0u8; 20];
    let num = decimal(nr.max(0) as u64, &mut digits);
    for part in [&head[..], kind.as_bytes(), &middle[..], num, &tail[..]] {
        // SAFETY: writes `part`, which lives across the call, to stderr (the VM's log).
        unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Installs the process's SIGSYS handler (once).
pub(crate) fn install_sigsys_handler() -> Result<(), SeccompError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is valid; the fields used are set below.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = sigsys_handler as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            // SAFETY: installs a handler for SIGSYS from a valid sigaction.
            let r = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        })
        .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child a test starts: it installs a filter and breaks it.
    const CHILD: &str = "FORKVM_SECCOMP_TEST_CHILD";

    /// Runs test `name` of this executable again as the victim (`CHILD` set); returns its
    /// exit code and stderr.
    fn victim(name: &str) -> (Option<i32>, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("seccomp::tests::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn is_victim() -> bool {
        std::env::var_os(CHILD).is_some()
    }

    fn assert_trapped(name: &str, kind: ThreadKind, nr: i64) {
        let (code, stderr) = victim(name);
        assert_eq!(code, Some(159), "{stderr}");
        let line = trap_message(kind, nr);
        assert!(stderr.contains(line.trim_end()), "{stderr}");
    }

    /// A test of a call that must trap: as the victim, runs `body` (on a thread of its
    /// own when `on_thread`), which must not return; otherwise runs the test again as the
    /// victim and checks that it ended on call `nr` in a thread of `kind`, with the line.
    fn trap_test(name: &str, kind: ThreadKind, nr: i64, on_thread: bool, body: fn()) {
        if !is_victim() {
            return assert_trapped(name, kind, nr);
        }
        if on_thread {
            std::thread::spawn(body).join().unwrap();
        } else {
            body();
        }
        unreachable!("{name}: the call was allowed");
    }

    #[test]
    fn a_call_outside_the_vcpu_filter_ends_the_process_with_a_log_line() {
        trap_test(
            "a_call_outside_the_vcpu_filter_ends_the_process_with_a_log_line",
            ThreadKind::Vcpu,
            libc::SYS_socket,
            true,
            || {
                apply(ThreadKind::Vcpu).unwrap();
                // Allowed: memory, eventfds, time.
                let v = vec![0u8; 1 << 20];
                drop(v);
                let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
                e.write(1).unwrap();
                let _ = std::time::Instant::now();
                // Refused, not fatal: opening a file.
                let e = std::fs::File::open("/etc/hostname").unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EACCES));
                // Not allowed: a socket.
                let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            },
        );
    }

    #[test]
    fn a_vcpu_thread_may_not_make_other_ioctls() {
        trap_test(
            "a_vcpu_thread_may_not_make_other_ioctls",
            ThreadKind::Vcpu,
            libc::SYS_ioctl,
            true,
            || {
                apply(ThreadKind::Vcpu).unwrap();
                // TIOCSTI: pushing input into a terminal is no vCPU's business.
                // SAFETY: an ioctl on stdin with a valid pointer; the filter stops it first.
                unsafe { libc::ioctl(0, libc::TIOCSTI, c"x".as_ptr()) };
            },
        );
    }

    #[test]
    fn a_vcpu_thread_signals_only_its_own_process() {
        trap_test(
            "a_vcpu_thread_signals_only_its_own_process",
            ThreadKind::Vcpu,
            libc::SYS_tgkill,
            true,
            || {
                apply(ThreadKind::Vcpu).unwrap();
                // Its own thread (the kick of a vCPU; abort's raise): allowed.
                // SAFETY: signal 0 sends nothing; getpid and gettid name this thread.
                let own = unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        libc::syscall(libc::SYS_gettid),
                        0,
                    )
                };
                assert_eq!(own, 0);
                // Another process (init): trapped before the kernel sees it.
                // SAFETY: signal 0 sends nothing; the filter stops the call first.
                unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            },
        );
    }

    #[test]
    fn an_api_thread_signals_only_its_own_process() {
        trap_test(
            "an_api_thread_signals_only_its_own_process",
            ThreadKind::Api,
            libc::SYS_tgkill,
            true,
            || {
                apply(ThreadKind::Api).unwrap();
                // SAFETY: signal 0 sends nothing; the filter stops the call first.
                unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            },
        );
    }

    #[test]
    fn the_stand_in_for_the_process_id_is_in_the_vcpu_and_api_filters_once() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Api] {
            let named: usize = filters(kind)
                .unwrap()
                .iter()
                .map(|f| for_this_process(f).1)
                .sum();
            assert_eq!(named, 1, "{}", kind.name());
            // Replaced, it is gone.
            for f in filters(kind).unwrap() {
                assert_eq!(for_this_process(&for_this_process(f).0).1, 0);
            }
        }
        let process: usize = filters(ThreadKind::Process)
            .unwrap()
            .iter()
            .map(|f| for_this_process(f).1)
            .sum();
        assert_eq!(process, 0);
    }

    #[test]
    fn the_api_threads_start_threads_but_no_process() {
        trap_test(
            "the_api_threads_start_threads_but_no_process",
            ThreadKind::Api,
            libc::SYS_clone,
            true,
            || {
                apply(ThreadKind::Api).unwrap();
                // A thread: clone3 refused, glibc falls back to clone with CLONE_THREAD.
                std::thread::spawn(|| {}).join().unwrap();
                // A process: clone without CLONE_THREAD. (Through posix_spawn, which
                // blocks every signal around its clone, the trap kills without the line.)
                // SAFETY: fork in a test's victim process; the filter stops it first.
                unsafe { libc::fork() };
            },
        );
    }

    #[test]
    fn the_process_filter_covers_every_thread_and_refuses_mount() {
        trap_test(
            "the_process_filter_covers_every_thread_and_refuses_mount",
            ThreadKind::Process,
            libc::SYS_mount,
            false,
            || {
                // A thread started before the filter gets it too.
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let earlier = std::thread::spawn(move || {
                    rx.recv().unwrap();
                    // SAFETY: mount with valid C strings; the filter stops it first.
                    unsafe {
                        libc::mount(
                            c"none".as_ptr(),
                            c"/mnt".as_ptr(),
                            c"tmpfs".as_ptr(),
                            0,
                            std::ptr::null(),
                        )
                    };
                });
                apply(ThreadKind::Process).unwrap();
                // What a VMM does is allowed: files, sockets of its kinds, a process.
                std::fs::read_to_string("/proc/self/status").unwrap();
                drop(std::os::unix::net::UnixDatagram::unbound().unwrap());
                assert!(std::process::Command::new("/bin/true")
                    .status()
                    .unwrap()
                    .success());
                tx.send(()).unwrap();
                earlier.join().unwrap();
            },
        );
    }

    #[test]
    fn the_process_filter_allows_only_the_vmms_socket_domains() {
        trap_test(
            "the_process_filter_allows_only_the_vmms_socket_domains",
            ThreadKind::Process,
            libc::SYS_socket,
            false,
            || {
                apply(ThreadKind::Process).unwrap();
                for domain in SOCKET_DOMAINS {
                    // SAFETY: socket(2) takes no pointers; the descriptor is closed at once.
                    let fd =
                        unsafe { libc::socket(*domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
                    if fd >= 0 {
                        // SAFETY: closes the descriptor just made.
                        unsafe { libc::close(fd) };
                    }
                }
                // A signal to a process of its own is allowed.
                // SAFETY: signal 0 only checks that the process exists.
                assert_eq!(unsafe { libc::kill(libc::getpid(), 0) }, 0);
                // File handles are refused, not fatal (a share's server does without).
                for nr in [libc::SYS_name_to_handle_at, libc::SYS_open_by_handle_at] {
                    // SAFETY: the filter answers before the kernel reads any argument.
                    let rc = unsafe { libc::syscall(nr, -1, 0, 0, 0, 0) };
                    let e = std::io::Error::last_os_error();
                    assert_eq!((rc, e.raw_os_error()), (-1, Some(libc::EOPNOTSUPP)));
                }
                // A TCP connection is not.
                // SAFETY: socket(2) takes no pointers; the filter stops it first.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            },
        );
    }

    #[test]
    fn the_process_filter_signals_no_process_group_and_not_every_process() {
        trap_test(
            "the_process_filter_signals_no_process_group_and_not_every_process",
            ThreadKind::Process,
            libc::SYS_kill,
            false,
            || {
                apply(ThreadKind::Process).unwrap();
                // kill(-1, 0): every process root may signal. Trapped before it is made.
                // SAFETY: signal 0 sends nothing; the filter stops the call first.
                unsafe { libc::kill(-1, 0) };
            },
        );
    }

    #[test]
    fn vcpu_ioctl_numbers_are_the_kernels() {
        let ioctls = vcpu_ioctls();
        for known in [0xae80, 0x8090_ae81, 0x8400_ae8e, 0xaea3] {
            assert!(
                ioctls.contains(&known),
                "{known:#x} missing from {ioctls:x?}"
            );
        }
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(257, &mut b), b"257");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }
}
