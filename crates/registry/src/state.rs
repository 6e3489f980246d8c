//! The state file of one VM: what it is, which process runs it, how it ended.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::liveness::ProcessIdentity;
use crate::Error;

/// The state file schema this forkvm writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// What the VMM last recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Registered; the VMM is starting.
    Creating,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// The VMM ended and recorded how.
    Exited,
}

/// Why a VM ended. Written in `state.json` as the words `ps` shows (`poweroff`,
/// `reboot`, `stopped`, `killed`, `failed: <why>`), read back into this type, so no
/// reader parses the words itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Ending {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (a reboot, or a triple fault); the VMM does not restart it.
    Reboot,
    /// A stop request ended it.
    Stopped,
    /// Something killed its VMM (`forkvm kill`).
    Killed,
    /// The guest or the VMM failed, and why.
    Failed(String),
}

const FAILED_PREFIX: &str = "failed: ";

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::PowerOff => f.write_str("poweroff"),
            Ending::Reboot => f.write_str("reboot"),
            Ending::Stopped => f.write_str("stopped"),
            Ending::Killed => f.write_str("killed"),
            Ending::Failed(why) => write!(f, "{FAILED_PREFIX}{why}"),
        }
    }
}

impl From<Ending> for String {
    fn from(e: Ending) -> Self {
        e.to_string()
    }
}

impl From<String> for Ending {
    fn from(s: String) -> Self {
        match s.as_str() {
            "poweroff" => Ending::PowerOff,
            "reboot" => Ending::Reboot,
            "stopped" => Ending::Stopped,
            "killed" => Ending::Killed,
            _ => Ending::Failed(s.strip_prefix(FAILED_PREFIX).unwrap_or(&s).to_owned()),
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit status of the VMM (0: powered off, rebooted or stopped on request).
    pub code: i32,
    /// Why it ended.
    pub reason: Ending,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

impl ExitRecord {
    /// A record stamped now.
    pub fn new(code: i32, reason: Ending) -> Self {
        Self {
            code,
            reason,
            at_ms: crate::time::now_ms(),
        }
    }
}

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// [`SCHEMA_VERSION`] when written.
    pub schema: u32,
    /// The VM's ID (32 hex digits).
    pub id: String,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// The VMM process, once known.
    pub process: Option<ProcessIdentity>,
    /// What the VMM last recorded.
    pub status: Status,
    /// vCPUs (0 until the VMM records the machine).
    pub vcpus: u8,
    /// Guest memory in MiB (0 until recorded).
    pub mem_mib: u64,
    /// The VM it was forked from.
    pub parent: Option<String>,
    /// When it was registered, Unix milliseconds.
    pub created_ms: u64,
    /// How it ended, once it has.
    pub exit: Option<ExitRecord>,
    /// The guest's addresses on forkvm's own network (`address/prefix`, one per NIC on
    /// it), once it has taken them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The cgroup (v2) directory the VM process made for itself: removed with the home
    /// when the process could not remove it (it was killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// A fork child's own identity (entropy, clock, hostname, MACs), once its guest
    /// took it: without it the child still has its parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityTaken>,
}

/// When and how a fork child's guest took its own identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityTaken {
    /// When its guest agent confirmed it, Unix microseconds.
    pub at_us: u64,
    /// How it was sent: `identity-port` (the second UART) or `vsock`.
    pub via: String,
}

/// What a VM is, as `ps` shows it: the recorded status checked against the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Starting.
    Creating,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Ended and recorded how.
    Exited,
    /// Its VMM is gone without recording an exit (killed, crashed).
    Dead,
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Observed::Creating => "creating",
            Observed::Running => "running",
            Observed::Paused => "paused",
            Observed::Exited => "exited",
            Observed::Dead => "dead",
        })
    }
}

