//! A Kubernetes pod on the host: one VM per pod sandbox, and the directory through
//! which the pod's containers' roots reach it.
//!
//! containerd's CRI says what a container is to a pod with annotations
//! ([`crate::bundle::PodRole`]). The sandbox (the pause container) boots the pod's VM
//! with one more virtio-fs share, [`POD_SHARE_TAG`], of the pod directory
//! ([`pod_dir`]: `<runtime root>/@pods/<sandbox id>`), prepared by [`prepare`] before
//! the sandbox's monitor starts: a small tmpfs of its own (the guest writes there, and
//! fills no more than [`POD_TMPFS`] of the host), **shared**, so that what is mounted
//! under it later in the runtime's mount namespace also appears in the monitor's and
//! its VM process's (slaves of it, see `runtime::create`). A pod's container is then
//! made inside the running VM: its root filesystem is bound at
//! `<pod dir>/<container id>/rootfs` ([`bind_member_root`]), and the guest agent makes
//! the container from that directory of the share. The host files the container binds
//! (CRI's `/etc/hosts`, `/etc/resolv.conf`, ...) are copied to the top of the pod
//! directory as `<container id>@<n>` ([`copy_member_file`]), where the agent takes a
//! share's files by `TAG/NAME`; the host directories it binds are bound at
//! `<container id>/volumes/<n>/<name>` ([`bind_member_volume`]).
//!
//! Nothing here ever removes a directory recursively: a pod directory holds the
//! containers' roots and volumes, bound in, and a recursive removal through a bind
//! would remove the host's files. [`release`] detaches the whole mount first and then
//! removes the directory. The guest writes in the pod directory (a compromised one
//! could plant symlinks there, or move a directory that holds a bind), so what lies in
//! it is reached from a handle on the directory, never through a symlink, out of it or
//! across a mount (`openat2` with `RESOLVE_BENEATH`, `RESOLVE_NO_SYMLINKS` and
//! `RESOLVE_NO_XDEV`), and made, bound, unmounted and removed through such handles.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// The tag of the pod VM's share of its pod directory.
pub const POD_SHARE_TAG: &str = "forkvm-pod";

/// The directory under the runtime's root that holds the pod directories: a name no
/// container id can have (`@`), so that no container's state directory is it.
const PODS_DIR: &str = "@pods";

/// The pod directory's own filesystem: what the pod's guest may write there beside the
/// containers' binds, and the copies of the files they bind (their sum is bounded by
/// it), in memory, never more than this.
pub const POD_TMPFS: &std::ffi::CStr = c"size=64m,nr_inodes=16384,mode=0700";

/// The name of a pod container's root directory inside its directory of the pod.
const ROOTFS: &str = "rootfs";

/// The name of the directory holding a pod container's volumes inside its directory of
/// the pod: `volumes/<i>/<name>` is its `i`th.
const VOLUMES: &str = "volumes";

/// The name a volume without one of its own ([`crate::vm::Volume::name_in_share`]) has
/// in the pod directory.
const UNNAMED_VOLUME: &str = "volume";

