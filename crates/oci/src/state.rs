//! The runtime's per-container state: one directory per container under a root
//! (`--root`, default [`DEFAULT_ROOT`]) holding `state.json` (a [`ContainerState`]) and a
//! lock file.
//!
//! * Every write goes to a temporary file in the container's directory, is fsynced and
//!   renamed over `state.json`, so a reader sees the old state or the new one, never half.
//! * Read-modify-write ([`StateStore::update`], [`StateStore::remove`]) holds an exclusive
//!   `flock` on `<root>/<id>/lock` (see [`StateStore::lock`]), so two runtime invocations
//!   on one container serialize.
//! * [`StateStore::create`] creates the directory with `mkdir`, which fails when the id is
//!   taken: two concurrent `create`s of one id cannot both succeed.
//! * The status follows the runtime spec's lifecycle, `creating → created → running →
//!   stopped`, enforced by [`ContainerState::transition`].
//! * A container's `pid` is the host process whose lifetime is the container's. It is
//!   recorded with its start time from `/proc/<pid>/stat`; when that process is gone, a
//!   zombie, or the pid now names another process (pid reuse: the start time differs), the
//!   container counts as stopped ([`ContainerState::refresh`], applied by `load`/`list`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bundle::HostHooks;
use serde::{Deserialize, Serialize};

/// Where the runtime keeps its state when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/run/forkvm-runtime";
/// The runtime spec version reported in [`ContainerState::to_runtime_spec_json`].
pub const OCI_VERSION: &str = "1.2.0";
/// The longest container id: it names a directory, so it must fit in `NAME_MAX`.
pub const MAX_ID_LEN: usize = 255;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

/// A container's lifecycle status, as the runtime spec names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created: `create` has not finished.
    Creating,
    /// Created, the user's program not started yet.
    Created,
    /// The user's program runs.
    Running,
    /// The container's process has exited (or never will run).
    Stopped,
}

impl Status {
    /// The spec's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the runtime records about one container (`<root>/<id>/state.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// The container id, unique under the root.
    pub id: String,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The host process whose lifetime is the container's: its holder, in the
    /// container's namespaces, where it has one (`runtime/holder.rs`), else the VM's
    /// monitor process.
    pub pid: Option<i32>,
    /// The monitor, when `pid` is a holder (signals go to the monitor, which forwards
    /// them into the guest).
    #[serde(default)]
    pub monitor_pid: Option<i32>,
    /// `monitor_pid`'s start time, as `pid_start_time`.
    #[serde(default)]
    pub monitor_start_time: Option<u64>,
    /// `pid`'s start time in clock ticks since boot (`/proc/<pid>/stat` field 22), to tell
    /// it from a later process that reuses the pid.
    pub pid_start_time: Option<u64>,
    /// Lifecycle status.
    pub status: Status,
    /// When `create` began.
    pub created: SystemTime,
    /// The bundle's `annotations`.
    pub annotations: BTreeMap<String, String>,
    /// The forkvm VM running the container, once there is one.
    pub vm_id: Option<String>,
    /// The forkvm VM root `vm_id` is registered under (the monitor's `FORKVM_ROOT`,
    /// which the engine may not pass to later runtime calls).
    #[serde(default)]
    pub vm_root: Option<PathBuf>,
    /// The container process's exit code, once stopped and known.
    pub exit_code: Option<i32>,
    /// For a container forked from another: the parent container's id.
    pub parent: Option<String>,
    /// The container process's pid inside the guest, once started.
    #[serde(default)]
    pub guest_pid: Option<i32>,
    /// The VM's vsock Unix socket, where its agent answers.
    #[serde(default)]
    pub vsock: Option<PathBuf>,
    /// The bundle's host hooks: `start` runs `poststart`, `delete` runs `poststop` (the
    /// bundle may be gone by then).
    #[serde(default)]
    pub hooks: HostHooks,
    /// The pod template a pod's sandbox's VM is forked from (`create --pod-template`),
    /// instead of booting one.
    #[serde(default)]
    pub pod_template: Option<PathBuf>,
    /// `create` found the network namespace the bundle names by path to be the
    /// runtime's own (the host's network): the monitor, which joined it, must not take
    /// its interfaces ([`crate::bundle::NetworkPlan::Host`]).
    #[serde(default)]
    pub host_network: bool,
    /// The checked copy of the pod template's memory its monitor holds, for the next
    /// pods of the template ([`crate::pod_template::checked_copy`]).
    #[serde(default)]
    pub template_copy: Option<TemplateCopy>,
}

