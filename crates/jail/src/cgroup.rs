//! The VM process's own cgroup (v2): what bounds the memory and tasks of one VM.
//!
//! A jailed VM process moves itself into a group of its own before it builds the VM
//! (every thread it starts, and every process, is in it): forkvm's `forkvm/<VM ID>`, or
//! a container's `cgroupsPath`. The group's `memory.max` covers the guest memory the VM
//! may hold (its RAM and the overlays its fork children map) and the VMM's own memory,
//! `pids.max` its threads and helper processes. Guest RAM pages are charged
//! to the group of the VM that first touched them: a fork child is charged only for the
//! pages it copies, its parent (or template) for the ones they share.
//!
//! A VM of a family ([`crate::family`]) has its group in the family's,
//! `forkvm/family-<n>/<VM ID>`, which is delegated to the family's uid ([`crate::uid`]):
//! its VM processes make their fork children's groups there, and reach no other
//! family's.
//!
//! The group is made with its parents (the `memory` and `pids` controllers enabled down
//! the path), and removed when the process ends: it moves itself to the shared leaf
//! `exited` of its family's group (or of `forkvm`) first, as a process cannot remove the
//! group it is in. The family's init removes the family's group when the family ends.
//!
//! Written by hand rather than with a crate: five files under one directory, where the
//! cgroups crates (cgroups-rs, libcgroups) bring v1, systemd and D-Bus along.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where cgroup v2 is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The parent of forkvm's own groups, under [`ROOT`].
pub const FORKVM_GROUP: &str = "forkvm";
/// What a VM process may use besides guest RAM, by default: the VMM's heap, device
/// buffers (vsock's, up to 1023 connections), the FUSE server's.
pub const VMM_OVERHEAD: u64 = 512 << 20;
/// Tasks (threads and processes) a VM's group may hold, by default: its vCPUs, event
/// loop, API and fork threads, its fork pool's processes, and the processes of a fork of
/// up to 1024 children while they start (each moves to its own group).
pub const DEFAULT_PIDS_MAX: u64 = 4096;
/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Why the group could not be made or joined.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy where it should be.
    #[error(
        "{ROOT} is not a cgroup v2 file system: the jail puts each VM in a cgroup of its \
         own with memory and task limits (mount one with `mount -t cgroup2 none {ROOT}`)"
    )]
    NoHierarchy,
    /// A path that leaves the hierarchy or is empty.
    #[error("{0:?} is not a cgroup path under {ROOT}")]
    BadPath(PathBuf),
    /// A file of the hierarchy could not be written or made.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The group a VM process joins, and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSpec {
    /// The group, relative to the hierarchy's root: `forkvm/<VM ID>`, a container's
    /// `cgroupsPath`.
    pub path: PathBuf,
    /// `memory.max`, in bytes (`None`: no limit).
    pub memory_max: Option<u64>,
    /// `pids.max` (`None`: no limit).
    pub pids_max: Option<u64>,
}

impl CgroupSpec {
    /// forkvm's own group for VM `id` that may hold `guest_memory` bytes of guest memory:
    /// that plus [`VMM_OVERHEAD`], [`DEFAULT_PIDS_MAX`] tasks; in its family's group
    /// (`forkvm/family-<n>/<id>`) if it has one.
    pub fn for_vm(id: &str, guest_memory: u64, family: Option<&str>) -> Self {
        let mut path = PathBuf::from(FORKVM_GROUP);
        if let Some(f) = family {
            path.push(f);
        }
        Self {
            path: path.join(id),
            memory_max: Some(guest_memory.saturating_add(VMM_OVERHEAD)),
            pids_max: Some(DEFAULT_PIDS_MAX),
        }
    }

    /// The group of an OCI `cgroupsPath`: a path (`/docker/ID`, taken under the root), or
    /// systemd's `slice:prefix:name` (`system.slice:docker:ID` is
    /// `system.slice/docker-ID.scope`; a slice `a-b.slice` sits in `a.slice`).
    pub fn oci_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
        let bad = || CgroupError::BadPath(PathBuf::from(cgroups_path));
        let path = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
            [one] => PathBuf::from(one.trim_start_matches('/')),
            [slice, prefix, name] => {
                let slice = if slice.is_empty() {
                    "system.slice"
                } else {
                    slice
                };
                let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
                let mut dir = PathBuf::new();
                // Each dash-separated prefix of a slice's name is a parent slice.
                let parts: Vec<&str> = stem.split('-').collect();
                for i in 1..parts.len() {
                    dir.push(format!("{}.slice", parts[..i].join("-")));
                }
                dir.push(slice);
                let unit = if prefix.is_empty() {
                    format!("{name}.scope")
                } else {
                    format!("{prefix}-{name}.scope")
                };
                dir.join(unit)
            }
            _ => return Err(bad()),
        };
        check_relative(&path)?;
        Ok(path)
    }
}

