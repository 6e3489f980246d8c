//! A uid of its own for each VM family, and the family's cgroup subtree.
//!
//! Without capabilities a VM process running as uid 0 is still the owner of every file
//! root owns: within its places it could write other VMs' homes (and connect to their
//! API sockets), change the limits of their cgroups, and `chmod` root's files. So the
//! VM processes of a family ([`crate::family`]) run as a uid of their own, shared by the
//! family only: its first VM process switches to it while it is still single-threaded
//! ([`switch`]), keeping its capabilities until the VM is built (they are dropped then,
//! as for every VM process), and everything it starts (its fork children, its pool)
//! inherits it.
//!
//! What a family owns and the others cannot reach:
//! - **its homes**: the state root is `root:`[`FAMILIES_GID`] `1770` (every family may
//!   make a home there, none may rename or remove another's; [`prepare_state_root`]), and
//!   a home is `0700`, its files the family's;
//! - **its cgroups**: `forkvm/family-<uid>` is delegated to it (the directory and its
//!   `cgroup.procs` and `cgroup.threads`, as systemd delegates a subtree): its VM
//!   processes make their fork children's groups there and move between them; the
//!   family group's `cgroup.subtree_control` and its task limit ([`FAMILY_PIDS_MAX`]),
//!   and the group of a family's first VM with its limits, which root made, stay root's;
//!   another family's groups are not under it.
//!
//! A family's uid is allotted by its launcher ([`allot`]) from [`FIRST_UID`] on: a uid
//! whose lock (`/run/forkvm-families/<uid>`, `flock`) no living family holds (the
//! family's init holds it until the family ends) and that owns nothing in the state
//! root (a stopped VM's home stays its family's until it is removed).
//!
//! Where a family cannot have its own uid it runs as uid 0, as before, and says why at
//! start: a VM that shares directories (its file server keeps `CAP_SETUID` and the
//! capabilities to pass for any user, so a uid would bound nothing), a place its fork
//! children open by path that the uid cannot reach (a disk or vsock directory under a
//! directory only root may enter), forkvm run by a user. A container's VM, whose group
//! is its engine's, gets neither a uid nor a family group.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::root::{Access, Place};

/// The group of every family's uid, and of the state root: its members may make homes.
pub const FAMILIES_GID: u32 = 0x7fff_0000;
/// The first uid a family may get.
pub const FIRST_UID: u32 = FAMILIES_GID + 1;
/// How many uids families get: `FIRST_UID..FIRST_UID + UIDS`.
pub const UIDS: u32 = 0xfffe;
/// Tasks a family's processes may hold in all (`pids.max` of its group): its VMs'
/// groups have their own limits, which its processes could leave by moving between
/// them, not this one.
pub const FAMILY_PIDS_MAX: u64 = 16 * crate::cgroup::DEFAULT_PIDS_MAX;
/// Where the locks of the allotted uids are.
pub const LOCK_DIR: &str = "/run/forkvm-families";

/// A family as its VM processes are told of it (part of their jail).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilySpec {
    /// The family's uid; `None`: its VM processes stay uid 0 (its VM shares directories).
    pub uid: Option<u32>,
    /// The family's cgroup, under forkvm's (`family-<n>`).
    pub group: String,
}

impl FamilySpec {
    /// The family's cgroup directory under the hierarchy at `root`.
    pub fn group_dir(&self, root: &Path) -> PathBuf {
        root.join(crate::cgroup::FORKVM_GROUP).join(&self.group)
    }
}

/// An allotted family number, held until this value and every copy of its lock (the
/// family's init holds one) are gone.
#[derive(Debug)]
pub struct Allotted {
    /// The family.
    pub spec: FamilySpec,
    lock: File,
}

impl Allotted {
    /// The lock's descriptor, for the family's init to keep.
    pub fn lock_fd(&self) -> i32 {
        self.lock.as_raw_fd()
    }
}

/// Why a family could not be given a uid of its own.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    /// Something of the host's could not be read or changed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Every uid is held.
    #[error("every one of the {UIDS} family uids from {FIRST_UID} is held")]
    Exhausted,
    /// A credential change failed.
    #[error("cannot {0}")]
    Switch(&'static str, #[source] io::Error),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UidError + 'a {
    move |source| UidError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Whether this process may give families uids of their own: it is root with the
/// capabilities that takes (making the family's pid namespace, chowning, switching).
pub fn can_allot() -> bool {
    use caps::{CapSet, Capability};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_CHOWN,
    ]
    .into_iter()
    .all(|c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false))
}

