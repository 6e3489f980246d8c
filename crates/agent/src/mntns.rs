//! A mount namespace of its own for each app container of a pod's VM.
//!
//! An app container's root is assembled in the agent's mount namespace (under
//! [`crate::containers::CONTAINERS`], see there), where the agent keeps mounting on it
//! (its filesystems, volumes, a `/proc` of its PID namespace, masked paths) while the
//! container lives. Its processes run in a namespace made for it ([`create`]) as a copy
//! of the agent's in which:
//!
//! - every mount is a slave: what the agent mounts in the container's root later reaches
//!   the copy (the root's bind is made a shared mount of its own first), what the
//!   container's processes mount stays in their namespace. A remount does not
//!   propagate, so after each request that mounts in the container the agent gives
//!   the copies the flags of its own mounts ([`sync_flags`]: read-only, `nosuid`,
//!   `nodev`, `noexec`, access times): a read-only root or path is read-only in the
//!   container's namespace too;
//! - the container's root is moved to [`ROOT`] in the containers' directory, where its
//!   processes `chroot`;
//! - every other app container's root, the shares they come from (a pod's directory
//!   holds all of its containers' roots) and the boot container's root (`/rootfs`) are
//!   detached.
//!
//! So a process that leaves its `chroot` (root with `CAP_SYS_CHROOT`, which containers
//! get by default) finds the guest's own files, not another container's, and mounts a
//! container makes are seen by none of the others. (`pivot_root` would also take the
//! guest's files out of its reach, but the guest's root is its initramfs, which cannot
//! be pivoted away from.) Each namespace lives while the container does: the agent
//! holds it open ([`crate::containers::Container`]), and kills a container's processes
//! by it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Where, in the containers' directory, a container's root is in its own mount
/// namespace (an empty directory in the agent's; no container id starts with `.`).
pub const ROOT: &str = ".root";

/// An app container's mount namespace, open.
#[derive(Debug)]
pub struct MountNs {
    fd: OwnedFd,
    ino: u64,
    root: PathBuf,
}

impl MountNs {
    /// The namespace, to join.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Its inode number: what `/proc/PID/ns/mnt` of its processes stat to.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Where the container's root is in it.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Where the boot container's root is (`forkvm-init`'s `/rootfs`).
const BOOT_ROOT: &str = "/rootfs";

/// Makes the mount namespace of the app container whose root is bound at `rootfs`
/// (a shared mount, in the agent's namespace) under the containers' directory
/// `containers`, without the other containers' mounts (see the module documentation).
pub fn create(rootfs: &Path, containers: &Path) -> Result<MountNs, String> {
    let root = containers.join(ROOT);
    match std::fs::create_dir(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot make {}: {e}", root.display()))
        }
        _ => {}
    }
    let (rootfs, containers, at) = (rootfs.to_owned(), containers.to_owned(), root.clone());
    // A thread of its own takes the namespace (unsharing its file-system context from
    // the agent's other threads) and ends with it made: the agent stays in its own.
    let fd = std::thread::Builder::new()
        .name("mount-ns".into())
        .spawn(move || in_new_namespace(&rootfs, &containers, &at))
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the thread making the mount namespace panicked".to_owned())??;
    let file = std::fs::File::from(fd);
    let ino = inode(&file).map_err(|e| format!("cannot read the mount namespace: {e}"))?;
    Ok(MountNs {
        fd: file.into(),
        ino,
        root,
    })
}

