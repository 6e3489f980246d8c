//! Starting a [`ProcessSpec`]: everything is resolved and allocated in the parent
//! (user ids, `PATH` candidates, argv/envp, rlimits, pipes or a pty), then the child of
//! [`Reaper::fork`] makes only async-signal-safe calls, in this order:
//!
//! 1. signal mask emptied, every disposition back to default (the agent ignores SIGPIPE);
//!    a container's main process started in a PID namespace ([`PidStart`]) then reports
//!    to the agent, with a proc mount made there for the container's `/proc`
//!    ([`crate::container::stack_proc`]), and waits for the agent's go;
//! 2. `setsid`; stdio dup'ed onto 0, 1, 2; for a tty `TIOCSCTTY` on the slave;
//! 3. `oom_score_adj` written, `umask` set; the container's cgroup joined and a cgroup
//!    namespace of its own taken, once the container has one ([`crate::cgroup`]);
//! 4. an app container's mount namespace joined ([`crate::mntns`]: its root is the
//!    container's), else `chroot(root)` (skipped when the root is `/`); `chdir(cwd)`;
//! 5. `setrlimit` for each limit; the container's user namespace joined, once it has one
//!    ([`crate::userns`]: every capability inside it from here on); with capabilities, the bounding set dropped to the
//!    spec's and capabilities kept across the user switch (`PR_SET_KEEPCAPS`); without
//!    `no_new_privs`, the container's seccomp filters ([`crate::seccomp`]);
//!    `setgroups`, `setgid`, `setuid`;
//! 6. with capabilities, `capset` (effective, permitted, inheritable) and the ambient
//!    set raised; `PR_SET_NO_NEW_PRIVS` when asked, then the seccomp filters;
//! 7. `execve` of each `PATH` candidate in turn, with exactly the spec's environment.
//!
//! A failing step writes `[step: u32 BE][errno: i32 BE]` to a close-on-exec pipe and
//! exits 127; the parent turns that into a [`SpawnError`]. The fork is ours rather than
//! `std::process::Command`'s because std waits for a child whose exec failed, which
//! would race the reaper.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::protocol::{Capabilities, PidNamespace, ProcessSpec, DEFAULT_PATH};
use crate::reaper::{ChildHandle, Reaper};
use crate::user::{self, UserError};