/// `path` is a non-empty relative path that stays under the root.
fn check_relative(path: &Path) -> Result<(), CgroupError> {
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !normal || path.as_os_str().is_empty() {
        return Err(CgroupError::BadPath(path.to_owned()));
    }
    Ok(())
}

/// A group this process joined.
#[derive(Debug)]
pub struct Cgroup {
    root: PathBuf,
    dir: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn write_file(path: &Path, value: &str, what: &'static str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io(what, path))
}

/// Whether `root` is a cgroup v2 file system.
pub fn is_cgroup2(root: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; `c` is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_MAGIC
    }
}

impl Cgroup {
    /// Makes the group of `spec` under [`ROOT`] and moves this process into it.
    pub fn join(spec: &CgroupSpec) -> Result<Self, CgroupError> {
        Self::join_under(Path::new(ROOT), spec)
    }

    /// As [`Cgroup::join`], under the hierarchy mounted at `root`.
    pub fn join_under(root: &Path, spec: &CgroupSpec) -> Result<Self, CgroupError> {
        if !is_cgroup2(root) {
            return Err(CgroupError::NoHierarchy);
        }
        check_relative(&spec.path)?;
        let dir = root.join(&spec.path);
        let made = make_group(root, &dir)?;
        // A group this call made goes again if it cannot be joined as asked.
        Self::limit_and_join(&dir, spec).inspect_err(|_| {
            if made {
                let _ = std::fs::remove_dir(&dir);
            }
        })?;
        Ok(Self {
            root: root.to_owned(),
            dir,
        })
    }

    /// Sets `spec`'s limits on the group `dir` and moves this process into it.
    fn limit_and_join(dir: &Path, spec: &CgroupSpec) -> Result<(), CgroupError> {
        // A limit whose controller the host does not give this group (memory turned off
        // at boot, a parent that holds processes) is not set, and said.
        let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .map_err(io("read", &dir.join("cgroup.controllers")))?;
        let limits = [
            ("memory", "memory.max", spec.memory_max),
            ("pids", "pids.max", spec.pids_max),
        ];
        for (controller, file, limit) in limits {
            let Some(limit) = limit else { continue };
            if controllers.split_whitespace().any(|c| c == controller) {
                write_file(&dir.join(file), &limit.to_string(), "set")?;
            } else {
                tracing::warn!(
                    "{}: no {controller} controller here, {file} not set",
                    dir.display()
                );
            }
        }
        write_file(&dir.join("cgroup.procs"), "0", "join")
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Leaves the group (for the shared leaf `exited` of its family's group, or of
    /// forkvm's) and removes it, once the processes this one started have left it: the
    /// last thing a VM process does. The group stays (and is reported) if something
    /// still runs in it after `wait`.
    pub fn remove(self, wait: std::time::Duration) {
        let exited = forkvm_groups(&self.root).join("exited");
        let moved = std::fs::create_dir_all(&exited)
            .map_err(io("make the cgroup", &exited))
            .and_then(|()| write_file(&exited.join("cgroup.procs"), "0", "join"));
        if let Err(e) = moved {
            tracing::warn!("cannot leave the VM's cgroup: {e}");
            return;
        }
        remove_when_empty(&self.dir, wait);
    }
}

/// The shared leaf (`forkvm/families`) that VM families' inits and VM processes'
/// stand-ins ([`crate::family`]) move to: out of their launcher's group, so that
/// stopping the service or session that ran `forkvm boot -d` does not end the family
/// with it (its VM processes have groups of their own). Its `cgroup.procs`, open for
/// writing; `None` where there is no cgroup v2 hierarchy or the leaf cannot be made.
pub fn families_procs() -> Option<std::fs::File> {
    let root = Path::new(ROOT);
    if !is_cgroup2(root) {
        return None;
    }
    let dir = root.join(FORKVM_GROUP).join("families");
    std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        })
        .inspect_err(|e| tracing::debug!("no group for VM families: {}: {e}", dir.display()))
        .ok()
}

/// forkvm's own group of VM `id` (see [`CgroupSpec::for_vm`]): in this process's
/// family's group, else in whichever family's group it is, else in forkvm's.
pub fn vm_group(id: &str) -> PathBuf {
    let root = Path::new(ROOT);
    let own = forkvm_groups(root).join(id);
    if own.exists() {
        return own;
    }
    let forkvm = root.join(FORKVM_GROUP);
    let in_a_family = std::fs::read_dir(&forkvm)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let name = e.file_name();
            let group = e.path().join(id);
            (name.to_str()?.starts_with("family-") && group.exists()).then_some(group)
        });
    in_a_family.unwrap_or_else(|| forkvm.join(id))
}