/// Allots a family number for VMs registered under `state_root`: the first uid from a
/// point chosen by this process's pid whose lock it can take and that owns nothing in
/// the state root.
pub fn allot(state_root: &Path) -> Result<Allotted, UidError> {
    let dir = Path::new(LOCK_DIR);
    std::fs::create_dir_all(dir).map_err(io_err("make", dir))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let owned = owners_in(state_root);
    let start = std::process::id() % UIDS;
    for i in 0..UIDS {
        let uid = FIRST_UID + (start + i) % UIDS;
        if owned.contains(&uid) {
            continue;
        }
        let path = dir.join(uid.to_string());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: flock on a descriptor this function holds.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        // A group an ended family left (a VM killed before its group went, a launch that
        // failed before its family's init was made) goes now; one that still holds
        // groups keeps its uid from a new family.
        let spec = FamilySpec {
            uid: Some(uid),
            group: format!("family-{uid}"),
        };
        remove_group(&spec);
        if spec.group_dir(Path::new(crate::cgroup::ROOT)).exists() {
            continue;
        }
        return Ok(Allotted { spec, lock });
    }
    Err(UidError::Exhausted)
}

/// Removes the cgroup `dir` of the family of uid `uid` (its `exited` leaf, then itself)
/// if the family has ended (nobody holds its lock, which this holds meanwhile, so that
/// no launcher allots the uid and makes the group again in between) and nothing is left
/// in it. Only root may (the locks are root's); for anyone else nothing happens.
pub fn remove_group_if_ended(dir: &Path, uid: u32) {
    let path = Path::new(LOCK_DIR).join(uid.to_string());
    let Ok(lock) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    else {
        return;
    };
    // SAFETY: flock on a descriptor this function holds (closing it unlocks).
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return;
    }
    let _ = std::fs::remove_dir(dir.join("exited"));
    let _ = std::fs::remove_dir(dir);
    drop(lock);
}

/// Removes the family's cgroup (its `exited` leaf, then itself) where nothing is left
/// in it: a launch that failed before the family's init was made.
pub fn remove_group(spec: &FamilySpec) {
    let dir = spec.group_dir(Path::new(crate::cgroup::ROOT));
    let _ = std::fs::remove_dir(dir.join("exited"));
    let _ = std::fs::remove_dir(&dir);
}

/// The family uids that own something directly in `state_root` (a home, a staged one).
fn owners_in(state_root: &Path) -> std::collections::HashSet<u32> {
    let mut owned = std::collections::HashSet::new();
    for dir in [state_root.to_owned(), state_root.join(STAGING_DIR)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(m) = e.path().symlink_metadata() {
                if m.uid() >= FIRST_UID {
                    owned.insert(m.uid());
                }
            }
        }
    }
    owned
}

/// Where warm processes stage their homes, under the state root (the registry's
/// `.staged`).
const STAGING_DIR: &str = ".staged";

/// Makes the state root (and its staging directory) a place every family may make
/// homes in and none may rename or remove another's ([`open_to_families`]).
pub fn prepare_state_root(state_root: &Path) -> Result<(), UidError> {
    for dir in [state_root.to_owned(), state_root.join(STAGING_DIR)] {
        std::fs::create_dir_all(&dir).map_err(io_err("make", &dir))?;
        open_to_families(&dir)?;
    }
    Ok(())
}

/// Makes the directory `dir`, if it is root's, one every family's uid may make entries
/// in and none may rename or remove another's: `root:`[`FAMILIES_GID`] `1770` (the
/// state root, a bridge's lease directory). A directory of another user's (forkvm run
/// by a user) is left as it is.
pub fn open_to_families(dir: &Path) -> Result<(), UidError> {
    let m = dir.symlink_metadata().map_err(io_err("read", dir))?;
    if m.uid() != 0 || !m.is_dir() {
        return Ok(());
    }
    if m.gid() != FAMILIES_GID {
        std::os::unix::fs::lchown(dir, None, Some(FAMILIES_GID)).map_err(io_err("chown", dir))?;
    }
    if m.mode() & 0o7777 != 0o1770 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))
            .map_err(io_err("chmod", dir))?;
    }
    Ok(())
}

