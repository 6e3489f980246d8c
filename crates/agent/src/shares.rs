//! Host directories shared into the container: each virtio-fs device (by its tag)
//! mounted where the container expects it ([`forkvm_agent_proto::Request::Mount`]).
//!
//! A target is resolved inside the container's root as the container would see it:
//! `openat2` with `RESOLVE_IN_ROOT` makes absolute symlinks and `..` on the way stay
//! under the root (an image cannot point a mount at the guest's own files), missing
//! directories are created, and the mount goes onto the resolved directory through its
//! file descriptor, so nothing can swap the path between the check and the mount.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use forkvm_agent_proto::{ShareMount, MAX_SHARES};
use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Mounts every share in order; the first failure stops it, naming the share.
pub fn mount_all(root: &Path, shares: &[ShareMount]) -> Result<(), String> {
    if shares.len() > MAX_SHARES {
        return Err(format!(
            "{} shares: at most {MAX_SHARES} are allowed",
            shares.len()
        ));
    }
    let root_fd = open_root(root)?;
    for share in shares {
        mount_one(&root_fd, share)
            .map_err(|e| format!("share {:?} at {}: {e}", share.tag, share.target))?;
    }
    Ok(())
}

/// The container's root, to resolve paths in with `RESOLVE_IN_ROOT`.
pub(crate) fn open_root(root: &Path) -> Result<OwnedFd, String> {
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the container root {}: {e}", root.display()))
}

/// Mounts `share` at its target in the root (see [`mount_all`]).
pub(crate) fn mount_one(root: &OwnedFd, share: &ShareMount) -> Result<(), String> {
    check_tag(&share.tag)?;
    let dir = resolve_dir(root, &share.target)?;
    if crate::mounts::same_file(&dir, root) {
        // A share over the whole root would hide it (and stack on its mount).
        return Err("the target resolves to the container's root".into());
    }
    mount_virtiofs(&share.tag, &crate::mounts::fd_path(&dir), share.read_only)
}

/// A virtio-fs tag is 1 to 36 bytes without NUL (the device's field).
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > 36 || tag.contains('\0') {
        return Err("the tag must be 1 to 36 bytes without NUL".into());
    }
    Ok(())
}

/// Mounts the VMM's share `tag` at `target`; the error says what is missing.
pub(crate) fn mount_virtiofs(tag: &str, target: &CStr, read_only: bool) -> Result<(), String> {
    let source = CString::new(tag).map_err(|e| e.to_string())?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    crate::mounts::mount(Some(&source), target, Some(c"virtiofs"), flags, None).map_err(|e| {
        // virtio-fs answers an unknown tag with EINVAL; without the driver the
        // filesystem type is unknown (ENODEV).
        match e.raw_os_error() {
            Some(libc::EINVAL) => format!("the VM has no shared directory with this tag ({e})"),
            Some(libc::ENODEV) => "the guest has no virtiofs driver loaded".into(),
            _ => format!("mount failed: {e}"),
        }
    })
}

/// The share `tag`, mounted read-write at `base/TAG` unless something is mounted there
/// already (an earlier call's share): app container roots and volume directories come
/// from such shares, each bound where it goes, so the share itself stays outside every
/// container's root.
pub(crate) fn mounted(base: &Path, tag: &str) -> Result<PathBuf, String> {
    check_tag(tag).map_err(|e| format!("share {tag:?}: {e}"))?;
    // One caller at a time looks and mounts: two would stack two mounts.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    // The tag names a directory.
    if tag.contains(['/', '\\']) || tag.contains(char::is_whitespace) || tag == "." || tag == ".." {
        return Err(format!(
            "share {tag:?}: a share to bind from is one whose tag is a file name"
        ));
    }
    let at = base.join(tag);
    std::fs::create_dir_all(&at).map_err(|e| format!("cannot make {}: {e}", at.display()))?;
    let dev = |p: &Path| rustix::fs::lstat(p).map(|st| st.st_dev);
    let is_mount = match (dev(base), dev(&at)) {
        (Ok(b), Ok(a)) => a != b,
        (Err(e), _) | (_, Err(e)) => return Err(format!("cannot stat {}: {e}", at.display())),
    };
    if !is_mount {
        let target = CString::new(at.as_os_str().as_encoded_bytes()).expect("no NUL");
        mount_virtiofs(tag, &target, false).map_err(|e| format!("share {tag:?}: {e}"))?;
    }
    Ok(at)
}

/// Longest `PATH` of a volume's `TAG/PATH` source.
const MAX_SHARE_PATH: usize = 4096;

/// A volume's source: a share's tag, and the directory inside it to bind (`TAG/PATH`,
/// PATH relative, of plain names), or `None` for the whole share (a bare `TAG`).
pub(crate) fn volume_source(source: &str) -> Result<(&str, Option<&str>), String> {
    let Some((tag, path)) = source.split_once('/') else {
        check_tag(source)?;
        return Ok((source, None));
    };
    check_tag(tag)?;
    let plain = |n: &str| !matches!(n, "" | "." | "..") && !n.contains('\0');
    if path.len() > MAX_SHARE_PATH || !path.split('/').all(plain) {
        return Err(format!(
            "the source is not TAG/PATH with PATH a relative path of plain names \
             (at most {MAX_SHARE_PATH} bytes)"
        ));
    }
    Ok((tag, Some(path)))
}

