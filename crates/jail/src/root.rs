//! A VM process's own mount namespace and minimal root: what it sees of the host's files.
//!
//! Landlock ([`crate::landlock`]) rules where a VM process may *write*; this rules what
//! it can *reach* at all. [`enter`], while the process has one thread and still holds
//! `CAP_SYS_ADMIN`, before its seccomp filter:
//! 1. gives it a mount namespace of its own, every mount in it a slave of the host's:
//!    mounts the host makes later still reach it (a pod's containers' roots, bound in
//!    the pod directory after the pod's VM started), nothing it mounts reaches the host;
//! 2. mounts a small tmpfs (`forkvm-root`, unbindable, `nosuid,nodev,noexec`) on an empty
//!    directory of its home ([`MOUNT_DIR`]; on the host it stays empty);
//! 3. makes there each [`Place`] at the path the process names it by: links on the way
//!    are made as links (so `/var/run/x` leads where it does on the host), directories
//!    as directories, and the place itself is bound from the host with what lies beneath
//!    it, read-only unless it is written, `nosuid` and `nodev` unless it is a device;
//! 4. adds what every VM process needs: its launcher's procfs (read-only), the devices it opens, the
//!    cgroup hierarchy, and, read-only, its executable and the system's libraries (it
//!    starts its fork children as the same executable);
//! 5. pivots into it, detaches the old root and makes the new root itself read-only.
//!
//! So a VMM taken over by its guest no longer finds the host's `/etc`, `/home`, other
//! tenants' images and roots or the template key's directory: only its own places.
//! The processes it starts live in the same root (fork children's places lie in their
//! parent's). A process that cannot make a namespace (no `CAP_SYS_ADMIN`: forkvm run by
//! a user) keeps the host's root and says so; any other failure fails the jail.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
    MountAttrFlags,
};

use serde::{Deserialize, Serialize};

/// The mount source the minimal root's tmpfs is named by (as `/proc/<pid>/mountinfo`
/// shows it).
pub const ROOT_SOURCE: &str = "forkvm-root";

/// The directory of a VM's home that its process mounts its minimal root on (in its own
/// namespace: on the host it stays empty, and goes with the home).
pub const MOUNT_DIR: &str = ".root";

/// The tmpfs's source and options: it holds only directories, empty files and links
/// (mount points).
const ROOT_OPTIONS: [(&str, &str); 4] = [
    ("source", ROOT_SOURCE),
    ("mode", "0755"),
    ("size", "1m"),
    ("nr_inodes", "4096"),
];

/// The system's files every VM process reads: the dynamic loader and libraries its
/// executable needs when it starts a fork child, and the loader's cache.
const SYSTEM_READ: [&str; 5] = ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache"];

/// Devices every VM process opens: KVM, TUN (a fork child's TAPs), `/dev/null` (the
/// standard input of what it starts) and `/dev/urandom` (a random MAC).
pub const DEVICES: [&str; 4] = ["/dev/kvm", "/dev/net/tun", "/dev/null", "/dev/urandom"];

/// Where cgroup v2 is mounted: the process's own group, its fork children's.
const CGROUPS: &str = "/sys/fs/cgroup";

/// Links followed in one path at most (as the kernel's `ELOOP` limit).
const MAX_LINKS: u32 = 40;

/// What the process may do with a place of its root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Read-only.
    Read,
    /// Read and written (Landlock still rules which of its files).
    Write,
    /// A device node: written, and opened as a device.
    Device,
}

/// A path of the host that a VM process's root holds, as the process names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// The path (absolute; links in it are made in the root as on the host).
    pub path: PathBuf,
    /// What may be done there.
    pub access: Access,
}

impl Place {
    /// `path` (made absolute against the current directory), with `access`.
    pub fn new(path: impl AsRef<Path>, access: Access) -> Self {
        let path = path.as_ref();
        Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            access,
        }
    }
}

/// Why the minimal root could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make the VM process's minimal root: {step}")]
pub struct RootError {
    step: String,
    #[source]
    source: io::Error,
}

fn failed(step: impl Into<String>) -> impl FnOnce(io::Error) -> RootError {
    let step = step.into();
    move |source| RootError { step, source }
}

/// Whether the process got a root of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rooted {
    /// It lives in its minimal root.
    Own,
    /// It keeps the host's root, for the reason given.
    Not(String),
}

