//! Starting VM processes. Every VM runs in a process of its own, the `forkvm-vmm`
//! executable, whoever asks for it: `forkvm boot` and `forkvm run`, the OCI runtime's
//! monitor, or a VM that forks (and `forkvm template fork`).
//!
//! The launcher starts the executable with one end of a Unix socket pair on fd
//! [`LAUNCH_FD`] and sends a [`Launch`] on it (with the guest-memory files of a fork
//! child as `SCM_RIGHTS`): where the VM is registered, where its console goes and what
//! it starts from. The VM process answers on the same socket once its VM runs, or with
//! why it could not start. Nothing travels through the environment or the command line.
//!
//! A warm fork child ([`crate::pool`], [`crate::warm`]) is sent a [`Warmup`] first: it prepares a VM of
//! that shape and waits for its launch, or exits when the socket closes first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkvm_jail::{Access, Jail, JailSpec, Place, Places};
use forkvm_registry::{ProcessIdentity, VmHome, VmState};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::fork::{ChildPayload, ForkChildError, ForkState};
use crate::memory::guest_memory_budget;
use crate::snapshot::ChildIdentity;
use crate::warm::{prepare_in_background, Prepared, Staging, Warmup};

/// The file name of the VM-process executable.
pub const VMM_BINARY: &str = "forkvm-vmm";
/// The descriptor on which a VM process finds its launcher's socket.
pub const LAUNCH_FD: i32 = 3;
/// Largest launch payload a VM process accepts.
const MAX_LAUNCH_PAYLOAD: u64 = 64 << 20;
/// Longest failure message read back from a VM process.
const MAX_FAILURE_MESSAGE: usize = 64 * 1024;

/// Where the VMs that a VM forks register: under `root`, with `parent` as their parent
/// (none for children of a template).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildHomes {
    /// The state root the children register under.
    pub root: PathBuf,
    /// The ID of the VM they are forked from.
    pub parent: Option<String>,
}

/// Where a launched VM is registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HomeSpec {
    /// The launcher registered it already: VM `id` under `root`.
    Registered {
        /// The state root.
        root: PathBuf,
        /// The VM's ID.
        id: String,
    },
    /// The VM process registers it (a fork child).
    New(ChildHomes),
}

/// Where a launched VM's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleSpec {
    /// The VM's console log; the process's own messages go there too.
    Log,
    /// The process's stdout and the VM's console log (a VM in the foreground); its
    /// messages stay on its stderr.
    LogAndStdout,
    /// The file at this path, which the launcher opened (a VM process may not be let
    /// create it there) and sends as the last two files of the launch (open for
    /// appending, then for reading and writing, to cut it); the process's messages go to
    /// the console log.
    File(PathBuf),
}

/// What a launched VM starts from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Start {
    /// Boot this configuration's kernel.
    Boot(VmConfig),
    /// Restore a forked VM as the child with this identity; the fork's state
    /// ([`ForkState`](crate::fork)) and memory travel as files beside the launch, the
    /// state first.
    Restore(Box<ChildIdentity>),
}

/// Everything a VM process is told.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    /// Where the VM is registered.
    pub home: HomeSpec,
    /// Where its console goes.
    pub console: ConsoleSpec,
    /// What it starts from.
    pub start: Start,
    /// How the VM process is jailed (see `forkvm_jail`).
    #[serde(default)]
    pub jail: JailSpec,
}

/// A message on the launch socket, as the launcher sends it.
#[derive(Serialize)]
pub(crate) enum Message<'a> {
    /// Prepare a VM of this shape, then wait for the launch.
    Warmup(&'a Warmup),
    /// Start the VM; sent at this `CLOCK_MONOTONIC` time, ns (the host's clock: the VM
    /// process reads how long its launch waited unread, see [`Launched::queued_us`]).
    Launch(&'a Launch, u64),
    /// Be a fork pool's zygote: fork VM processes on request ([`crate::zygote`]).
    Zygote,
}

/// A message on the launch socket, as the VM process reads it.
#[derive(Deserialize)]
enum Received {
    Warmup(Box<Warmup>),
    Launch(Box<Launch>, u64),
    Zygote,
}

/// How the VM process is attached to its launcher.
#[derive(Debug)]
pub struct ProcessOptions {
    /// Standard input, output and error (`None`: `/dev/null`).
    pub stdio: [Option<Stdio>; 3],
    /// A session of its own: no signal from the launcher's terminal reaches it.
    pub own_session: bool,
    /// Killed when the launching thread ends (a VM that belongs to its launcher).
    pub die_with_launcher: bool,
}

impl ProcessOptions {
    /// A daemon: no stdio, its own session, outliving its launcher (a fork child, a
    /// detached VM).
    pub fn daemon() -> Self {
        Self {
            stdio: [None, None, None],
            own_session: true,
            die_with_launcher: false,
        }
    }

    /// A VM that belongs to its launcher (a container's monitor, `forkvm run`): no
    /// stdio, its own session, killed with its launcher.
    pub fn owned() -> Self {
        Self {
            die_with_launcher: true,
            ..Self::daemon()
        }
    }

    /// A VM in the launcher's foreground: its stdio and terminal signals, killed with
    /// its launcher.
    pub fn foreground() -> Self {
        Self {
            stdio: [
                Some(Stdio::inherit()),
                Some(Stdio::inherit()),
                Some(Stdio::inherit()),
            ],
            own_session: false,
            die_with_launcher: true,
        }
    }
}

/// A new family's uid and cgroup ([`forkvm_jail::uid`]) for the VMs registered under
/// `state_root`, the family's group made and delegated to its uid (the state root is
/// made one every family may make homes in by the VM process that takes the uid, see
/// [`Launched::enter_jail`]). `None` (said) where that fails: the family runs as uid 0
/// in forkvm's groups, as a VM of a launcher that may give no uid.
pub fn new_family(state_root: &Path) -> Option<forkvm_jail::uid::Allotted> {
    let made = forkvm_jail::uid::allot(state_root).and_then(|f| {
        forkvm_jail::uid::prepare_group(Path::new(forkvm_jail::cgroup::ROOT), &f.spec)?;
        Ok(f)
    });
    made.inspect_err(|e| {
        tracing::warn!(
            "the VM's family gets no uid of its own: {}",
            forkvm_config::logging::error_chain(e)
        )
    })
    .ok()
}

/// [`new_family`] for the VM `launch` starts.
fn family_of(launch: &Launch) -> Option<forkvm_jail::uid::Allotted> {
    let root = match &launch.home {
        HomeSpec::Registered { root, .. } => root,
        HomeSpec::New(homes) => &homes.root,
    };
    new_family(root)
}

/// Finds the VM-process executable: this process itself when it is one, else
/// `forkvm-vmm` where forkvm's programs are ([`forkvm_config::find_program`]).
pub fn vmm_executable() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == VMM_BINARY) {
        return Ok(exe);
    }
    forkvm_config::find_program(VMM_BINARY)
}