/// Why a pod's directory or a container's root in it could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A file system call failed.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox's pod directory is not the shared mount [`prepare`] makes.
    #[error(
        "the pod directory {} is not mounted: the pod's sandbox was not created by this \
         runtime version, or its directory was unmounted",
        .0.display()
    )]
    NotPrepared(PathBuf),
    /// Something is already where the container's root would go.
    #[error("{} exists already (a container of that id is in the pod)", .0.display())]
    Exists(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PodError + 'a {
    move |source| PodError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The pod directory of sandbox `sandbox` under the runtime's state root `root`.
pub fn pod_dir(root: &Path, sandbox: &str) -> PathBuf {
    root.join(PODS_DIR).join(sandbox)
}

/// Where a pod container's root is bound: relative to the pod directory (the path the
/// guest agent resolves inside the pod share), and on the host.
pub fn member_root(pod: &Path, id: &str) -> (String, PathBuf) {
    (format!("{id}/{ROOTFS}"), pod.join(id).join(ROOTFS))
}

/// The name of container `id`'s `i`th bound file at the top of the pod directory (`@`
/// is in no container id, so no two containers' names meet).
pub fn member_file(id: &str, i: usize) -> String {
    format!("{id}@{i}")
}

/// The guest agent's source for container `id`'s bound file whose source in a container
/// VM of its own would be `files_source` ([`crate::vm::FILES_TAG`]`/<i>`): that file in
/// the pod share.
pub fn member_file_source(id: &str, files_source: &str) -> Option<String> {
    let i = files_source
        .strip_prefix(crate::vm::FILES_TAG)?
        .strip_prefix('/')?
        .parse()
        .ok()?;
    Some(format!("{POD_SHARE_TAG}/{}", member_file(id, i)))
}

/// Copies the host file `source` as container `id`'s `i`th bound file into the pod
/// directory `pod`, with its mode and owner: a new file, made from a handle on the
/// directory (never through a symlink the guest may have put there).
pub fn copy_member_file(pod: &Path, id: &str, i: usize, source: &Path) -> Result<(), PodError> {
    use std::os::unix::fs::MetadataExt;
    let name = member_file(id, i);
    let target = pod.join(&name);
    let pod_fd = open_dir(pod).ok_or_else(|| PodError::NotPrepared(pod.to_owned()))?;
    let mut from = std::fs::File::open(source).map_err(io("cannot read", source))?;
    let meta = from.metadata().map_err(io("cannot read", source))?;
    let to = rustix::fs::openat(
        &pod_fd,
        name.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::EXIST => PodError::Exists(target.clone()),
        e => io("cannot make", &target)(e.into()),
    })?;
    let mut to = std::fs::File::from(to);
    std::io::copy(&mut from, &mut to)
        .and_then(|_| {
            rustix::fs::fchown(
                &to,
                Some(rustix::fs::Uid::from_raw(meta.uid())),
                Some(rustix::fs::Gid::from_raw(meta.gid())),
            )
            .map_err(Into::into)
        })
        .and_then(|()| {
            rustix::fs::fchmod(&to, Mode::from_raw_mode(meta.mode() & 0o7777)).map_err(Into::into)
        })
        .map_err(io("cannot copy the bound file into", &target))
}

/// Makes sandbox `sandbox`'s pod directory under `root`: a new, empty directory (mode
/// 0700) with a small filesystem of its own ([`POD_TMPFS`]: the guest writes in it, and
/// may fill no more than that), made a shared mount. Call it before the sandbox's
/// monitor makes its mount namespace.
pub fn prepare(root: &Path, sandbox: &str) -> Result<PathBuf, PodError> {
    let pods = root.join(PODS_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&pods)
        .map_err(io("cannot make", &pods))?;
    let dir = pod_dir(root, sandbox);
    make_new_dir(&dir)?;
    // A peer group of its own (private, then shared): the binds made in it later reach
    // the namespaces made from this one after now (the monitor's), not every namespace
    // that shares the mount the runtime's root is on.
    let made = rustix::mount::mount(
        "forkvm-pod",
        &dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(POD_TMPFS),
    )
    .and_then(|()| rustix::mount::mount_change(&dir, MountPropagationFlags::PRIVATE))
    .and_then(|()| rustix::mount::mount_change(&dir, MountPropagationFlags::SHARED))
    .map_err(|e| io("cannot make a shared mount of", &dir)(e.into()));
    if let Err(e) = made {
        release(root, sandbox);
        return Err(e);
    }
    Ok(dir)
}

/// Binds `rootfs` (recursively) at container `id`'s root in the pod directory `pod`,
/// which must be the shared mount [`prepare`] made. Returns the root's path relative to
/// the pod directory.
pub fn bind_member_root(pod: &Path, id: &str, rootfs: &Path) -> Result<String, PodError> {
    if !is_mount_point(pod) {
        return Err(PodError::NotPrepared(pod.to_owned()));
    }
    let (relative, target) = member_root(pod, id);
    new_dir_beneath(pod, id, 0o700)?;
    let bound = new_dir_beneath(pod, &relative, 0o755).and_then(|dir| {
        forkvm_jail::binds::bind_tree(rootfs, dir, false)
            .map_err(io("cannot bind the container's root at", &target))
    });
    if let Err(e) = bound {
        unbind_member_root(pod, id);
        return Err(e);
    }
    Ok(relative)
}