/// Terminal size a new pty starts with.
pub const DEFAULT_WINSIZE: (u16, u16) = (24, 80);

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `args` was empty.
    #[error("process.args is empty")]
    NoArgs,
    /// A string that cannot be passed to the kernel.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// An rlimit name `setrlimit(2)` does not know.
    #[error("unknown rlimit {0:?}")]
    UnknownRlimit(String),
    /// The user could not be resolved.
    #[error(transparent)]
    User(#[from] UserError),
    /// `args[0]` (no `/`) is in no `PATH` directory.
    #[error("exec {0:?}: executable file not found in $PATH")]
    NotFound(String),
    /// `args[0]` (a path) does not exist.
    #[error("exec {0:?}: no such file or directory")]
    NoSuchFile(String),
    /// The program exists but cannot be executed.
    #[error("exec {program:?}: {source}")]
    NotExecutable {
        /// `args[0]`.
        program: String,
        /// Why (permission denied, exec format error, ...).
        source: io::Error,
    },
    /// The working directory is missing in the container.
    #[error("cwd {0:?} does not exist")]
    NoCwd(String),
    /// The working directory is not a directory.
    #[error("cwd {0:?} is not a directory")]
    CwdNotDir(String),
    /// A field holds a value the kernel would refuse.
    #[error("{field}: {problem}")]
    BadField {
        /// The field (`process.oomScoreAdj`, ...).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Its PID namespace could not be taken into use.
    #[error("PID namespace: {0}")]
    PidNamespace(String),
    /// Another step of starting the process failed.
    #[error("{step}: {source}")]
    Os {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

impl SpawnError {
    /// The exit code a shell would report for this failure, where it is an exec failure
    /// (127 not found, 126 not executable).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            SpawnError::NotFound(_) | SpawnError::NoSuchFile(_) => Some(127),
            SpawnError::NotExecutable { .. } => Some(126),
            _ => None,
        }
    }
}

fn os_err_of(step: &'static str, source: io::Error) -> SpawnError {
    SpawnError::Os { step, source }
}

fn os_err(step: &'static str) -> SpawnError {
    SpawnError::Os {
        step,
        source: io::Error::last_os_error(),
    }
}

/// The agent's ends of a started process's stdio.
pub enum ProcessIo {
    /// Separate pipes.
    Pipes {
        /// Write end of the process's stdin, when it reads the host's stdin.
        stdin: Option<File>,
        /// Read end of its stdout.
        stdout: File,
        /// Read end of its stderr.
        stderr: File,
    },
    /// A pseudo-terminal: the master carries input, merged output and resizes.
    Pty {
        /// The pty master.
        master: File,
        /// Whether the host's stdin is forwarded to the terminal.
        stdin: bool,
    },
}

/// A started process.
pub struct Spawned {
    /// Its exit status, from the reaper.
    pub child: ChildHandle,
    /// The agent's ends of its stdio.
    pub io: ProcessIo,
}

// Steps of the child, reported with the errno of a failure.
const STEP_SETSID: u32 = 1;
const STEP_STDIO: u32 = 2;
const STEP_CTTY: u32 = 3;
const STEP_CHROOT: u32 = 4;
const STEP_CWD: u32 = 5;
const STEP_RLIMIT: u32 = 6;
const STEP_SETGROUPS: u32 = 7;
const STEP_SETGID: u32 = 8;
const STEP_SETUID: u32 = 9;
const STEP_EXEC: u32 = 10;
const STEP_OOM: u32 = 11;
const STEP_CAPBSET: u32 = 12;
const STEP_KEEPCAPS: u32 = 13;
const STEP_CAPSET: u32 = 14;
const STEP_AMBIENT: u32 = 15;
const STEP_NNP: u32 = 16;
const STEP_CGROUP: u32 = 17;
const STEP_SECCOMP: u32 = 18;
const STEP_USERNS: u32 = 19;
const STEP_PIDNS: u32 = 20;
const STEP_PROC: u32 = 21;
const STEP_MNTNS: u32 = 22;

fn step_name(step: u32) -> &'static str {
    match step {
        STEP_SETSID => "setsid",
        STEP_STDIO => "dup2 stdio",
        STEP_CTTY => "TIOCSCTTY",
        STEP_CHROOT => "chroot",
        STEP_CWD => "chdir",
        STEP_RLIMIT => "setrlimit",
        STEP_SETGROUPS => "setgroups",
        STEP_SETGID => "setgid",
        STEP_SETUID => "setuid",
        STEP_EXEC => "exec",
        STEP_OOM => "write oom_score_adj",
        STEP_CGROUP => "join the container's cgroup",
        STEP_SECCOMP => "install the container's seccomp filters",
        STEP_USERNS => "join the container's user namespace",
        STEP_MNTNS => "join the container's mount namespace",
        STEP_CAPBSET => "drop from the capability bounding set",
        STEP_KEEPCAPS => "keep capabilities across the user switch",
        STEP_CAPSET => "set the capabilities (capset)",
        STEP_AMBIENT => "raise the ambient capabilities",
        STEP_NNP => "set no_new_privs",
        STEP_PIDNS => "report from its PID namespace",
        STEP_PROC => "mount proc in its PID namespace",
        _ => "start process",
    }
}

/// Everything the child needs, prepared before the fork.
struct ChildPlan<'a> {
    stdio: [RawFd; 3],
    ctty: bool,
    root: Option<CString>,
    cwd: CString,
    /// The container's mount namespace, joined (root and working directory then its
    /// root) instead of the `chroot`.
    mntns: Option<RawFd>,
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    set_groups: bool,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// `oom_score_adj` as the text written to `/proc/self/oom_score_adj`.
    oom_score_adj: Option<Vec<u8>>,
    umask: Option<libc::mode_t>,
    /// The container's cgroup to join (with a cgroup namespace of its own), once made.
    cgroup_procs: Option<&'a std::ffi::CStr>,
    /// The container's seccomp filters (pointing into memory that outlives the fork).
    seccomp: Vec<libc::sock_fprog>,
    /// The container's user namespace, to join after the rlimits.
    userns: Option<RawFd>,
    caps: Option<CapPlan>,
    no_new_privs: bool,
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    err_fd: RawFd,
    /// A main process started in a PID namespace: its end of the socket it reports on
    /// ([`report_in_pid_ns`]).
    ns_sock: Option<RawFd>,
    /// With `ns_sock`: the attributes of the proc mount to make for the container's
    /// `/proc`; none when the container has no proc mounted there.
    proc_attrs: Option<rustix::mount::MountAttrFlags>,
    /// With `ns_sock`: the agent's end of that socket, which the child closes first (so
    /// that the agent's closing it is an end of file there).
    ns_peer: Option<RawFd>,
}

// SAFETY: a plan is only read once built (by the forking thread, which may be another
// than the one that built it: [`forked_in`]); its raw pointers point into strings and
// filters that outlive every reader.
unsafe impl Sync for ChildPlan<'_> {}