/// Where this process's VM processes have their groups under the hierarchy at `root`:
/// its family's group, or forkvm's.
pub fn forkvm_groups(root: &Path) -> PathBuf {
    match crate::family_spec() {
        Some(f) => f.group_dir(root),
        None => root.join(FORKVM_GROUP),
    }
}

/// Makes the group `dir` (under the hierarchy at `root`) with its parents, each parent
/// handing the `memory` and `pids` controllers down (one that holds processes itself
/// cannot: the engine's own groups are made ready by the engine). Whether `dir` itself
/// was made.
pub(crate) fn make_group(root: &Path, dir: &Path) -> Result<bool, CgroupError> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| CgroupError::BadPath(dir.to_owned()))?;
    check_relative(rel)?;
    let mut at = root.to_owned();
    let mut made = false;
    for part in rel.components() {
        enable_controllers(&at);
        at.push(part);
        made = match std::fs::create_dir(&at) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io("make the cgroup", &at)(e)),
        };
    }
    Ok(made)
}

/// Removes the group `dir` once the processes in it are gone, waiting up to `wait` (a
/// killed VM process takes a moment to be reaped): only a directory under [`ROOT`]
/// without `..`, and only an empty group (the kernel refuses any other). What made it
/// (a VM process that was killed, a warm process of a pool) is gone; a group that stays
/// is reported.
pub fn remove_when_empty(dir: &Path, wait: std::time::Duration) {
    let under_root = dir.starts_with(ROOT)
        && dir
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::RootDir));
    if !under_root || !dir.exists() {
        return;
    }
    let deadline = std::time::Instant::now() + wait;
    while let Err(e) = std::fs::remove_dir(dir) {
        match e.kind() {
            std::io::ErrorKind::NotFound => return,
            // Not this process's to remove (a container's group, outside the places its
            // jail lets it change): whoever made it removes it (the runtime's `delete`).
            std::io::ErrorKind::PermissionDenied if crate::landlock::bound().is_some() => {
                tracing::debug!("the cgroup {} is left to its owner: {e}", dir.display());
                return;
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!("cannot remove the cgroup {}: {e}", dir.display());
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A family's last group (a killed VM's, removed by `rm` after the family's init
    // ended): its family's group goes too, once the family has ended (nobody holds its
    // uid's lock: only root may look) and nothing is left in it.
    let family = dir.parent().and_then(|p| {
        let n = p.file_name()?.to_str()?.strip_prefix("family-")?;
        Some((p, n.parse::<u32>().ok()?))
    });
    if let Some((family, uid)) = family {
        crate::uid::remove_group_if_ended(family, uid);
    }
}

/// Enables the `memory` and `pids` controllers for `dir`'s children, those it has.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in ["memory", "pids"] {
        let has = |list: &str| list.split_whitespace().any(|c| c == controller);
        if has(&available) && !has(&enabled) {
            if let Err(e) = write_file(
                &dir.join("cgroup.subtree_control"),
                &format!("+{controller}"),
                "enable a controller in",
            ) {
                tracing::debug!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_paths() {
        assert_eq!(
            CgroupSpec::oci_path("/docker/abc").unwrap(),
            Path::new("docker/abc")
        );
        assert_eq!(
            CgroupSpec::oci_path("system.slice:docker:abc").unwrap(),
            Path::new("system.slice/docker-abc.scope")
        );
        assert_eq!(
            CgroupSpec::oci_path("kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/\
                 cri-containerd-abc.scope"
            )
        );
        for bad in [
            "",
            "/",
            "../etc",
            "/docker/../../x",
            "a:b",
            "a.scope:x:y",
            "a:b:c:d",
        ] {
            assert!(
                matches!(CgroupSpec::oci_path(bad), Err(CgroupError::BadPath(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_vms_own_group_covers_ram_and_overhead() {
        let s = CgroupSpec::for_vm("abc", 256 << 20, None);
        assert_eq!(s.path, Path::new("forkvm/abc"));
        assert_eq!(s.memory_max, Some((256 << 20) + VMM_OVERHEAD));
        assert_eq!(s.pids_max, Some(DEFAULT_PIDS_MAX));
        let s = CgroupSpec::for_vm("abc", 256 << 20, Some("family-7"));
        assert_eq!(s.path, Path::new("forkvm/family-7/abc"));
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = Cgroup::join_under(dir.path(), &CgroupSpec::for_vm("x", 1, None)).unwrap_err();
        assert!(matches!(e, CgroupError::NoHierarchy), "{e}");
        assert!(e.to_string().contains("mount -t cgroup2"), "{e}");
        assert!(!dir.path().join("forkvm").exists(), "nothing made");
    }
}