/// A started VM process, before and after it reported.
#[derive(Debug)]
pub struct VmProcess {
    process: Handle,
    sock: UnixStream,
    /// Its pid as `/proc` names it (this process's pid namespace may be a VM family's,
    /// below that procfs's: [`ProcessIdentity::proc_pid_of`]).
    proc_pid: Option<u32>,
    /// The VM process's pidfd where the child this process holds is its stand-in (the
    /// first VM process of a family, [`forkvm_jail::family`]).
    vm_pidfd: Option<OwnedFd>,
}

/// How the launcher holds a VM process.
#[derive(Debug)]
enum Handle {
    /// Started (exec'd) by this process: its child.
    Spawned(Child),
    /// Forked by a pool's zygote ([`crate::zygote`]): not this process's child; held by
    /// a pidfd, reaped by init.
    Forked { pid: u32, pidfd: OwnedFd },
}

/// How long killing a forked process waits for it to be gone.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

impl Handle {
    /// Whether the main thread of the process `/proc` names `pid` has exited (`Z` or
    /// `X` in its `/proc/PID/stat`). Only for a pid whose pidfd has not ended (or a
    /// child not reaped): until then the pid is still the process's. What cannot be
    /// read (or a process `/proc` does not name) says nothing (the pidfd decides).
    fn leader_exited(pid: Option<u32>) -> bool {
        let Some(pid) = pid else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // The state follows the command name's closing parenthesis.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        matches!(state, Some("Z" | "X"))
    }

    /// Sends SIGKILL to the process `pidfd` refers to.
    fn pidfd_kill(pidfd: &OwnedFd) {
        // SAFETY: pidfd_send_signal with a pidfd we own, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Whether the pidfd says the process ended, waiting at most `timeout`.
    fn pidfd_ended(pidfd: &OwnedFd, timeout: Duration) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut p = [PollFd::new(pidfd, PollFlags::IN)];
        // A poll that fails counts as ended: a process that cannot be watched is not
        // handed out as warm, and a kill does not wait on it.
        !matches!(
            poll(&mut p, Timespec::try_from(timeout).ok().as_ref()),
            Ok(0)
        )
    }
}

/// A VM process's report on its socket: it runs.
pub(crate) const REPORT_RUNNING: u64 = 1;
/// A VM process's report on its socket: it failed; a length-prefixed message follows.
const REPORT_FAILED: u64 = 2;
/// A warm process's report on its socket: its VM is prepared (or could not be: it is
/// made at the launch then); it waits for the launch.
pub(crate) const REPORT_PREPARED: u64 = 3;
/// A fork child's report on its socket when its fork's children start together: its VM
/// is restored, paused, and waits for [`START_TOGETHER`].
pub(crate) const REPORT_RESTORED: u64 = 4;
/// The launcher's word to a child that reported [`REPORT_RESTORED`]: every child of its
/// fork is restored; run.
pub(crate) const START_TOGETHER: u64 = 5;
/// How long a restored fork child waits for [`START_TOGETHER`]: twice the longest a
/// launcher waits for the largest fork's reports ([`crate::fork::start_deadline`], counted
/// once its last child started). A launcher that gives up closes the socket, which ends
/// the wait sooner; this bounds it should the launcher hang.
fn siblings_deadline() -> Duration {
    crate::fork::start_deadline(crate::fork::MAX_CHILDREN) * 2
}

/// What a VM process reported on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// Its VM runs.
    Running,
    /// Its VM is restored and waits for its fork's other children ([`REPORT_RESTORED`]).
    Restored,
}

