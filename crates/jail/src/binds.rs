//! Binds of host files and directory trees, attached by handle: what the OCI runtime
//! binds for a VM to share (a whole tree, read-only from the moment it is attached where
//! the volume is, and a slave of the source's mounts), and the places of a VM process's
//! minimal root ([`crate::root`]).
//!
//! A bind made with `mount(2)` and then remounted read-only is read-only only in the
//! namespace that remounted it: a copy that mount propagation already took (into the
//! namespace of a pod's VM process, say) keeps the flags the bind had when it was
//! made. So the tree is cloned detached (`open_tree`), made read-only there, all of
//! it (`mount_setattr`), and only then attached (`move_mount`): every copy that
//! propagation makes then is read-only. (A mount the host makes under the source
//! later arrives with its own flags, as it does in a runc container's `rslave` bind.)
//!
//! The clone is made a **slave** in the same call: a recursive clone of a shared mount
//! (most host mounts under systemd, kubelet's volumes) would otherwise join its
//! original's peer groups, and detaching the clone later (`umount -l`) would unmount
//! the mounts under the source on the host too.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

/// A handle on the directory `path` to bind onto, which must not be a symlink.
pub fn target_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Binds the directory tree at `source` (its mounts below included, each a slave of
/// its original) onto the directory `target` (a handle: nothing can swap the path for
/// a link between its check and the bind); read-only throughout where `read_only`.
pub fn bind_tree(source: &Path, target: impl AsFd, read_only: bool) -> std::io::Result<()> {
    let tree = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?;
    let attr = match read_only {
        true => libc::MOUNT_ATTR_RDONLY,
        false => 0,
    };
    attach(tree, target, attr)
}

/// Binds what `source` (a handle) is, a file or a directory (with the mounts below it
/// when `recursive`, each a slave of its original), onto `target` (a handle on a file or
/// directory of the same kind), with the `MOUNT_ATTR_*` flags `attr` set on every mount
/// of it before it is attached.
pub fn bind_handle(
    source: impl AsFd,
    target: impl AsFd,
    recursive: bool,
    attr: u64,
) -> std::io::Result<()> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    attach(open_tree(source, "", flags)?, target, attr)
}

/// Sets `attr` and slave propagation on every mount of the detached tree `tree`, then
/// attaches it on `target`.
fn attach(tree: OwnedFd, target: impl AsFd, attr: u64) -> std::io::Result<()> {
    set_attr(&tree, attr, libc::MS_SLAVE)?;
    move_onto(&tree, target)
}

