//! Shared by the `forkvm` integration tests: running the `forkvm` binary with a time
//! limit in its own process group, watching its output while it runs, and checking that
//! it left no process behind.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `forkvm` binary under test.
pub const FORKVM: &str = env!("CARGO_BIN_EXE_forkvm");

/// How long one guest may take from spawn to exit. Guests boot in ~10 s inside the
/// virtual host (nested KVM under TCG); the margin is for a loaded machine.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// The kernel command line that runs `script` with `sh -c` as the guest's command: the
/// VMM's default line, then ` -- `. The kernel's parser only knows double quotes, so the
/// script must not contain any (single quotes reach `sh` untouched).
pub fn guest_cmdline(script: &str) -> String {
    assert!(
        !script.contains('"'),
        "a guest script cannot contain double quotes: {script}"
    );
    format!(
        "{} -- sh -c \"{script}\"",
        forkvm_vmm::config::DEFAULT_CMDLINE
    )
}

/// The whole lines of a console log read while its guest may still be writing: a
/// serial console prints a byte at a time, so the text can end in the middle of a line
/// (`clock=179` of `clock=1796381334`), which is left out.
pub fn whole_lines(text: &str) -> impl DoubleEndedIterator<Item = &str> {
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    whole.lines()
}

/// Output captured from a running process, shared with its reader thread.
#[derive(Default)]
struct Captured {
    bytes: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap().0).into_owned()
    }
}

fn reader(mut from: impl Read + Send + 'static, into: Arc<Captured>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let mut g = into.bytes.lock().unwrap();
            if n == 0 {
                g.1 = true;
                into.grew.notify_all();
                return;
            }
            g.0.extend_from_slice(&buf[..n]);
            into.grew.notify_all();
        }
    })
}

/// A `forkvm` process that is running.
pub struct Forkvm {
    child: Option<Child>,
    args: Vec<String>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    readers: Vec<JoinHandle<()>>,
    deadline: Instant,
    _root: tempfile::TempDir,
}

/// How a `forkvm` run ended.
#[derive(Debug)]
pub struct Finished {
    /// The command line, for messages.
    pub args: Vec<String>,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (the guest console).
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "forkvm {:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

impl Forkvm {
    /// Starts `forkvm ARGS` in a process group of its own, with stdin closed; it must have
    /// exited within `timeout`.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Self {
        Self::spawn_with(args, timeout, &[], None)
    }

