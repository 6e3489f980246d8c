//! Seccomp filters of the VMM's threads.
//!
//! vCPU threads are where a guest's exits land: every MMIO and port access runs device
//! code on them (the virtio-mmio registers, the serial port, the power and reset
//! devices). They run under an allow-list ([`VCPU_SYSCALLS`]) of what that code does:
//! KVM and TUN ioctls, reads and writes of eventfds and the console log, memory and
//! synchronisation, the kick signal. Opening a file fails with `EACCES` (glibc's
//! allocator opens `/proc/sys/vm/overcommit_memory` the first time a heap shrinks, and
//! copes with a refusal). Any other call (a socket, `exec`, `ptrace`) traps: the VM
//! process writes one line naming the call to its log and ends with exit code 159
//! (128 + SIGSYS). The filters are installed by each vCPU thread before it first runs
//! the guest, with `no_new_privs`.
//!
//! Not yet filtered (issue "Contain the guest"): the event loop thread (devices' queue
//! work, the FUSE server), the API server's threads and the main thread; ioctl
//! arguments are not restricted.

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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

/// What a vCPU thread may call.
pub const VCPU_SYSCALLS: &[(i64, &str)] = &[
    // KVM_RUN and the vCPU state ioctls; TUNSETOFFLOAD when the guest activates a NIC;
    // KVM_IOEVENTFD/IRQFD registrations of queues set up by the guest.
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
    // Passed here, refused by the second filter with EACCES ([`REFUSED_SYSCALLS`]).
    (libc::SYS_openat, "openat"),
    (libc::SYS_open, "open"),
];

/// Calls a vCPU thread's code may make but gets refused (`EACCES`) instead of the
/// process ending: opening files, which glibc's allocator tries and does without.
pub const REFUSED_SYSCALLS: &[(i64, &str)] =
    &[(libc::SYS_openat, "openat"), (libc::SYS_open, "open")];

/// The vCPU threads' filters, built once: the allow-list (anything else traps), and the
/// refusals (stacked: the kernel applies the stricter answer of the two).
fn vcpu_filters() -> Result<&'static [BpfProgram; 2], SeccompError> {
    static FILTERS: OnceLock<Result<[BpfProgram; 2], String>> = OnceLock::new();
    let build = |calls: &[(i64, &str)], mismatch, matched| {
        let rules = calls.iter().map(|&(nr, _)| (nr, vec![])).collect();
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| e.to_string())
    };
    FILTERS
        .get_or_init(|| {
            Ok([
                build(VCPU_SYSCALLS, SeccompAction::Trap, SeccompAction::Allow)?,
                build(
                    REFUSED_SYSCALLS,
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::EACCES as u32),
                )?,
            ])
        })
        .as_ref()
        .map_err(|e| SeccompError::Build(e.clone()))
}

/// Puts the calling thread (a vCPU thread) under the vCPU filters, for good.
pub fn apply_vcpu_filter() -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    // The refusals first: once the allow-list is on, installing (prctl, seccomp) traps.
    let [allow_list, refusals] = vcpu_filters()?;
    for filter in [refusals, allow_list] {
        seccompiler::apply_filter(filter).map_err(SeccompError::Install)?;
    }
    Ok(())
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

/// The line a trapped call writes (`number`: its system call number).
pub fn trap_message(number: i64) -> String {
    format!(
        "forkvm: a vCPU thread made system call {number}, which its seccomp filter does not \
         allow: the VM process ends\n"
    )
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: no allocation, no locks; write(2) and _exit(2).
    // SAFETY: the kernel passes a SIGSYS siginfo, whose layout SigsysInfo mirrors.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let head = b"forkvm: a vCPU thread made system call ";
    let tail = b", which its seccomp filter does not allow: the VM process ends\n";
    let mut digits = [0u8; 20];
    let num = decimal(nr.max(0) as u64, &mut digits);
    for part in [&head[..], num, &tail[..]] {
        // SAFETY: writes `part`, which lives across the call, to stderr (the VM's log).
        unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Installs the process's SIGSYS handler (once).
fn install_sigsys_handler() -> Result<(), SeccompError> {
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

    /// Set in the child the test starts: it installs the filter and breaks it.
    const CHILD: &str = "FORKVM_SECCOMP_TEST_CHILD";

    #[test]
    fn a_call_outside_the_vcpu_filter_ends_the_process_with_a_log_line() {
        if std::env::var_os(CHILD).is_some() {
            std::thread::spawn(|| {
                apply_vcpu_filter().unwrap();
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
                unreachable!("the socket was allowed");
            })
            .join()
            .unwrap();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::a_call_outside_the_vcpu_filter_ends_the_process_with_a_log_line",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(159), "{stderr}");
        let line = trap_message(libc::SYS_socket);
        assert!(stderr.contains(line.trim_end()), "{stderr}");
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(257, &mut b), b"257");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }
}