/// Where container `id`'s `i`th volume is bound, relative to the pod directory (the
/// path the guest agent binds from the pod share): `<id>/volumes/<i>/<name>`, named as
/// the host directory is, so that the container's mount table shows the name.
pub fn member_volume(id: &str, i: usize, volume: &crate::vm::Volume) -> String {
    let name = volume.name_in_share().unwrap_or(UNNAMED_VOLUME);
    format!("{id}/{VOLUMES}/{i}/{name}")
}

/// Binds container `id`'s `i`th volume (recursively; read-only throughout where it is,
/// in the pod VM's mount namespace too: see [`forkvm_jail::binds`]) at [`member_volume`] in
/// the pod directory `pod`, whose container directory [`bind_member_root`] made. The
/// directories on the way are made from handles, never through a link the guest may
/// have put in the pod directory.
pub fn bind_member_volume(
    pod: &Path,
    id: &str,
    i: usize,
    volume: &crate::vm::Volume,
) -> Result<(), PodError> {
    if !is_mount_point(pod) {
        return Err(PodError::NotPrepared(pod.to_owned()));
    }
    let relative = member_volume(id, i, volume);
    let volumes = format!("{id}/{VOLUMES}");
    match new_dir_beneath(pod, &volumes, 0o700) {
        Ok(_) | Err(PodError::Exists(_)) => {}
        Err(e) => return Err(e),
    }
    new_dir_beneath(pod, &format!("{volumes}/{i}"), 0o700)?;
    let target = new_dir_beneath(pod, &relative, 0o755)?;
    forkvm_jail::binds::bind_tree(&volume.host, target, volume.read_only)
        .map_err(io("cannot bind the volume at", &pod.join(&relative)))
}

/// Makes the directory `relative` (its parent must be there) beneath the pod directory
/// `pod`, new, with `mode`, and returns a handle on it; reached from a handle on the
/// pod directory without following a link.
fn new_dir_beneath(pod: &Path, relative: &str, mode: u32) -> Result<OwnedFd, PodError> {
    let shown = pod.join(relative);
    let pod_fd = open_dir(pod).ok_or_else(|| PodError::NotPrepared(pod.to_owned()))?;
    let (parent, name) = match relative.rsplit_once('/') {
        Some((parent, name)) => (
            beneath_dir(&pod_fd, parent).ok_or_else(|| {
                io("cannot open", &pod.join(parent))(std::io::Error::other("missing, or a link"))
            })?,
            name,
        ),
        None => (pod_fd, relative),
    };
    match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => return Err(PodError::Exists(shown)),
        Err(e) => return Err(io("cannot make", &shown)(e.into())),
    }
    beneath_dir(&parent, name)
        .ok_or_else(|| io("cannot open", &shown)(std::io::Error::other("gone, or a link")))
}

/// Detaches container `id`'s root from the pod directory `pod` and removes the
/// directories [`bind_member_root`] made (only if empty once detached), reaching them
/// from the pod directory without following symlinks.
pub fn unbind_member_root(pod: &Path, id: &str) {
    let Some(pod_fd) = open_dir(pod) else {
        return;
    };
    let detach = |parent: &OwnedFd, name: &str| {
        if let Some(bound) = mount_root(parent, name) {
            // The mount the handle is on (the bind), with everything in it.
            let _ = rustix::mount::unmount(
                format!("/proc/thread-self/fd/{}", bound.as_raw_fd()),
                UnmountFlags::DETACH,
            );
        }
    };
    if let Some(member) = beneath_dir(&pod_fd, id) {
        detach(&member, ROOTFS);
        // Its volumes, each detached with what is mounted in it.
        if let Some((volumes, slots)) = listed(&member, VOLUMES) {
            for slot in slots {
                let Some((slot_fd, names)) = listed(&volumes, &slot) else {
                    continue;
                };
                for name in names {
                    detach(&slot_fd, &name);
                }
            }
        }
    }
    remove_member_dirs(&pod_fd, id, pod);
    // Its bound files.
    let prefix = format!("{id}@");
    for name in names(pod) {
        if name.starts_with(&prefix) {
            remove_file_at(&pod_fd, &name, pod);
        }
    }
}

