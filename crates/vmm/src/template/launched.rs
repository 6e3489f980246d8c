//! Launch records: the configuration `forkvm boot` or `forkvm run` started a VM with,
//! kept where no VM process can write or even see it, so that `forkvm template save`
//! checks the state a VM process hands over against what its owner launched
//! ([`super::save_running`]'s `expected`), not against what that process says of
//! itself.
//!
//! Why: the state a VM process saves for a template is untrusted input, sealed by the
//! caller with the host's key. Without the launch configuration, a VMM taken over by
//! its guest could have its owner seal a template whose configuration names other host
//! files (a read-only disk or share of any path it chooses), which every child of the
//! template would then open.
//!
//! Where: `<root>.launched/<id>.json` beside the state root `root` (`/run/forkvm` keeps
//! its records in `/run/forkvm.launched`), a directory of mode 0700, each record mode
//! 0600 and written atomically. A VM process may write only beneath the state root (its
//! Landlock rules) and its root holds the state root but not its neighbours, so the
//! records are out of its reach. Records of VMs whose home is gone are removed whenever
//! a record is written.
//!
//! Fork children asked for by `forkvm fork` (without per-child settings) are recorded
//! with their parent's record, and those of `forkvm template fork` with the template's
//! authenticated configuration ([`record_children`]): a fork child's kernel, initrd,
//! disks, shares, vCPUs and memory are its parent's. The children are found by their
//! parent and process ID in their homes, which VM processes write; so a record is only
//! ever added, never replaced: a parent taken over that names another VM as its child
//! can at worst give a VM that had no record its own parent's launch, which the other
//! VM's saved state then fails to match (no template, rather than a forged one).
//!
//! Not recorded: containers' VMs (the runtime checks its pod templates against the
//! configuration it built itself) and children of forks asked for through the API.
//! `forkvm template save` refuses a VM without a record unless its owner passes
//! `--trust-vm-config`, which takes what its VM process reports.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::VmConfig;

/// The most bytes a record is read from (a configuration is a few KiB).
const MAX_RECORD: u64 = 1 << 20;
/// What the records directory's name adds to the state root's.
const SUFFIX: &str = ".launched";

/// Why a launch record could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The state root has no name or no parent to put the records beside it.
    #[error("no place for launch records beside the state root {0}")]
    NoPlace(PathBuf),
    /// Not a VM ID (32 lowercase hex digits).
    #[error("{0:?} is not a VM ID")]
    BadId(String),
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A record or the records directory is not what this module writes.
    #[error("{path}: {problem}")]
    Bad {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory of the launch records of the VMs under state root `root`.
pub fn records_dir(root: &Path) -> Result<PathBuf, RecordError> {
    let root = std::path::absolute(root).map_err(io(root))?;
    let no_place = || RecordError::NoPlace(root.clone());
    let name = root.file_name().ok_or_else(no_place)?;
    root.parent().ok_or_else(no_place)?;
    let mut dir = name.to_os_string();
    dir.push(SUFFIX);
    Ok(root.with_file_name(dir))
}

/// The records directory under `root` and VM `id`'s record in it.
fn record_path(root: &Path, id: &str) -> Result<(PathBuf, PathBuf), RecordError> {
    if !forkvm_registry::is_id(id) {
        return Err(RecordError::BadId(id.to_owned()));
    }
    let dir = records_dir(root)?;
    let path = dir.join(format!("{id}.json"));
    Ok((dir, path))
}

/// Checks that `dir` is a directory of this user's that no one else may enter (not a
/// link, mode 0700).
fn check_private(dir: &Path) -> Result<(), RecordError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    // SAFETY: geteuid takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(RecordError::Bad {
            path: dir.to_owned(),
            problem: format!("not a directory of uid {me} that only it may use (mode 0700)"),
        });
    }
    Ok(())
}

