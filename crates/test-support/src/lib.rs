//! Helpers shared by forkvm's end-to-end tests, in a crate of their own so that no
//! product crate compiles them. A dev-dependency only.

pub mod netns;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub use forkvm_config::logging::error_chain;

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses), state first; `None` when there is no such process.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether process `pid` exists and has not ended (a zombie has ended).
pub fn is_running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| state != "Z"))
}

/// `CAP_SYS_PTRACE`, which reaches any process's `/proc/<pid>` entries.
const CAP_SYS_PTRACE: u32 = 19;

/// Whether process `pid` is open to another process of its uid that holds no
/// `CAP_SYS_PTRACE` (as another VM process): whether that process can read its
/// `/proc/<pid>/environ`. For a process of the same uid that is dumpable it can, for one
/// that is not it cannot. Probed from a forked child that keeps this process's
/// capabilities but `CAP_SYS_PTRACE`. `None` when `pid` itself may hold
/// `CAP_SYS_PTRACE` (the kernel then refuses any reader without it, dumpable or not).
pub fn reachable_without_ptrace(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let permitted = status
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    if permitted & (1 << CAP_SYS_PTRACE) != 0 {
        return None;
    }
    let path = std::ffi::CString::new(format!("/proc/{pid}/environ")).expect("no NUL");
    let (header, caps) = caps_but_ptrace();
    // SAFETY: the child only makes system calls (capset, open, _exit) on memory made
    // before the fork; the parent waits for it.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        // SAFETY: system calls on memory made before the fork, then _exit.
        0 => unsafe {
            if libc::syscall(libc::SYS_capset, &header, caps.as_ptr()) != 0 {
                libc::_exit(2);
            }
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            libc::_exit(if fd >= 0 { 0 } else { 1 })
        },
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` outlives the call.
            assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
            match libc::WEXITSTATUS(status) {
                0 => Some(true),
                1 => Some(false),
                _ => panic!("the probe could not drop CAP_SYS_PTRACE"),
            }
        }
    }
}

/// Whether `sh -c script` succeeds when run as uid `uid` and group `gid` (no other
/// group, no capability): what a process of that user may do.
pub fn runs_as(uid: u32, gid: u32, script: &str) -> bool {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only credential system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.status()
        .unwrap_or_else(|e| panic!("cannot run {script:?} as uid {uid}: {e}"))
        .success()
}

/// This thread's capabilities without `CAP_SYS_PTRACE`, for `capset` in a child.
fn caps_but_ptrace() -> (CapHeader, [CapData; 2]) {
    let header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut caps = [CapData::default(); 2];
    // SAFETY: capget fills the two data words of a version-3 header.
    let got = unsafe { libc::syscall(libc::SYS_capget, &header, caps.as_mut_ptr()) };
    assert_eq!(got, 0, "capget: {}", std::io::Error::last_os_error());
    let c = &mut caps[0];
    c.effective &= !(1 << CAP_SYS_PTRACE);
    c.permitted &= !(1 << CAP_SYS_PTRACE);
    c.inheritable &= !(1 << CAP_SYS_PTRACE);
    (header, caps)
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// Each thread of process `pid` whose name starts with `prefix`: its name and the
/// `Seccomp` and `NoNewPrivs` fields of its status (`"2"` and `"1"` when confined).
pub fn thread_confinement(pid: u32, prefix: &str) -> Vec<(String, String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let name = name.trim().to_owned();
            if !name.starts_with(prefix) {
                return None;
            }
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            Some((name, field("Seccomp:"), field("NoNewPrivs:")))
        })
        .collect()
}

/// Checks that process `pid` (a VM process) lives in a root of its own, as the kernel
/// shows it: a mount namespace that is not the host's (init's), where the directory
/// `place` (one of its places) and `/dev/kvm` are and the host's `/etc/passwd` is not.
/// `what` is shown on failure.
pub fn assert_own_root(pid: u32, what: &str, place: &Path) {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("1"),
        "{what}: the host's mount namespace"
    );
    let seen = Path::new("/proc").join(pid.to_string()).join("root");
    let inside = |p: &Path| seen.join(p.strip_prefix("/").unwrap_or(p));
    assert!(
        inside(place).is_dir(),
        "{what}: {} not in its root",
        place.display()
    );
    assert!(
        inside(Path::new("/dev/kvm")).exists(),
        "{what}: no /dev/kvm"
    );
    assert!(
        !inside(Path::new("/etc/passwd")).exists(),
        "{what}: the host's /etc/passwd in its root"
    );
}

/// Runs test `test` (its full path) of this test binary again as the first process of a
/// new pid namespace (under this one's procfs), with `marker` set in its environment
/// so that it knows to take the child's part; returns its pid as this process sees it
/// and its output.
pub fn rerun_in_new_pid_namespace(test: &str, marker: &str) -> (u32, std::process::Output) {
    let exe = std::env::current_exe().unwrap();
    let (test, marker) = (test.to_owned(), marker.to_owned());
    std::thread::spawn(move || {
        // SAFETY: unshare(2) reads no memory; it changes the pid namespace this thread's
        // children start in.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        let child = Command::new(exe)
            .args(["--exact", "--nocapture", &test])
            .env(marker, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        (child.id(), child.wait_with_output().unwrap())
    })
    .join()
    .unwrap()
}

/// The parent of process `pid`, while it exists.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The processes whose parent is `pid` and that have not ended.
pub fn running_children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_of(p) == Some(pid) && is_running(p))
        .collect()
}

/// Pids and command lines (`pid: cmdline`) of the processes that have not ended and
/// whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(needle) && is_running(pid)).then(|| format!("{pid}: {}", cmd.trim_end()))
        })
        .collect()
}

/// Sends SIGKILL to `pid` (a process the test started); whether it existed is not
/// checked.
pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) takes no pointers; at worst it fails with ESRCH.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Starts `cmd` in a process group of its own (so a test can kill everything it
/// started), stdout and stderr piped, and `stdin`, when given, written to its standard
/// input from a thread and then closed (else its stdin is `/dev/null`).
pub fn spawn_in_group(cmd: &mut Command, stdin: Option<Vec<u8>>) -> Child {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd.get_program().to_string_lossy()));
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child
}

/// Installs the forkvm built beside `target_bin` (a test's own target directory, e.g.
/// the parent of `CARGO_BIN_EXE_forkvm-runtime`) into `<scratch>/prefix` as
/// `cargo xtask install` does: the programs, the guest agent, and a `forkvm.toml` that
/// registers VMs under `vms`, finds the guests in this machine's forkvm cache (which
/// the test prepared) and keeps the template key in `scratch`. The engines then drive that copy with none of forkvm's
/// variables in their environment. Returns the prefix.
pub fn install_forkvm(target_bin: &Path, scratch: &Path, vms: &Path) -> PathBuf {
    let agent = forkvm_guest_kernel::find_agent()
        .expect("the guest agent is not built (run `cargo xtask prepare-guest`)");
    let cache = forkvm_guest_kernel::cache_dir().expect("a forkvm cache directory");
    let prefix = scratch.join("prefix");
    let config = forkvm_config::Config {
        root: Some(vms.to_owned()),
        cache: Some(cache),
        // The test's own: the host's key is not touched (its directory may be
        // read-only in the virtual host).
        template_key: Some(scratch.join("template.key")),
        ..forkvm_config::Config::default()
    };
    let installed = forkvm_config::install::install(target_bin, &agent, &prefix, &config)
        .unwrap_or_else(|e| {
            panic!(
                "cannot install forkvm into {} (build every program first: \
                 `cargo build --workspace --bins`): {e}",
                prefix.display()
            )
        });
    println!(
        "installed forkvm in {}; {}:\n{}",
        prefix.display(),
        installed.config.display(),
        std::fs::read_to_string(&installed.config).unwrap_or_default()
    );
    prefix
}

/// Runs `f` with a fresh directory on a thread in a mount namespace of its own (every
/// mount private), for tests that mount (as root).
///
/// The directory is a tmpfs of its own: everything the test makes and mounts is in it,
/// and it is detached, with whatever is still mounted in it, before the directory is
/// removed, which is never done recursively: a bind a test left behind must not lead a
/// recursive removal into the host's files. The threads and processes `f` starts
/// inherit the namespace.
pub fn in_own_mounts(f: impl FnOnce(&Path) + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; this thread gets its own mount namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0, "unshare");
        // SAFETY: NUL-terminated strings that outlive the call; no data.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "make / private");
        let dir = std::env::temp_dir().join(format!(
            "forkvm-mounts-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir(&dir).unwrap();
        let c_dir = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=64m".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "tmpfs on {}", dir.display());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&dir)));
        // SAFETY: a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(rc, 0, "detach {}", dir.display());
        std::fs::remove_dir(&dir).unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .join()
    .unwrap();
}

/// Numbers the directories of [`in_own_mounts`] within one process.
static NEXT_DIR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A `Write` whose bytes the test reads afterwards; clones share them.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What was written so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

/// Checks that [`reachable_without_ptrace`] tells, on this kernel, a dumpable process
/// of this uid from one that is not: two children that give up `CAP_SYS_PTRACE` (every
/// set, for good) and wait, the second made not dumpable. (A sandbox kernel may not
/// enforce dumpability; the virtual test host's Linux does.)
pub fn assert_probe_tells_dumpable_processes() {
    let waiter = |dumpable: bool| -> i32 {
        let (header, caps) = caps_but_ptrace();
        // SAFETY: the child only makes system calls (capset, prctl, pause, _exit).
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            // SAFETY: system calls on memory made before the fork, then _exit.
            0 => unsafe {
                libc::syscall(libc::SYS_capset, &header, caps.as_ptr());
                if !dumpable {
                    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                }
                libc::pause();
                libc::_exit(0)
            },
            pid => pid,
        }
    };
    let (open, closed) = (waiter(true), waiter(false));
    // Once each has done what it does before it waits.
    let settled = |pid: i32, want: bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = reachable_without_ptrace(pid as u32);
            if r == Some(want) || std::time::Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let reached = (settled(open, true), settled(closed, false));
    for pid in [open, closed] {
        sigkill(pid as u32);
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    assert_eq!(
        reached,
        (Some(true), Some(false)),
        "the dumpability probe does not work on this kernel"
    );
}
