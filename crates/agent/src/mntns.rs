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
//!   propagate, so after each request that mounts in the container the agent gives the
//!   copies the flags of its own mounts ([`sync_flags`]: read-only, `nosuid`, `nodev`,
//!   `noexec`, `nosymfollow`): a read-only root or path is read-only in the container's
//!   namespace too;
//! - the container's root is moved onto `/` (as `switch_root` does), and every other
//!   mount is detached: the guest's `/proc`, `/sys`, `/dev`, `/run` (the other
//!   containers' roots, the shares they come from, the copies of their bound files),
//!   the boot container's root. A process joining the namespace starts in the
//!   container's root (`setns` goes down the mounts on the namespace's root).
//!
//! So a root process of the container cannot leave its root the way one leaves a
//! `chroot` (`CAP_SYS_CHROOT`, which containers get by default, is enough for that):
//! `..` from the container's root, mounted over the namespace's, goes down its mounts
//! again; and the namespace holds no other mount of the guest's to reach, neither
//! another container's files nor the guest's processes. Mounts a container makes are
//! seen by none of the others. Each namespace lives while the container does: the agent
//! holds it open ([`crate::containers::Container`]) and kills a container's processes by
//! it.
//!
//! Limits: a root given as a directory of the guest (no share) is bound with what is
//! mounted under it; a mount whose spec changes its propagation (`rslave`, `rprivate`)
//! leaves the agent's peer group, so what the agent mounts under it later does not
//! reach the container; and a main process started in a PID namespace waits for the
//! agent (while it stacks the namespace's `/proc`) in the guest's root before it joins
//! the container's namespace, so for those milliseconds a container sharing that PID
//! namespace with `CAP_SYS_PTRACE` could reach the guest's root through `/proc/PID/root`.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};

/// Rounds of detaching the namespace's other mounts (stacked ones go one per round).
const DETACH_ROUNDS: usize = 16;

/// An app container's mount namespace, open.
#[derive(Debug)]
pub struct MountNs {
    fd: OwnedFd,
    ino: u64,
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
}

/// Makes the mount namespace of the app container whose root is bound at `rootfs` (a
/// shared mount, in the agent's namespace): see the module documentation.
pub fn create(rootfs: &Path) -> Result<MountNs, String> {
    let rootfs = rootfs.to_owned();
    // A thread of its own takes the namespace (unsharing its file-system context from
    // the agent's other threads) and ends with it made: the agent stays in its own.
    let fd = on_a_thread(move || in_new_namespace(&rootfs))?;
    let file = File::from(fd);
    let ino = std::os::unix::fs::MetadataExt::ino(
        &file
            .metadata()
            .map_err(|e| format!("cannot read the mount namespace: {e}"))?,
    );
    Ok(MountNs {
        fd: file.into(),
        ino,
    })
}

/// Runs `f` on a thread of its own (which may change its namespaces and ends after).
fn on_a_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    std::thread::Builder::new()
        .name("mount-ns".into())
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the thread acting in a mount namespace panicked".to_owned())?
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// On a thread of its own: unshares its mount namespace, makes it the container's and
/// returns it, open.
fn in_new_namespace(rootfs: &Path) -> Result<OwnedFd, String> {
    // SAFETY: unshare reads no memory; it changes this thread's namespaces only (its
    // file-system context unshared with them), and the thread ends after.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) } != 0 {
        return Err(os_error("unshare(CLONE_NEWNS)"));
    }
    // Opened while the guest's /proc is there: the namespace, and this thread's proc
    // directory (its mount table, read after /proc is detached).
    let ns = File::open("/proc/thread-self/ns/mnt")
        .map_err(|e| format!("cannot open the mount namespace: {e}"))?;
    let proc_self = File::open("/proc/thread-self")
        .map_err(|e| format!("cannot open /proc/thread-self: {e}"))?;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL");
    let mount = |source: Option<&CString>, target: &CString, flags: libc::c_ulong| {
        crate::mounts::mount(source.map(CString::as_c_str), target, None, flags, None)
    };
    let slash = c(Path::new("/"));
    mount(None, &slash, libc::MS_REC | libc::MS_SLAVE)
        .map_err(|e| format!("cannot make the mounts slaves: {e}"))?;
    // The namespace's own root, under what is moved onto it: what this thread walks
    // from to detach the rest.
    let bottom = File::open("/").map_err(|e| format!("cannot open /: {e}"))?;
    mount(Some(&c(rootfs)), &slash, libc::MS_MOVE)
        .map_err(|e| format!("cannot move the container's root onto /: {e}"))?;
    // SAFETY: fchdir reads no memory; this thread's working directory (unshared) only.
    if unsafe { libc::fchdir(bottom.as_raw_fd()) } != 0 {
        return Err(os_error("fchdir"));
    }
    let mut last_failure = None;
    for _ in 0..DETACH_ROUNDS {
        let table = entries(&read_mountinfo(&proc_self)?);
        let Some(top) = namespace_root(&table) else {
            return Err("the mount table has no root".into());
        };
        // The container's root: the one mount on the namespace's root at `/`.
        let others: Vec<&Entry> = table
            .iter()
            .filter(|e| e.parent == top.id && e.id != top.id)
            .filter(|e| e.point != Path::new("/"))
            .collect();
        if others.is_empty() {
            return Ok(ns.into());
        }
        // The latest first (one mounted over another's ancestor hides it), each by its
        // path relative to the namespace's root (this thread's working directory), not
        // through the container's root moved onto it; one that fails (hidden) is tried
        // again in the next round.
        let mut failed = None;
        for e in others.iter().rev() {
            let relative = c(e.point.strip_prefix("/").unwrap_or(&e.point));
            // SAFETY: a NUL-terminated path that lives across the call.
            if unsafe { libc::umount2(relative.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) }
                != 0
            {
                failed = Some(os_error(&format!("cannot detach {}", e.point.display())));
            }
        }
        last_failure = failed;
    }
    Err(format!(
        "mounts were left in the container's mount namespace after {DETACH_ROUNDS} rounds{}",
        last_failure.map_or(String::new(), |e| format!(" ({e})"))
    ))
}