/// Makes the family's cgroup `forkvm/<group>` under the hierarchy at `root`, with the
/// shared leaf its VM processes leave their groups for (`exited`), and delegates both
/// to the family's uid (when it has one). Nothing where there is no cgroup v2.
pub fn prepare_group(root: &Path, spec: &FamilySpec) -> Result<(), UidError> {
    if !crate::cgroup::is_cgroup2(root) {
        return Ok(());
    }
    let dir = spec.group_dir(root);
    let exited = dir.join("exited");
    crate::cgroup::make_group(root, &dir).map_err(|e| UidError::Io {
        what: "make the cgroup",
        path: dir.clone(),
        source: io::Error::other(e),
    })?;
    std::fs::create_dir_all(&exited).map_err(io_err("make the cgroup", &exited))?;
    // The family's own limit, root's: its processes may move between its groups, out
    // of any one group's limits, but not out of the family's.
    let pids = dir.join("pids.max");
    if pids.exists() {
        std::fs::write(&pids, FAMILY_PIDS_MAX.to_string()).map_err(io_err("set", &pids))?;
    }
    let Some(uid) = spec.uid else { return Ok(()) };
    // Its own `cgroup.subtree_control` stays root's (set when the first VM's group was
    // made): the family cannot turn its groups' controllers off.
    let delegated = [
        dir.clone(),
        dir.join("cgroup.procs"),
        dir.join("cgroup.threads"),
        exited.clone(),
        exited.join("cgroup.procs"),
        exited.join("cgroup.threads"),
    ];
    for p in delegated {
        if p.exists() {
            std::os::unix::fs::lchown(&p, Some(uid), Some(FAMILIES_GID))
                .map_err(io_err("delegate", &p))?;
        }
    }
    Ok(())
}

/// The groups a family's uid is given besides [`FAMILIES_GID`]: `/dev/kvm`'s, where
/// only its group may open it (a fork child opens it to make its VM).
fn supplementary() -> Vec<libc::gid_t> {
    match std::fs::metadata("/dev/kvm") {
        Ok(m) if m.mode() & 0o006 != 0o006 && m.mode() & 0o060 == 0o060 => vec![m.gid()],
        _ => Vec::new(),
    }
}

/// What reaching `place` as its access says takes (`access(2)` mode): a read place read
/// (a directory also entered), a written one written (a directory entered), the
/// executable run.
pub fn access_mode(place: &Place) -> libc::c_int {
    match (place.access, place.path.is_dir()) {
        (Access::Read, false) => libc::R_OK,
        (Access::Read, true) => libc::R_OK | libc::X_OK,
        (_, false) => libc::R_OK | libc::W_OK,
        (_, true) => libc::W_OK | libc::X_OK,
    }
}

/// Whether uid `uid` (in [`FAMILIES_GID`] and the [`supplementary`] groups) can reach
/// each path of `checks` with its `access(2)` mode ([`access_mode`]): the places a
/// family's fork children open by path. The first one it cannot reach, else `None`.
/// Changes this process's real ids for the checks: call it while it has one thread, as
/// root.
pub fn unreachable(
    uid: u32,
    checks: &[(PathBuf, libc::c_int)],
) -> Result<Option<PathBuf>, UidError> {
    let groups = supplementary();
    // This process's groups, to be given back.
    // SAFETY: getgroups with a zero size only counts; then fills a buffer of that size.
    let own: Vec<libc::gid_t> = unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        let mut own = vec![0; usize::try_from(n).unwrap_or(0)];
        let n = libc::getgroups(n.max(0), own.as_mut_ptr());
        own.truncate(usize::try_from(n).unwrap_or(0));
        own
    };
    // Raw system calls: they change this thread's ids only (the C library's wrappers
    // change every thread's), which is all `access` looks at.
    let setgroups = |g: &[libc::gid_t]| {
        // SAFETY: setgroups reads `g.len()` ids from a live slice.
        unsafe { libc::syscall(libc::SYS_setgroups, g.len(), g.as_ptr()) as i32 }
    };
    let setresgid = |r: u32| {
        // SAFETY: setresgid takes plain integers (-1: unchanged).
        unsafe { libc::syscall(libc::SYS_setresgid, r, u32::MAX, u32::MAX) as i32 }
    };
    let setresuid = |r: u32| {
        // SAFETY: setresuid takes plain integers (-1: unchanged).
        unsafe { libc::syscall(libc::SYS_setresuid, r, u32::MAX, u32::MAX) as i32 }
    };
    let last = |what| UidError::Switch(what, io::Error::last_os_error());
    let mut taken = Ok(());
    // The real ids only: the effective ones, and so the capabilities, stay root's.
    if setgroups(&groups) != 0 {
        taken = Err(last("take the family's groups for a check"));
    } else if setresgid(FAMILIES_GID) != 0 {
        taken = Err(last("take the families' group for a check"));
    } else if setresuid(uid) != 0 {
        taken = Err(last("take the family's uid for a check"));
    }
    let mut first = None;
    if taken.is_ok() {
        for (path, mode) in checks {
            let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: access(2) reads a NUL-terminated path; it checks with the real ids.
            if unsafe { libc::access(c.as_ptr(), *mode) } != 0 {
                first = Some(path.clone());
                break;
            }
        }
    }
    // Back to root's ids and its own groups, whatever was taken.
    if setresuid(0) != 0 || setresgid(0) != 0 || setgroups(&own) != 0 {
        return Err(last("give back root's ids after a check"));
    }
    taken.map(|()| first)
}