/// Where a forked pod sandbox's monitor holds the checked copy of its template's
/// memory (a sealed memory file) and what it was checked against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCopy {
    /// Its descriptor in the monitor.
    pub fd: i32,
    /// The memory's MAC in the template's authenticated state.
    pub memory_mac: [u8; 32],
}

impl ContainerState {
    /// A container being created now, with no process yet.
    pub fn new(id: impl Into<String>, bundle: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            bundle: bundle.into(),
            pid: None,
            monitor_pid: None,
            monitor_start_time: None,
            pid_start_time: None,
            status: Status::Creating,
            created: SystemTime::now(),
            annotations: BTreeMap::new(),
            vm_id: None,
            vm_root: None,
            exit_code: None,
            parent: None,
            guest_pid: None,
            vsock: None,
            hooks: HostHooks::default(),
            pod_template: None,
            host_network: false,
            template_copy: None,
        }
    }

    /// Records `pid` as the container's process, with its current start time.
    pub fn record_pid(&mut self, pid: i32) -> Result<(), StateError> {
        let (_, start_time) = proc_stat(pid).ok_or(StateError::NoSuchProcess { pid })?;
        self.pid = Some(pid);
        self.pid_start_time = Some(start_time);
        Ok(())
    }

    /// Records `pid` as the container's monitor, `pid` being its holder.
    pub fn record_monitor(&mut self, pid: i32) -> Result<(), StateError> {
        let (_, start_time) = proc_stat(pid).ok_or(StateError::NoSuchProcess { pid })?;
        self.monitor_pid = Some(pid);
        self.monitor_start_time = Some(start_time);
        Ok(())
    }

    /// Moves to `to` along the runtime spec's lifecycle: `creating → created → running`,
    /// and to `stopped` from any other status.
    pub fn transition(&mut self, to: Status) -> Result<(), StateError> {
        use Status::*;
        let allowed = matches!(
            (self.status, to),
            (Creating, Created) | (Created, Running) | (Creating | Created | Running, Stopped)
        );
        if !allowed {
            return Err(StateError::InvalidTransition {
                id: self.id.clone(),
                from: self.status,
                to,
            });
        }
        self.status = to;
        Ok(())
    }

    /// The pod sandbox whose VM this container runs in, when it is a Kubernetes pod's
    /// container (containerd's CRI annotations, as `create` planned it). One with a VM
    /// of its own is not (versions before pods ran such a container as a VM).
    pub fn pod_sandbox(&self) -> Option<&str> {
        if self.vm_id.is_some() {
            return None;
        }
        (self.annotations.get(crate::bundle::CRI_CONTAINER_TYPE)? == "container")
            .then(|| self.annotations.get(crate::bundle::CRI_SANDBOX_ID))
            .flatten()
            .map(String::as_str)
    }

    /// Whether its process runs in a container the VM's agent made by its id (a pod's
    /// container, or a sandbox forked from a pod template), not as the VM's own: what
    /// is asked of it in the guest (exec, stats) names it.
    pub fn in_vm_container(&self) -> bool {
        self.pod_sandbox().is_some() || self.pod_template.is_some()
    }

    /// Whether this container is a Kubernetes pod's sandbox, whose VM holds the pod's
    /// containers.
    pub fn is_pod_sandbox(&self) -> bool {
        self.annotations
            .get(crate::bundle::CRI_CONTAINER_TYPE)
            .is_some_and(|t| t == "sandbox")
    }

    /// Whether the recorded process still runs: it exists, is not a zombie, and (when a
    /// start time was recorded) started when the recorded one did.
    pub fn process_alive(&self) -> bool {
        alive(self.pid, self.pid_start_time)
    }

    /// Whether the container's monitor still runs, where `pid` is its holder's (else
    /// whether `pid` does).
    pub fn monitor_alive(&self) -> bool {
        match self.monitor_pid {
            Some(pid) => alive(Some(pid), self.monitor_start_time),
            None => self.process_alive(),
        }
    }

    /// Marks the container stopped when its recorded process is gone. A container still
    /// `creating` without a pid is left alone. Returns whether the status changed.
    pub fn refresh(&mut self) -> bool {
        let live_status = matches!(
            self.status,
            Status::Creating | Status::Created | Status::Running
        );
        if live_status && self.pid.is_some() && !self.process_alive() {
            self.status = Status::Stopped;
            return true;
        }
        false
    }

    /// The runtime spec's state object, as `runc state` prints it: `ociVersion`, `id`,
    /// `status`, `pid` (omitted when stopped or not yet known), `bundle`, `annotations`,
    /// and runc's extras that go-runc reads (`rootfs`, `created`, `owner`).
    pub fn to_runtime_spec_json(&self) -> serde_json::Value {
        let mut state = serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": self.status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.bundle.join("rootfs"),
            "created": self.created_rfc3339(),
            "owner": "",
            "annotations": self.annotations,
        });
        if let Some(pid) = self.pid.filter(|_| self.status != Status::Stopped) {
            state["pid"] = pid.into();
        }
        state
    }

    /// Where the container's VM is registered: the forkvm root (forkvm's default root for
    /// state written before `vm_root` was recorded) and the VM's id.
    pub fn vm_location(&self) -> Option<(PathBuf, &str)> {
        // A pod's container runs in its sandbox's VM, which is not its own.
        if self.pod_sandbox().is_some() {
            return None;
        }
        let id = self.vm_id.as_deref()?;
        let root = self
            .vm_root
            .clone()
            .unwrap_or_else(forkvm_registry::default_root);
        Some((root, id))
    }

    /// `created` as RFC 3339 in UTC (`2024-01-31T12:00:00.123456789Z`), the form `runc
    /// state` and containerd use.
    pub fn created_rfc3339(&self) -> String {
        forkvm_registry::time::rfc3339_nanos(
            self.created.duration_since(UNIX_EPOCH).unwrap_or_default(),
        )
    }
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id does not match runc's `^[\w+-\.]+$` (or is `.`, `..`, or too long).
    #[error(
        "invalid container id {id:?}: use 1 to {MAX_ID_LEN} letters, digits, '_', '+', ',', '-' or '.'"
    )]
    InvalidId {
        /// The rejected id.
        id: String,
    },
    /// `create` of an id already in use.
    #[error("container {id:?} already exists")]
    AlreadyExists {
        /// The id.
        id: String,
    },
    /// No container with that id.
    #[error("container {id:?} does not exist")]
    NotFound {
        /// The id.
        id: String,
    },
    /// A status change the lifecycle does not allow.
    #[error("container {id:?} is {from}; it cannot become {to}")]
    InvalidTransition {
        /// The container.
        id: String,
        /// Its status.
        from: Status,
        /// The refused status.
        to: Status,
    },
    /// `record_pid` of a process that does not exist.
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// A file system operation on the state directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `state.json` is not a valid state.
    #[error("{} is corrupt: {source}", path.display())]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks a container id the way runc does: `^[\w+-\.]+$` (letters, digits, `_`, and the