impl VmProcess {
    /// Starts [`vmm_executable`] as `opts` say and sends it `launch` and `files`: the
    /// first VM of a family (a booted VM, a container's), in a pid namespace of its own
    /// if it is jailed ([`forkvm_jail::family`]).
    ///
    /// A jailed family gets a uid and cgroup of its own ([`forkvm_jail::uid`]) where this
    /// process may give it them (root, with the capabilities that takes).
    pub fn spawn(launch: &Launch, files: &[File], opts: ProcessOptions) -> std::io::Result<Self> {
        let exe = vmm_executable()?;
        // Not a container's VM, whose group is its engine's (it stays uid 0).
        let own_group = !launch.jail.container && launch.jail.cgroup.is_none();
        let family = match launch.jail.enabled && own_group && forkvm_jail::uid::can_allot() {
            true => family_of(launch),
            false => None,
        };
        let blob = match &family {
            Some(f) => {
                let mut launch = launch.clone();
                launch.jail.family = Some(f.spec.clone());
                encode(&launch)?
            }
            None => encode(launch)?,
        };
        let ending = match &family {
            Some(f) => forkvm_jail::family::Ending::of(f),
            None => forkvm_jail::family::Ending::none(),
        };
        let started = Self::start(&exe, opts, launch.jail.enabled.then_some(ending));
        if let (Err(_), Some(f)) = (&started, &family) {
            forkvm_jail::uid::remove_group(&f.spec);
        }
        let mut p = started?;
        // Its init holds the family's lock now.
        drop(family);
        p.send(&blob, files)?;
        Ok(p)
    }

    /// [`VmProcess::spawn`] with the launch already encoded ([`encode`]).
    pub(crate) fn spawn_encoded(
        exe: &Path,
        blob: &[u8],
        files: &[File],
        opts: ProcessOptions,
    ) -> std::io::Result<Self> {
        let mut p = Self::start(exe, opts, None)?;
        p.send(blob, files)?;
        Ok(p)
    }

    /// Starts `exe` as a warm fork child: a daemon that prepares a VM as `warmup` says
    /// and waits for [`VmProcess::send`].
    pub(crate) fn spawn_warm(exe: &Path, warmup: &Warmup, files: &[File]) -> std::io::Result<Self> {
        let mut p = Self::start(exe, ProcessOptions::daemon(), None)?;
        p.warm_up(warmup, files)?;
        Ok(p)
    }

    /// Sends the process its warm-up, with the memory `files` its layout names.
    pub(crate) fn warm_up(&mut self, warmup: &Warmup, files: &[File]) -> std::io::Result<()> {
        let blob =
            forkvm_snapshot::encode(&Message::Warmup(warmup)).map_err(std::io::Error::other)?;
        self.send(&blob, files)
    }

    /// Waits up to `timeout` for a warm process to say it has prepared its VM
    /// ([`REPORT_PREPARED`]): `Ok(false)` if it has not yet.
    pub(crate) fn wait_prepared(&self, timeout: Duration) -> std::io::Result<bool> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut b = [0u8; 8];
        match (&self.sock).read_exact(&mut b) {
            Ok(()) if u64::from_le_bytes(b) == REPORT_PREPARED => Ok(true),
            Ok(()) => Err(std::io::Error::other(format!(
                "it sent report {} instead of saying it is prepared",
                u64::from_le_bytes(b)
            ))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(std::io::Error::other(format!(
                "it exited before it was prepared ({e})"
            ))),
        }
    }

    /// Sends an encoded launch ([`encode`]) and `files`; a process that cannot take it
    /// (it died) is killed and reaped.
    pub(crate) fn send(&mut self, blob: &[u8], files: &[File]) -> std::io::Result<()> {
        let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        forkvm_snapshot::send_blob(&self.sock, blob, &raw).map_err(|e| {
            self.kill_and_reap();
            std::io::Error::other(e)
        })
    }