/// On a thread of its own: unshares its mount namespace, makes it the container's and
/// returns it, open.
fn in_new_namespace(rootfs: &Path, containers: &Path, root: &Path) -> Result<OwnedFd, String> {
    // SAFETY: unshare reads no memory; it changes this thread's namespaces only (its
    // file-system context unshared with them), and the thread ends after.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        ));
    }
    let mount = |source: Option<&CString>, target: &CString, flags: libc::c_ulong| {
        crate::mounts::mount(source.map(CString::as_c_str), target, None, flags, None)
    };
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
    mount(None, &c(Path::new("/")), libc::MS_REC | libc::MS_SLAVE)
        .map_err(|e| format!("cannot make the mounts slaves: {e}"))?;
    mount(Some(&c(rootfs)), &c(root), libc::MS_MOVE).map_err(|e| {
        format!(
            "cannot move the container's root to {}: {e}",
            root.display()
        )
    })?;
    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map_err(|e| format!("cannot read the mount table: {e}"))?;
    for point in to_detach(&mountinfo, &[containers, Path::new(BOOT_ROOT)], root) {
        // SAFETY: a NUL-terminated path that lives across the call.
        if unsafe { libc::umount2(c(&point).as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(format!(
                "cannot detach {}: {}",
                point.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    std::fs::File::open("/proc/thread-self/ns/mnt")
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open the mount namespace: {e}"))
}

/// Gives each mount in the namespace `ns` under its root the flags the agent's mount at
/// the same place under `rootfs` has (the uppermost of each place on both sides), where
/// they differ: a remount in the agent's namespace reaches no copy.
pub fn sync_flags(ns: &MountNs, rootfs: &Path) -> Result<(), String> {
    let ours = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map_err(|e| format!("cannot read the mount table: {e}"))?;
    let want = uppermost_flags(&ours, rootfs);
    let (fd, root) = (ns.fd(), ns.root().to_owned());
    std::thread::Builder::new()
        .name("mount-ns".into())
        .spawn(move || -> Result<(), String> {
            // SAFETY: unshare and setns read no memory; they change this thread's
            // file-system context and mount namespace only, and the thread ends after.
            let joined = unsafe {
                libc::unshare(libc::CLONE_FS) == 0 && libc::setns(fd, libc::CLONE_NEWNS) == 0
            };
            if !joined {
                return Err(format!(
                    "cannot join the container's mount namespace: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let theirs = std::fs::read_to_string("/proc/thread-self/mountinfo")
                .map_err(|e| format!("cannot read the container's mount table: {e}"))?;
            let have = uppermost_flags(&theirs, &root);
            for (place, flags) in want {
                if have.get(&place) == Some(&flags) {
                    continue;
                }
                let at =
                    CString::new(root.join(&place).as_os_str().as_encoded_bytes()).expect("no NUL");
                crate::mounts::mount(
                    None,
                    &at,
                    None,
                    libc::MS_REMOUNT | libc::MS_BIND | flags,
                    None,
                )
                .map_err(|e| format!("cannot remount {} in the container: {e}", place.display()))?;
            }
            Ok(())
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the thread remounting in the mount namespace panicked".to_owned())?
}

/// For each place at or under `under` where `mountinfo` has a mount, relative to
/// `under`: the per-mount flags of the uppermost one (the last listed).
fn uppermost_flags(
    mountinfo: &str,
    under: &Path,
) -> std::collections::BTreeMap<PathBuf, libc::c_ulong> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = PathBuf::from(unescape(fields.nth(4)?));
            let options = fields.next()?;
            let place = point.strip_prefix(under).ok()?.to_owned();
            Some((place, flags_of(options)))
        })
        .collect()
}

/// The `MS_*` flags a mount's options (`rw,nosuid,relatime`) name, of those a bind
/// remount sets.
fn flags_of(options: &str) -> libc::c_ulong {
    options
        .split(',')
        .map(|o| match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The mount points in `mountinfo` (`/proc/PID/mountinfo`) at or under one of `under`
/// but not at or under `keep`, outermost only (detaching one takes what is mounted
/// under it), in the table's order.
fn to_detach(mountinfo: &str, under: &[&Path], keep: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| under.iter().any(|u| p.starts_with(u)) && !p.starts_with(keep))
        .collect();
    let all = points.clone();
    points.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    points.dedup();
    points
}

/// A mount point as `mountinfo` writes it: space, tab, newline and backslash as octal
/// escapes (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |n, b| n.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The inode number of the mount namespace `/proc/PID/ns/mnt` names: what tells
/// processes of one namespace apart from the rest.
fn inode(ns: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    ns.metadata().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outermost_mounts_under_the_given_places_are_detached() {
        let table = "\
1 0 0:2 / / rw - rootfs rootfs rw
20 1 0:20 / /proc rw - proc proc rw
30 1 0:30 / /rootfs rw - virtiofs forkvm-root rw
31 30 0:31 / /rootfs/proc rw - proc proc rw
40 1 0:40 / /run/forkvm/containers/.shares/forkvm-pod rw - virtiofs forkvm-pod rw
41 1 0:40 /a/rootfs /run/forkvm/containers/a/rootfs rw - virtiofs forkvm-pod rw
42 41 0:42 / /run/forkvm/containers/a/rootfs/proc rw - proc proc rw
43 1 0:40 /b\\040c/rootfs /run/forkvm/containers/b\\040c/rootfs rw - virtiofs forkvm-pod rw
44 1 0:40 /c/rootfs /run/forkvm/containers/.root rw - virtiofs forkvm-pod rw
45 44 0:45 / /run/forkvm/containers/.root/proc rw - proc proc rw
50 1 0:50 / /run/forkvm/containersX rw - tmpfs tmpfs rw
";
        let got = to_detach(
            table,
            &[Path::new("/run/forkvm/containers"), Path::new("/rootfs")],
            Path::new("/run/forkvm/containers/.root"),
        );
        assert_eq!(
            got,
            [
                "/rootfs",
                "/run/forkvm/containers/.shares/forkvm-pod",
                "/run/forkvm/containers/a/rootfs",
                "/run/forkvm/containers/b c/rootfs",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_uppermost_mount_of_each_place_gives_its_flags() {
        let table = "\
1 0 0:2 / / rw - rootfs rootfs rw
41 1 0:40 /a/rootfs /c/a/rootfs ro,nosuid - virtiofs forkvm-pod rw
42 41 0:42 / /c/a/rootfs/proc rw,nosuid,nodev,noexec,relatime - proc proc rw
43 42 0:43 / /c/a/rootfs/proc rw,nosuid,nodev,noexec,relatime - proc proc rw
44 43 0:44 /sys /c/a/rootfs/proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
45 1 0:45 / /c/ab rw - tmpfs tmpfs rw
";
        let got = uppermost_flags(table, Path::new("/c/a/rootfs"));
        let all = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RELATIME;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                (PathBuf::from(""), libc::MS_RDONLY | libc::MS_NOSUID),
                (PathBuf::from("proc"), all),
                (PathBuf::from("proc/sys"), libc::MS_RDONLY | all),
            ]
        );
    }

    #[test]
    fn mountinfo_escapes_are_read_back() {
        assert_eq!(unescape(r"/a\040b\011c"), "/a b\tc");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
        // Not an escape: kept as it is.
        assert_eq!(unescape(r"/a\9b\04"), r"/a\9b\04");
    }
}