/// range `+`..`.`, that is `+ , - .`), not `.` or `..`, at most [`MAX_ID_LEN`] bytes.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b',' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId { id: id.to_owned() })
    }
}

/// The state directory: one subdirectory per container.
#[derive(Clone, Debug)]
pub struct StateStore {
    root: PathBuf,
}

/// An exclusive lock on one container's state; released on drop.
#[derive(Debug)]
pub struct ContainerLock {
    _file: File,
}

impl StateStore {
    /// Opens the state root, creating it (mode 0700) when absent. A relative root is
    /// made absolute first: the runtime changes its working directory to reach a
    /// container's sockets by short relative names.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        let root = std::path::absolute(&root).map_err(io_error(&root))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode_0700()
            .create(&root)
            .map_err(io_error(&root))?;
        Ok(Self { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding container `id`'s files.
    pub fn container_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        Ok(self.root.join(id))
    }

    /// Records a new container. Fails with [`StateError::AlreadyExists`] when the id is in
    /// use, even by a `create` racing this one.
    pub fn create(&self, state: &ContainerState) -> Result<(), StateError> {
        let dir = self.container_dir(&state.id)?;
        match fs::DirBuilder::new().mode_0700().create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::AlreadyExists {
                    id: state.id.clone(),
                });
            }
            Err(e) => return Err(io_error(&dir)(e)),
        }
        let _lock = self.lock(&state.id)?;
        write_atomically(&dir, state)
    }

    /// Takes the exclusive lock on container `id`, blocking until it is free.
    pub fn lock(&self, id: &str) -> Result<ContainerLock, StateError> {
        let dir = self.container_dir(id)?;
        let path = dir.join(LOCK_FILE);
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound { id: id.to_owned() });
            }
            Err(e) => return Err(io_error(&path)(e)),
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_error(&path)(e.into()))?;
        Ok(ContainerLock { _file: file })
    }

    /// Container `id`'s state, with [`ContainerState::refresh`] applied (not written back).
    pub fn load(&self, id: &str) -> Result<ContainerState, StateError> {
        let mut state = self.load_raw(id)?;
        state.refresh();
        Ok(state)
    }

    fn load_raw(&self, id: &str) -> Result<ContainerState, StateError> {
        let path = self.container_dir(id)?.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound { id: id.to_owned() });
            }
            Err(e) => return Err(io_error(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Read-modify-write under the container's lock: loads (refreshed), applies `change`,
    /// and writes the result atomically. When `change` fails nothing is written.
    pub fn update<T>(
        &self,
        id: &str,
        change: impl FnOnce(&mut ContainerState) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let _lock = self.lock(id)?;
        let mut state = self.load(id)?;
        let out = change(&mut state)?;
        write_atomically(&self.root.join(id), &state)?;
        Ok(out)
    }

    /// Every container under the root, by id, each refreshed. Directories that are not
    /// (yet) containers, such as one whose `create` is half done, are skipped.
    pub fn list(&self) -> Result<Vec<ContainerState>, StateError> {
        let mut states = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_error(&self.root))? {
            let entry = entry.map_err(io_error(&self.root))?;
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_id(&id).is_err() || !entry.path().join(STATE_FILE).is_file() {
                continue;
            }
            match self.load(&id) {
                Ok(state) => states.push(state),
                // Removed between read_dir and load.
                Err(StateError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        states.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(states)
    }

    /// Deletes container `id`'s state, under its lock.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.container_dir(id)?;
        let _lock = self.lock(id)?;
        if !dir.join(STATE_FILE).exists() {
            return Err(StateError::NotFound { id: id.to_owned() });
        }
        fs::remove_dir_all(&dir).map_err(io_error(&dir))
    }
}

/// `DirBuilder::mode` without importing the Unix extension trait at every call.
trait DirBuilderExt {
    fn mode_0700(&mut self) -> &mut Self;
}

impl DirBuilderExt for fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}

/// Writes `state` to `<dir>/state.json` atomically.
fn write_atomically(dir: &Path, state: &ContainerState) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let mut json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
        path: path.clone(),
        source,
    })?;
    json.push(b'\n');
    forkvm_registry::write_atomic(&path, &json).map_err(io_error(&path))
}