/// The names in the directory `dir` that are UTF-8.
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Removes the file (or symlink, not followed) `name` in `dir`; what cannot be is left,
/// with a warning naming it under `shown`.
fn remove_file_at(dir: &OwnedFd, name: &str, shown: &Path) {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!("{} left in place: {e}", shown.join(name).display()),
    }
}

/// Detaches sandbox `sandbox`'s pod directory under `root`, with every root still bound
/// in it, and removes the directories this module made there (only if empty once
/// detached). Safe to call for a sandbox that has none.
pub fn release(root: &Path, sandbox: &str) {
    let dir = pod_dir(root, sandbox);
    if !dir.exists() {
        return;
    }
    let _ = rustix::mount::unmount(&dir, UnmountFlags::DETACH);
    if is_mount_point(&dir) || has_mounts_under(&dir) {
        tracing::warn!(
            "the pod directory {} still has mounts: left in place",
            dir.display()
        );
        return;
    }
    let Some(pod_fd) = open_dir(&dir) else {
        return;
    };
    for name in names(&dir) {
        // A container's bound file, or its directory.
        if name.contains('@') {
            remove_file_at(&pod_fd, &name, &dir);
            continue;
        }
        remove_member_dirs(&pod_fd, &name, &dir);
    }
    drop(pod_fd);
    if let Err(e) = std::fs::remove_dir(&dir) {
        tracing::warn!("{} left in place: {e}", dir.display());
    }
}

/// A handle on the directory `path` (not followed if it is a symlink).
fn open_dir(path: &Path) -> Option<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// A handle on the directory `relative` beneath the directory `dir`, reached without a
/// symlink and without crossing into a mount (the guest writes in the pod directory and
/// may rename a directory holding a bind to where the runtime looks): a link there, a
/// mount on the way, or anything but a directory gives none.
fn beneath_dir(dir: &OwnedFd, relative: &str) -> Option<OwnedFd> {
    openat2(
        dir,
        relative,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .ok()
}

/// A handle on the directory `name` (one name) in `dir`, the root of what is mounted
/// there if anything is: a bind to detach. Not a link.
fn mount_root(dir: &OwnedFd, name: &str) -> Option<OwnedFd> {
    if name.contains('/') {
        return None;
    }
    openat2(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()
}

/// A handle on the directory `relative` beneath `dir` (reached as [`beneath_dir`]
/// reaches it), with the UTF-8 names in it.
fn listed(dir: &OwnedFd, relative: &str) -> Option<(OwnedFd, Vec<String>)> {
    let handle = beneath_dir(dir, relative)?;
    let listing = openat2(
        &handle,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_XDEV,
    )
    .ok()?;
    let names = rustix::fs::Dir::read_from(&listing)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
        .filter(|n| n != "." && n != "..")
        .collect();
    Some((handle, names))
}

/// Removes container `id`'s directories in the pod directory (a handle, `shown` in
/// warnings) that are empty: its root's, its volumes', its own. Its mounts must be
/// detached first.
fn remove_member_dirs(pod_fd: &OwnedFd, id: &str, shown: &Path) {
    if let Some(member) = beneath_dir(pod_fd, id) {
        let shown = shown.join(id);
        remove_empty_at(&member, ROOTFS, &shown);
        if let Some((volumes, slots)) = listed(&member, VOLUMES) {
            let shown = shown.join(VOLUMES);
            for slot in slots {
                if let Some((slot_fd, names)) = listed(&volumes, &slot) {
                    for name in names {
                        remove_empty_at(&slot_fd, &name, &shown.join(&slot));
                    }
                }
                remove_empty_at(&volumes, &slot, &shown);
            }
        }
        remove_empty_at(&member, VOLUMES, &shown);
    }
    remove_empty_at(pod_fd, id, shown);
}

/// Removes the directory `name` in `dir` if it is empty; anything else is left, with a
/// warning naming it under `shown`.
fn remove_empty_at(dir: &OwnedFd, name: &str, shown: &Path) {
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!("{} left in place: {e}", shown.join(name).display()),
    }
}

/// Makes the directory `dir` (mode 0700), which must not exist yet.
fn make_new_dir(dir: &Path) -> Result<(), PodError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PodError::Exists(dir.to_owned()),
            _ => io("cannot make", dir)(e),
        })
}