impl VmState {
    /// A fresh state for a VM being registered.
    pub fn new(id: String, name: Option<String>, parent: Option<String>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id,
            name,
            process: None,
            status: Status::Creating,
            vcpus: 0,
            mem_mib: 0,
            parent,
            created_ms: crate::time::now_ms(),
            exit: None,
            addresses: Vec::new(),
            cgroup: None,
            identity: None,
        }
    }

    /// Whether its VMM process still runs.
    pub fn is_alive(&self) -> bool {
        self.status != Status::Exited && self.process.is_some_and(|p| p.is_alive())
    }

    /// The recorded status checked against the process.
    pub fn observe(&self) -> Observed {
        match self.status {
            Status::Exited => Observed::Exited,
            _ if !self.is_alive() => Observed::Dead,
            Status::Creating => Observed::Creating,
            Status::Running => Observed::Running,
            Status::Paused => Observed::Paused,
        }
    }

    /// Reads and checks a state file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bytes =
            std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                path: path.to_owned(),
                source,
            })?;
        let found = value.get("schema").and_then(|s| s.as_u64()).unwrap_or(0);
        if found != u64::from(SCHEMA_VERSION) {
            return Err(Error::Schema {
                path: path.to_owned(),
                found: found as u32,
            });
        }
        serde_json::from_value(value).map_err(|source| Error::Corrupt {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes it atomically (temp file, fsync, rename, fsync of the directory), mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self).expect("a VmState always serializes");
        write_atomic(path, &json).map_err(Error::io(format!("cannot write {}", path.display())))
    }
}

/// Replaces `path` with `data` so readers see the old file or the new one, never a
/// part: a private (0600) temporary file beside it, fsync, rename, fsync of the
/// directory. The one atomic write of forkvm's state files (VM homes, container state,
/// the image index, templates).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    // The host pid: processes in different pid namespaces may share a number.
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        crate::liveness::ProcessIdentity::current().pid,
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Root writing in a directory of a VM family's uid (a home, see `forkvm_jail::uid`)
        // leaves the file that uid's, which its VM processes read and replace.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let owner = std::fs::metadata(dir)?;
            if owner.uid() != 0 {
                std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
            }
        }
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_are_written_as_words_and_read_back() {
        for (ending, word) in [
            (Ending::PowerOff, "poweroff"),
            (Ending::Reboot, "reboot"),
            (Ending::Stopped, "stopped"),
            (Ending::Killed, "killed"),
            (
                Ending::Failed("KVM_RUN: EFAULT".into()),
                "failed: KVM_RUN: EFAULT",
            ),
        ] {
            let json = serde_json::to_string(&ending).unwrap();
            assert_eq!(json, format!("{word:?}"));
            assert_eq!(serde_json::from_str::<Ending>(&json).unwrap(), ending);
        }
        // A record written before the type existed reads the same.
        let old: ExitRecord =
            serde_json::from_str(r#"{"code":1,"reason":"failed: no memory","at_ms":5}"#).unwrap();
        assert_eq!(old.reason, Ending::Failed("no memory".into()));
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut s = VmState::new("ab".repeat(16), Some("web".into()), None);
        s.vcpus = 2;
        s.mem_mib = 512;
        s.process = Some(ProcessIdentity::current());
        s.status = Status::Running;
        s.write(&path).unwrap();
        assert_eq!(VmState::read(&path).unwrap(), s);
        assert_eq!(s.observe(), Observed::Running);
        s.exit = Some(ExitRecord::new(0, Ending::PowerOff));
        s.status = Status::Exited;
        s.write(&path).unwrap();
        assert_eq!(VmState::read(&path).unwrap(), s);
        assert_eq!(s.observe(), Observed::Exited);
        // No temp files left behind; the file is private.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn corrupt_and_foreign_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{\"schema\": 1, \"id\": ").unwrap();
        assert!(matches!(VmState::read(&path), Err(Error::Corrupt { .. })));
        std::fs::write(&path, b"{\"schema\": 1, \"id\": 5}").unwrap();
        assert!(matches!(VmState::read(&path), Err(Error::Corrupt { .. })));
        std::fs::write(&path, b"{\"schema\": 99}").unwrap();
        let e = VmState::read(&path).unwrap_err();
        assert!(matches!(e, Error::Schema { found: 99, .. }), "{e}");
        assert!(matches!(
            VmState::read(&dir.path().join("nope")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn a_live_status_with_a_gone_process_is_dead() {
        let mut s = VmState::new("cd".repeat(16), None, None);
        s.status = Status::Running;
        assert_eq!(s.observe(), Observed::Dead, "no process recorded");
        s.process = Some(ProcessIdentity {
            pid: u32::MAX - 1,
            start_ticks: 5,
        });
        assert_eq!(s.observe(), Observed::Dead);
        assert!(!s.is_alive());
    }
}