/// Switches this process to the family's uid `uid`, group [`FAMILIES_GID`] (and the
/// [`supplementary`] ones), keeping its capabilities, which are dropped once the VM is
/// built as for every VM process; then makes `home` (its directory and the files in it)
/// the family's. The process stays dumpable (its `/proc/self` files, which it reads,
/// are then its own) but leaves no core file. Call it while the process has one thread.
pub fn switch(uid: u32, home: &Path) -> Result<(), UidError> {
    use caps::CapSet;
    let groups = supplementary();
    let last = |what| UidError::Switch(what, io::Error::last_os_error());
    // SAFETY: prctl, setgroups, setresgid and setresuid with plain values and a live
    // slice; setrlimit reads the struct it is given.
    unsafe {
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(last("keep the capabilities across the uid change"));
        }
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(last("set the family's groups"));
        }
        if libc::setresgid(FAMILIES_GID, FAMILIES_GID, FAMILIES_GID) != 0 {
            return Err(last("take the families' group"));
        }
        // The family's tasks count against its uid's process limit, which uid 0's did
        // not: as many as its group allows, raised while it is still root (raising the
        // hard limit takes `CAP_SYS_RESOURCE`, which the uid change lowers).
        let tasks = libc::rlimit {
            rlim_cur: FAMILY_PIDS_MAX,
            rlim_max: FAMILY_PIDS_MAX,
        };
        let mut now: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NPROC, &mut now) == 0
            && now.rlim_cur < FAMILY_PIDS_MAX
            && libc::setrlimit(libc::RLIMIT_NPROC, &tasks) != 0
        {
            return Err(last("raise the family's process limit"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last("take the family's uid"));
        }
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return Err(last("forbid core files"));
        }
        // The uid change made it not dumpable, its `/proc/self` root's.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(last("make /proc/self the family's"));
        }
    }
    // The effective set was cleared by the change; the permitted one was kept.
    let permitted = caps::read(None, CapSet::Permitted)
        .map_err(|e| UidError::Switch("read the capabilities", io::Error::other(e)))?;
    caps::set(None, CapSet::Effective, &permitted)
        .map_err(|e| UidError::Switch("raise the capabilities again", io::Error::other(e)))?;
    give_home(uid, home)
}

/// Makes `home` and the files directly in it uid `uid`'s (its mount point for the
/// minimal root stays root's).
fn give_home(uid: u32, home: &Path) -> Result<(), UidError> {
    let own = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(uid), Some(FAMILIES_GID)).map_err(io_err("chown", p))
    };
    own(home)?;
    let entries = std::fs::read_dir(home).map_err(io_err("read", home))?;
    for e in entries.flatten() {
        if e.file_name() == crate::root::MOUNT_DIR {
            continue;
        }
        own(&e.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_uid_is_not_allotted_again_nor_one_that_owns_a_home() {
        let root = tempfile::tempdir().unwrap();
        let a = allot(root.path()).unwrap();
        let b = allot(root.path()).unwrap();
        let (ua, ub) = (a.spec.uid.unwrap(), b.spec.uid.unwrap());
        assert_ne!(ua, ub, "a held uid was allotted again");
        assert!((FIRST_UID..FIRST_UID + UIDS).contains(&ua));
        assert_eq!(a.spec.group, format!("family-{ua}"));
        // Released, and a home of its left behind: not allotted (the search starts from
        // this process's point, where `a` was found, unless another test held it).
        drop(a);
        let home = root.path().join("0123");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::lchown(&home, Some(ua), None).unwrap();
        assert!(owners_in(root.path()).contains(&ua));
        let c = allot(root.path()).unwrap();
        assert_ne!(
            c.spec.uid,
            Some(ua),
            "a uid that owns a home went to a new family"
        );
        drop((b, c));
    }

    #[test]
    fn a_place_under_a_directory_only_root_may_enter_is_unreachable() {
        use std::os::unix::fs::PermissionsExt;
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let wx = libc::W_OK | libc::X_OK;
        let inside = private.path().join("root");
        std::fs::create_dir(&inside).unwrap();
        let got = std::thread::spawn(move || {
            (
                unreachable(FIRST_UID, &[(inside.clone(), wx)]).unwrap(),
                unreachable(FIRST_UID, &[(open.path().to_owned(), wx)]).unwrap(),
                // SAFETY: getuid and getgid have no preconditions.
                unsafe { (libc::getuid(), libc::getgid()) },
                inside,
            )
        })
        .join()
        .unwrap();
        assert_eq!(
            got.0,
            Some(got.3),
            "reached through a 0700 directory of root's"
        );
        assert_eq!(got.1, None, "a 1777 directory is every user's");
        assert_eq!(got.2, (0, 0), "root's ids were not given back");
    }
}
