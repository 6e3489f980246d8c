//! The OCI runtime binary, driven through runc's command-line contract the way
//! containerd-shim-runc-v2 drives runc (through go-runc):
//!
//! ```text
//! RUNTIME --root ROOT --log LOG --log-format json create --bundle B --pid-file P [--console-socket S] [--no-pivot] ID
//! RUNTIME ... start ID | state ID | kill [--all] ID SIGNAL | delete [--force] ID
//! RUNTIME ... exec --process FILE --detach --pid-file P [--tty --console-socket S] ID
//! RUNTIME ... ps --format json ID | pause ID | resume ID
//! ```
//!
//! A failed command's message is the last `{"level":"error","msg":...}` line the runtime
//! appended to the `--log` file during that command, else the last line of its stderr,
//! else its exit status. Commands are waited for through [`Exits`] (the shim's reaper
//! owns `waitpid`), and their output goes to unlinked temporary files rather than
//! pipes, so a runtime that leaves a process holding its stdio (a VMM) cannot hang the
//! shim.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::exits::Exits;

/// The runtime's file name, looked for beside the shim and on `PATH`.
pub const DEFAULT_BINARY: &str = "forkvm-runtime";
/// The environment variable that names the runtime binary (below the runtime options'
/// `BinaryName`, above the defaults).
pub const RUNTIME_ENV: &str = "FORKVM_RUNTIME";
/// The runtime's state root, under which each containerd namespace has its own.
pub const DEFAULT_ROOT: &str = "/run/containerd/forkvm";

/// Picks the runtime binary: `binary_name` (the runtime options' `BinaryName`) when
/// set, else `env` (`$FORKVM_RUNTIME`), else `forkvm-runtime` beside the shim's own
/// executable `shim_exe`, else `forkvm-runtime` on `path` (`$PATH`). A name without a
/// slash is looked up on `path`, as go-runc does.
pub fn select_binary(
    binary_name: &str,
    env: Option<&OsStr>,
    shim_exe: Option<&Path>,
    path: Option<&OsStr>,
) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let lookup = |name: &OsStr, tried: &mut Vec<String>| -> Option<PathBuf> {
        let p = Path::new(name);
        if p.components().count() > 1 || p.is_absolute() {
            tried.push(p.display().to_string());
            return is_executable(p).then(|| p.to_path_buf());
        }
        tried.push(format!("{} on PATH", p.display()));
        search_path(name, path)
    };
    if !binary_name.is_empty() {
        return lookup(OsStr::new(binary_name), &mut tried).ok_or_else(|| Error::RuntimeNotFound {
            tried: format!("BinaryName {}", tried.join(", ")),
        });
    }
    if let Some(env) = env.filter(|e| !e.is_empty()) {
        return lookup(env, &mut tried).ok_or_else(|| Error::RuntimeNotFound {
            tried: format!("{RUNTIME_ENV}={}", tried.join(", ")),
        });
    }
    if let Some(dir) = shim_exe.and_then(Path::parent) {
        let beside = dir.join(DEFAULT_BINARY);
        tried.push(beside.display().to_string());
        if is_executable(&beside) {
            return Ok(beside);
        }
    }
    lookup(OsStr::new(DEFAULT_BINARY), &mut tried).ok_or_else(|| Error::RuntimeNotFound {
        tried: tried.join(", "),
    })
}

/// The runtime's `--root` for a containerd namespace: `root` (the runtime options'
/// `Root`) when set, else [`DEFAULT_ROOT`], with the namespace appended (as runc-v2 does
/// with `/run/containerd/runc/<namespace>`).
pub fn runtime_root(root: &str, namespace: &str) -> PathBuf {
    let base = if root.is_empty() { DEFAULT_ROOT } else { root };
    Path::new(base).join(namespace)
}