/// How long the agent waits for a process started in a PID namespace to report.
const NS_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The capability sets to apply, masked to the capabilities this kernel knows.
struct CapPlan {
    /// Capabilities `0..=last` exist.
    last: u32,
    sets: Capabilities,
}

impl CapPlan {
    /// `sets` for this kernel: bits past `/proc/sys/kernel/cap_last_cap` cleared.
    fn new(sets: Capabilities) -> Self {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        let known = if last == 63 {
            u64::MAX
        } else {
            (1u64 << (last + 1)) - 1
        };
        let mask = |set: u64| set & known;
        Self {
            last,
            sets: Capabilities {
                bounding: mask(sets.bounding),
                effective: mask(sets.effective),
                permitted: mask(sets.permitted),
                inheritable: mask(sets.inheritable),
                ambient: mask(sets.ambient),
            },
        }
    }
}

/// `capset(2)`'s header and data, version 3 (64-bit sets as two halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The `setrlimit(2)` resource for `RLIMIT_*` names.
pub fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    } as libc::c_int)
}

/// Paths `execve` tries for `program`, as `execvp` would: the program itself when it
/// contains a `/`, else each directory of `path` (an empty entry meaning `.`).
pub fn exec_candidates(program: &str, path: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// `PATH` from an environment list (the last one wins), else [`DEFAULT_PATH`].
pub fn path_of(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

fn cstring(s: &str, what: &'static str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(what))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_err("pipe"));
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_cloexec(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path).expect("static paths have no NUL");
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the terminal size of a pty (either end).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ as _, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new pty pair: the master and the slave, both close-on-exec.
pub fn open_pty() -> io::Result<(File, OwnedFd)> {
    let master = open_cloexec("/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK as _, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER opens the slave with the given flags and returns it.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER as _,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if peer >= 0 {
        // SAFETY: a new descriptor we own.
        unsafe { OwnedFd::from_raw_fd(peer) }
    } else {
        // Kernels before 4.13: open the slave by name.
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes an unsigned int.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN as _, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        open_cloexec(&format!("/dev/pts/{n}"), libc::O_RDWR | libc::O_NOCTTY)?
    };
    let (rows, cols) = DEFAULT_WINSIZE;
    set_winsize(master.as_raw_fd(), rows, cols)?;
    Ok((File::from(master), slave))
}

/// Starts `spec` in `container`: in its root (no chroot when it is `/`), its cgroup,
/// its user namespace, under its seccomp filters, in its PID namespace. A main process
/// (`init`) starts in the PID namespace `spec.pid_namespace` names (a new one, or that
/// of `shared`, the container it names), which becomes the container's; its `/proc`
/// (not the guest's own, when the container's root is `/`) then shows that namespace.
pub fn spawn(
    container: &crate::containers::Container,
    spec: &ProcessSpec,
    reaper: &Reaper,
    shared: Option<&crate::containers::Container>,
) -> Result<Spawned, SpawnError> {
    let program = spec.args.first().ok_or(SpawnError::NoArgs)?.clone();
    let mut confines = container.confines(true);
    if !spec.init {
        return spawn_inner(spec, &program, &confines, reaper, None);
    }
    confines.pid = match (&spec.pid_namespace, shared.and_then(|c| c.pidns())) {
        (None, _) => return spawn_inner(spec, &program, &confines, reaper, None),
        (Some(PidNamespace::New), _) => PidStart::New,
        (Some(_), Some(ns)) => PidStart::Join(ns),
        (Some(_), None) => return spawn_inner(spec, &program, &confines, reaper, None),
    };
    if container.pidns().is_some() {
        return Err(SpawnError::PidNamespace(
            "the container's main process was started once already".into(),
        ));
    }
    let proc = (container.root() != Path::new("/"))
        .then(|| crate::container::proc_attrs(container.root()))
        .flatten();
    // Kept for the container once the process runs its program: a start that fails
    // leaves neither the namespace (its init is gone) nor its /proc behind.
    let taken: std::sync::Mutex<(Option<OwnedFd>, bool)> = Default::default();
    let take = |pid: libc::pid_t, mount: Option<OwnedFd>| -> Result<(), String> {
        // Opened while the process waits for us: the namespace is still there.
        let ns = File::open(format!("/proc/{pid}/ns/pid"))
            .map_err(|e| format!("cannot open /proc/{pid}/ns/pid: {e}"))?;
        let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.0 = Some(ns.into());
        if let Some(mount) = mount {
            let (readonly, masked) = container.proc_paths();
            crate::container::stack_proc(container.root(), &mount, &readonly, &masked)?;
            taken.1 = true;
            container.sync_mounts()?;
        }
        Ok(())
    };
    let spawned = spawn_inner(spec, &program, &confines, reaper, Some((proc, &take)));
    let (ns, stacked) = taken.into_inner().unwrap_or_else(|e| e.into_inner());
    // (Warnings on the agent's standard error, the guest's console.)
    match (&spawned, ns) {
        (Ok(_), Some(ns)) => {
            if let Err(e) = container.set_pidns(ns) {
                eprintln!("forkvm-agent: {e}");
            }
        }
        (Err(_), _) if stacked => {
            if let Err(e) = crate::container::unstack_proc(container.root()) {
                eprintln!("forkvm-agent: cannot take the ended namespace's /proc away: {e}");
            }
        }
        _ => {}
    }
    spawned
}

/// [`spawn`] of `program` (searched as `args[0]` would be) with `spec.args` as its
/// arguments, `argv[0]` included, and without the container's seccomp filters: an OCI
/// hook's `path` and `args` (in the container's user namespace, as runc runs them).
pub fn spawn_program(
    container: &crate::containers::Container,
    spec: &ProcessSpec,
    program: &str,
    reaper: &Reaper,
) -> Result<Spawned, SpawnError> {
    spawn_inner(spec, program, &container.confines(false), reaper, None)
}

/// What a process takes of its container.
pub(crate) struct Confines<'a> {
    /// Its root directory, as the agent sees it.
    pub root: &'a Path,
    /// Its mount namespace ([`crate::mntns`]), whose root is the container's, joined
    /// instead of the `chroot`; `None`: the agent's.
    pub mntns: Option<RawFd>,
    /// Seccomp filters, installed in order.
    pub seccomp: &'a [Vec<libc::sock_filter>],
    /// A user namespace to join.
    pub userns: Option<RawFd>,
    /// `cgroup.procs` of a group to join (with a cgroup namespace of its own).
    pub cgroup_procs: Option<&'a std::ffi::CStr>,
    /// The PID namespace it starts in.
    pub pid: PidStart,
}

/// The PID namespace a process starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PidStart {
    /// The agent's (the guest's).
    Agent,
    /// A new one, whose init it is.
    New,
    /// The one this descriptor names.
    Join(RawFd),
}

/// What the agent does once a main process started in a PID namespace reported (see
/// [`spawn`]): given its pid and, when asked for, the proc mount it made there.
type TakeNamespace<'a> = &'a dyn Fn(libc::pid_t, Option<OwnedFd>) -> Result<(), String>;

/// Starts the process. With `ns_report` (a main process in a PID namespace), the child
/// reports from there with a proc mount of the given attributes (`None`: no mount),
/// and goes on once the callback took the namespace; a failing callback kills it.
pub(crate) fn spawn_inner(
    spec: &ProcessSpec,
    program: &str,
    container: &Confines,
    reaper: &Reaper,
    ns_report: Option<(Option<rustix::mount::MountAttrFlags>, TakeNamespace<'_>)>,
) -> Result<Spawned, SpawnError> {
    let root = container.root;
    if spec.args.is_empty() {
        return Err(SpawnError::NoArgs);
    }
    let program = program.to_owned();
    let ids = user::resolve(root, &spec.user)?;
    let rlimits = spec
        .rlimits
        .iter()
        .map(|r| {
            let res = rlimit_resource(&r.kind)
                .ok_or_else(|| SpawnError::UnknownRlimit(r.kind.clone()))?;
            Ok((
                res,
                libc::rlimit {
                    rlim_cur: r.soft as libc::rlim_t,
                    rlim_max: r.hard as libc::rlim_t,
                },
            ))
        })
        .collect::<Result<Vec<_>, SpawnError>>()?;
    let argv_owned = spec
        .args
        .iter()
        .map(|a| cstring(a, "process.args"))
        .collect::<Result<Vec<_>, _>>()?;
    let env_owned = spec
        .env
        .iter()
        .map(|e| cstring(e, "process.env"))
        .collect::<Result<Vec<_>, _>>()?;
    let candidates = exec_candidates(&program, path_of(&spec.env))
        .iter()
        .map(|c| cstring(c, "process.args"))
        .collect::<Result<Vec<_>, _>>()?;
    let cwd_str = if spec.cwd.starts_with('/') {
        spec.cwd.clone()
    } else {
        format!("/{}", spec.cwd)
    };
    let cwd = cstring(&cwd_str, "process.cwd")?;
    // In its own mount namespace, the container's root is the namespace's.
    let root_c = if container.mntns.is_some() || root == Path::new("/") {
        None
    } else {
        let s = root.to_str().ok_or(SpawnError::Nul("root"))?;
        Some(cstring(s, "root")?)
    };

    // The agent's ends are kept; the child's are dropped once it has them.
    let (io, child_fds): (ProcessIo, Vec<OwnedFd>) = if spec.tty {
        let (master, slave) = open_pty().map_err(|source| SpawnError::Os {
            step: "open pty",
            source,
        })?;
        if let Some([rows, cols]) = spec.console_size.filter(|[r, c]| *r > 0 && *c > 0) {
            set_winsize(master.as_raw_fd(), rows, cols).map_err(|source| SpawnError::Os {
                step: "set the terminal size",
                source,
            })?;
        }
        (
            ProcessIo::Pty {
                master,
                stdin: spec.stdin,
            },
            vec![slave],
        )
    } else {
        let (stdin_child, stdin_ours) = if spec.stdin {
            let (r, w) = pipe()?;
            (r, Some(File::from(w)))
        } else {
            let null =
                open_cloexec("/dev/null", libc::O_RDONLY).map_err(|source| SpawnError::Os {
                    step: "open /dev/null",
                    source,
                })?;
            (null, None)
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        (
            ProcessIo::Pipes {
                stdin: stdin_ours,
                stdout: File::from(out_r),
                stderr: File::from(err_r),
            },
            vec![stdin_child, out_w, err_w],
        )
    };
    let stdio = if spec.tty {
        [child_fds[0].as_raw_fd(); 3]
    } else {
        [
            child_fds[0].as_raw_fd(),
            child_fds[1].as_raw_fd(),
            child_fds[2].as_raw_fd(),
        ]
    };
    let oom_score_adj = match spec.oom_score_adj {
        Some(adj) if !(-1000..=1000).contains(&adj) => {
            return Err(SpawnError::BadField {
                field: "process.oomScoreAdj",
                problem: format!("{adj} is outside -1000 to 1000"),
            })
        }
        other => other.map(|adj| adj.to_string().into_bytes()),
    };
    let umask = match spec.umask {
        Some(m) if m > 0o777 => {
            return Err(SpawnError::BadField {
                field: "process.user.umask",
                problem: format!("{m:#o} has bits beyond 0777"),
            })
        }
        other => other.map(|m| m as libc::mode_t),
    };
    let (err_r, err_w) = pipe()?;
    let ns_socks = match ns_report {
        Some(_) => {
            let (ours, its) = rustix::net::socketpair(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| SpawnError::Os {
                step: "socketpair",
                source: e.into(),
            })?;
            rustix::net::sockopt::set_socket_timeout(
                &ours,
                rustix::net::sockopt::Timeout::Recv,
                Some(NS_REPORT_WAIT),
            )
            .map_err(|e| SpawnError::Os {
                step: "set a receive timeout",
                source: e.into(),
            })?;
            Some((ours, its))
        }
        None => None,
    };
    let null_terminated = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let plan = ChildPlan {
        stdio,
        ctty: spec.tty,
        root: root_c,
        cwd,
        mntns: container.mntns,
        rlimits,
        // SAFETY: geteuid has no preconditions.
        set_groups: unsafe { libc::geteuid() } == 0,
        groups: ids.groups.clone(),
        uid: ids.uid,
        gid: ids.gid,
        oom_score_adj,
        umask,
        cgroup_procs: container.cgroup_procs,
        seccomp: crate::seccomp::fprogs(container.seccomp),
        userns: container.userns,
        caps: spec.capabilities.map(CapPlan::new),
        no_new_privs: spec.no_new_privileges,
        candidates,
        argv: null_terminated(&argv_owned),
        envp: null_terminated(&env_owned),
        err_fd: err_w.as_raw_fd(),
        ns_sock: ns_socks.as_ref().map(|(_, its)| its.as_raw_fd()),
        proc_attrs: ns_report.and_then(|(attrs, _)| attrs),
        ns_peer: ns_socks.as_ref().map(|(ours, _)| ours.as_raw_fd()),
    };

    let plan = &plan;
    // SAFETY: `child_main` only makes async-signal-safe calls on `plan`, which was fully
    // allocated above and outlives the fork.
    let fork = || unsafe { reaper.fork(|| child_main(plan)) };
    let child = forked_in(container.pid, fork)?;
    drop(child_fds);
    drop(err_w);
    if let (Some((ours, its)), Some((_, take))) = (ns_socks, ns_report) {
        drop(its);
        let fail = |e: SpawnError| {
            // SAFETY: kill(2) of our own child, which waits for us and is not reaped.
            unsafe { libc::kill(child.pid(), libc::SIGKILL) };
            child.wait();
            Err(e)
        };
        match receive_report(&ours) {
            // It failed before it reported: the error pipe says why.
            Ok(None) => {}
            Ok(Some(mount)) => {
                if let Err(e) = take(child.pid(), mount) {
                    return fail(SpawnError::PidNamespace(e));
                }
                let step = "let the process go on";
                match rustix::io::write(&ours, &[0]) {
                    Ok(1) => {}
                    Ok(_) => return fail(os_err_of(step, io::ErrorKind::WriteZero.into())),
                    Err(e) => return fail(os_err_of(step, e.into())),
                }
            }
            Err(source) => {
                return fail(SpawnError::Os {
                    step: "hear from the process in its PID namespace",
                    source,
                })
            }
        }
    }

    let mut report = [0u8; 8];
    let mut got = 0;
    let mut err_file = File::from(err_r);
    while got < report.len() {
        match err_file.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got < report.len() {
        // The pipe closed on a successful exec.
        return Ok(Spawned { child, io });
    }
    // The child reported a failure and exits; collect it so it leaves no zombie.
    child.wait();
    let step = u32::from_be_bytes([report[0], report[1], report[2], report[3]]);
    let errno = i32::from_be_bytes([report[4], report[5], report[6], report[7]]);
    Err(child_error(step, errno, &program, &cwd_str))
}

fn child_error(step: u32, errno: i32, program: &str, cwd: &str) -> SpawnError {
    let source = io::Error::from_raw_os_error(errno);
    match (step, errno) {
        (STEP_EXEC, libc::ENOENT | libc::ENOTDIR) if program.contains('/') => {
            SpawnError::NoSuchFile(program.to_owned())
        }
        (STEP_EXEC, libc::ENOENT | libc::ENOTDIR) => SpawnError::NotFound(program.to_owned()),
        (STEP_EXEC, libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY) => {
            SpawnError::NotExecutable {
                program: program.to_owned(),
                source,
            }
        }
        (STEP_CWD, libc::ENOENT) => SpawnError::NoCwd(cwd.to_owned()),
        (STEP_CWD, libc::ENOTDIR) => SpawnError::CwdNotDir(cwd.to_owned()),
        _ => SpawnError::Os {
            step: step_name(step),
            source,
        },
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Reports `step`'s failure with `err` and exits. Async-signal-safe.
fn fail_with(err_fd: RawFd, step: u32, err: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_be_bytes());
    buf[4..].copy_from_slice(&err.to_be_bytes());
    // SAFETY: write and _exit are async-signal-safe; `buf` is valid for 8 bytes.
    unsafe {
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

fn fail(err_fd: RawFd, step: u32) -> ! {
    fail_with(err_fd, step, errno())
}

/// Runs `fork` so that its child starts in `pid`: for a PID namespace other than the
/// agent's, on a thread of its own that enters it for its children first (`unshare` or
/// `setns`: a thread's namespace for its children is its own, and cannot be undone).
/// The child is a `fork(2)` child all the same, so libc knows it has one thread (its
/// `setuid` would otherwise wait for the agent's other threads).
fn forked_in<T: Send>(
    pid: PidStart,
    fork: impl FnOnce() -> io::Result<T> + Send,
) -> Result<T, SpawnError> {
    let forked = |r: io::Result<T>| match r {
        // A namespace whose init ended takes no new process.
        Err(e) if matches!(pid, PidStart::Join(_)) && e.raw_os_error() == Some(libc::ENOMEM) => {
            Err(SpawnError::PidNamespace(
                "the process whose PID namespace this container has ended".into(),
            ))
        }
        other => other.map_err(|source| os_err_of("fork", source)),
    };
    let enter = || match pid {
        PidStart::Agent => 0,
        // SAFETY: unshare(2) of a PID namespace changes only this thread's namespace
        // for its children.
        PidStart::New => unsafe { libc::unshare(libc::CLONE_NEWPID) },
        // SAFETY: setns(2) on a descriptor the caller keeps open; as above.
        PidStart::Join(ns) => unsafe { libc::setns(ns, libc::CLONE_NEWPID) },
    };
    if pid == PidStart::Agent {
        return forked(fork());
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if enter() < 0 {
                    return Err(os_err("enter the PID namespace"));
                }
                forked(fork())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(os_err_of(
                    "fork",
                    io::Error::other("the forking thread panicked"),
                ))
            })
    })
}

/// The report of a process started in a PID namespace ([`report_in_pid_ns`]): `None`
/// when it ended first (end of file), else the proc mount it sent, if any.
fn receive_report(sock: &OwnedFd) -> io::Result<Option<Option<OwnedFd>>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = rustix::net::recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if got.bytes == 0 {
        return Ok(None);
    }
    let mut mount = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                mount.get_or_insert(fd);
            }
        }
    }
    Ok(Some(mount))
}