/// Moves the calling process into a mount namespace of its own whose root holds only
/// `places` and what every VM process needs (see the module doc), mounted on the empty
/// directory `mount_on` (made if missing; a link or anything but a directory there is
/// refused). Call it before the seccomp filter, while the process has one thread (the
/// others would keep the host's root and namespace).
/// The current directory is kept (its directories are made in the new root), else it
/// becomes `/`.
pub fn enter(mount_on: &Path, places: &[Place]) -> Result<Rooted, RootError> {
    let cwd = std::env::current_dir().ok();
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(Rooted::Not(format!(
                "a mount namespace needs CAP_SYS_ADMIN ({e})"
            )));
        }
        return Err(failed("a mount namespace of its own")(e));
    }
    if let Err(e) = mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_SLAVE,
        None,
    ) {
        // An LSM that refuses mounts (AppArmor's profile for containers): the namespace
        // is a copy of the host's, nothing in it changed.
        if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
            return Ok(Rooted::Not(format!("mounts are refused here ({e})")));
        }
        return Err(failed("every mount made a slave of the host's")(e));
    }
    let new = match NewRoot::mount(mount_on) {
        Ok(new) => new,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            return Ok(Rooted::Not(format!(
                "its mount calls (fsmount, mount_setattr) need Linux 5.12 ({e})"
            )))
        }
        Err(e) => return Err(failed(format!("a tmpfs on {}", mount_on.display()))(e)),
    };
    for bound in new.resolve(&with_system_places(places))? {
        new.bind(&bound)?;
    }
    if let Some(cwd) = &cwd {
        new.keep_dir(cwd);
    }
    new.mount_proc()?;
    if let Err(e) = new.pivot() {
        if e.source.raw_os_error() == Some(libc::EINVAL) {
            // The host's root is its initramfs (rootfs cannot be pivoted from): back
            // where it was, the tmpfs detached.
            let _ = std::env::set_current_dir(cwd.as_deref().unwrap_or(Path::new("/")));
            let _ = mount_detach(&new.dir);
            return Ok(Rooted::Not(format!("the host's root cannot be left: {e}")));
        }
        return Err(e);
    }
    // The root itself (its directories and mount points) read-only; the places bound
    // in it keep their own access.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
    .map_err(failed("the new root made read-only"))?;
    let back = cwd.is_some_and(|d| std::env::set_current_dir(d).is_ok());
    if !back {
        std::env::set_current_dir("/").map_err(failed("chdir /"))?;
    }
    Ok(Rooted::Own)
}

/// `places`, then the system's (see the module doc).
fn with_system_places(places: &[Place]) -> Vec<Place> {
    let mut all: Vec<Place> = places.to_vec();
    all.extend(SYSTEM_READ.iter().map(|p| Place::new(p, Access::Read)));
    if let Ok(exe) = std::env::current_exe() {
        all.push(Place::new(exe, Access::Read));
    }
    all.extend(DEVICES.iter().map(|p| Place::new(p, Access::Device)));
    all.push(Place::new(CGROUPS, Access::Write));
    all
}

/// A place as the host has it: where its path leads (no links), what may be done
/// there, and whether it is a directory or a device node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resolved {
    real: PathBuf,
    access: Access,
    dir: bool,
    device: bool,
}

/// `places` resolved, parents before what lies beneath them, each once (a path named
/// twice gets the most access it was given).
fn ordered(mut all: Vec<Resolved>) -> Vec<Resolved> {
    all.sort_by(|a, b| {
        (a.real.components().count(), &a.real).cmp(&(b.real.components().count(), &b.real))
    });
    let mut out: Vec<Resolved> = Vec::new();
    for r in all {
        match out.last_mut() {
            Some(last) if last.real == r.real => {
                if r.access == Access::Write || last.access == Access::Read {
                    last.access = r.access;
                }
            }
            _ => out.push(r),
        }
    }
    out
}

/// The minimal root being made: a tmpfs, attached on the directory a handle was
/// opened on.
struct NewRoot {
    /// A handle on the tmpfs's root.
    mnt: OwnedFd,
    /// The tmpfs's root as a path (`/proc/self/fd/N`).
    dir: PathBuf,
    /// The tmpfs's device: only there are directories, files and links made.
    dev: u64,
    /// What is bound so far, and how.
    bound: std::cell::RefCell<Vec<Resolved>>,
}