    /// [`Forkvm::spawn`] with extra environment variables and, if given, `stdin` written
    /// to its standard input (then closed).
    pub fn spawn_with<S: AsRef<OsStr>>(
        args: &[S],
        timeout: Duration,
        env: &[(&str, &OsStr)],
        stdin: Option<Vec<u8>>,
    ) -> Self {
        let args_s: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        // A state root of its own, so test VMs are not registered among the machine's.
        let root = tempfile::Builder::new()
            .prefix("forkvm-test-root")
            .tempdir()
            .expect("cannot create a state root");
        let mut child = forkvm_test_support::spawn_in_group(
            Command::new(FORKVM)
                .args(args)
                .env("FORKVM_ROOT", root.path())
                .envs(env.iter().copied()),
            stdin,
        );
        let stdout = Arc::new(Captured::default());
        let stderr = Arc::new(Captured::default());
        let readers = vec![
            reader(child.stdout.take().unwrap(), stdout.clone()),
            reader(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Self {
            child: Some(child),
            args: args_s,
            stdout,
            stderr,
            readers,
            deadline: Instant::now() + timeout,
            _root: root,
        }
    }

    /// The process ID of the `forkvm` process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not yet collected").id()
    }

    /// What the process has written to stdout so far.
    pub fn stdout_so_far(&self) -> String {
        self.stdout.text()
    }

    /// Waits until stdout contains `needle`; panics (after killing the VMM) if it exits or
    /// the time limit passes first.
    pub fn wait_for_stdout(&mut self, needle: &str) {
        let mut g = self.stdout.bytes.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&g.0).contains(needle) {
                return;
            }
            let now = Instant::now();
            if g.1 || now >= self.deadline {
                let why = if g.1 { "exited" } else { "timed out" };
                drop(g);
                let out = self.kill_and_collect();
                panic!("forkvm {why} before printing {needle:?}\n{out}");
            }
            g = self
                .stdout
                .grew
                .wait_timeout(g, (self.deadline - now).min(Duration::from_millis(500)))
                .unwrap()
                .0;
        }
    }

    /// What a stuck run leaves to look at: each thread's state and kernel wait channel,
    /// and the console log of every VM registered under this run's state root.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Some(child) = &self.child {
            let tasks = format!("/proc/{}/task", child.id());
            for t in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                let state = read("stat");
                let state = state.rsplit(") ").next().unwrap_or("").split(' ').next();
                out.push_str(&format!(
                    "thread {} {:?} state {} wchan {}\n",
                    t.file_name().to_string_lossy(),
                    read("comm").trim(),
                    state.unwrap_or("?"),
                    read("wchan")
                ));
            }
        }
        for vm in std::fs::read_dir(self._root.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let log = vm.path().join("console.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                out.push_str(&format!("--- {} ---\n{text}\n", log.display()));
            }
        }
        out
    }

    fn kill_and_collect(&mut self) -> Finished {
        let diagnostics = self.diagnostics();
        eprintln!(
            "forkvm {:?}: its state before it is killed:\n{diagnostics}",
            self.args
        );
        let mut child = self.child.take().expect("not yet collected");
        // SAFETY: kill(2) with a negative pid signals the process group the child leads;
        // it touches no memory of ours.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let status = child.wait().expect("wait for forkvm");
        self.collect(status)
    }

    fn collect(&mut self, status: ExitStatus) -> Finished {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            args: self.args.clone(),
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        }
    }

    /// Waits for the process to exit within its time limit (killing it and panicking
    /// otherwise) and checks that nothing it started is still running in its process
    /// group.
    pub fn finish(mut self) -> Finished {
        let pid = self.child.as_ref().expect("not yet collected").id() as i32;
        let status = loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().expect("wait for forkvm") {
                break status;
            }
            if Instant::now() >= self.deadline {
                let out = self.kill_and_collect();
                panic!("forkvm did not exit in time; killed it\n{out}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        let out = self.collect(status);
        // SAFETY: signal 0 only checks whether any process is left in the group.
        let left = unsafe { libc::kill(-pid, 0) } == 0;
        assert!(!left, "processes of forkvm's group {pid} still run\n{out}");
        out
    }
}

impl Drop for Forkvm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // A panicking test must not leave a VM running.
            // SAFETY: as in `kill_and_collect`.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Runs `forkvm ARGS` to completion (see [`Forkvm::finish`]).
pub fn run_forkvm<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Finished {
    Forkvm::spawn(args, timeout).finish()
}

/// Asserts that a guest ran its command to the end: the init's ready marker, then
/// `forkvm-init: exit 0`, and the VMM exiting 0 after the guest powered off.
pub fn assert_clean_guest_run(out: &Finished) {
    assert!(
        out.stdout.contains(forkvm_guest_kernel::READY_MARKER),
        "no ready marker\n{out}"
    );
    assert!(
        out.stdout.contains("forkvm-init: exit 0"),
        "the guest command did not exit 0\n{out}"
    );
    assert_eq!(out.status.code(), Some(0), "forkvm exit status\n{out}");
}

/// Runs `program ARGS` on the (virtual) host, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes sure the default guest (kernel and initramfs) is in the forkvm cache. Call it
/// before [`forkvm_testhost::on_kvm_host`]: inside the virtual host the cache is read-only.
pub fn warm_default_guest() {
    if !forkvm_testhost::in_test_host() {
        forkvm_guest_kernel::default_guest().expect("cannot prepare the default guest");
    }
}

/// Makes sure the container guest (kernel and the agent-as-init initramfs) is in the
/// forkvm cache; like [`warm_default_guest`], call it before entering the virtual host.
pub fn warm_container_guest() {
    if !forkvm_testhost::in_test_host() {
        let agent = forkvm_guest_kernel::find_agent()
            .expect("the guest agent is not built: run `cargo xtask prepare-guest`");
        forkvm_guest_kernel::container_guest(&agent).expect("cannot prepare the container guest");
    }
}