/// The mount points of this thread's mount namespace (`/proc/thread-self/mountinfo`,
/// read as bytes, with its octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read("/proc/thread-self/mountinfo").unwrap_or_default();
    text.split(|&b| b == b'\n')
        .filter_map(|l| l.split(|&b| b == b' ').nth(4))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(p))))
        .collect()
}

/// `\NNN` octal escapes (space, tab, newline, backslash) undone.
fn unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let n = u16::from(d[0] - b'0') * 64
                    + u16::from(d[1] - b'0') * 8
                    + u16::from(d[2] - b'0');
                out.push(n as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Whether something is mounted at `path` (resolved) in this mount namespace.
fn is_mount_point(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    mount_points().contains(&path)
}

/// Whether something is mounted anywhere below `path` (resolved).
fn has_mounts_under(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    mount_points()
        .iter()
        .any(|m| m != &path && m.starts_with(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/a\040b\011c\134d"), b"/a b\tc\\d");
        assert_eq!(unescape(br"/plain"), b"/plain");
        assert_eq!(unescape(br"/cut\04"), b"/cut\\04");
    }

    #[test]
    fn a_bound_root_is_seen_in_the_pod_and_survives_its_release() {
        forkvm_test_support::in_own_mounts(|tmp| {
            let root = tmp.join("state");
            let rootfs = tmp.join("bundle-rootfs");
            std::fs::create_dir_all(rootfs.join("bin")).unwrap();
            std::fs::write(rootfs.join("bin/app"), "the app").unwrap();

            let pod = prepare(&root, "sb").unwrap();
            assert!(is_mount_point(&pod));
            assert!(matches!(prepare(&root, "sb"), Err(PodError::Exists(_))));
            let rel = bind_member_root(&pod, "app", &rootfs).unwrap();
            assert_eq!(rel, "app/rootfs");
            assert_eq!(
                std::fs::read_to_string(pod.join("app/rootfs/bin/app")).unwrap(),
                "the app"
            );
            // Bound files are copied to the top of the pod, with their mode.
            let hosts = tmp.join("hosts");
            std::fs::write(&hosts, "10.0.0.9 peer\n").unwrap();
            std::fs::set_permissions(&hosts, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                .unwrap();
            copy_member_file(&pod, "app", 0, &hosts).unwrap();
            let copy = pod.join("app@0");
            assert_eq!(std::fs::read_to_string(&copy).unwrap(), "10.0.0.9 peer\n");
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(&copy).unwrap().permissions()
                ) & 0o777,
                0o640
            );
            assert!(matches!(
                copy_member_file(&pod, "app", 0, &hosts),
                Err(PodError::Exists(_))
            ));
            assert_eq!(
                member_file_source("app", "forkvm-files/3").as_deref(),
                Some("forkvm-pod/app@3")
            );
            assert_eq!(member_file_source("app", "other/3"), None);
            // Writes through the pod land in the container's root.
            std::fs::write(pod.join("app/rootfs/made"), "x").unwrap();
            assert!(rootfs.join("made").exists());
            assert!(matches!(
                bind_member_root(&pod, "app", &rootfs),
                Err(PodError::Exists(_))
            ));

            // Releasing the pod with the root still bound takes nothing of the root.
            release(&root, "sb");
            assert!(!pod.exists(), "the pod directory is left");
            assert_eq!(
                std::fs::read_to_string(rootfs.join("bin/app")).unwrap(),
                "the app"
            );
            assert!(rootfs.join("made").exists());
            assert!(!has_mounts_under(tmp), "{:?}", mount_points());

            // One container's root unbound: its directories and files go, the root
            // stays, another container's file too.
            let pod = prepare(&root, "sb2").unwrap();
            bind_member_root(&pod, "a", &rootfs).unwrap();
            copy_member_file(&pod, "a", 0, &hosts).unwrap();
            copy_member_file(&pod, "a.0", 0, &hosts).unwrap();
            unbind_member_root(&pod, "a");
            assert!(!pod.join("a").exists());
            assert!(!pod.join("a@0").exists());
            assert!(pod.join("a.0@0").exists());
            assert!(rootfs.join("bin/app").exists());
            // A directory that is not a prepared pod is refused.
            let plain = tmp.join("plain");
            std::fs::create_dir(&plain).unwrap();
            assert!(matches!(
                bind_member_root(&plain, "a", &rootfs),
                Err(PodError::NotPrepared(_))
            ));
            release(&root, "sb2");
            assert!(!pod.exists());
        });
    }

    #[test]
    fn a_members_volumes_are_bound_in_the_pod_and_unbound_with_it() {
        forkvm_test_support::in_own_mounts(|tmp| {
            let root = tmp.join("state");
            let rootfs = tmp.join("bundle-rootfs");
            std::fs::create_dir_all(&rootfs).unwrap();
            let (data, conf) = (tmp.join("host/data"), tmp.join("host/conf"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(&conf).unwrap();
            std::fs::write(conf.join("token"), "secret").unwrap();
            let volumes = [
                crate::vm::Volume::new(&data, "/data", false).unwrap(),
                crate::vm::Volume::new(&conf, "/var/run/secrets", true).unwrap(),
            ];
            let pod = prepare(&root, "sb").unwrap();
            bind_member_root(&pod, "app", &rootfs).unwrap();
            for (i, v) in volumes.iter().enumerate() {
                bind_member_volume(&pod, "app", i, v).unwrap();
            }
            assert_eq!(member_volume("app", 0, &volumes[0]), "app/volumes/0/data");
            assert_eq!(member_volume("app", 1, &volumes[1]), "app/volumes/1/conf");
            let volume = |i| pod.join(member_volume("app", i, &volumes[i]));
            std::fs::write(volume(0).join("f"), "written").unwrap();
            assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "written");
            assert_eq!(
                std::fs::read_to_string(volume(1).join("token")).unwrap(),
                "secret"
            );
            let e = std::fs::write(volume(1).join("token"), "changed").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            assert!(matches!(
                bind_member_volume(&pod, "app", 0, &volumes[0]),
                Err(PodError::Exists(_))
            ));
            // The guest fills no more of the host than the pod directory's own
            // filesystem beside the binds; a volume is the host's directory.
            let big = vec![0u8; 1 << 20];
            let mut filler = std::fs::File::create(pod.join("filler")).unwrap();
            let filled = (0..80).try_for_each(|_| std::io::Write::write_all(&mut filler, &big));
            assert_eq!(filled.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
            drop(filler);
            std::fs::write(volume(0).join("big"), &big).unwrap();
            std::fs::remove_file(data.join("big")).unwrap();
            std::fs::remove_file(pod.join("filler")).unwrap();
            // What the guest adds beside a volume stays, and is not followed.
            std::os::unix::fs::symlink(&data, pod.join("app/volumes/0/planted")).unwrap();

            unbind_member_root(&pod, "app");
            assert!(!volume(1).exists() && !pod.join("app/rootfs").exists());
            assert!(pod.join("app/volumes/0/planted").is_symlink());
            assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "written");
            assert_eq!(
                std::fs::read_to_string(conf.join("token")).unwrap(),
                "secret"
            );
            assert!(!has_mounts_under(&pod), "{:?}", mount_points());

            // Released with its volumes still bound: nothing of them is taken.
            bind_member_root(&pod, "b", &rootfs).unwrap();
            bind_member_volume(&pod, "b", 0, &volumes[0]).unwrap();
            // A link the guest put where the volumes go is not made a directory of.
            bind_member_root(&pod, "c", &rootfs).unwrap();
            std::os::unix::fs::symlink(tmp.join("host"), pod.join("c/volumes")).unwrap();
            assert!(bind_member_volume(&pod, "c", 0, &volumes[0]).is_err());
            assert!(!tmp.join("host/0").exists());
            // A guest that moves a directory holding a bind to where the runtime looks
            // next (`d/volumes` is the bound host directory `volumes`) does not get
            // anything made or bound inside the host's directory.
            let named_volumes = tmp.join("host/volumes");
            std::fs::create_dir_all(&named_volumes).unwrap();
            let tricky = crate::vm::Volume::new(&named_volumes, "/v", false).unwrap();
            bind_member_root(&pod, "a2", &rootfs).unwrap();
            bind_member_volume(&pod, "a2", 0, &tricky).unwrap();
            bind_member_root(&pod, "d", &rootfs).unwrap();
            std::fs::rename(pod.join("d"), pod.join("d-away")).unwrap();
            std::fs::rename(pod.join("a2/volumes/0"), pod.join("d")).unwrap();
            assert!(bind_member_volume(&pod, "d", 0, &volumes[0]).is_err());
            assert!(
                std::fs::read_dir(&named_volumes).unwrap().next().is_none(),
                "made in the host's directory"
            );
            unbind_member_root(&pod, "d");
            assert!(named_volumes.exists() && !data.join("0").exists());
            rustix::mount::unmount(pod.join("d/volumes"), UnmountFlags::DETACH).unwrap();
            std::fs::remove_dir(pod.join("d/volumes")).unwrap();
            std::fs::remove_dir(pod.join("d")).unwrap();
            rustix::mount::unmount(pod.join("d-away/rootfs"), UnmountFlags::DETACH).unwrap();
            std::fs::remove_file(pod.join("app/volumes/0/planted")).unwrap();
            std::fs::remove_file(pod.join("c/volumes")).unwrap();
            release(&root, "sb");
            assert!(!pod.exists(), "the pod directory is left");
            assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "written");
            assert!(!has_mounts_under(tmp), "{:?}", mount_points());
        });
    }

    #[test]
    fn what_the_guest_plants_in_the_pod_leads_nothing_astray() {
        forkvm_test_support::in_own_mounts(|tmp| {
            let root = tmp.join("state");
            let rootfs = tmp.join("bundle-rootfs");
            std::fs::create_dir_all(&rootfs).unwrap();
            // A host mount elsewhere, and an empty directory, the guest would like gone.
            let victim = tmp.join("victim");
            std::fs::create_dir_all(victim.join("rootfs")).unwrap();
            rustix::mount::mount_bind(&rootfs, victim.join("rootfs")).unwrap();
            std::fs::create_dir_all(tmp.join("empty/rootfs")).unwrap();

            let pod = prepare(&root, "sb").unwrap();
            bind_member_root(&pod, "app", &rootfs).unwrap();
            bind_member_root(&pod, "other", &rootfs).unwrap();
            // A file the guest planted where a bound file's copy goes is not written
            // through.
            std::os::unix::fs::symlink(tmp.join("host-file"), pod.join("app@0")).unwrap();
            let hosts = tmp.join("hosts");
            std::fs::write(&hosts, "x").unwrap();
            assert!(matches!(
                copy_member_file(&pod, "app", 0, &hosts),
                Err(PodError::Exists(_))
            ));
            assert!(!tmp.join("host-file").exists());
            // The guest moves the containers' directories away and leaves symlinks to
            // the host's directories in their place.
            std::fs::rename(pod.join("app"), pod.join("moved")).unwrap();
            std::os::unix::fs::symlink(&victim, pod.join("app")).unwrap();
            std::fs::rename(pod.join("other"), pod.join("moved2")).unwrap();
            std::os::unix::fs::symlink(tmp.join("empty"), pod.join("other")).unwrap();
            unbind_member_root(&pod, "app");
            unbind_member_root(&pod, "other");
            assert!(
                is_mount_point(&victim.join("rootfs")),
                "{:?}",
                mount_points()
            );
            assert!(tmp.join("empty/rootfs").is_dir());
            release(&root, "sb");
            assert!(is_mount_point(&victim.join("rootfs")));
            assert!(tmp.join("empty/rootfs").is_dir());
            assert!(!has_mounts_under(&pod));
            rustix::mount::unmount(victim.join("rootfs"), UnmountFlags::DETACH).unwrap();
        });
    }

    #[test]
    fn member_roots_lie_in_the_pod_directory() {
        let (rel, host) = member_root(Path::new("/r/pods/sb"), "app");
        assert_eq!(rel, "app/rootfs");
        assert_eq!(host, Path::new("/r/pods/sb/app/rootfs"));
        assert_eq!(pod_dir(Path::new("/r"), "sb"), Path::new("/r/@pods/sb"));
        // No container's state directory can be the pods' directory.
        assert!(crate::state::validate_id(PODS_DIR).is_err());
    }
}
