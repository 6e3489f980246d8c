//! Owns the public entry point [`run_in_kvm_host`]: options, outcome, the
//! direct/virtual decision, direct execution, and the shared process plumbing
//! (timeouts, kill-on-drop, parent-death signal, run logs).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::caps::{in_test_host, Capabilities};
use crate::error::Error;

/// Where a command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On this machine, which has hardware KVM (or the caller asked so).
    Direct,
    /// Inside the QEMU/TCG virtual host with nested SVM.
    Virtual,
}

/// How to choose between [`Mode::Direct`] and [`Mode::Virtual`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostChoice {
    /// `FORKVM_TESTHOST=force` -> virtual, `FORKVM_TESTHOST=never` -> direct; otherwise
    /// direct inside the virtual host or with hardware KVM, else virtual.
    #[default]
    Auto,
    /// Always run directly.
    Direct,
    /// Always run in the virtual host (direct when already inside it).
    Virtual,
}

/// Options for [`run_in_kvm_host`].
#[derive(Debug, Clone)]
pub struct TestHostOptions {
    /// Wall-clock limit for the run; in virtual mode it starts once the
    /// cross-process lock is held (boot time included).
    pub timeout: Duration,
    /// Virtual host memory in MiB.
    pub mem_mib: u32,
    /// Virtual host vCPUs. Default 1: see [`DEFAULT_SMP`].
    pub smp: u32,
    /// Extra environment variables for the command (on top of this process's environment).
    pub envs: Vec<(String, String)>,
    /// Working directory of the command (default: the current directory).
    pub cwd: PathBuf,
    /// Copy the command's stdout/stderr to ours live.
    pub stream: bool,
    /// Direct or virtual.
    pub host: HostChoice,
    /// Host directories the command may write to in virtual mode (each is
    /// exported read-write at the same path; the rest of `/` is read-only).
    pub writable: Vec<PathBuf>,
    /// Virtual mode: how long the virtual host may go without writing its heartbeat
    /// (every [`HEARTBEAT_EVERY`]) before it is taken as stalled and killed
    /// ([`crate::Error::Stalled`]).
    pub stall_after: Duration,
}

/// How often the virtual host writes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// [`TestHostOptions::stall_after`] unless set: four and a half missed heartbeats. A
/// loaded virtual host still writes it on time (its console lines, one per six beats,
/// came 60.5-60.9 s apart in every log of a day's CI and benchmark runs), and a frozen
/// one never writes again: each of its minutes of silence is a minute of CI lost (two
/// freezes in a row cost one test 240 s at 120 s).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(45);

impl Default for TestHostOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            mem_mib: 4096,
            smp: DEFAULT_SMP,
            envs: Vec::new(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            stream: false,
            host: HostChoice::Auto,
            writable: Vec::new(),
            stall_after: DEFAULT_STALL_AFTER,
        }
    }
}

/// The virtual host's vCPUs unless asked otherwise: one.
///
/// With two, QEMU runs one TCG thread per vCPU, and its SVM emulation is not reliable
/// across them: in 5 of 48 virtual-host sessions of one day (the long ones: Docker,
/// podman, `forkvm run`) the host's kernel hit its task stack guard page inside
/// `exc_page_fault`, both vCPUs soft-locked, or a nested guest triple-faulted while
/// booting. With one vCPU (one TCG thread) none of
/// that was seen, at the price of nested VMs time-sharing one CPU (a guest boot
/// takes ~15% longer).
pub const DEFAULT_SMP: u32 = 1;

/// The result of a command that ran to completion.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The command's exit code (128+N when killed by signal N).
    pub exit_code: i32,
    /// What it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// What it wrote to stderr (lossy UTF-8).
    pub stderr: String,
    /// The run log: kernel console and init messages (virtual mode) and the command's output.
    pub log_path: PathBuf,
    /// Wall time of the run, lock wait excluded.
    pub wall: Duration,
    /// Where it ran.
    pub mode: Mode,
}

/// Decides where a command would run under `choice`.
pub fn decide_mode(choice: HostChoice) -> Mode {
    if in_test_host() {
        return Mode::Direct;
    }
    let choice = match choice {
        HostChoice::Auto => match std::env::var("FORKVM_TESTHOST").as_deref() {
            Ok("force") => HostChoice::Virtual,
            Ok("never") => HostChoice::Direct,
            _ => HostChoice::Auto,
        },
        other => other,
    };
    match choice {
        HostChoice::Direct => Mode::Direct,
        HostChoice::Virtual => Mode::Virtual,
        HostChoice::Auto if Capabilities::detect().hardware_kvm() => Mode::Direct,
        HostChoice::Auto => Mode::Virtual,
    }
}

