//! What the containerd end-to-end tests share: a private containerd for a test's
//! lifetime (root, state and sockets in a temporary directory).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private containerd, killed when dropped.
pub struct Containerd {
    /// Its directory: `config.toml`, `containerd.log`, its root, state and socket.
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    /// Starts containerd in a fresh directory (prefixed `prefix`) with its root, state,
    /// sockets and `opt` there, the plugins `disabled` off and the tables `extra`
    /// appended to its `config.toml` (`{dir}` in them names the directory). `setup` runs
    /// with the directory first (to write what the config names) and returns the
    /// directory to put first on containerd's `PATH` and the environment variables to
    /// give it.
    pub fn start(
        prefix: &str,
        disabled: &[&str],
        extra: &str,
        setup: impl FnOnce(&Path) -> (PathBuf, Vec<(String, OsString)>),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("a temporary directory");
        let d = dir.path();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = {disabled:?}\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n{extra}",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            opt = d.join("opt").display(),
            disabled = disabled,
            extra = extra.replace("{dir}", &d.display().to_string()),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let (first, envs) = setup(d);
        let path = std::env::join_paths(std::iter::once(first).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .unwrap();
        let log = File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .args(["--log-level", "debug"])
            .env("PATH", path)
            .envs(envs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start containerd (Debian package `containerd`)");
        let ctd = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctd.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not listen within 30 s\n{}",
                ctd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ctd
    }

    /// Its gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The last lines of its log, for failure messages.
    pub fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(80)..];
        format!("--- containerd log (last lines)\n{}", tail.join("\n"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mounts the cgroup v2 hierarchy at `/sys/fs/cgroup` unless it is there (runc needs
/// it; the virtual host does not mount it).
pub fn mount_cgroup2() {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let status = Command::new("mount")
            .args(["-t", "cgroup2", "none", "/sys/fs/cgroup"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount cgroup2");
    }
}