    /// Starts `exe` with its launch socket on [`LAUNCH_FD`], as `opts` say; `family`:
    /// as the first VM process of a family, in a pid namespace of its own (the child
    /// this process holds is then its stand-in, see [`forkvm_jail::family`]), whose init
    /// holds and undoes what the ending says.
    fn start(
        exe: &Path,
        opts: ProcessOptions,
        family: Option<forkvm_jail::family::Ending>,
    ) -> std::io::Result<Self> {
        let (family, ending) = match family {
            Some(e) => (true, std::sync::Arc::new(e)),
            None => (
                false,
                std::sync::Arc::new(forkvm_jail::family::Ending::none()),
            ),
        };
        let theirs_ending = ending.clone();
        let (ours, theirs) = UnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(exe);
        let [stdin, stdout, stderr] = opts.stdio;
        cmd.stdin(stdin.unwrap_or_else(Stdio::null))
            .stdout(stdout.unwrap_or_else(Stdio::null))
            .stderr(stderr.unwrap_or_else(Stdio::null));
        let (own_session, die) = (opts.own_session, opts.die_with_launcher);
        let kvm = crate::vm::kvm_fd();
        // Out of this process's cgroup: the family's init and the VM's stand-in.
        let families = family.then(forkvm_jail::cgroup::families_procs).flatten();
        let families_fd = families.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe calls between fork and exec (setsid, prctl,
        // dup2, and `family::split`'s forks and system calls), on values copied into the
        // closure; nothing allocates or locks.
        unsafe {
            let ending = theirs_ending;
            cmd.pre_exec(move || {
                if own_session && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if die && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // This process's /dev/kvm on the next (see `vm::KVM_FD`); it, the
                // families' group and the family's lock copied out of the way of those
                // numbers first.
                let kvm = match kvm {
                    Some(k) => libc::fcntl(k, libc::F_DUPFD_CLOEXEC, 16),
                    None => -1,
                };
                let families_fd = families_fd.map(|f| libc::fcntl(f, libc::F_DUPFD_CLOEXEC, 16));
                ending.lift_lock(16)?;
                if libc::dup2(fd, LAUNCH_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if kvm >= 0 && libc::dup2(kvm, crate::vm::KVM_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if family {
                    forkvm_jail::family::split(LAUNCH_FD, families_fd, &ending)?;
                }
                Ok(())
            });
        }
        let mut child = forkvm_jail::family::spawning(|| cmd.spawn())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", exe.display())))?;
        drop(theirs);
        drop(families);
        if !family {
            return Ok(Self {
                proc_pid: ProcessIdentity::proc_pid_of(child.id()),
                process: Handle::Spawned(child),
                sock: ours,
                vm_pidfd: None,
            });
        }
        // The child is the VM process's stand-in, which says the VM process's pid first,
        // with a pidfd of it.
        let (vm, pidfd) = match forkvm_jail::family::read_report(&ours, KILL_DEADLINE) {
            Ok(said) => said,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // Without one (a kernel without pidfds) by its number (the VM process waits for
        // its launch, not sent yet); none if it is gone already (its socket says why).
        let vm_pidfd = pidfd.or_else(|| crate::reap::pidfd_open(vm).ok());
        // The VM process is the child itself: no pid namespace could be made, so no
        // family's init will remove the family's group (the VM process joins none).
        if vm == child.id() {
            ending.undo();
        }
        Ok(Self {
            // `vm` is its pid in this process's namespace, which may be below the one
            // `/proc` is of (a monitor in a container's pid namespace).
            proc_pid: vm_pidfd
                .as_ref()
                .and_then(ProcessIdentity::proc_pid_of_pidfd)
                .or_else(|| ProcessIdentity::proc_pid_of(vm)),
            process: Handle::Spawned(child),
            sock: ours,
            vm_pidfd,
        })
    }

    /// A process a zygote forked, held by its `pidfd`, whose launch socket's other end
    /// is `sock`; `pid` is its pid in the zygote's namespace (this process's may be
    /// another: the pidfd names it here).
    pub(crate) fn forked(pid: u32, pidfd: OwnedFd, sock: UnixStream) -> Self {
        Self {
            proc_pid: ProcessIdentity::proc_pid_of_pidfd(&pidfd),
            process: Handle::Forked { pid, pidfd },
            sock,
            vm_pidfd: None,
        }
    }

    /// The socket to the process.
    pub(crate) fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Whether the process still runs (one that ended is reaped, if it is our child).
    pub fn is_alive(&mut self) -> bool {
        match &mut self.process {
            Handle::Spawned(child) => {
                matches!(child.try_wait(), Ok(None))
                    && !Handle::leader_exited(self.proc_pid)
                    && !self
                        .vm_pidfd
                        .as_ref()
                        .is_some_and(|fd| Handle::pidfd_ended(fd, Duration::ZERO))
            }
            // A killed process's pidfd turns readable (and `waitpid` answers) only once
            // its last thread has gone; its main thread shows it dying (a zombie) before
            // that, and such a process must not be handed out as a warm one.
            Handle::Forked { pidfd, .. } => {
                !Handle::pidfd_ended(pidfd, Duration::ZERO) && !Handle::leader_exited(self.proc_pid)
            }
        }
    }

    /// Kills and reaps the process.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    /// Kills the process and waits until it is gone (reaps it, if it is our child).
    pub fn kill_and_reap(&mut self) {
        match &mut self.process {
            Handle::Spawned(child) => {
                match &self.vm_pidfd {
                    // A stand-in: its VM process first, which the stand-in reaps, then
                    // ends as it ended (killed, the VM process would be left to init).
                    Some(vm) => {
                        Handle::pidfd_kill(vm);
                        Handle::pidfd_ended(vm, KILL_DEADLINE);
                    }
                    None => {
                        let _ = child.kill();
                    }
                }
                let _ = child.wait();
            }
            Handle::Forked { pidfd, .. } => {
                Handle::pidfd_kill(pidfd);
                Handle::pidfd_ended(pidfd, KILL_DEADLINE);
            }
        }
    }

    /// Its process ID as `/proc` names it: the host's, by which the registry, `forkvm
    /// ps` and the API name VM processes (a VM family's processes have other pids in
    /// their own namespace).
    pub fn pid(&self) -> u32 {
        self.proc_pid.unwrap_or(match &self.process {
            Handle::Spawned(child) => child.id(),
            Handle::Forked { pid, .. } => *pid,
        })
    }

    /// Waits up to `timeout` for its report: `Ok` once its VM runs, else why it did not
    /// start (it exited, hung, or said why).
    pub fn wait_running(&self, timeout: Duration) -> std::io::Result<()> {
        match self.wait_report(timeout)? {
            Report::Running => Ok(()),
            Report::Restored => Err(std::io::Error::other(
                "it waits for the other children of a fork",
            )),
        }
    }

    /// Tells a fork child that reported [`Report::Restored`] to run.
    pub(crate) fn start_together(&self) -> std::io::Result<()> {
        (&self.sock).write_all(&START_TOGETHER.to_le_bytes())
    }

    /// Waits up to `timeout` for its next report, else says why none came (it exited,
    /// hung, or said why it failed).
    pub(crate) fn wait_report(&self, timeout: Duration) -> std::io::Result<Report> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut b = [0u8; 8];
        (&self.sock).read_exact(&mut b).map_err(|e| {
            std::io::Error::other(format!("it exited or hung before reporting ({e})"))
        })?;
        match u64::from_le_bytes(b) {
            REPORT_RUNNING => Ok(Report::Running),
            REPORT_RESTORED => Ok(Report::Restored),
            REPORT_FAILED => {
                let mut len = [0u8; 4];
                (&self.sock).read_exact(&mut len)?;
                let len = (u32::from_le_bytes(len) as usize).min(MAX_FAILURE_MESSAGE);
                let mut msg = vec![0u8; len];
                (&self.sock).read_exact(&mut msg)?;
                Err(std::io::Error::other(
                    String::from_utf8_lossy(&msg).into_owned(),
                ))
            }
            other => Err(std::io::Error::other(format!("unexpected report {other}"))),
        }
    }

    /// Waits for the process to end and returns how it ended; only for a process this
    /// one started (a zygote's are reaped by init).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match &mut self.process {
            Handle::Spawned(child) => child.wait(),
            Handle::Forked { pid, .. } => Err(std::io::Error::other(format!(
                "process {pid} was forked by a zygote: not this process's child"
            ))),
        }
    }

    /// Leaves the process to run on its own: this process's one reaper thread reaps it
    /// when it ends ([`crate::reap`]; init reaps one a zygote forked).
    pub fn detach(self) -> std::io::Result<()> {
        let Self { process, sock, .. } = self;
        drop(sock);
        let Handle::Spawned(child) = process else {
            return Ok(());
        };
        crate::reap::reap_when_done(child)
    }
}

/// Encodes the message that makes a VM process a zygote.
pub(crate) fn encode_zygote() -> std::io::Result<Vec<u8>> {
    forkvm_snapshot::encode(&Message::Zygote).map_err(std::io::Error::other)
}

/// Encodes `launch` as the launch message a VM process reads, with the time it was
/// encoded (so encode it right before it is sent).
pub fn encode(launch: &Launch) -> std::io::Result<Vec<u8>> {
    forkvm_snapshot::encode(&Message::Launch(launch, monotonic_ns())).map_err(std::io::Error::other)
}

/// The host's `CLOCK_MONOTONIC`, ns: one clock for every process on the host (a VM
/// process's namespaces do not change it).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Errors receiving a launch.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Fd 3 is not a socket: the program was not started by a launcher.
    #[error("no launch socket on fd {LAUNCH_FD}: {VMM_BINARY} is started by forkvm (boot, run, the OCI runtime, a fork), not by hand")]
    NotLaunched,
    /// Receiving the payload failed.
    #[error("cannot receive the launch on fd {LAUNCH_FD}")]
    Transfer(#[from] forkvm_snapshot::TransferError),
    /// The payload is invalid.
    #[error("invalid launch payload")]
    Format(#[from] forkvm_snapshot::FormatError),
    /// A warm process's launcher went away before sending a launch: nothing to do.
    #[error("the launcher closed the socket before sending a launch")]
    Abandoned,
    /// A second warm-up, or a zygote request after a warm-up.
    #[error("launch messages out of order: {0}")]
    OutOfOrder(&'static str),
    /// A fork child's state did not come or is invalid.
    #[error("cannot start the fork child")]
    Fork(#[source] ForkChildError),
    /// The VM process could not be jailed.
    #[error("cannot jail the VM process")]
    Jail(#[source] forkvm_jail::JailError),
}

/// The jail a warm process entered while it waited: its spec, and the jail (`Ok(None)`:
/// not jailed) or why it could not be entered.
type WarmJail = (JailSpec, Result<Option<Jail>, forkvm_jail::JailError>);

/// Where the VM process of a VM under the state root `root`, configured as `cfg` (when
/// known), may go once jailed (see `forkvm_jail`). It may change the file system in the
/// state root (its home, its fork children's, a template it saves), its writable disks
/// and shares, and the directory of its vsock socket, for sockets only (its fork
/// children bind theirs beside it; a stale one is removed before the rules apply). Its
/// minimal root holds those and what it reads once jailed: its kernel and initrd, its
/// read-only disks and shares. Its console is opened before.
pub fn places(root: &Path, cfg: Option<&VmConfig>) -> Places {
    let mut p = Places::default();
    p.dir(root);
    let parent_of = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_owned)
    };
    let Some(cfg) = cfg else { return p };
    p.read(&cfg.kernel);
    if let Some(initrd) = &cfg.initrd {
        p.read(initrd);
    }
    for d in &cfg.disks {
        match d.read_only {
            true => p.read(&d.path),
            false => p.file(&d.path),
        };
    }
    for s in &cfg.shares {
        match s.read_only {
            true => p.read(&s.host_path),
            false => p.dir(&s.host_path),
        };
    }
    // Only sockets there: the directory is often a shared one (`/tmp`).
    if let Some(dir) = cfg.vsock.as_ref().and_then(|v| parent_of(&v.uds)) {
        p.sockets(dir);
    }
    p
}

/// What the fork children of a VM of `cfg` open by path as they start (where a
/// family's uid must reach, see [`forkvm_jail::uid`]): its disks, and the directory of
/// its vsock socket, where they make theirs.
pub fn reopened_by_children(cfg: &VmConfig) -> Vec<Place> {
    let mut p: Vec<Place> = cfg
        .disks
        .iter()
        .map(|d| match d.read_only {
            true => Place::new(&d.path, Access::Read),
            false => Place::new(&d.path, Access::Write),
        })
        .collect();
    if let Some(dir) = cfg.vsock.as_ref().and_then(|v| v.uds.parent()) {
        if !dir.as_os_str().is_empty() {
            p.push(Place::new(dir, Access::Write));
        }
    }
    p
}

/// What a VM process that makes a root of its own (not one started by a jailed VM
/// process, which lives in its parent's) reads besides its VM's places: the
/// configuration file it read. (Not the host's template key: a template the VM saves
/// is sealed by whoever asked for it, [`crate::template::save_running`].)
pub fn own_root_places(places: &mut Places) {
    if let Some(file) = forkvm_config::loaded_from() {
        places.read(file);
    }
}

/// A launch as the VM process received it, with the socket to report on.
#[derive(Debug)]
pub struct Launched {
    sock: UnixStream,
    /// What to do.
    pub launch: Launch,
    /// What a fork child starts from (its identity and the fork's state, read from the
    /// first file that came with a [`Start::Restore`]); `None` for a boot.
    pub fork: Option<ChildPayload>,
    /// The files that came with it (a fork child's guest memory).
    pub files: Vec<File>,
    /// The VM prepared while the process waited warm, if it was told to.
    pub prepared: Option<Prepared>,
    /// The home staged while the process waited warm.
    staged: Option<Staged>,
    /// The spec of the jail it entered while it waited warm, and that jail (`Ok(None)`:
    /// not jailed) or why it could not; `None`: it enters the launch's.
    warm_jail: Option<WarmJail>,
    /// When a staged home was published (its creation time to record).
    published_at_ms: Option<u64>,
    /// When the launch was read (for a warm process: after its wait).
    pub received: std::time::Instant,
    /// How long the launch waited between its launcher's sending it and this process's
    /// reading it, us: a new process's start, or a warm one's still preparing.
    pub queued_us: u64,
}

/// What a VM process records in its home's state: that it runs the VM, and the VM's
/// shape (shown by `ps` before the API is asked).
pub(crate) fn this_process_runs(vcpus: u8, mem_mib: u64) -> impl FnOnce(&mut VmState) {
    move |s| {
        s.process = Some(ProcessIdentity::current());
        s.vcpus = vcpus;
        s.mem_mib = mem_mib;
    }
}

/// A home a warm process staged, and as what.
#[derive(Debug)]
struct Staged {
    staging: Staging,
    vcpus: u8,
    home: VmHome,
}

impl Launched {
    /// Registers the VM with this process and the machine it starts: opens the home
    /// its launcher made; or, for a fork child, publishes the home it staged while it
    /// waited warm (one rename) or makes one (one write).
    pub fn register(&mut self) -> Result<VmHome, forkvm_registry::Error> {
        let cfg = self.config();
        let (vcpus, mem_mib) = (cfg.vcpus, cfg.mem_mib);
        let record = this_process_runs(vcpus, mem_mib);
        let staged = self.staged.take();
        match &self.launch.home {
            HomeSpec::Registered { root, id } => {
                let home = VmHome::open(root, id)?;
                home.update(record)?;
                Ok(home)
            }
            HomeSpec::New(homes) => {
                if let Some(s) = staged {
                    // Staged as the child of the VM this launch says, of its shape.
                    if s.staging.homes == *homes && (s.vcpus, s.staging.mem_mib) == (vcpus, mem_mib)
                    {
                        let mut home = s.home;
                        home.publish()?;
                        self.published_at_ms = Some(forkvm_registry::time::now_ms());
                        return Ok(home);
                    }
                    let _ = s.home.remove();
                }
                VmHome::create_with(&homes.root, None, homes.parent.as_deref(), record)
            }
        }
    }

    /// Enters the VM process's jail (see `forkvm_jail`) for the registered `home`: the
    /// one it entered while it waited warm, or the launch's.
    pub fn enter_jail(&mut self, home: &VmHome) -> Result<Option<Jail>, LaunchError> {
        // The warm-up's jail is this VM's only when its staged home became the VM's (the
        // group is named by that ID and sized by that shape) and the launch asks for the
        // same; otherwise it goes (dropping it leaves and removes its group).
        let warm = self
            .warm_jail
            .take()
            .filter(|(spec, _)| self.published_at_ms.is_some() && *spec == self.launch.jail);
        match warm {
            Some((_, entered)) => entered.map_err(LaunchError::Jail),
            None => {
                // Threads confined for the warm-up's jail go: the process enters a
                // jail with one thread.
                if let Some(p) = &mut self.prepared {
                    p.end_threads();
                }
                let ram = self.config().mem_mib << 20;
                // A socket left by a VM process that is gone: its directory will let the
                // VM make a socket, not remove one.
                // (A boot's only: a fork child's socket is new, and its identity is
                // checked against its parent's later.)
                let boot = self.fork.is_none() && self.launch.jail.enabled;
                if let Some(v) = self.config().vsock.as_ref().filter(|_| boot) {
                    if let Err(e) = forkvm_devices::virtio::vsock::remove_stale_socket(&v.uds) {
                        tracing::warn!("{}", forkvm_config::logging::error_chain(&e));
                    }
                }
                let cfg = self.config();
                let mut places = places(home.root(), Some(cfg));
                if !self.launch.jail.filter_inherited {
                    own_root_places(&mut places);
                }
                let mut spec = self.launch.jail.clone();
                let with_uid = spec.family.as_mut().filter(|f| f.uid.is_some());
                if let Some(f) = with_uid.filter(|_| !cfg.shares.is_empty()) {
                    // Its file server passes for any user (`CAP_SETUID`, ...): a uid would
                    // bound nothing.
                    tracing::info!("the VM's family runs as uid 0: the VM shares directories");
                    f.uid = None;
                }
                if spec.family.as_ref().is_some_and(|f| f.uid.is_some()) {
                    // Where its fork children (of the family's uid) register.
                    if let Err(e) = forkvm_jail::uid::prepare_state_root(home.root()) {
                        tracing::warn!("{}", forkvm_config::logging::error_chain(&e));
                    }
                    // Where they take their leases.
                    for bridge in cfg.nets.iter().filter_map(|n| n.bridge.as_ref()) {
                        let dir = Path::new(forkvm_jail::LEASE_ROOT).join(bridge);
                        let made = std::fs::create_dir_all(&dir).map_err(|e| e.to_string());
                        let shared = made.and_then(|()| {
                            forkvm_jail::uid::open_to_families(&dir).map_err(|e| e.to_string())
                        });
                        if let Err(e) = shared {
                            tracing::warn!(
                                "{}: its fork children may lease no address: {e}",
                                dir.display()
                            );
                        }
                    }
                }
                Jail::enter(
                    &spec,
                    home.id(),
                    guest_memory_budget(ram),
                    places,
                    home.dir(),
                    &reopened_by_children(cfg),
                )
                .map_err(LaunchError::Jail)
            }
        }
    }

    /// The configuration of the VM it starts: the one it boots, or the forked VM's.
    pub fn config(&self) -> &VmConfig {
        match (&self.fork, &self.launch.start) {
            (Some(payload), _) => payload.config(),
            (None, Start::Boot(cfg)) => cfg,
            (None, Start::Restore(_)) => unreachable!("receive() reads every restore's state"),
        }
    }

    /// Records, for a home published from a warm process's stage, that the VM was
    /// created when it was launched, not when the home was staged: a write left for
    /// after the VM reported running.
    pub fn date_published_home(&self, home: &VmHome) -> Result<(), forkvm_registry::Error> {
        match self.published_at_ms {
            Some(ms) => home.update(|s| s.created_ms = ms).map(drop),
            None => Ok(()),
        }
    }

    /// Receives the launch on [`LAUNCH_FD`], set up by [`VmProcess::spawn`] before exec.
    pub fn receive() -> Result<Self, LaunchError> {
        // SAFETY: an all-zero `stat` is a valid value, and fstat only writes into it;
        // a closed descriptor fails with EBADF before anything owns it.
        let is_socket = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(LAUNCH_FD, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
        };
        if !is_socket {
            return Err(LaunchError::NotLaunched);
        }
        // SAFETY: fd 3 is an open socket (checked above), our end of the launcher's
        // socket pair, and nothing else in this process owns it.
        let mut sock = unsafe { UnixStream::from_raw_fd(LAUNCH_FD) };
        let mut prepared = None;
        let mut staged: Option<Staged> = None;
        let mut warm_jail: Option<WarmJail> = None;
        let mut warm = false;
        loop {
            let (blob, files) = match forkvm_snapshot::recv_blob(&sock, MAX_LAUNCH_PAYLOAD) {
                Err(forkvm_snapshot::TransferError::Closed) if warm => {
                    if let Some(s) = staged {
                        let _ = s.home.remove();
                    }
                    // Its jail goes with it (dropping it removes its group).
                    drop(warm_jail);
                    return Err(LaunchError::Abandoned);
                }
                other => other?,
            };
            match forkvm_snapshot::decode(&blob)? {
                // Returns in each process it forks, with that process's launch socket.
                Received::Zygote if !warm => sock = crate::zygote::serve(sock)?,
                Received::Zygote => {
                    return Err(LaunchError::OutOfOrder("a zygote request after a warm-up"))
                }
                Received::Warmup(_) if warm => {
                    return Err(LaunchError::OutOfOrder("a second warm-up"))
                }
                Received::Warmup(mut w) => {
                    warm = true;
                    let vcpus = w.vcpus;
                    // A home that cannot be staged is made at the launch instead.
                    staged = w.stage.take().and_then(|staging| {
                        staging
                            .stage(vcpus)
                            .inspect_err(|e| tracing::warn!("cannot stage a warm VM's home: {e}"))
                            .ok()
                            .map(|home| Staged {
                                staging,
                                vcpus,
                                home,
                            })
                    });
                    // Jailed while it waits, in a cgroup named by the staged ID: off the
                    // fork's way. A jail it cannot enter fails its launch.
                    // Its VM's configuration is not known yet: it may write where the
                    // forking VM does.
                    if let (Some(spec), Some(s)) = (&w.jail, &staged) {
                        let budget = guest_memory_budget(s.staging.mem_mib << 20);
                        let root = &s.staging.homes.root;
                        let mut places = places(root, None);
                        places.extend(&w.places);
                        if !spec.filter_inherited {
                            own_root_places(&mut places);
                        }
                        warm_jail = Some((
                            spec.clone(),
                            // What its children open by path: the template's disks.
                            Jail::enter(
                                spec,
                                &s.staging.id,
                                budget,
                                places,
                                s.home.dir(),
                                &w.places.root,
                            ),
                        ));
                    }
                    // Its seccomp filters built now, not on the fork's way (a zygote's
                    // processes have them already).
                    forkvm_jail::seccomp::prepare();
                    // A VM that cannot be prepared is made at restore instead, where
                    // its error reaches the fork.
                    prepared = prepare_in_background(&w, files)
                        .inspect_err(|e| {
                            tracing::warn!(
                                "cannot prepare a warm VM: {}",
                                crate::control::error_chain(e)
                            )
                        })
                        .ok();
                    // Its vCPU threads, confined in the jail it is in (one it enters at
                    // the launch ends them first).
                    if let (Some(p), Some((_, Ok(_)))) = (&mut prepared, &warm_jail) {
                        p.park_threads();
                    }
                    // Counted ready by its pool from now on; a pool that went away
                    // closed the socket, which the next receive finds.
                    let _ = (&sock).write_all(&REPORT_PREPARED.to_le_bytes());
                    crate::warm::wait_for_launch_as_batch();
                }
                Received::Launch(launch, sent_ns) => {
                    let received = std::time::Instant::now();
                    if warm {
                        crate::warm::launched_at_normal_policy();
                    }
                    let queued_us = monotonic_ns().saturating_sub(sent_ns) / 1000;
                    let mut files = files;
                    let fork = match &launch.start {
                        Start::Boot(_) => None,
                        Start::Restore(identity) => {
                            let read = match files.is_empty() {
                                true => Err(ForkChildError::NoMemory),
                                false => ForkState::read(files.remove(0), (**identity).clone()),
                            };
                            match read {
                                Ok(payload) => Some(payload),
                                Err(e) => {
                                    if let Some(s) = staged {
                                        let _ = s.home.remove();
                                    }
                                    report_failure(&sock, &e.to_string());
                                    return Err(LaunchError::Fork(e));
                                }
                            }
                        }
                    };
                    return Ok(Self {
                        sock,
                        launch: *launch,
                        fork,
                        files,
                        prepared,
                        staged,
                        warm_jail,
                        published_at_ms: None,
                        received,
                        queued_us,
                    });
                }
            }
        }
    }

    /// Tells the launcher the VM runs.
    pub fn report_running(&self) -> std::io::Result<()> {
        (&self.sock).write_all(&REPORT_RUNNING.to_le_bytes())
    }

    /// For a fork child whose fork's children start together
    /// ([`ChildPayload::starts_together`]): tells the launcher its VM is restored and
    /// waits (at most about 35 minutes) until the launcher says every child is.
    pub fn wait_for_siblings(&self) -> std::io::Result<()> {
        (&self.sock).write_all(&REPORT_RESTORED.to_le_bytes())?;
        self.sock.set_read_timeout(Some(siblings_deadline()))?;
        let mut b = [0u8; 8];
        (&self.sock).read_exact(&mut b).map_err(|e| {
            std::io::Error::other(format!(
                "the launcher did not start the fork's children ({e})"
            ))
        })?;
        self.sock.set_read_timeout(None)?;
        match u64::from_le_bytes(b) {
            START_TOGETHER => Ok(()),
            other => Err(std::io::Error::other(format!(
                "the launcher sent {other} instead of starting the fork's children"
            ))),
        }
    }

    /// Tells the launcher the VM could not start, and why.
    pub fn report_failure(&self, why: &str) {
        report_failure(&self.sock, why);
    }
}

/// Tells the launcher on `sock` that the VM could not start, and why.
fn report_failure(sock: &UnixStream, why: &str) {
    let why = &why.as_bytes()[..why.len().min(MAX_FAILURE_MESSAGE)];
    let mut out = REPORT_FAILED.to_le_bytes().to_vec();
    out.extend_from_slice(&(why.len() as u32).to_le_bytes());
    out.extend_from_slice(why);
    let _ = (&*sock).write_all(&out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GuestIp, NetConfig};

    /// Launches are bincode, which has no optional fields: every NIC setting must come
    /// through whether it is set or not.
    #[test]
    fn a_launch_decodes_as_it_was_encoded() {
        let mut cfg = VmConfig::new(Path::new("/k"));
        cfg.nets = vec![
            NetConfig {
                tap: "t0".into(),
                mac: None,
                bridge: None,
                guest_ip: None,
            },
            NetConfig {
                tap: "t1".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                bridge: Some("forkvm0".into()),
                guest_ip: Some(GuestIp {
                    address: "10.77.0.2/16".into(),
                    gateway: "10.77.0.1".into(),
                }),
            },
        ];
        let launch = Launch {
            home: HomeSpec::Registered {
                root: "/run/forkvm".into(),
                id: "a".repeat(32),
            },
            console: ConsoleSpec::Log,
            start: Start::Boot(cfg),
            jail: JailSpec::default(),
        };
        let before = monotonic_ns();
        let blob = encode(&launch).unwrap();
        let Received::Launch(back, sent_ns) = forkvm_snapshot::decode(&blob).unwrap() else {
            panic!("not a launch")
        };
        assert!(
            (before..=monotonic_ns()).contains(&sent_ns),
            "the launch carries when it was encoded"
        );
        let Start::Boot(back) = back.start else {
            panic!("not a boot")
        };
        let Start::Boot(sent) = &launch.start else {
            unreachable!()
        };
        assert_eq!(back.nets, sent.nets);
    }
}