/// The child's side of [`receive_report`]: one byte on `sock`, with a detached proc
/// mount made here (so that it shows this PID namespace) when `proc` gives its
/// attributes; then it waits for the agent's byte to go on, and exits when the agent
/// closes instead. Async-signal-safe: system calls on stack memory.
fn report_in_pid_ns(sock: RawFd, proc: Option<rustix::mount::MountAttrFlags>, err_fd: RawFd) {
    use rustix::mount::{fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags};
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    // SAFETY: the plan's descriptor, open in this process while it runs.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock) };
    let mount = proc.map(|attrs| {
        fsopen(c"proc", FsOpenFlags::FSOPEN_CLOEXEC)
            .and_then(|fs| {
                fsconfig_create(&fs)?;
                fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            })
            .unwrap_or_else(|e| fail_with(err_fd, STEP_PROC, e.raw_os_error()))
    });
    let fds = mount.as_ref().map(|m| [std::os::fd::AsFd::as_fd(m)]);
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fds) = &fds {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    match rustix::net::sendmsg(
        sock,
        &[io::IoSlice::new(&[0])],
        &mut control,
        SendFlags::NOSIGNAL,
    ) {
        Ok(1) => {}
        Ok(_) => fail_with(err_fd, STEP_PIDNS, libc::EPIPE),
        Err(e) => fail_with(err_fd, STEP_PIDNS, e.raw_os_error()),
    }
    let mut go = [0u8; 1];
    if rustix::io::read(sock, &mut go) != Ok(1) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(127) };
    }
}