fn search_path(name: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The message of the last `"level":"error"` line of a runtime's JSON log (logrus'
/// format: one object per line with `level` and `msg`), as go-runc reports it.
pub fn last_log_error(log: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        level: Option<String>,
        msg: Option<String>,
    }
    log.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l.trim()).ok())
        .filter(|l| l.level.as_deref() == Some("error"))
        .filter_map(|l| l.msg)
        .next_back()
}

/// What `RUNTIME state ID` prints (the runtime spec's state, plus runc's extras).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The spec version.
    #[serde(default)]
    pub oci_version: String,
    /// The container id.
    pub id: String,
    /// `creating`, `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The container's pid (0 once stopped).
    #[serde(default)]
    pub pid: u32,
    /// The bundle directory.
    #[serde(default)]
    pub bundle: String,
}

/// The standard streams a runtime command hands to the process it creates (runc passes
/// its own stdio to a non-terminal container). `None` is /dev/null for stdin and a
/// capture file for output.
#[derive(Default)]
pub struct Stdio3 {
    /// Standard input.
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: Option<OwnedFd>,
    /// Standard error.
    pub stderr: Option<OwnedFd>,
}

/// `create`'s options beyond the id and bundle.
pub struct CreateOpts<'a> {
    /// The pid file the runtime writes.
    pub pid_file: &'a Path,
    /// Where to send the pty master (terminal containers).
    pub console_socket: Option<&'a Path>,
    /// runc's `--no-pivot` (the runtime options' `NoPivotRoot`).
    pub no_pivot: bool,
    /// forkvm's `--pod-template` (the `ConfigPath` file's `PodTemplate`): a pod
    /// sandbox's VM starts by fork.
    pub pod_template: Option<&'a Path>,
}

/// `exec`'s options beyond the id.
pub struct ExecOpts<'a> {
    /// The process spec (JSON) file.
    pub process: &'a Path,
    /// The pid file the runtime writes.
    pub pid_file: &'a Path,
    /// Where to send the pty master, for a terminal exec (also passes `--tty`).
    pub console_socket: Option<&'a Path>,
}

/// One runtime binary with its state root and log file.
#[derive(Clone)]
pub struct Runtime {
    /// The binary.
    pub binary: PathBuf,
    /// Its `--root`.
    pub root: PathBuf,
    /// Its `--log` (JSON lines).
    pub log: PathBuf,
    exits: Arc<Exits>,
}

impl Runtime {
    /// A runtime whose commands are waited for through `exits`.
    pub fn new(binary: PathBuf, root: PathBuf, log: PathBuf, exits: Arc<Exits>) -> Self {
        Runtime {
            binary,
            root,
            log,
            exits,
        }
    }

    /// The flags every command starts with.
    pub fn global_args(&self) -> Vec<OsString> {
        vec![
            "--root".into(),
            self.root.clone().into(),
            "--log".into(),
            self.log.clone().into(),
            "--log-format".into(),
            "json".into(),
        ]
    }