/// Attaches the detached mount `mount` (a clone, or a new file system's) on `target`,
/// both handles: no path is resolved again.
pub fn move_onto(mount: impl AsFd, target: impl AsFd) -> std::io::Result<()> {
    move_mount(
        mount,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// `mount_setattr` on every mount under the mount `mount` (a handle on its root): the
/// `MOUNT_ATTR_*` flags `attr` set, and `propagation` (an `MS_*` type; 0 keeps it).
pub fn set_attr(mount: impl AsFd, attr: u64, propagation: u64) -> std::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attr,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size` bytes of `attr`, which lives on this stack
    // frame for the call; the path is a static empty C string (AT_EMPTY_PATH: the mount
    // of the handle itself), and no memory is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// [`bind_tree`] onto the directory `target`, in a mount namespace that propagates
/// nowhere (a container's monitor's: a slave of the host's, shared with nobody). Where
/// the kernel lacks the calls [`bind_tree`] makes (`open_tree` and `move_mount` came in
/// Linux 5.2, `mount_setattr` in 5.12), a recursive bind then remounted read-only at its
/// top does here: no copy of it can keep other flags, and detaching it reaches no peer
/// of the source's.
pub fn bind_tree_unshared(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    match bind_tree(source, target_dir(target)?, read_only) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            tracing::debug!("no mount_setattr: a recursive bind of {}", source.display());
            bind_tree_legacy(source, target, read_only)
        }
        other => other,
    }
}

/// A recursive bind of `source` at `target`, remounted read-only (its top) where
/// `read_only`: see [`bind_tree_unshared`].
fn bind_tree_legacy(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    rustix::mount::mount_bind_recursive(source, target)?;
    if read_only {
        rustix::mount::mount_remount(
            target,
            rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
            "",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the new mount calls, a recursive bind stands in, read-only at its top.
    #[test]
    fn the_legacy_bind_binds_the_tree_read_only() {
        forkvm_test_support::in_own_mounts(|top| {
            let source = top.join("source");
            std::fs::create_dir_all(&source).unwrap();
            std::fs::write(source.join("f"), "source's").unwrap();
            let target = top.join("target");
            std::fs::create_dir(&target).unwrap();
            bind_tree_legacy(&source, &target, true).unwrap();
            assert_eq!(
                std::fs::read_to_string(target.join("f")).unwrap(),
                "source's"
            );
            let e = std::fs::write(target.join("g"), "refused").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
        });
    }

    /// Detaching a bound tree (as a pod container's delete does) leaves the mounts
    /// under a shared source in place on the host.
    #[test]
    fn detaching_a_bound_tree_leaves_the_sources_mounts() {
        forkvm_test_support::in_own_mounts(|top| {
            let source = top.join("source");
            let sub = source.join("sub");
            std::fs::create_dir_all(&sub).unwrap();
            rustix::mount::mount_bind(&source, &source).unwrap();
            rustix::mount::mount_change(&source, rustix::mount::MountPropagationFlags::SHARED)
                .unwrap();
            rustix::mount::mount(
                "tmpfs",
                &sub,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .unwrap();
            std::fs::write(sub.join("f"), "host's").unwrap();
            let target = top.join("target");
            std::fs::create_dir(&target).unwrap();
            bind_tree(&source, target_dir(&target).unwrap(), false).unwrap();
            assert_eq!(
                std::fs::read_to_string(target.join("sub/f")).unwrap(),
                "host's"
            );
            rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
            assert_eq!(
                std::fs::read_to_string(sub.join("f")).unwrap(),
                "host's",
                "the source's mount went with the bind"
            );
            rustix::mount::unmount(&sub, rustix::mount::UnmountFlags::DETACH).unwrap();
            rustix::mount::unmount(&source, rustix::mount::UnmountFlags::DETACH).unwrap();
        });
    }

    /// A read-only bind is read-only in a namespace it propagates to as well (a
    /// remount after the bind would not be), and so are the mounts below its source.
    #[test]
    fn a_read_only_tree_is_read_only_wherever_it_propagates() {
        forkvm_test_support::in_own_mounts(|top| {
            let source = top.join("source");
            let inner = source.join("inner");
            std::fs::create_dir_all(&inner).unwrap();
            rustix::mount::mount(
                "tmpfs",
                &inner,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .unwrap();
            let shared = top.join("shared");
            std::fs::create_dir(&shared).unwrap();
            rustix::mount::mount_bind(&shared, &shared).unwrap();
            rustix::mount::mount_change(&shared, rustix::mount::MountPropagationFlags::SHARED)
                .unwrap();
            // A peer of `shared`, as a pod VM process's namespace holds one.
            let peer = top.join("peer");
            std::fs::create_dir(&peer).unwrap();
            rustix::mount::mount_bind(&shared, &peer).unwrap();
            let (ro, rw) = (shared.join("ro"), shared.join("rw"));
            std::fs::create_dir(&ro).unwrap();
            std::fs::create_dir(&rw).unwrap();
            bind_tree(&source, target_dir(&ro).unwrap(), true).unwrap();
            bind_tree(&source, target_dir(&rw).unwrap(), false).unwrap();
            // A link is not a target.
            let link = shared.join("link");
            std::os::unix::fs::symlink(&rw, &link).unwrap();
            assert_eq!(
                target_dir(&link).unwrap_err().raw_os_error(),
                Some(libc::ENOTDIR)
            );
            std::fs::write(rw.join("inner/f"), "written").unwrap();
            assert_eq!(std::fs::read_to_string(inner.join("f")).unwrap(), "written");
            for dir in [&ro, &peer.join("ro")] {
                for file in [dir.join("f"), dir.join("inner/g")] {
                    let e = std::fs::write(&file, "refused").unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{}", file.display());
                }
                assert_eq!(
                    std::fs::read_to_string(dir.join("inner/f")).unwrap(),
                    "written"
                );
            }
            let detach =
                |p: &Path| rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH).unwrap();
            detach(&peer);
            detach(&shared);
            detach(&inner);
        });
    }
}