/// The child side of [`spawn`]: async-signal-safe calls only, on pre-allocated data.
fn child_main(p: &ChildPlan<'_>) -> ! {
    // SAFETY: every call below is async-signal-safe and only reads memory in `p`, which
    // the parent allocated before forking and which this copy of the address space keeps.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..65 {
            libc::signal(sig, libc::SIG_DFL);
        }
        if let Some(sock) = p.ns_sock {
            if let Some(peer) = p.ns_peer {
                libc::close(peer);
            }
            report_in_pid_ns(sock, p.proc_attrs, p.err_fd);
        }
        if libc::setsid() < 0 {
            fail(p.err_fd, STEP_SETSID);
        }
        // Copies above 2 first, so no source is overwritten by an earlier dup2.
        let mut high = [0; 3];
        for (h, &fd) in high.iter_mut().zip(&p.stdio) {
            *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
            if *h < 0 {
                fail(p.err_fd, STEP_STDIO);
            }
        }
        for (target, &fd) in high.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                fail(p.err_fd, STEP_STDIO);
            }
        }
        if p.ctty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
            fail(p.err_fd, STEP_CTTY);
        }
        if let Some(adj) = &p.oom_score_adj {
            // Before the chroot: the agent's /proc.
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::write(fd, adj.as_ptr().cast(), adj.len()) != adj.len() as isize {
                fail(p.err_fd, STEP_OOM);
            }
            libc::close(fd);
        }
        if let Some(m) = p.umask {
            libc::umask(m);
        }
        if let Some(procs) = p.cgroup_procs {
            if let Err(e) = crate::cgroup::join_and_unshare(procs) {
                fail_with(p.err_fd, STEP_CGROUP, e);
            }
        }
        if let Some(ns) = p.mntns {
            if libc::setns(ns, libc::CLONE_NEWNS) < 0 {
                fail(p.err_fd, STEP_MNTNS);
            }
        }
        if let Some(root) = &p.root {
            if libc::chroot(root.as_ptr()) < 0 || libc::chdir(c"/".as_ptr()) < 0 {
                fail(p.err_fd, STEP_CHROOT);
            }
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            fail(p.err_fd, STEP_CWD);
        }
        for (res, lim) in &p.rlimits {
            if libc::setrlimit(*res as _, lim) < 0 {
                fail(p.err_fd, STEP_RLIMIT);
            }
        }
        // After what needs the guest's root (the chroot, raising hard limits), before
        // the capability and user changes: joining resets the bounding set to full and
        // gives every capability inside the namespace, for those steps to narrow.
        if let Some(ns) = p.userns {
            if libc::setns(ns, libc::CLONE_NEWUSER) < 0 {
                fail(p.err_fd, STEP_USERNS);
            }
        }
        if let Some(caps) = &p.caps {
            for cap in 0..=caps.last {
                if caps.sets.bounding & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                {
                    fail(p.err_fd, STEP_CAPBSET);
                }
            }
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) < 0 {
                fail(p.err_fd, STEP_KEEPCAPS);
            }
        }
        // Without no_new_privs a filter goes on while the process may still install one
        // (root, before its user and capabilities change), as runc does.
        if !p.no_new_privs {
            if let Err(e) = crate::seccomp::install(&p.seccomp) {
                fail_with(p.err_fd, STEP_SECCOMP, e);
            }
        }
        if p.set_groups && libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0 {
            fail(p.err_fd, STEP_SETGROUPS);
        }
        if libc::setgid(p.gid) < 0 {
            fail(p.err_fd, STEP_SETGID);
        }
        if libc::setuid(p.uid) < 0 {
            fail(p.err_fd, STEP_SETUID);
        }
        if let Some(caps) = &p.caps {
            let s = &caps.sets;
            let half = |set: u64, high: bool| if high { (set >> 32) as u32 } else { set as u32 };
            let data = [false, true].map(|high| CapData {
                effective: half(s.effective, high),
                permitted: half(s.permitted, high),
                inheritable: half(s.inheritable, high),
            });
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0 {
                fail(p.err_fd, STEP_CAPSET);
            }
            let ambient = |op: libc::c_ulong, cap: libc::c_ulong| {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    op,
                    cap,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            if ambient(libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0) < 0 {
                fail(p.err_fd, STEP_AMBIENT);
            }
            for cap in 0..=caps.last {
                // A capability not also permitted and inheritable cannot be ambient
                // (EPERM): left out, as runc leaves it (`runc spec` asks for ambient
                // ones without inheritable).
                if s.ambient & (1 << cap) != 0
                    && ambient(
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                    ) < 0
                    && *libc::__errno_location() != libc::EPERM
                {
                    fail(p.err_fd, STEP_AMBIENT);
                }
            }
        }
        if p.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) < 0
        {
            fail(p.err_fd, STEP_NNP);
        }
        // With no_new_privs, last: the fewest calls of ours run under the filters.
        if p.no_new_privs {
            if let Err(e) = crate::seccomp::install(&p.seccomp) {
                fail_with(p.err_fd, STEP_SECCOMP, e);
            }
        }
        let mut denied = false;
        for c in &p.candidates {
            libc::execve(c.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
            match errno() {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR => {}
                other => fail_with(p.err_fd, STEP_EXEC, other),
            }
        }
        fail_with(
            p.err_fd,
            STEP_EXEC,
            if denied { libc::EACCES } else { libc::ENOENT },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_follows_execvp() {
        assert_eq!(
            exec_candidates("sh", "/usr/bin:/bin/:"),
            ["/usr/bin/sh", "/bin/sh", "./sh"]
        );
        assert_eq!(exec_candidates("./x", "/bin"), ["./x"]);
        assert_eq!(exec_candidates("/bin/sh", "/usr/bin"), ["/bin/sh"]);
        assert_eq!(path_of(&[]), DEFAULT_PATH);
        assert_eq!(
            path_of(&["PATH=/a".into(), "X=1".into(), "PATH=/b".into()]),
            "/b"
        );
        assert_eq!(path_of(&["MYPATH=/a".into()]), DEFAULT_PATH);
    }

    #[test]
    fn rlimit_names_map_to_resources() {
        assert_eq!(
            rlimit_resource("RLIMIT_NOFILE"),
            Some(libc::RLIMIT_NOFILE as libc::c_int)
        );
        assert_eq!(rlimit_resource("NOFILE"), None);
    }

    #[test]
    fn child_failures_map_to_shell_exit_codes() {
        let e = child_error(STEP_EXEC, libc::ENOENT, "nosuchcmd", "/");
        assert_eq!(
            e.to_string(),
            "exec \"nosuchcmd\": executable file not found in $PATH"
        );
        assert_eq!(e.exit_code(), Some(127));
        assert_eq!(
            child_error(STEP_EXEC, libc::ENOENT, "/no/such", "/").exit_code(),
            Some(127)
        );
        assert_eq!(
            child_error(STEP_EXEC, libc::EACCES, "x", "/").exit_code(),
            Some(126)
        );
        let e = child_error(STEP_CWD, libc::ENOENT, "x", "/x");
        assert_eq!(e.to_string(), "cwd \"/x\" does not exist");
        assert_eq!(e.exit_code(), None);
        let e = child_error(STEP_SETUID, libc::EPERM, "x", "/");
        assert!(e.to_string().starts_with("setuid: "), "{e}");
    }
}