/// Records that VM `id` under state root `root` was launched with `cfg`; removes the
/// records of VMs whose home is gone.
pub fn record(root: &Path, id: &str, cfg: &VmConfig) -> Result<PathBuf, RecordError> {
    let (dir, path) = record_path(root, id)?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(&dir)(e)),
    }
    check_private(&dir)?;
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| RecordError::Bad {
        path: path.clone(),
        problem: format!("cannot encode the configuration: {e}"),
    })?;
    forkvm_registry::write_atomic(&path, &json).map_err(io(&path))?;
    prune(root, &dir);
    Ok(path)
}

/// The configuration VM `id` under state root `root` was launched with, if it was
/// recorded.
pub fn launched(root: &Path, id: &str) -> Result<Option<VmConfig>, RecordError> {
    let (dir, path) = record_path(root, id)?;
    if !dir.exists() {
        return Ok(None);
    }
    check_private(&dir)?;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let meta = file.metadata().map_err(io(&path))?;
    if !meta.is_file() || meta.len() > MAX_RECORD {
        return Err(RecordError::Bad {
            path,
            problem: format!("not a regular file of at most {MAX_RECORD} bytes"),
        });
    }
    let mut json = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_RECORD)
        .read_to_end(&mut json)
        .map_err(io(&path))?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| RecordError::Bad {
            path,
            problem: format!("not a launch record: {e}"),
        })
}

/// Records `cfg` for each VM under `root` whose home names `parent` as its parent (none:
/// no parent) and one of `pids` as its process, unless it has a record already; returns
/// the IDs recorded and the failures.
pub fn record_children(
    root: &Path,
    parent: Option<&str>,
    pids: &[u32],
    cfg: &VmConfig,
) -> (Vec<String>, Vec<(String, RecordError)>) {
    let (mut recorded, mut failed) = (Vec::new(), Vec::new());
    let Ok(entries) = forkvm_registry::list(root) else {
        return (recorded, failed);
    };
    for entry in entries {
        let Ok(state) = &entry.state else {
            continue;
        };
        let child = state.parent.as_deref() == parent
            && state.process.is_some_and(|p| pids.contains(&p.pid));
        if !child {
            continue;
        }
        match launched(root, &entry.id) {
            Ok(None) => match record(root, &entry.id, cfg) {
                Ok(_) => recorded.push(entry.id),
                Err(e) => failed.push((entry.id, e)),
            },
            Ok(Some(_)) => {}
            Err(e) => failed.push((entry.id, e)),
        }
    }
    (recorded, failed)
}