    /// `create`'s arguments after the global flags.
    pub fn create_args(id: &str, bundle: &Path, opts: &CreateOpts<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "create".into(),
            "--bundle".into(),
            bundle.into(),
            "--pid-file".into(),
            opts.pid_file.into(),
        ];
        if let Some(s) = opts.console_socket {
            a.extend(["--console-socket".into(), s.into()]);
        }
        if opts.no_pivot {
            a.push("--no-pivot".into());
        }
        if let Some(t) = opts.pod_template {
            a.extend(["--pod-template".into(), t.into()]);
        }
        a.push(id.into());
        a
    }

    /// `exec`'s arguments after the global flags.
    pub fn exec_args(id: &str, opts: &ExecOpts<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "exec".into(),
            "--process".into(),
            opts.process.into(),
            "--detach".into(),
            "--pid-file".into(),
            opts.pid_file.into(),
        ];
        if let Some(s) = opts.console_socket {
            a.extend(["--tty".into(), "--console-socket".into(), s.into()]);
        }
        a.push(id.into());
        a
    }

    /// `kill`'s arguments after the global flags.
    pub fn kill_args(id: &str, signal: u32, all: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["kill".into()];
        if all {
            a.push("--all".into());
        }
        a.extend([id.into(), signal.to_string().into()]);
        a
    }

    /// `delete`'s arguments after the global flags.
    pub fn delete_args(id: &str, force: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["delete".into()];
        if force {
            a.push("--force".into());
        }
        a.push(id.into());
        a
    }

    /// `RUNTIME create`: the container's process exists (not yet running its program)
    /// when this returns, its pid in `opts.pid_file`.
    pub fn create(&self, id: &str, bundle: &Path, opts: &CreateOpts<'_>, io: Stdio3) -> Result<()> {
        self.run("create", Self::create_args(id, bundle, opts), io)
            .map(drop)
    }

    /// `RUNTIME start`.
    pub fn start(&self, id: &str) -> Result<()> {
        self.run("start", vec!["start".into(), id.into()], Stdio3::default())
            .map(drop)
    }

    /// `RUNTIME exec --detach`: the exec's process exists when this returns, its pid in
    /// `opts.pid_file`.
    pub fn exec(&self, id: &str, opts: &ExecOpts<'_>, io: Stdio3) -> Result<()> {
        self.run("exec", Self::exec_args(id, opts), io).map(drop)
    }

    /// `RUNTIME kill [--all] ID SIGNAL`.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        self.run("kill", Self::kill_args(id, signal, all), Stdio3::default())
            .map(drop)
    }

    /// `RUNTIME delete [--force] ID`.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        self.run("delete", Self::delete_args(id, force), Stdio3::default())
            .map(drop)
    }

    /// `RUNTIME pause ID`.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.run("pause", vec!["pause".into(), id.into()], Stdio3::default())
            .map(drop)
    }

    /// `RUNTIME resume ID`.
    pub fn resume(&self, id: &str) -> Result<()> {
        self.run(
            "resume",
            vec!["resume".into(), id.into()],
            Stdio3::default(),
        )
        .map(drop)
    }

    /// `RUNTIME state ID`.
    pub fn state(&self, id: &str) -> Result<State> {
        let out = self.run("state", vec!["state".into(), id.into()], Stdio3::default())?;
        serde_json::from_slice(&out).map_err(|e| Error::RuntimeOutput {
            verb: "state".into(),
            reason: e.to_string(),
        })
    }

    /// `RUNTIME ps --format json ID`: the container's host pids.
    pub fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let out = self.run(
            "ps",
            vec!["ps".into(), "--format".into(), "json".into(), id.into()],
            Stdio3::default(),
        )?;
        let text = String::from_utf8_lossy(&out);
        // runc prints `null` for none.
        let pids: Option<Vec<u32>> =
            serde_json::from_str(text.trim()).map_err(|e| Error::RuntimeOutput {
                verb: "ps".into(),
                reason: e.to_string(),
            })?;
        Ok(pids.unwrap_or_default())
    }

    /// `RUNTIME events --stats ID`: what the container uses, as runc's JSON event.
    pub fn stats(&self, id: &str) -> Result<RuntimeStats> {
        let out = self.run(
            "events",
            vec!["events".into(), "--stats".into(), id.into()],
            Stdio3::default(),
        )?;
        let text = String::from_utf8_lossy(&out);
        let event: StatsEvent =
            serde_json::from_str(text.trim()).map_err(|e| Error::RuntimeOutput {
                verb: "events".into(),
                reason: e.to_string(),
            })?;
        Ok(event.data)
    }

    /// Runs one command to completion; its stdout on success.
    fn run(&self, verb: &str, args: Vec<OsString>, io: Stdio3) -> Result<Vec<u8>> {
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut out = tempfile::tempfile().map_err(Error::io("create a capture file"))?;
        let mut err = tempfile::tempfile().map_err(Error::io("create a capture file"))?;
        let clone = |f: &File| f.try_clone().map_err(Error::io("dup a capture file"));
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.global_args())
            .args(&args)
            .stdin(io.stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(match io.stdout {
                Some(fd) => Stdio::from(fd),
                None => Stdio::from(clone(&out)?),
            })
            .stderr(match io.stderr {
                Some(fd) => Stdio::from(fd),
                None => Stdio::from(clone(&err)?),
            });
        tracing::debug!(binary = %self.binary.display(), ?args, "running the OCI runtime");
        let mark = self.exits.mark();
        let child = cmd.spawn().map_err(|source| Error::RuntimeSpawn {
            binary: self.binary.clone(),
            source,
        })?;
        self.exits.spawned();
        // The command's own stdio ends go with `cmd`.
        drop(cmd);
        let pid = child.id() as i32;
        // Never `child.wait()`: the reaper owns waitpid. `Child` does not wait on drop.
        drop(child);
        let exit = self
            .exits
            .wait(pid, mark, None)
            .expect("an untimed wait returns an exit");
        let read_all = |f: &mut File| -> Vec<u8> {
            let mut v = Vec::new();
            let _ = f
                .seek(SeekFrom::Start(0))
                .and_then(|_| f.read_to_end(&mut v));
            v
        };
        let stdout = read_all(&mut out);
        if exit.code == 0 {
            return Ok(stdout);
        }
        let stderr = read_all(&mut err);
        let message = self
            .log_error_since(log_start)
            .or_else(|| last_line(&stderr))
            .unwrap_or_else(|| format!("exit status {}", exit.code));
        tracing::warn!(verb, code = exit.code, %message, "OCI runtime command failed");
        Err(Error::RuntimeFailed {
            verb: verb.into(),
            message,
        })
    }

    fn log_error_since(&self, offset: u64) -> Option<String> {
        let mut f = File::open(&self.log).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        last_log_error(&text)
    }
}