impl NewRoot {
    /// Makes the tmpfs (detached: nothing can be planted in it) and attaches it on the
    /// directory `mount_on` through a handle opened without following links.
    fn mount(mount_on: &Path) -> io::Result<Self> {
        match std::fs::DirBuilder::new().mode(0o700).create(mount_on) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let at = crate::binds::target_dir(mount_on)?;
        let mnt = new_mount(
            "tmpfs",
            &ROOT_OPTIONS,
            MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
                | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )?;
        // Left out when a place above it is bound with what lies beneath.
        crate::binds::set_attr(&mnt, 0, libc::MS_UNBINDABLE)?;
        crate::binds::move_onto(&mnt, &at)?;
        let dev = rustix::fs::fstat(&mnt)?.st_dev;
        Ok(Self {
            dir: PathBuf::from(format!("/proc/self/fd/{}", mnt.as_raw_fd())),
            mnt,
            dev,
            bound: Default::default(),
        })
    }

    /// Where each place leads on the host, with the links on the way made in the new
    /// root; a place the host does not have is left out (what needs it fails later by
    /// its name, as it would on the host).
    fn resolve(&self, places: &[Place]) -> Result<Vec<Resolved>, RootError> {
        let mut all = Vec::new();
        for place in places {
            let mut links = 0;
            let real = match self.mirror(&place.path, &mut links) {
                Ok(Some(real)) => real,
                Ok(None) => {
                    tracing::debug!(path = %place.path.display(), "not on this host: not in the VM process's root");
                    continue;
                }
                Err(e) => return Err(failed(format!("follow {}", place.path.display()))(e)),
            };
            let meta =
                std::fs::metadata(&real).map_err(failed(format!("stat {}", real.display())))?;
            let kind = meta.file_type();
            all.push(Resolved {
                real,
                access: place.access,
                dir: kind.is_dir(),
                device: kind.is_block_device() || kind.is_char_device(),
            });
        }
        Ok(ordered(all))
    }

    /// Binds the place `r` at its path: read-only unless written, `nosuid`, `nodev`
    /// unless it is a device node, with the mounts beneath a directory (all of them so).
    fn bind(&self, r: &Resolved) -> Result<(), RootError> {
        // Beneath a place bound with the same access it is there already; with another
        // (a read-only share in the written state root) it is bound again on top.
        // (The nearest: a written place in a read-only one in a written one is bound.)
        let covered = self
            .bound
            .borrow()
            .iter()
            .filter(|b| b.dir && r.real.starts_with(&b.real))
            .max_by_key(|b| b.real.components().count())
            .is_some_and(|b| b.access == r.access);
        if covered {
            return Ok(());
        }
        let what = || format!("bind {}", r.real.display());
        match r.dir {
            true => self.dir_for(&r.real)?,
            false => self.file_for(&r.real)?,
        };
        let rel = r.real.strip_prefix("/").unwrap_or(&r.real);
        let target = openat2(
            &self.mnt,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .map_err(io::Error::from)
        .map_err(failed(what()))?;
        // No link on the way now either (one swapped in since it was followed).
        let source = openat2(
            rustix::fs::CWD,
            &r.real,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        )
        .map_err(io::Error::from)
        .map_err(failed(what()))?;
        let mut attr = libc::MOUNT_ATTR_NOSUID;
        if !r.device {
            attr |= libc::MOUNT_ATTR_NODEV;
        }
        if r.access == Access::Read {
            attr |= libc::MOUNT_ATTR_RDONLY;
        }
        crate::binds::bind_handle(source, target, r.dir, attr).map_err(failed(what()))?;
        self.bound.borrow_mut().push(r.clone());
        Ok(())
    }

    /// Makes the directories of `dir` (the current directory) in the new root, so that
    /// the process stays there and relative paths (`../images/k`) still lead where they
    /// did; best effort.
    fn keep_dir(&self, dir: &Path) {
        let mut links = 0;
        if let Ok(Some(real)) = self.mirror(dir, &mut links) {
            let _ = self.made_dirs(&real);
        }
    }

    /// The procfs the process had at `/proc` (its launcher's, with what is mounted on
    /// it), bound read-only (`/proc/sys` and the like not written through it): a VM
    /// process in a family's pid namespace ([`crate::family`]), and the processes it
    /// starts, read their host pids there (a procfs mounted now would be the family
    /// namespace's, where the host's pids are not seen).
    fn mount_proc(&self) -> Result<(), RootError> {
        let step = failed("a procfs");
        let at = self.dir_for(Path::new("/proc"))?;
        let made = (|| -> io::Result<()> {
            let target = crate::binds::target_dir(&at)?;
            let source = crate::binds::target_dir(Path::new("/proc"))?;
            crate::binds::bind_handle(
                &source,
                &target,
                true,
                libc::MOUNT_ATTR_RDONLY
                    | libc::MOUNT_ATTR_NOSUID
                    | libc::MOUNT_ATTR_NODEV
                    | libc::MOUNT_ATTR_NOEXEC,
            )
        })();
        made.map_err(step)
    }

    /// `pivot_root` into the tmpfs (the current root goes on top of it, then is
    /// detached).
    fn pivot(&self) -> Result<(), RootError> {
        rustix::process::fchdir(&self.mnt)
            .map_err(io::Error::from)
            .map_err(failed("chdir into the new root"))?;
        // SAFETY: NUL-terminated strings that outlive the call.
        if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
            return Err(failed("pivot_root")(io::Error::last_os_error()));
        }
        mount_detach(Path::new(".")).map_err(failed("detach the host's root"))?;
        std::env::set_current_dir("/").map_err(failed("chdir /"))
    }