/// A mount table (`/proc/PID/mountinfo`) read through a task's proc directory.
fn read_mountinfo(proc_task: &File) -> Result<Vec<u8>, String> {
    let fd = rustix::fs::openat(
        proc_task,
        "mountinfo",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the mount table: {e}"))?;
    let mut bytes = Vec::new();
    File::from(fd)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the mount table: {e}"))?;
    Ok(bytes)
}

/// Gives each mount of the namespace `ns` the flags the agent's mount at the same place
/// under `rootfs` has (the uppermost of each place on both sides), where they differ: a
/// remount in the agent's namespace reaches no copy. A place the namespace lacks (under
/// a mount whose propagation its spec changed) is left.
pub fn sync_flags(ns: &MountNs, rootfs: &Path) -> Result<(), String> {
    let ours = std::fs::read("/proc/thread-self/mountinfo")
        .map_err(|e| format!("cannot read the mount table: {e}"))?;
    let want = uppermost(&ours, rootfs);
    let fd = ns.fd();
    on_a_thread(move || {
        let proc_self = File::open("/proc/thread-self")
            .map_err(|e| format!("cannot open /proc/thread-self: {e}"))?;
        // SAFETY: unshare and setns read no memory; they change this thread's
        // file-system context and mount namespace only, and the thread ends after.
        let joined = unsafe {
            libc::unshare(libc::CLONE_FS) == 0 && libc::setns(fd, libc::CLONE_NEWNS) == 0
        };
        if !joined {
            return Err(os_error("cannot join the container's mount namespace"));
        }
        // Its root now: the container's.
        let root = File::open("/").map_err(|e| format!("cannot open the root: {e}"))?;
        let have = uppermost(&read_mountinfo(&proc_self)?, Path::new("/"));
        for (place, (_, flags)) in want {
            let Some(&(id, now)) = have.get(&place) else {
                continue;
            };
            if now != flags {
                set_flags(&root, &place, id, flags)
                    .map_err(|e| format!("cannot set the flags of {}: {e}", place.display()))?;
            }
        }
        Ok(())
    })
}

/// The flags [`sync_flags`] keeps equal (`MOUNT_ATTR_*`).
const SYNCED: u64 = libc::MOUNT_ATTR_RDONLY
    | libc::MOUNT_ATTR_NOSUID
    | libc::MOUNT_ATTR_NODEV
    | libc::MOUNT_ATTR_NOEXEC
    | libc::MOUNT_ATTR_NOSYMFOLLOW;

/// Sets `flags` (of [`SYNCED`]) and clears the others on the mount at `place` under the
/// directory `root`, reached without following a link (the container may have made
/// one on the way) and without leaving `root`, if it is the mount `id` (a mount the
/// container made over it, or over one of the directories on the way, is not).
fn set_flags(root: &File, place: &Path, id: u64, flags: u64) -> std::io::Result<()> {
    let path = match place.as_os_str().is_empty() {
        true => Path::new("."),
        false => place,
    };
    let fd = match openat2(
        root,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
    ) {
        Ok(fd) => fd,
        // Moved or replaced by the container since the table was read: not the mount.
        Err(e)
            if [
                rustix::io::Errno::NOENT,
                rustix::io::Errno::LOOP,
                rustix::io::Errno::XDEV,
            ]
            .contains(&e) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e.into()),
    };
    let reached = rustix::fs::statx(
        &fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )?;
    if reached.stx_mnt_id != id {
        return Ok(());
    }
    let attr = libc::mount_attr {
        attr_set: flags & SYNCED,
        attr_clr: !flags & SYNCED,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size` bytes of `attr`, which lives on this stack
    // frame for the call; the path is a static empty C string (AT_EMPTY_PATH: the mount
    // the handle is on), and no memory is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// One line of a mount table.
#[derive(Debug, PartialEq)]
struct Entry {
    id: u64,
    parent: u64,
    point: PathBuf,
    /// Its per-mount flags, as `MOUNT_ATTR_*` ([`SYNCED`] only).
    flags: u64,
}

/// The lines of a mount table (`/proc/PID/mountinfo`) that parse.
fn entries(mountinfo: &[u8]) -> Vec<Entry> {
    mountinfo
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|&b| b == b' ');
            let number = |f: Option<&[u8]>| std::str::from_utf8(f?).ok()?.parse().ok();
            let id = number(fields.next())?;
            let parent = number(fields.next())?;
            let point = PathBuf::from(unescape(fields.nth(2)?));
            let flags = flags_of(fields.next()?);
            Some(Entry {
                id,
                parent,
                point,
                flags,
            })
        })
        .collect()
}

/// The root mount of a mount table: its own parent (the initramfs' in the guest), or one
/// whose parent is not in the table (a copy of another namespace's root).
fn namespace_root(table: &[Entry]) -> Option<&Entry> {
    table
        .iter()
        .find(|e| e.parent == e.id || !table.iter().any(|p| p.id == e.parent))
}

/// For each place at or under `under` where `mountinfo` has a mount, relative to
/// `under`: the id and flags of the uppermost one (the last listed; [`set_flags`] checks
/// that it is the one a path reaches).
fn uppermost(mountinfo: &[u8], under: &Path) -> std::collections::BTreeMap<PathBuf, (u64, u64)> {
    entries(mountinfo)
        .into_iter()
        .filter_map(|e| {
            Some((
                e.point.strip_prefix(under).ok()?.to_owned(),
                (e.id, e.flags),
            ))
        })
        .collect()
}

/// The [`SYNCED`] flags a mount's options (`rw,nosuid,relatime`) name.
fn flags_of(options: &[u8]) -> u64 {
    options
        .split(|&b| b == b',')
        .map(|o| match o {
            b"ro" => libc::MOUNT_ATTR_RDONLY,
            b"nosuid" => libc::MOUNT_ATTR_NOSUID,
            b"nodev" => libc::MOUNT_ATTR_NODEV,
            b"noexec" => libc::MOUNT_ATTR_NOEXEC,
            b"nosymfollow" => libc::MOUNT_ATTR_NOSYMFOLLOW,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// A mount point as `mountinfo` writes it: space, tab, newline and backslash as octal
/// escapes (`\040`); any other byte (not UTF-8 either) as it is.
fn unescape(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |n, b| n.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    const TABLE: &[u8] = b"\
1 0 0:2 / / rw - rootfs rootfs rw
41 1 0:40 /a/rootfs /c/a/rootfs ro,nosuid - virtiofs forkvm-pod rw
42 41 0:42 / /c/a/rootfs/proc rw,nosuid,nodev,noexec,relatime - proc proc rw
43 42 0:43 / /c/a/rootfs/proc rw,nosuid,nodev,noexec,relatime - proc proc rw
44 43 0:44 /sys /c/a/rootfs/proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
45 1 0:45 / /c/ab rw,nosymfollow - tmpfs tmpfs rw
46 1 0:46 / /c/a\\040b/\xff rw - tmpfs tmpfs rw
";

    #[test]
    fn a_mount_table_is_read_as_bytes() {
        let table = entries(TABLE);
        assert_eq!(table.len(), 7);
        assert_eq!(
            table[6],
            Entry {
                id: 46,
                parent: 1,
                point: PathBuf::from(OsStr::from_bytes(b"/c/a b/\xff")),
                flags: 0,
            }
        );
        assert_eq!(table[5].flags, libc::MOUNT_ATTR_NOSYMFOLLOW);
    }

    #[test]
    fn the_root_mount_is_its_own_parent_or_has_none_in_the_table() {
        assert_eq!(namespace_root(&entries(TABLE)).map(|e| e.id), Some(1));
        // The guest's initramfs: the root is its own parent.
        let guest = b"1 1 0:2 / / rw - rootfs rootfs rw\n7 1 0:7 / /run rw - tmpfs tmpfs rw\n";
        assert_eq!(namespace_root(&entries(guest)).map(|e| e.id), Some(1));
        assert!(namespace_root(&[]).is_none());
    }

    #[test]
    fn the_uppermost_mount_of_each_place_gives_its_flags() {
        let got = uppermost(TABLE, Path::new("/c/a/rootfs"));
        let all = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                (
                    PathBuf::from(""),
                    (41, libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID)
                ),
                (PathBuf::from("proc"), (43, all)),
                (
                    PathBuf::from("proc/sys"),
                    (44, libc::MOUNT_ATTR_RDONLY | all)
                ),
            ]
        );
    }

    #[test]
    fn mountinfo_escapes_are_read_back() {
        assert_eq!(unescape(br"/a\040b\011c"), OsStr::new("/a b\tc"));
        assert_eq!(unescape(br"/a\134b"), OsStr::new(r"/a\b"));
        // Not an escape: kept as it is.
        assert_eq!(unescape(br"/a\9b\04"), OsStr::new(r"/a\9b\04"));
        assert_eq!(unescape(br"\777"), OsStr::from_bytes(&[0o777u16 as u8]));
    }
}