/// Whether process `pid` runs (exists, is no zombie) and, when `start` is known,
/// started then.
fn alive(pid: Option<i32>, start: Option<u64>) -> bool {
    let Some(pid) = pid else { return false };
    match proc_stat(pid) {
        Some((state, start_time)) => {
            !matches!(state, 'Z' | 'X' | 'x') && start.is_none_or(|t| t == start_time)
        }
        None => false,
    }
}

/// (state character, start time) of process `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    forkvm_registry::liveness::parse_stat(&stat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    #[test]
    fn a_pods_container_names_its_sandbox_unless_it_has_a_vm_of_its_own() {
        let mut s = ContainerState::new("app", "/b");
        assert_eq!(s.pod_sandbox(), None);
        s.annotations = [
            (crate::bundle::CRI_CONTAINER_TYPE, "container"),
            (crate::bundle::CRI_SANDBOX_ID, "sb"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(s.pod_sandbox(), Some("sb"));
        assert!(!s.is_pod_sandbox());
        assert!(s.in_vm_container());
        assert_eq!(s.vm_location(), None);
        // Booted as a VM of its own by an earlier version: deleted as one.
        s.vm_id = Some("vm1".into());
        assert_eq!(s.pod_sandbox(), None);
        assert!(s.vm_location().is_some());
        s.annotations
            .insert(crate::bundle::CRI_CONTAINER_TYPE.into(), "sandbox".into());
        assert!(s.is_pod_sandbox());
        // A sandbox booted is its VM's own container; forked from a pod template, one
        // the agent made.
        assert!(!s.in_vm_container());
        s.pod_template = Some("/var/lib/forkvm/pod".into());
        assert!(s.in_vm_container());
    }

    fn store() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path().join("root")).unwrap();
        (dir, store)
    }

    fn full_state(id: &str) -> ContainerState {
        let mut state = ContainerState::new(id, "/srv/bundles/web");
        state
            .annotations
            .insert("io.kubernetes.cri.sandbox-id".into(), "abc".into());
        state.vm_id = Some("vm-1234".into());
        state.exit_code = Some(3);
        state.parent = Some("parent-ctr".into());
        state.record_pid(std::process::id() as i32).unwrap();
        state
    }

    #[test]
    fn ids_like_runc() {
        for id in [
            "a",
            "web-1",
            "a.b_c+d,e-f",
            &"f".repeat(64),
            &"x".repeat(MAX_ID_LEN),
        ] {
            validate_id(id).unwrap();
        }
        for id in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "ü",
            "a:b",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let e = validate_id(id).unwrap_err();
            assert!(matches!(e, StateError::InvalidId { .. }), "{id:?}");
        }
        let (_dir, store) = store();
        assert!(matches!(
            store.create(&ContainerState::new("a/b", "/b")),
            Err(StateError::InvalidId { .. })
        ));
        assert!(matches!(
            store.load("../etc"),
            Err(StateError::InvalidId { .. })
        ));
    }

    #[test]
    fn create_load_round_trip() {
        let (_dir, store) = store();
        let state = full_state("web");
        store.create(&state).unwrap();
        assert_eq!(store.load("web").unwrap(), state);
        let dir = store.container_dir("web").unwrap();
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["lock", "state.json"],
            "no temporary files left behind"
        );
    }

    #[test]
    fn create_refuses_existing_id() {
        let (_dir, store) = store();
        store.create(&ContainerState::new("x", "/b")).unwrap();
        let e = store
            .create(&ContainerState::new("x", "/other"))
            .unwrap_err();
        assert_eq!(e.to_string(), r#"container "x" already exists"#);
        assert_eq!(store.load("x").unwrap().bundle, Path::new("/b"));
    }

    #[test]
    fn missing_container_is_not_found() {
        let (_dir, store) = store();
        let e = store.load("ghost").unwrap_err();
        assert_eq!(e.to_string(), r#"container "ghost" does not exist"#);
        assert!(matches!(
            store.remove("ghost"),
            Err(StateError::NotFound { .. })
        ));
        assert!(matches!(
            store.update("ghost", |_| Ok(())),
            Err(StateError::NotFound { .. })
        ));
    }

    #[test]
    fn corrupt_state_is_reported() {
        let (_dir, store) = store();
        store.create(&ContainerState::new("c", "/b")).unwrap();
        let path = store.container_dir("c").unwrap().join(STATE_FILE);
        fs::write(&path, "{\"id\": ").unwrap();
        let e = store.load("c").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }));
        assert!(e.to_string().contains("state.json is corrupt"), "{e}");
        assert!(store.list().is_err());
    }

    #[test]
    fn update_writes_and_failed_update_does_not() {
        let (_dir, store) = store();
        store.create(&ContainerState::new("u", "/b")).unwrap();
        let got = store
            .update("u", |s| {
                s.transition(Status::Created)?;
                s.vm_id = Some("vm-9".into());
                Ok(7)
            })
            .unwrap();
        assert_eq!(got, 7);
        let state = store.load("u").unwrap();
        assert_eq!(state.status, Status::Created);
        assert_eq!(state.vm_id.as_deref(), Some("vm-9"));
        let e = store
            .update("u", |s| {
                s.vm_id = None;
                s.transition(Status::Creating)
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"container "u" is created; it cannot become creating"#
        );
        assert_eq!(store.load("u").unwrap().vm_id.as_deref(), Some("vm-9"));
    }

    #[test]
    fn list_and_remove() {
        let (_dir, store) = store();
        for id in ["b", "a", "c"] {
            store.create(&ContainerState::new(id, "/b")).unwrap();
        }
        // Not containers: a stray file, a half-created directory, a bad name.
        fs::write(store.root().join("stray"), "").unwrap();
        fs::create_dir(store.root().join("half")).unwrap();
        fs::create_dir(store.root().join("bad name")).unwrap();
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        store.remove("b").unwrap();
        assert!(!store.root().join("b").exists());
        assert!(matches!(store.load("b"), Err(StateError::NotFound { .. })));
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["a", "c"]);
        // The id is free again.
        store.create(&ContainerState::new("b", "/b2")).unwrap();
    }

    #[test]
    fn lock_serializes_read_modify_write() {
        let (_dir, store) = store();
        store.create(&ContainerState::new("l", "/b")).unwrap();
        let guard = store.lock("l").unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let worker = {
            let (store, done) = (store.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                started_tx.send(()).unwrap();
                store
                    .update("l", |s| s.transition(Status::Created))
                    .unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        started_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !done.load(Ordering::SeqCst),
            "update ran while the lock was held"
        );
        drop(guard);
        worker.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(store.load("l").unwrap().status, Status::Created);
    }

    #[test]
    fn lifecycle_transitions() {
        use Status::*;
        let all = [Creating, Created, Running, Stopped];
        let allowed = [
            (Creating, Created),
            (Created, Running),
            (Creating, Stopped),
            (Created, Stopped),
            (Running, Stopped),
        ];
        for from in all {
            for to in all {
                let mut s = ContainerState::new("t", "/b");
                s.status = from;
                let r = s.transition(to);
                assert_eq!(r.is_ok(), allowed.contains(&(from, to)), "{from} -> {to}");
                assert_eq!(s.status, if r.is_ok() { to } else { from });
            }
        }
    }

    #[test]
    fn runtime_spec_state_object() {
        let mut state = full_state("web");
        state.status = Status::Running;
        let json = state.to_runtime_spec_json();
        let obj = json.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "annotations",
                "bundle",
                "created",
                "id",
                "ociVersion",
                "owner",
                "pid",
                "rootfs",
                "status"
            ]
        );
        assert_eq!(json["created"], state.created_rfc3339());
        assert_eq!(json["rootfs"], "/srv/bundles/web/rootfs");
        assert_eq!(json["ociVersion"], OCI_VERSION);
        assert_eq!(json["id"], "web");
        assert_eq!(json["status"], "running");
        assert_eq!(json["pid"], std::process::id());
        assert_eq!(json["bundle"], "/srv/bundles/web");
        assert_eq!(json["annotations"]["io.kubernetes.cri.sandbox-id"], "abc");
        // The spec's own type reads it back.
        let spec: oci_spec::runtime::State = serde_json::from_value(json).unwrap();
        assert_eq!(spec.id(), "web");
        assert_eq!(*spec.status(), oci_spec::runtime::ContainerState::Running);
        assert_eq!(*spec.pid(), Some(std::process::id() as i32));

        for (status, name) in [(Status::Creating, "creating"), (Status::Created, "created")] {
            state.status = status;
            assert_eq!(state.to_runtime_spec_json()["status"], name);
        }
        state.status = Status::Stopped;
        let json = state.to_runtime_spec_json();
        assert_eq!(json["status"], "stopped");
        assert!(json.get("pid").is_none(), "no pid once stopped");
        let fresh = ContainerState::new("new", "/b").to_runtime_spec_json();
        assert!(fresh.get("pid").is_none());
        assert_eq!(fresh["annotations"], serde_json::json!({}));
    }

    #[test]
    fn liveness_detects_exit_and_pid_reuse() {
        let me = std::process::id() as i32;
        let mut state = ContainerState::new("p", "/b");
        state.status = Status::Running;
        state.record_pid(me).unwrap();
        assert!(state.process_alive());
        assert!(!state.refresh());
        assert_eq!(state.status, Status::Running);

        // Same pid, different start time: another process reused the pid.
        state.pid_start_time = state.pid_start_time.map(|t| t + 1);
        assert!(!state.process_alive());
        assert!(state.refresh());
        assert_eq!(state.status, Status::Stopped);

        // An exited (zombie, then reaped) child.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let mut state = ContainerState::new("q", "/b");
        state.status = Status::Created;
        state.record_pid(pid).unwrap();
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state.process_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!state.process_alive(), "a zombie is not alive");
        child.wait().unwrap();
        assert!(state.refresh());
        assert_eq!(state.status, Status::Stopped);

        assert!(matches!(
            ContainerState::new("r", "/b").record_pid(pid),
            Err(StateError::NoSuchProcess { .. })
        ));
        // No pid yet: still creating.
        let mut creating = ContainerState::new("s", "/b");
        assert!(!creating.refresh());
        assert_eq!(creating.status, Status::Creating);
    }

    #[test]
    fn load_and_list_apply_liveness() {
        let (_dir, store) = store();
        let mut state = full_state("gone");
        state.status = Status::Running;
        state.pid_start_time = Some(0);
        store.create(&state).unwrap();
        assert_eq!(store.load("gone").unwrap().status, Status::Stopped);
        assert_eq!(store.list().unwrap()[0].status, Status::Stopped);
    }

    #[test]
    fn proc_stat_parsing() {
        let line =
            "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        let parse = forkvm_registry::liveness::parse_stat;
        assert_eq!(parse(line), Some(('S', 987654)));
        assert!(parse("garbage").is_none());
        assert!(parse("1 (x) Z 1 2").is_none());
        assert!(proc_stat(-1).is_none());
    }

    #[test]
    fn created_as_rfc3339() {
        let at = |secs: u64, nanos: u32| {
            let mut s = ContainerState::new("t", "/b");
            s.created = UNIX_EPOCH + Duration::new(secs, nanos);
            s.created_rfc3339()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(1_700_000_000, 0), "2023-11-14T22:13:20.000000000Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000000000Z");
    }
}