    /// Makes `path` lead in the new root where it leads on the host: each link on its
    /// way is made there as a link (with the same target) and followed. Returns where it
    /// leads on the host (no links), or `None` when it does not exist there.
    fn mirror(&self, path: &Path, links: &mut u32) -> io::Result<Option<PathBuf>> {
        let mut at = PathBuf::from("/");
        for c in path.components() {
            let name = match c {
                Component::Normal(name) => name,
                // `at` has no links: its parent is the path's.
                Component::ParentDir => {
                    at.pop();
                    continue;
                }
                _ => continue,
            };
            let host = at.join(name);
            let meta = match std::fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if !meta.file_type().is_symlink() {
                at = host;
                continue;
            }
            *links += 1;
            if *links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(&host)?;
            self.link(&host, &target)?;
            let next = match target.is_absolute() {
                true => target,
                false => at.join(target),
            };
            match self.mirror(&next, links)? {
                Some(real) => at = real,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// Makes the link `host` (a host path whose parent has no links) to `target` in the
    /// new root, unless something is there already.
    fn link(&self, host: &Path, target: &Path) -> io::Result<()> {
        let Some(parent) = host.parent() else {
            return Ok(());
        };
        // Beneath a bound place the host's link is there already.
        let Some(dir) = self.made_dirs(parent)?.filter(|d| self.on_tmpfs(d)) else {
            return Ok(());
        };
        let at = dir.join(host.file_name().unwrap_or_default());
        match std::os::unix::fs::symlink(target, &at) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// The directory in the new root for host directory `path` (no links), made on the
    /// tmpfs where missing.
    fn dir_for(&self, path: &Path) -> Result<PathBuf, RootError> {
        self.made_dirs(path)
            .map_err(failed(format!("make {}", path.display())))?
            .ok_or_else(|| {
                failed(format!("make {}", path.display()))(io::Error::from_raw_os_error(
                    libc::ENOENT,
                ))
            })
    }

    /// The (empty) file in the new root to bind host file `path` on.
    fn file_for(&self, path: &Path) -> Result<PathBuf, RootError> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = self.dir_for(parent)?;
        let at = dir.join(path.file_name().unwrap_or_default());
        if std::fs::symlink_metadata(&at).is_err() {
            self.on_tmpfs(&dir)
                .then_some(())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&at)
                })
                .map_err(failed(format!("make {}", at.display())))?;
        }
        Ok(at)
    }