/// Binds directory `path` of the share `tag` (mounted under `base`, see [`mounted`]) at
/// `destination` in `root` (resolved as [`resolve_dir`] does), then applies `flags`
/// (`MS_RDONLY`, `MS_NOSUID`, ...) to the bind. The path is resolved beneath the share
/// without following any link, so what is in the share cannot point the bind elsewhere.
/// The guest's mount table shows the bind's root as `/PATH`, as a host's shows the path
/// of a directory it binds.
pub(crate) fn bind_from_share(
    base: &Path,
    (tag, path): (&str, &str),
    root: &OwnedFd,
    destination: &str,
    flags: libc::c_ulong,
) -> Result<(), String> {
    let share = mounted(base, tag)?;
    let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let share_fd =
        rustix::fs::open(&share, dir, Mode::empty()).map_err(|e| format!("share {tag:?}: {e}"))?;
    let source = openat2(
        &share_fd,
        path,
        dir,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| format!("{path} in share {tag:?}: {e}"))?;
    let target = resolve_dir(root, destination)?;
    if crate::mounts::same_file(&target, root) {
        return Err("the destination resolves to the container's root".into());
    }
    crate::mounts::mount(
        Some(&crate::mounts::fd_path(&source)),
        &crate::mounts::fd_path(&target),
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(|e| format!("bind: {e}"))?;
    if flags != 0 {
        // A bind takes its flags from a remount of itself: the destination again, now
        // the bind's root.
        let now = resolve_dir(root, destination)?;
        crate::mounts::mount(
            None,
            &crate::mounts::fd_path(&now),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            None,
        )
        .map_err(|e| format!("remount: {e}"))?;
    }
    Ok(())
}

/// The directory `target` (absolute) names inside `root`, created where missing.
pub(crate) fn resolve_dir(root: &OwnedFd, target: &str) -> Result<OwnedFd, String> {
    if !target.starts_with('/') {
        return Err("the target is not an absolute path".into());
    }
    let mut done = PathBuf::from(".");
    for comp in target.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let next = done.join(comp);
        match open_in_root(root, &next) {
            Ok(_) => {}
            Err(Errno::NOENT) => {
                let parent = open_in_root(root, &done)
                    .map_err(|e| format!("cannot open {}: {e}", done.display()))?;
                match rustix::fs::mkdirat(&parent, comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(format!("cannot create {}: {e}", next.display())),
                }
            }
            Err(Errno::NOTDIR) => {
                return Err(format!("{} is not a directory", next.display()));
            }
            Err(e) => return Err(format!("cannot open {}: {e}", next.display())),
        }
        done = next;
    }
    open_in_root(root, &done).map_err(|e| format!("cannot open the target: {e}"))
}

/// `path` (relative) under `root`, resolved as if `root` were `/`.
fn open_in_root(root: &OwnedFd, path: &Path) -> rustix::io::Result<OwnedFd> {
    openat2(
        root,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mounts::fd_path;

    fn root_fd(dir: &Path) -> OwnedFd {
        rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    fn resolved(root: &OwnedFd) -> impl Fn(&str) -> Result<PathBuf, String> + '_ {
        move |target| {
            let fd = resolve_dir(root, target)?;
            Ok(std::fs::read_link(fd_path(&fd).to_str().unwrap()).unwrap())
        }
    }

    #[test]
    fn targets_resolve_inside_the_root_and_missing_directories_appear() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("rootfs");
        std::fs::create_dir_all(root.join("var")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        // An image's absolute symlink, and one that tries to climb out.
        std::os::unix::fs::symlink("/run", root.join("var/run")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        std::fs::write(root.join("file"), "x").unwrap();
        let fd = root_fd(&root);
        let at = resolved(&fd);

        assert_eq!(at("/data/deep").unwrap(), root.join("data/deep"));
        assert!(root.join("data/deep").is_dir());
        assert_eq!(at("/var/run/app").unwrap(), root.join("run/app"));
        assert_eq!(at("/up/escaped").unwrap(), root.join("escaped"));
        assert_eq!(at("/../../x").unwrap(), root.join("x"));
        assert!(!outer.path().join("escaped").exists());
        assert_eq!(at("/").unwrap(), root);

        assert!(at("relative").unwrap_err().contains("not an absolute path"));
        assert!(at("/file/below").unwrap_err().contains("not a directory"));
    }

    #[test]
    fn bad_requests_name_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let share = |tag: &str, target: &str| ShareMount {
            tag: tag.into(),
            target: target.into(),
            read_only: false,
        };
        let e = mount_all(dir.path(), &[share("", "/a")]).unwrap_err();
        assert!(
            e.contains("share \"\" at /a") && e.contains("1 to 36 bytes"),
            "{e}"
        );
        let e = mount_all(dir.path(), &[share("t", "rel")]).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        let many = vec![share("t", "/a"); MAX_SHARES + 1];
        assert!(mount_all(dir.path(), &many)
            .unwrap_err()
            .contains("at most 64"));
    }
}