/// Removes the records in `dir` of VMs that have no home (published or staged) under
/// `root` any more. Best effort: a record another process removes first is gone anyway.
fn prune(root: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if forkvm_registry::is_id(id)
            && !root.join(id).exists()
            && !forkvm_registry::staged_dir(root, id).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kernel: &str) -> VmConfig {
        let mut c = VmConfig::new(PathBuf::from(kernel));
        c.initrd = Some(PathBuf::from("/boot/initrd"));
        c.vcpus = 2;
        c.mem_mib = 256;
        c
    }

    #[test]
    fn a_record_lies_beside_the_state_root_privately_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        std::fs::create_dir(&root).unwrap();
        let id = forkvm_registry::new_id();
        std::fs::create_dir(root.join(&id)).unwrap();
        let path = record(&root, &id, &cfg("/boot/vmlinux")).unwrap();
        assert_eq!(
            path,
            tmp.path().join("vms.launched").join(format!("{id}.json"))
        );
        assert!(
            !path.starts_with(&root),
            "a VM process can write its state root"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let back = launched(&root, &id).unwrap().expect("recorded");
        assert_eq!(back.kernel, PathBuf::from("/boot/vmlinux"));
        assert_eq!(back.initrd, Some(PathBuf::from("/boot/initrd")));
        assert_eq!((back.vcpus, back.mem_mib), (2, 256));
        // A VM never recorded has none; a trailing slash names the same root.
        assert!(launched(&root, &forkvm_registry::new_id())
            .unwrap()
            .is_none());
        let slashed = PathBuf::from(format!("{}/", root.display()));
        assert!(launched(&slashed, &id).unwrap().is_some());
    }

    #[test]
    fn ids_that_are_not_ids_name_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        for id in [
            "../../etc/passwd",
            "",
            "ABCDEF0123456789abcdef0123456789",
            "x",
        ] {
            assert!(matches!(
                record(&root, id, &cfg("/k")),
                Err(RecordError::BadId(_))
            ));
            assert!(matches!(launched(&root, id), Err(RecordError::BadId(_))));
        }
        assert!(!tmp.path().join("vms.launched").exists());
        assert!(matches!(
            records_dir(Path::new("/")),
            Err(RecordError::NoPlace(_))
        ));
    }

    #[test]
    fn records_of_vms_without_a_home_go_when_another_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        std::fs::create_dir(&root).unwrap();
        let (gone, staged, live) = (
            forkvm_registry::new_id(),
            forkvm_registry::new_id(),
            forkvm_registry::new_id(),
        );
        std::fs::create_dir_all(forkvm_registry::staged_dir(&root, &staged)).unwrap();
        std::fs::create_dir(root.join(&live)).unwrap();
        for id in [&gone, &staged] {
            record(&root, id, &cfg("/k")).unwrap();
        }
        // `gone` never had a home here: the next record removes it, not the staged one.
        record(&root, &live, &cfg("/k")).unwrap();
        assert!(launched(&root, &gone).unwrap().is_none());
        assert!(launched(&root, &staged).unwrap().is_some());
        assert!(launched(&root, &live).unwrap().is_some());
    }

    #[test]
    fn a_forks_children_get_the_record_and_no_record_is_replaced() {
        use forkvm_registry::{ProcessIdentity, VmHome};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        let home = |parent: Option<&str>, pid: u32| {
            let h = VmHome::create(&root, None, parent).unwrap();
            h.record_process(ProcessIdentity {
                pid,
                start_ticks: 1,
            })
            .unwrap();
            h.id().to_owned()
        };
        let parent = home(None, 10);
        record(&root, &parent, &cfg("/parent-kernel")).unwrap();
        let (a, b) = (home(Some(&parent), 11), home(Some(&parent), 12));
        // Another VM's child, and a VM without a parent, with pids the fork names.
        let other = home(Some(&forkvm_registry::new_id()), 13);
        let booted = home(None, 14);
        // A child that has a record keeps it.
        record(&root, &b, &cfg("/own-kernel")).unwrap();
        let (recorded, failed) = record_children(
            &root,
            Some(&parent),
            &[11, 12, 13, 14],
            &cfg("/parent-kernel"),
        );
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(recorded, vec![a.clone()]);
        let kernel = |id: &str| launched(&root, id).unwrap().map(|c| c.kernel);
        assert_eq!(kernel(&a), Some(PathBuf::from("/parent-kernel")));
        assert_eq!(kernel(&b), Some(PathBuf::from("/own-kernel")));
        assert_eq!(kernel(&other), None);
        assert_eq!(kernel(&booted), None);
        // A template's children have no parent: found by their processes alone.
        let (recorded, _) = record_children(&root, None, &[14], &cfg("/template-kernel"));
        assert_eq!(recorded, vec![booted.clone()]);
    }

    #[test]
    fn a_directory_others_may_enter_or_a_linked_record_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        std::fs::create_dir(&root).unwrap();
        let id = forkvm_registry::new_id();
        std::fs::create_dir(root.join(&id)).unwrap();
        let path = record(&root, &id, &cfg("/k")).unwrap();
        // A record replaced by a link to another file is not followed.
        let elsewhere = tmp.path().join("elsewhere.json");
        std::fs::write(&elsewhere, serde_json::to_vec(&cfg("/evil")).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(matches!(launched(&root, &id), Err(RecordError::Io { .. })));
        // A directory others may enter is not trusted.
        let dir = path.parent().unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert!(matches!(launched(&root, &id), Err(RecordError::Bad { .. })));
        assert!(matches!(
            record(&root, &id, &cfg("/k")),
            Err(RecordError::Bad { .. })
        ));
    }
}