    /// Makes the directories of host path `path` (no links) in the new root, only on the
    /// tmpfs (beneath a bound place they are the host's, there already). `None` when one
    /// is missing where it cannot be made.
    fn made_dirs(&self, path: &Path) -> io::Result<Option<PathBuf>> {
        let mut at = self.dir.clone();
        for c in path.components() {
            let Component::Normal(name) = c else { continue };
            let next = at.join(name);
            match std::fs::symlink_metadata(&next) {
                Ok(m) if m.is_dir() => {}
                // A link the root has where the host has a directory (mirrored from a
                // path that named it otherwise): not followed (it may lead to the host's
                // files); the place is left out.
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.on_tmpfs(&at) => {
                    std::fs::DirBuilder::new().mode(0o755).create(&next)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
            at = next;
        }
        Ok(Some(at))
    }

    /// Whether `dir` is on the new root's tmpfs (not in a place bound from the host).
    fn on_tmpfs(&self, dir: &Path) -> bool {
        // The root itself is named by a magic link, which `lstat` would not follow.
        dir == self.dir || std::fs::symlink_metadata(dir).is_ok_and(|m| m.dev() == self.dev)
    }
}

/// A new, detached mount of a file system of type `fstype` with `options`, with the
/// `attrs` flags: a handle to attach with [`crate::binds::move_onto`].
fn new_mount(fstype: &str, options: &[(&str, &str)], attrs: MountAttrFlags) -> io::Result<OwnedFd> {
    let fs = fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    for &(key, value) in options {
        fsconfig_set_string(&fs, key, value)?;
    }
    fsconfig_create(&fs)?;
    Ok(fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?)
}

/// Detaches the mount at `path` (and what is mounted beneath it).
fn mount_detach(path: &Path) -> io::Result<()> {
    // SAFETY: a NUL-terminated path that outlives the call.
    match unsafe { libc::umount2(cstring(path).as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// mount(2).
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring);
    let target = cstring(target);
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: NUL-terminated strings (or null) that outlive the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc;

    use super::*;

    fn dev(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().dev()
    }

    /// What a process sees once in its root: the places at the paths it names them by
    /// (through links too), read-only where they are only read; nothing else of the
    /// host's; mounts the host makes later beneath a place reach it; and nothing it makes
    /// lands anywhere but in its places.
    #[test]
    fn the_root_holds_the_places_and_nothing_else() {
        forkvm_test_support::in_own_mounts(|dir| {
            let dir = dir.to_owned();
            // Shared, so that what is mounted here later propagates (as a pod directory).
            mount(None, &dir, None, libc::MS_SHARED, None).unwrap();
            let state = dir.join("state");
            let data = dir.join("data");
            std::fs::create_dir_all(state.join("late")).unwrap();
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("kernel"), b"kernel bytes").unwrap();
            std::fs::write(data.join("other"), b"beside the kernel").unwrap();
            std::fs::write(dir.join("secret"), b"not for the VM").unwrap();
            std::os::unix::fs::symlink("data", dir.join("link")).unwrap();
            // A read-only tree with a mount beneath it, and a written place inside it
            // named through a link (it sorts before the tree by its spelling).
            let ro = dir.join("ro");
            std::fs::create_dir_all(ro.join("sub")).unwrap();
            std::fs::create_dir_all(ro.join("w")).unwrap();
            mount(
                Some(Path::new("tmpfs")),
                &ro.join("sub"),
                Some("tmpfs"),
                0,
                None,
            )
            .unwrap();
            std::os::unix::fs::symlink("ro/w", dir.join("w")).unwrap();
            std::fs::create_dir_all(dir.join("work")).unwrap();
            // A read-only place in the written state root, and a written one in it.
            std::fs::create_dir_all(state.join("share/out")).unwrap();
            assert!(Path::new("/etc/passwd").exists());
            let places = vec![
                Place::new(&state, Access::Write),
                Place::new(dir.join("link/kernel"), Access::Read),
                Place::new(dir.join("missing/disk"), Access::Read),
                Place::new(dir.join("w"), Access::Write),
                Place::new(&ro, Access::Read),
                Place::new(state.join("share"), Access::Read),
                Place::new(state.join("share/out"), Access::Write),
            ];
            let (entered_tx, entered) = mpsc::channel();
            let (mounted, mounted_rx) = mpsc::channel::<()>();
            let inside = {
                let (dir, state, ro) = (dir.clone(), state.clone(), ro.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    // Not a place: its directories are made, so relative paths lead on.
                    std::env::set_current_dir(dir.join("work")).unwrap();
                    let rooted = enter(&state.join(MOUNT_DIR), &places);
                    entered_tx.send(()).unwrap();
                    assert_eq!(rooted.map_err(|e| format!("{e:?}"))?, Rooted::Own);
                    let check = |ok: bool, what: &str| match ok {
                        true => Ok(()),
                        false => Err(what.to_owned()),
                    };
                    check(
                        std::env::current_dir().unwrap() == dir.join("work"),
                        "cwd kept",
                    )?;
                    check(
                        std::fs::read("../link/kernel").ok().as_deref() == Some(b"kernel bytes"),
                        "a relative path with ..",
                    )?;
                    let erofs = |p: &Path| {
                        std::fs::write(p, b"x")
                            .is_err_and(|e| e.raw_os_error() == Some(libc::EROFS))
                    };
                    check(erofs(&ro.join("f")), "a read-only tree")?;
                    check(erofs(&ro.join("sub/f")), "a mount beneath a read-only tree")?;
                    check(
                        erofs(&state.join("share/f")),
                        "read-only in a written place",
                    )?;
                    std::fs::write(state.join("share/out/f"), b"x")
                        .map_err(|e| format!("written in read-only in written: {e}"))?;
                    std::fs::write(ro.join("w/f"), b"x")
                        .map_err(|e| format!("written place: {e}"))?;
                    check(!Path::new("/etc/passwd").exists(), "/etc hidden")?;
                    check(
                        !dir.join("secret").exists(),
                        "a file beside the places hidden",
                    )?;
                    check(
                        !dir.join("data/other").exists(),
                        "a place's file, not its directory",
                    )?;
                    check(
                        std::fs::read(dir.join("link/kernel")).ok().as_deref()
                            == Some(b"kernel bytes"),
                        "a read place through a link",
                    )?;
                    let w = std::fs::OpenOptions::new()
                        .append(true)
                        .open(dir.join("link/kernel"));
                    check(
                        w.is_err_and(|e| e.raw_os_error() == Some(libc::EROFS)),
                        "a read place is read-only",
                    )?;
                    std::fs::write(state.join("written"), b"by the VM")
                        .map_err(|e| e.to_string())?;
                    check(
                        std::fs::create_dir("/new")
                            .is_err_and(|e| e.raw_os_error() == Some(libc::EROFS)),
                        "the root itself is read-only",
                    )?;
                    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
                    check(
                        mountinfo
                            .lines()
                            .any(|l| l.contains(" / / ") && l.contains(ROOT_SOURCE)),
                        "its root is the forkvm-root tmpfs",
                    )?;
                    check(
                        std::fs::read_dir(state.join(MOUNT_DIR))
                            .unwrap()
                            .next()
                            .is_none(),
                        "the root is not bound into itself",
                    )?;
                    let mut null = std::fs::OpenOptions::new()
                        .write(true)
                        .open("/dev/null")
                        .unwrap();
                    null.write_all(b"x").map_err(|e| e.to_string())?;
                    check(std::env::current_exe().unwrap().exists(), "its executable")?;
                    mounted_rx.recv().unwrap();
                    check(
                        dev(&state.join("late")) != dev(&state),
                        "a mount made on the host later reaches it",
                    )?;
                    Ok(())
                })
            };
            entered.recv().unwrap();
            let late = state.join("late");
            mount(
                Some(Path::new("tmpfs")),
                &late,
                Some("tmpfs"),
                0,
                Some("size=1m"),
            )
            .unwrap();
            let _ = mounted.send(());
            let outcome = inside.join().unwrap();
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(cstring(&late).as_ptr(), libc::MNT_DETACH) };
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(cstring(&ro.join("sub")).as_ptr(), libc::MNT_DETACH) };
            outcome.unwrap();
            assert_eq!(std::fs::read(state.join("written")).unwrap(), b"by the VM");
            // On the host the directory it mounted its root on stays empty.
            assert!(std::fs::read_dir(state.join(MOUNT_DIR))
                .unwrap()
                .next()
                .is_none());
            assert!(
                !dir.join("missing").exists(),
                "nothing made for a missing place"
            );
        });
    }

    #[test]
    fn places_come_parents_first_each_once_with_the_most_access() {
        let r = |real: &str, access| Resolved {
            real: real.into(),
            access,
            dir: true,
            device: false,
        };
        let out = ordered(vec![
            r("/a/b/c", Access::Read),
            r("/a", Access::Read),
            r("/a", Access::Write),
            r("/a", Access::Read),
        ]);
        assert_eq!(out, vec![r("/a", Access::Write), r("/a/b/c", Access::Read)]);
        assert!(with_system_places(&[])
            .iter()
            .any(|p| p.path == Path::new("/dev/kvm") && p.access == Access::Device));
    }
}