fn last_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON `forkvm-runtime events --stats` prints (runc's event), read back.
    #[test]
    fn a_stats_event_is_read() {
        let text = r#"{"type":"stats","id":"c1","data":{"cpu":{"usage":{"total":1500000,"user":1000000,"kernel":500000},"throttling":{}},"memory":{"usage":{"usage":4096,"limit":18446744073709551615},"cache":2048,"raw":{"anon":1024,"file":2048,"inactive_file":512}},"pids":{"current":3,"limit":64}}}"#;
        let event: StatsEvent = serde_json::from_str(text).unwrap();
        let s = event.data;
        assert_eq!(
            (s.cpu.usage.total, s.cpu.usage.user, s.cpu.usage.kernel),
            (1_500_000, 1_000_000, 500_000)
        );
        assert_eq!(
            (s.memory.usage.usage, s.memory.usage.limit),
            (4096, u64::MAX)
        );
        assert_eq!(s.memory.raw.get("inactive_file"), Some(&512));
        assert_eq!((s.pids.current, s.pids.limit), (3, 64));
        // runc's fuller event (blkio, hugetlb, ...) reads too.
        let runc = r#"{"type":"stats","id":"c","data":{"cpu":{"usage":{"total":1,"percpu":[1],"kernel":0,"user":1},"throttling":{}},"memory":{"usage":{"usage":1,"max":2,"limit":3,"failcnt":0},"swap":{},"cache":7,"raw":{"inactive_file":5}},"pids":{"current":1},"blkio":{},"hugetlb":{}}}"#;
        let s = serde_json::from_str::<StatsEvent>(runc).unwrap().data;
        assert_eq!((s.memory.usage.limit, s.pids.limit), (3, 0));
        assert_eq!(s.memory.raw.get("inactive_file"), Some(&5));
    }
    use std::os::unix::fs::PermissionsExt;

    fn exe(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn binary_selection_order() {
        let tmp = tempfile::tempdir().unwrap();
        let shim_dir = tmp.path().join("bin");
        let path_dir = tmp.path().join("path");
        std::fs::create_dir_all(&shim_dir).unwrap();
        std::fs::create_dir_all(&path_dir).unwrap();
        let shim = shim_dir.join("containerd-shim-forkvm-v1");
        let beside = shim_dir.join(DEFAULT_BINARY);
        let on_path = path_dir.join(DEFAULT_BINARY);
        let runc = path_dir.join("runc");
        exe(&on_path);
        exe(&runc);
        let path = path_dir.as_os_str();

        // Nothing beside the shim: PATH.
        assert_eq!(
            select_binary("", None, Some(&shim), Some(path)).unwrap(),
            on_path
        );
        // Beside the shim wins over PATH.
        exe(&beside);
        assert_eq!(
            select_binary("", None, Some(&shim), Some(path)).unwrap(),
            beside
        );
        // The environment wins over both; a bare name is looked up on PATH.
        let env = runc.as_os_str();
        assert_eq!(
            select_binary("", Some(env), Some(&shim), Some(path)).unwrap(),
            runc
        );
        assert_eq!(
            select_binary("", Some(OsStr::new("runc")), Some(&shim), Some(path)).unwrap(),
            runc
        );
        // An empty variable counts as unset.
        assert_eq!(
            select_binary("", Some(OsStr::new("")), Some(&shim), Some(path)).unwrap(),
            beside
        );
        // The options' BinaryName wins over everything.
        assert_eq!(
            select_binary("runc", Some(beside.as_os_str()), Some(&shim), Some(path)).unwrap(),
            runc
        );
    }

    #[test]
    fn a_missing_binary_says_where_it_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let shim = tmp.path().join("containerd-shim-forkvm-v1");
        let err = select_binary("", None, Some(&shim), Some(tmp.path().as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&tmp.path().join(DEFAULT_BINARY).display().to_string()),
            "{err}"
        );
        assert!(err.contains("forkvm-runtime on PATH"), "{err}");

        let err = select_binary("", Some(OsStr::new("/nonexistent/rt")), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FORKVM_RUNTIME=/nonexistent/rt"), "{err}");

        // A non-executable file does not count.
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        assert!(select_binary(plain.to_str().unwrap(), None, None, None).is_err());
    }

    #[test]
    fn root_is_per_namespace() {
        assert_eq!(
            runtime_root("", "default"),
            Path::new("/run/containerd/forkvm/default")
        );
        assert_eq!(
            runtime_root("/srv/rt", "k8s.io"),
            Path::new("/srv/rt/k8s.io")
        );
    }

    #[test]
    fn the_last_error_line_of_the_log_is_the_message() {
        let log = concat!(
            r#"{"level":"info","msg":"starting","time":"2024-01-01T00:00:00Z"}"#,
            "\n",
            r#"{"level":"error","msg":"first problem","time":"2024-01-01T00:00:01Z"}"#,
            "\n",
            "not json at all\n",
            r#"{"level":"error","msg":"runc create failed: no such file","time":"x"}"#,
            "\n",
            r#"{"level":"warning","msg":"later warning"}"#,
            "\n"
        );
        assert_eq!(
            last_log_error(log).as_deref(),
            Some("runc create failed: no such file")
        );
        assert_eq!(last_log_error(r#"{"level":"info","msg":"ok"}"#), None);
        assert_eq!(last_log_error(""), None);
    }

    #[test]
    fn command_lines_follow_runc() {
        let rt = Runtime::new(
            "/usr/sbin/runc".into(),
            "/run/containerd/forkvm/default".into(),
            "/b/log.json".into(),
            Exits::new(),
        );
        let s = |v: Vec<OsString>| {
            v.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            s(rt.global_args()),
            "--root /run/containerd/forkvm/default --log /b/log.json --log-format json"
        );
        let opts = CreateOpts {
            pid_file: Path::new("/b/init.pid"),
            console_socket: Some(Path::new("/tmp/pty/s")),
            no_pivot: true,
            pod_template: None,
        };
        assert_eq!(
            s(Runtime::create_args("c1", Path::new("/b"), &opts)),
            "create --bundle /b --pid-file /b/init.pid --console-socket /tmp/pty/s --no-pivot c1"
        );
        let opts = CreateOpts {
            pid_file: Path::new("/b/init.pid"),
            console_socket: None,
            no_pivot: false,
            pod_template: None,
        };
        assert_eq!(
            s(Runtime::create_args("c1", Path::new("/b"), &opts)),
            "create --bundle /b --pid-file /b/init.pid c1"
        );
        let opts = CreateOpts {
            pod_template: Some(Path::new("/var/lib/forkvm/pod")),
            ..opts
        };
        assert_eq!(
            s(Runtime::create_args("c1", Path::new("/b"), &opts)),
            "create --bundle /b --pid-file /b/init.pid --pod-template /var/lib/forkvm/pod c1"
        );
        let opts = ExecOpts {
            process: Path::new("/b/e1.json"),
            pid_file: Path::new("/b/e1.pid"),
            console_socket: None,
        };
        assert_eq!(
            s(Runtime::exec_args("c1", &opts)),
            "exec --process /b/e1.json --detach --pid-file /b/e1.pid c1"
        );
        let opts = ExecOpts {
            console_socket: Some(Path::new("/tmp/s")),
            ..opts
        };
        assert_eq!(
            s(Runtime::exec_args("c1", &opts)),
            "exec --process /b/e1.json --detach --pid-file /b/e1.pid --tty --console-socket /tmp/s c1"
        );
        assert_eq!(s(Runtime::kill_args("c1", 9, true)), "kill --all c1 9");
        assert_eq!(s(Runtime::kill_args("c1", 15, false)), "kill c1 15");
        assert_eq!(s(Runtime::delete_args("c1", true)), "delete --force c1");
        assert_eq!(s(Runtime::delete_args("c1", false)), "delete c1");
    }

    #[test]
    fn state_output_parses() {
        let s: State = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"running","pid":42,"bundle":"/b","rootfs":"/b/rootfs","created":"x","owner":""}"#,
        )
        .unwrap();
        assert_eq!(s.status, "running");
        assert_eq!(s.pid, 42);
        assert_eq!(s.bundle, "/b");
    }
}

/// One event of `RUNTIME events --stats` (runc's JSON; the fields a shim reports).
#[derive(Debug, Deserialize)]
struct StatsEvent {
    data: RuntimeStats,
}

/// What a container uses, as runc's `events --stats` says it (CPU times in ns).
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RuntimeStats {
    /// CPU time.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// Tasks.
    pub pids: PidsStats,
}

/// `cpu` of [`RuntimeStats`].
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CpuStats {
    /// Times used, in ns.
    pub usage: CpuUsage,
}

/// `cpu.usage` of [`RuntimeStats`], in ns.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CpuUsage {
    /// All of it.
    pub total: u64,
    /// In user mode.
    pub user: u64,
    /// In the kernel.
    pub kernel: u64,
}

/// `memory` of [`RuntimeStats`].
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MemoryStats {
    /// Use and limit, in bytes.
    pub usage: MemoryUsage,
    /// `memory.stat`'s figures, in bytes, by name (runc's `raw`).
    pub raw: std::collections::BTreeMap<String, u64>,
}

/// `memory.usage` of [`RuntimeStats`].
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MemoryUsage {
    /// Bytes in use.
    pub usage: u64,
    /// The limit (`u64::MAX`: none).
    pub limit: u64,
}

/// `pids` of [`RuntimeStats`].
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PidsStats {
    /// Tasks now.
    pub current: u64,
    /// Their limit (0: none).
    pub limit: u64,
}