/// Runs `cmd` where a hardware-accelerated `/dev/kvm` exists: directly when
/// this machine has one, otherwise inside the virtual host (see the crate docs).
pub fn run_in_kvm_host<S: AsRef<std::ffi::OsStr>>(
    cmd: &[S],
    opts: &TestHostOptions,
) -> Result<Outcome, Error> {
    let cmd: Vec<OsString> = cmd.iter().map(|s| s.as_ref().to_owned()).collect();
    if cmd.is_empty() {
        return Err(Error::EmptyCommand);
    }
    let mode = decide_mode(opts.host);
    tracing::debug!(?mode, ?cmd, "run_in_kvm_host");
    match mode {
        Mode::Direct => run_direct(&cmd, opts),
        Mode::Virtual => crate::virt::run_virtual(&cmd, opts),
    }
}

/// Directory for run logs: `<cache>/testhost/logs`, or a temp dir when the cache
/// is not writable (e.g. inside the virtual host, where `/` is read-only).
pub(crate) fn new_log_path(kind: &str) -> PathBuf {
    let dirs = [
        forkvm_guest_kernel::cache_dir()
            .ok()
            .map(|c| c.join("testhost/logs")),
        Some(std::env::temp_dir().join("forkvm-testhost-logs")),
    ];
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // Two runs of one process may start in the same millisecond (a test binary's tests
    // run on several threads): a count tells them apart.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{kind}-{stamp}-{}-{n}.log", std::process::id());
    for dir in dirs.into_iter().flatten() {
        if fs::create_dir_all(&dir).is_ok() && probe_writable(&dir) {
            prune_logs(&dir, 50);
            return dir.join(name);
        }
    }
    PathBuf::from("/dev/null")
}

fn probe_writable(dir: &Path) -> bool {
    tempfile::tempfile_in(dir).is_ok()
}

fn prune_logs(dir: &Path, keep: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut logs: Vec<(SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if logs.len() <= keep {
        return;
    }
    logs.sort();
    for (_, p) in &logs[..logs.len() - keep] {
        let _ = fs::remove_file(p);
    }
}

pub(crate) fn open_log(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Io {
            what: format!("opening log {}", path.display()),
            source,
        })
}

/// Makes the child die with SIGKILL when the spawning thread's process dies,
/// and puts it in its own process group so a timeout kills everything it started.
pub(crate) fn harden(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls the
    // async-signal-safe `prctl`, `getppid` and `kill`.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// Kills the child's process group and reaps it when dropped.
pub(crate) struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub(crate) fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain syscall on a process group we created and have
                // not yet reaped, so the id cannot have been reused.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn pump<R: Read + Send + 'static>(
    mut r: R,
    to_stderr: bool,
    stream: bool,
) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if stream {
                        let _ = if to_stderr {
                            io::stderr().write_all(&buf[..n])
                        } else {
                            io::stdout().write_all(&buf[..n])
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        all
    })
}

fn run_direct(cmd: &[OsString], opts: &TestHostOptions) -> Result<Outcome, Error> {
    let log_path = new_log_path("direct");
    let mut log = open_log(&log_path)?;
    let _ = writeln!(
        log,
        "forkvm-testhost: direct run of {cmd:?} in {}",
        opts.cwd.display()
    );
    let start = Instant::now();
    let mut command = Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .current_dir(&opts.cwd)
        .envs(opts.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    harden(&mut command);
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        program: cmd[0].to_string_lossy().into_owned(),
        source,
    })?;
    let out = child.stdout.take().map(|o| pump(o, false, opts.stream));
    let err = child.stderr.take().map(|e| pump(e, true, opts.stream));
    let mut guard = ChildGuard::new(child);
    let deadline = start + opts.timeout;
    let status = loop {
        match guard.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(Error::Io {
                    what: "waiting for the command".into(),
                    source,
                })
            }
        }
        if Instant::now() >= deadline {
            guard.kill();
            let _ = writeln!(log, "forkvm-testhost: timed out after {:?}", opts.timeout);
            return Err(Error::TimedOut {
                timeout: opts.timeout,
                log_path,
            });
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    let exit_code = exit_code(status);
    let _ = log.write_all(b"--- stdout ---\n");
    let _ = log.write_all(&stdout);
    let _ = log.write_all(b"\n--- stderr ---\n");
    let _ = log.write_all(&stderr);
    let _ = writeln!(log, "\n--- exit code {exit_code} ---");
    Ok(Outcome {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        log_path,
        wall: start.elapsed(),
        mode: Mode::Direct,
    })
}
