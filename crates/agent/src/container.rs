//! The rest of the container's spec ([`forkvm_agent_proto::Request::Container`]),
//! applied as runc applies the OCI `linux.devices`, `linux.sysctl`,
//! `linux.readonlyPaths` and `linux.maskedPaths`, in that order, then `root.readonly`,
//! after the container's volumes are mounted and its network set up, before its
//! process starts.
//!
//! - The seccomp filters and the user namespace ([`crate::seccomp`], [`crate::userns`])
//!   are kept by the container ([`crate::containers::Container`]) for its processes
//!   started from then on.
//! - A device node is made with its type, numbers, mode and owner (missing directories
//!   created). A device the host has ([`DeviceNode::host_has`]) must be one the guest's
//!   kernel has too (`/sys/dev/char/M:m`, `/sys/dev/block/M:m`): a device only the host
//!   has (`/dev/kvm` in a VM without nested virtualization) is an error naming it. A
//!   device neither has is made all the same, as runc makes it; a FIFO always. One
//!   already there stays.
//! - A kernel parameter (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`) is written to
//!   `/proc/sys`: the guest's kernel is the container's own. A key with an empty, `.` or
//!   `..` component is refused; one the kernel does not have is an error naming it.
//! - A masked path is hidden: a file under `/dev/null`, a directory under an empty
//!   read-only tmpfs.
//! - A read-only path is bind-mounted onto itself and remounted read-only, keeping its
//!   `nosuid`, `nodev` and `noexec`.
//!
//! Paths resolve inside the container's root as the container sees them (`openat2`
//! with `RESOLVE_IN_ROOT`: its symlinks cannot point outside), and each mount goes onto
//! the resolved file through its descriptor. A path that does not exist is skipped, as
//! runc skips it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use forkvm_agent_proto::DeviceNode;
use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Most entries of each kind one request may carry.
pub const MAX_ENTRIES: usize = 1024;

/// Where the guest kernel shows its parameters and devices.
pub struct GuestKernel {
    /// `/proc/sys`.
    pub proc_sys: PathBuf,
    /// `/sys/dev`, with a `char` and a `block` directory of `major:minor` entries.
    pub sys_dev: PathBuf,
}

impl GuestKernel {
    /// This kernel's.
    pub fn own() -> Self {
        Self {
            proc_sys: "/proc/sys".into(),
            sys_dev: "/sys/dev".into(),
        }
    }
}

/// What [`apply`] applies.
pub struct Settings<'a> {
    /// `linux.devices`.
    pub devices: &'a [DeviceNode],
    /// `linux.sysctl`.
    pub sysctls: &'a BTreeMap<String, String>,
    /// `linux.maskedPaths`.
    pub masked: &'a [String],
    /// `linux.readonlyPaths`.
    pub readonly: &'a [String],
    /// `root.readonly`.
    pub readonly_root: bool,
    /// `domainname`.
    pub domainname: Option<&'a str>,
    /// `linux.seccomp`, compiled: kept for the processes started from then on.
    pub seccomp: &'a [String],
    /// The `user` namespace and its id maps: made and kept for the processes started
    /// from then on.
    pub user_namespace: Option<&'a forkvm_agent_proto::UserNamespace>,
}

/// Keeps the container's seccomp filters and user namespace, makes the device nodes in
/// its root, sets the kernel parameters, then masks paths and makes paths read-only
/// inside its root. The first failure stops it, naming the field and the entry.
pub fn apply(
    container: &crate::containers::Container,
    kernel: &GuestKernel,
    s: &Settings,
    reaper: &crate::reaper::Reaper,
) -> Result<(), String> {
    let root = container.root();
    for (what, n) in [
        ("linux.devices", s.devices.len()),
        ("linux.sysctl", s.sysctls.len()),
        ("linux.maskedPaths", s.masked.len()),
        ("linux.readonlyPaths", s.readonly.len()),
    ] {
        if n > MAX_ENTRIES {
            return Err(format!("{what}: {n} entries, at most {MAX_ENTRIES}"));
        }
    }
    if !s.seccomp.is_empty() {
        container
            .set_seccomp(s.seccomp)
            .map_err(|e| format!("linux.seccomp: {e}"))?;
    }
    if let Some(ns) = s.user_namespace {
        container.set_userns(ns, &kernel.proc_sys, reaper)?;
    }
    if let Some(name) = s.domainname {
        set_domainname(name).map_err(|e| format!("domainname {name:?}: {e}"))?;
    }
    let root_fd = crate::shares::open_root(root)?;
    for d in s.devices {
        make_device(&root_fd, &kernel.sys_dev, d).map_err(|e| {
            format!(
                "linux.devices {} ({} {}:{}): {e}",
                d.path, d.kind, d.major, d.minor
            )
        })?;
    }
    let (sysctls, masked, readonly) = (s.sysctls, s.masked, s.readonly);
    for (key, value) in sysctls {
        let path = kernel
            .proc_sys
            .join(sysctl_path(key).map_err(|e| format!("linux.sysctl {key}: {e}"))?);
        // Written, never created: a name the kernel does not have is an error.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()))
            .map_err(|e| format!("linux.sysctl {key}={value}: {e}"))?;
    }
    container.keep_proc_paths(readonly, masked);
    protect_paths(&root_fd, readonly, masked)?;
    if s.readonly_root {
        remount(root, true).map_err(|e| format!("root.readonly: {e}"))?;
    }
    Ok(())
}

/// `statfs(2)`'s type of a proc file system.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// The mount attributes (`MOUNT_ATTR_*`) of the proc file system mounted
/// at `/proc` in `root`, for a proc mount of another PID namespace to stack on it
/// ([`stack_proc`]); `None` when `root` has no proc file system there.
pub(crate) fn proc_attrs(root: &Path) -> Option<rustix::mount::MountAttrFlags> {
    use rustix::fs::StatVfsMountFlags as F;
    use rustix::mount::MountAttrFlags as A;
    let root_fd = crate::shares::open_root(root).ok()?;
    let proc = resolve(&root_fd, "/proc").ok()??;
    let fs = rustix::fs::fstatfs(&proc).ok()?;
    if fs.f_type as i64 != PROC_SUPER_MAGIC {
        return None;
    }
    let flags = rustix::fs::fstatvfs(&proc).ok()?.f_flag;
    Some(
        [
            (F::RDONLY, A::MOUNT_ATTR_RDONLY),
            (F::NOSUID, A::MOUNT_ATTR_NOSUID),
            (F::NODEV, A::MOUNT_ATTR_NODEV),
            (F::NOEXEC, A::MOUNT_ATTR_NOEXEC),
        ]
        .into_iter()
        .filter(|(st, _)| flags.contains(*st))
        .fold(A::empty(), |acc, (_, attr)| acc | attr),
    )
}

/// Stacks `proc`, a detached proc mount made in the container's PID namespace, on the
/// one at `/proc` in `root` (which shows the guest's), then applies the container's
/// read-only and masked paths under `/proc` (`readonly`, `masked`) to it again.
pub(crate) fn stack_proc(
    root: &Path,
    proc: &OwnedFd,
    readonly: &[String],
    masked: &[String],
) -> Result<(), String> {
    let root_fd = crate::shares::open_root(root)?;
    let target = resolve(&root_fd, "/proc")
        .and_then(|t| t.ok_or_else(|| "it is gone".to_owned()))
        .map_err(|e| format!("/proc: {e}"))?;
    rustix::mount::move_mount(
        proc,
        "",
        &target,
        "",
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
            | rustix::mount::MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| format!("/proc: move_mount: {e}"))?;
    let masks = protect_paths(&root_fd, readonly, masked);
    // Never a /proc without its masks.
    if masks.is_err() {
        let _ = unstack_proc(root);
    }
    masks
}

/// Makes `readonly` read-only, then masks `masked`, in runc's order, inside the root
/// `root_fd`; the first failure names its field and path.
fn protect_paths(root_fd: &OwnedFd, readonly: &[String], masked: &[String]) -> Result<(), String> {
    for path in readonly {
        make_readonly(root_fd, path).map_err(|e| format!("linux.readonlyPaths {path}: {e}"))?;
    }
    for path in masked {
        mask(root_fd, path).map_err(|e| format!("linux.maskedPaths {path}: {e}"))?;
    }
    Ok(())
}

/// Takes what [`stack_proc`] stacked (with the masks on it) away again.
pub(crate) fn unstack_proc(root: &Path) -> Result<(), String> {
    let root_fd = crate::shares::open_root(root)?;
    let top = resolve(&root_fd, "/proc")?.ok_or("/proc is gone")?;
    // SAFETY: a NUL-terminated path that lives across the call.
    match unsafe { libc::umount2(fd_path(&top).as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(format!("umount /proc: {}", std::io::Error::last_os_error())),
    }
}

/// Longest NIS domain name the kernel takes (`__NEW_UTS_LEN`).
const MAX_DOMAINNAME: usize = 64;

/// Sets the guest's NIS domain name (its UTS namespace is the container's).
fn set_domainname(name: &str) -> Result<(), String> {
    if name.len() > MAX_DOMAINNAME {
        return Err(format!("longer than {MAX_DOMAINNAME} bytes"));
    }
    // SAFETY: a pointer to `name.len()` readable bytes, which the kernel copies.
    let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().to_string()),
    }
}

/// Remounts the mount at `path` read-only or read-write, keeping its `nosuid`, `nodev`
/// and `noexec`; the mounts under it keep theirs.
pub fn remount(path: &Path, read_only: bool) -> Result<(), String> {
    let st = rustix::fs::statvfs(path).map_err(|e| format!("statvfs: {e}"))?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | mount_flags(st.f_flag);
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    sys_mount(None, &target, None, flags)
}

/// Runs `f` on a writable view of the container's `root`: `root` itself when it is
/// writable; for a read-only root (`root.readonly`), a bind mount of it beside it
/// (`/rootfs.rw-view`, outside the container's root) made writable for `f` alone and
/// detached after. The container's own mount stays read-only throughout.
pub fn with_writable_root<T>(
    root: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    if root == Path::new("/") || !is_read_only(root) {
        return f(root);
    }
    // One view at a time: it is one mount point, and a second caller's bind mount on it
    // would be the one the first caller's detach takes away (a fork child's identity
    // retried while the first try still runs).
    static VIEW: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = VIEW.lock().unwrap_or_else(|e| e.into_inner());
    let view = &root.with_extension("rw-view");
    std::fs::create_dir_all(view)?;
    let cstr =
        |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other);
    sys_mount(Some(&cstr(root)?), &cstr(view)?, None, libc::MS_BIND)
        .map_err(std::io::Error::other)?;
    let result = remount(view, false)
        .map_err(std::io::Error::other)
        .and_then(|()| f(view));
    // SAFETY: a NUL-terminated path that lives across the call.
    unsafe { libc::umount2(cstr(view)?.as_ptr(), libc::MNT_DETACH) };
    result
}

/// Largest file [`read_in_root`] reads.
const MAX_READ: u64 = 1 << 20;

/// The file `path` (absolute, as the container sees it) in `root`, at most 1 MiB;
/// `None` when it is missing or is a symlink (never followed).
pub fn read_in_root(root: &Path, path: &str) -> std::io::Result<Option<Vec<u8>>> {
    let (dir, name) = split_path(path).map_err(std::io::Error::other)?;
    let root_fd = crate::shares::open_root(root).map_err(std::io::Error::other)?;
    let Some(dir) = resolve(&root_fd, dir).map_err(std::io::Error::other)? else {
        return Ok(None);
    };
    let file = match rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => std::fs::File::from(fd),
        Err(Errno::NOENT | Errno::LOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_READ), &mut bytes)?;
    Ok(Some(bytes))
}

/// Replaces the file `path` (absolute, as the container sees it) in `root` with
/// `contents` (mode 0644): its directory resolved inside the root and created where
/// missing, whatever was there (a symlink included) replaced, never followed. The new
/// file is written beside it under a name of its own and renamed over it, so two
/// writers at once both succeed (the last one's contents stay) and a reader sees the
/// old file or the new one, never a part.
pub fn replace_in_root(root: &Path, path: &str, contents: &[u8]) -> std::io::Result<()> {
    let (dir, name) = split_path(path).map_err(std::io::Error::other)?;
    let root_fd = crate::shares::open_root(root).map_err(std::io::Error::other)?;
    let dir = crate::shares::resolve_dir(&root_fd, dir).map_err(std::io::Error::other)?;
    // The directory as an O_PATH descriptor cannot create files: open it for real.
    let dir = rustix::fs::openat(
        &dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = format!(".{name}.forkvm-{}-{n}", std::process::id());
    let fd = rustix::fs::openat(
        &dir,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let written = std::io::Write::write_all(&mut std::fs::File::from(fd), contents)
        .and_then(|()| rustix::fs::renameat(&dir, &tmp, &dir, name).map_err(Into::into));
    if written.is_err() {
        let _ = rustix::fs::unlinkat(&dir, &tmp, rustix::fs::AtFlags::empty());
    }
    written
}

/// `path`'s directory and last component (absolute paths to a file only).
fn split_path(path: &str) -> Result<(&str, &str), String> {
    match path.rsplit_once('/') {
        Some((dir, name))
            if path.starts_with('/') && !name.is_empty() && name != "." && name != ".." =>
        {
            Ok((if dir.is_empty() { "/" } else { dir }, name))
        }
        _ => Err(format!("{path}: not an absolute path to a file")),
    }
}

/// Whether the mount at `path` is read-only.
pub fn is_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// The `nosuid`, `nodev` and `noexec` of a mount, as `mount(2)` flags.
fn mount_flags(f: rustix::fs::StatVfsMountFlags) -> libc::c_ulong {
    use rustix::fs::StatVfsMountFlags as F;
    [
        (F::NOSUID, libc::MS_NOSUID),
        (F::NODEV, libc::MS_NODEV),
        (F::NOEXEC, libc::MS_NOEXEC),
    ]
    .into_iter()
    .filter(|(st, _)| f.contains(*st))
    .fold(0, |acc, (_, ms)| acc | ms)
}

/// Makes the node `d` inside `root` (see the module documentation).
fn make_device(root: &OwnedFd, sys_dev: &Path, d: &DeviceNode) -> Result<(), String> {
    let (kind, class) = match d.kind.as_str() {
        "c" => (libc::S_IFCHR, Some("char")),
        "b" => (libc::S_IFBLK, Some("block")),
        "p" => (libc::S_IFIFO, None),
        other => return Err(format!("unknown type {other:?}: c, b or p")),
    };
    if let Some(class) = class {
        let entry = sys_dev.join(class).join(format!("{}:{}", d.major, d.minor));
        if d.host_has && !entry.exists() {
            return Err(
                "the VM's kernel has no such device (a host device cannot be passed into a VM)"
                    .into(),
            );
        }
    }
    let (dir, name) = split_path(&d.path).map_err(|_| "not an absolute path to a file")?;
    let dir = crate::shares::resolve_dir(root, dir)?;
    let mode = Mode::from_raw_mode(d.mode & 0o7777);
    let file_type = rustix::fs::FileType::from_raw_mode(kind);
    let dev = rustix::fs::makedev(d.major, d.minor);
    match rustix::fs::mknodat(&dir, name, file_type, mode, dev) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Ok(()),
        Err(e) => return Err(format!("mknod: {e}")),
    }
    // The umask does not apply, and the owner is the spec's.
    rustix::fs::chmodat(&dir, name, mode, rustix::fs::AtFlags::empty())
        .map_err(|e| format!("chmod: {e}"))?;
    rustix::fs::chownat(
        &dir,
        name,
        Some(rustix::fs::Uid::from_raw(d.uid)),
        Some(rustix::fs::Gid::from_raw(d.gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("chown: {e}"))
}

/// The path under `/proc/sys` of the kernel parameter `key` (dots or slashes).
pub fn sysctl_path(key: &str) -> Result<PathBuf, String> {
    let parts: Vec<&str> = if key.contains('/') {
        key.split('/').collect()
    } else {
        key.split('.').collect()
    };
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err("not a kernel parameter name".into());
    }
    Ok(parts.iter().collect())
}

/// `path` (absolute) inside `root` as the container resolves it; `None` when it does
/// not exist.
pub(crate) fn resolve(root: &OwnedFd, path: &str) -> Result<Option<OwnedFd>, String> {
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    let relative = format!(".{path}");
    // A lookup confined to the root fails with EAGAIN when a mount or rename happened
    // anywhere meanwhile (the kernel cannot vouch for the walk): it is tried again, a
    // bounded number of times (other containers of a pod start beside this one).
    let mut tries = 0;
    loop {
        match openat2(
            root,
            relative.as_str(),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::AGAIN) if tries < RESOLVE_TRIES => tries += 1,
            Err(e) => return Err(format!("cannot open it: {e}")),
        }
    }
}

/// How often [`resolve`] tries a lookup that a concurrent mount or rename disturbed.
const RESOLVE_TRIES: u32 = 64;

use crate::mounts::fd_path;

/// [`crate::mounts::mount`] without data, its error worded for these callers.
fn sys_mount(
    source: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
) -> Result<(), String> {
    crate::mounts::mount(
        source.map(CString::as_c_str),
        target,
        fstype.map(CString::as_c_str),
        flags,
        None,
    )
    .map_err(|e| format!("mount: {e}"))
}

fn mask(root: &OwnedFd, path: &str) -> Result<(), String> {
    let Some(fd) = resolve(root, path)? else {
        return Ok(());
    };
    let is_dir = rustix::fs::fstat(&fd)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .map_err(|e| format!("stat: {e}"))?;
    let target = fd_path(&fd);
    if is_dir {
        let tmpfs = CString::new("tmpfs").expect("no NUL");
        sys_mount(Some(&tmpfs), &target, Some(&tmpfs), libc::MS_RDONLY)
    } else {
        let null = CString::new("/dev/null").expect("no NUL");
        sys_mount(Some(&null), &target, None, libc::MS_BIND)
    }
}

fn make_readonly(root: &OwnedFd, path: &str) -> Result<(), String> {
    let Some(fd) = resolve(root, path)? else {
        return Ok(());
    };
    let target = fd_path(&fd);
    sys_mount(Some(&target), &target, None, libc::MS_BIND | libc::MS_REC)?;
    // The descriptor still names what lies under the new mount: resolve the path again
    // for the mount on top, and remount that one read-only with the flags it has.
    let top = resolve(root, path)?.ok_or("it vanished")?;
    let st = rustix::fs::fstatvfs(&top).map_err(|e| format!("statvfs: {e}"))?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | mount_flags(st.f_flag);
    sys_mount(None, &fd_path(&top), None, flags)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writers of one file at once all succeed (a fork child's identity retried while
    /// its first try still writes `/etc/hostname`), the file holds one of their
    /// contents whole, nothing of theirs is left beside it, and a symlink in its place
    /// is replaced, not followed.
    #[test]
    fn files_replaced_at_once_by_several_writers_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/hostname")).unwrap();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let root = root.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        replace_in_root(&root, "/etc/hostname", format!("writer-{i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let now = std::fs::read_to_string(root.join("etc/hostname")).unwrap();
        assert!(
            now.starts_with("writer-") && now.ends_with('\n') && now.len() <= 10,
            "{now:?}"
        );
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        let left: Vec<_> = std::fs::read_dir(root.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["hostname"], "{left:?}");
    }

    /// A kernel whose parameters live in `dir/sys` and whose devices are `dir/dev`'s
    /// entries (`char/1:3`, ...).
    fn kernel(dir: &Path) -> GuestKernel {
        GuestKernel {
            proc_sys: dir.join("sys"),
            sys_dev: dir.join("dev"),
        }
    }

    fn only<'a>(
        devices: &'a [DeviceNode],
        sysctls: &'a BTreeMap<String, String>,
        masked: &'a [String],
        readonly: &'a [String],
    ) -> Settings<'a> {
        Settings {
            devices,
            sysctls,
            masked,
            readonly,
            readonly_root: false,
            domainname: None,
            seccomp: &[],
            user_namespace: None,
        }
    }

    /// [`super::apply`] with the process's reaper.
    fn apply(root: &Path, kernel: &GuestKernel, s: &Settings) -> Result<(), String> {
        let container = crate::containers::Container::boot(root);
        super::apply(&container, kernel, s, crate::reaper::Reaper::global())
    }

    #[test]
    fn sysctl_keys_map_to_proc_sys_paths_and_bad_ones_are_refused() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.1/forwarding").unwrap(),
            PathBuf::from("net/ipv4/conf/eth0.1/forwarding")
        );
        for bad in ["", "net..x", "../../etc/passwd", "net/../x", ".x", "/etc"] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sysctls_are_written_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let k = kernel(dir.path());
        std::fs::create_dir_all(sys.join("net/ipv4")).unwrap();
        std::fs::create_dir_all(sys.join("kernel")).unwrap();
        std::fs::write(sys.join("net/ipv4/ip_forward"), "0").unwrap();
        let mut sysctls = BTreeMap::new();
        sysctls.insert("net.ipv4.ip_forward".to_owned(), "1".to_owned());
        apply(dir.path(), &k, &only(&[], &sysctls, &[], &[])).unwrap();
        assert_eq!(
            std::fs::read_to_string(sys.join("net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        sysctls.insert("kernel.no_such_knob".to_owned(), "1".to_owned());
        let e = apply(dir.path(), &k, &only(&[], &sysctls, &[], &[])).unwrap_err();
        assert!(e.starts_with("linux.sysctl kernel.no_such_knob=1: "), "{e}");
        assert!(!sys.join("kernel/no_such_knob").exists(), "never created");
        let mut bad = BTreeMap::new();
        bad.insert("../x".to_owned(), "1".to_owned());
        let e = apply(dir.path(), &k, &only(&[], &bad, &[], &[])).unwrap_err();
        assert!(e.contains("not a kernel parameter name"), "{e}");
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("/p{i}")).collect();
        let e = apply(dir.path(), &k, &only(&[], &BTreeMap::new(), &many, &[])).unwrap_err();
        assert!(e.contains("linux.maskedPaths: 1025 entries"), "{e}");
    }

    #[test]
    fn masked_paths_are_hidden_and_readonly_paths_refuse_writes() {
        forkvm_test_support::in_own_mounts(|dir| {
            let root = &dir.join("root");
            std::fs::write(dir.join("outside"), "host").unwrap();
            std::fs::create_dir_all(root.join("proc/acpi")).unwrap();
            std::fs::write(root.join("proc/acpi/table"), "secret").unwrap();
            std::fs::write(root.join("proc/kcore"), "core").unwrap();
            std::fs::create_dir_all(root.join("proc/sys")).unwrap();
            std::fs::write(root.join("proc/sys/knob"), "0").unwrap();
            // An image's symlinks that try to point a mask at the guest's own files.
            std::os::unix::fs::symlink("/etc/shadow", root.join("escape")).unwrap();
            std::os::unix::fs::symlink("../outside", root.join("climb")).unwrap();
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/shadow"), "inside").unwrap();
            apply(
                root,
                &GuestKernel::own(),
                &only(
                    &[],
                    &BTreeMap::new(),
                    &[
                        "/proc/acpi".into(),
                        "/proc/kcore".into(),
                        "/proc/missing".into(),
                        "/escape".into(),
                        "/climb".into(),
                    ],
                    &["/proc/sys".into(), "/not/there".into()],
                ),
            )
            .unwrap();
            assert_eq!(
                std::fs::read_dir(root.join("proc/acpi")).unwrap().count(),
                0,
                "a masked directory is empty"
            );
            assert!(std::fs::write(root.join("proc/acpi/x"), "").is_err());
            assert_eq!(std::fs::read(root.join("proc/kcore")).unwrap(), b"");
            // The symlinks resolved inside the root: the root's file is masked, the
            // one outside untouched.
            assert_eq!(std::fs::read(root.join("etc/shadow")).unwrap(), b"");
            assert_eq!(std::fs::read(dir.join("outside")).unwrap(), b"host");
            let e = std::fs::write(root.join("proc/sys/knob"), "1").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            assert_eq!(
                std::fs::read_to_string(root.join("proc/sys/knob")).unwrap(),
                "0"
            );
            let e = apply(
                root,
                &GuestKernel::own(),
                &only(&[], &BTreeMap::new(), &["x".into()], &[]),
            )
            .unwrap_err();
            assert_eq!(e, "linux.maskedPaths x: not an absolute path");

            // root.readonly: the root refuses writes, its own mounts do not; the agent
            // can open it up again (a fork child's identity) and close it.
            std::fs::create_dir_all(root.join("data")).unwrap();
            // SAFETY: NUL-terminated strings that outlive the call; no data.
            let rc = unsafe {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    CString::new(root.join("data").to_str().unwrap())
                        .unwrap()
                        .as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0);
            // The root must be a mount point of its own, as the guest's overlay is.
            let r = CString::new(root.to_str().unwrap()).unwrap();
            // SAFETY: as above.
            let rc = unsafe {
                libc::mount(
                    r.as_ptr(),
                    r.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0);
            let no_sysctls = BTreeMap::new();
            let mut ro = only(&[], &no_sysctls, &[], &[]);
            ro.readonly_root = true;
            apply(root, &GuestKernel::own(), &ro).unwrap();
            assert!(is_read_only(root));
            let e = std::fs::write(root.join("new"), "").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            std::fs::write(root.join("data/ok"), "").unwrap();
            remount(root, false).unwrap();
            std::fs::write(root.join("new"), "").unwrap();
            remount(root, true).unwrap();
            assert!(is_read_only(root));

            // A fork child's hostname files go through a private writable view: the
            // container's root stays read-only.
            crate::identity::write_hostname_files(root, "fork-1").unwrap();
            assert_eq!(
                std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
                "fork-1\n"
            );
            assert!(std::fs::read_to_string(root.join("etc/hosts"))
                .unwrap()
                .contains("fork-1"));
            assert!(is_read_only(root));
            assert!(std::fs::write(root.join("etc/x"), "").is_err());
        });
    }

    #[test]
    fn device_nodes_are_made_for_devices_the_guest_has_only() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(dir.path().join("dev/char")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("dev/char/1:3"), "").unwrap();
        let node = |path: &str, kind: &str, major, minor| DeviceNode {
            path: path.into(),
            kind: kind.into(),
            major,
            minor,
            mode: 0o620,
            uid: 1000,
            gid: 5,
            host_has: true,
        };
        let k = kernel(dir.path());
        let apply_one = |d: DeviceNode| apply(&root, &k, &only(&[d], &BTreeMap::new(), &[], &[]));
        apply_one(node("/dev/sub/mynull", "c", 1, 3)).unwrap();
        let m = std::fs::metadata(root.join("dev/sub/mynull")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), libc::makedev(1, 3));
        assert_eq!(
            m.mode() & 0o7777,
            0o620,
            "the spec's mode, whatever the umask"
        );
        assert_eq!((m.uid(), m.gid()), (1000, 5));
        // Already there: kept.
        apply_one(node("/dev/sub/mynull", "c", 1, 3)).unwrap();
        // A FIFO needs no device.
        apply_one(node("/run/fifo", "p", 0, 0)).unwrap();
        assert!(std::fs::metadata(root.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        // A device only the host has: named, and nothing made.
        let e = apply_one(node("/dev/kvm", "c", 10, 232)).unwrap_err();
        assert!(
            e.starts_with("linux.devices /dev/kvm (c 10:232): the VM's kernel has no such device"),
            "{e}"
        );
        assert!(!root.join("dev/kvm").exists());
        // A device neither the host nor the guest has is a node all the same, as runc
        // makes one (opening it fails: no driver).
        let absent = DeviceNode {
            host_has: false,
            ..node("/dev/test1", "c", 10, 666)
        };
        apply_one(absent).unwrap();
        let m = std::fs::metadata(root.join("dev/test1")).unwrap();
        assert_eq!(m.rdev(), libc::makedev(10, 666));
        let e = apply_one(node("/dev/x", "a", 1, 3)).unwrap_err();
        assert!(e.contains("unknown type \"a\""), "{e}");
        let e = apply_one(node("dev/null", "c", 1, 3)).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        // A path through the image's symlink stays inside the root.
        std::os::unix::fs::symlink("/../../..", root.join("up")).unwrap();
        apply_one(node("/up/escaped", "p", 0, 0)).unwrap();
        assert!(root.join("escaped").exists());
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn files_written_in_the_root_never_follow_its_symlinks_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/hosts"), "host's").unwrap();
        // An image whose files point out of its root.
        std::os::unix::fs::symlink("../../out/hosts", root.join("etc/hosts")).unwrap();
        std::os::unix::fs::symlink("/../../out/hostname", root.join("etc/hostname")).unwrap();
        crate::identity::write_hostname_files(&root, "web-1").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("out/hosts")).unwrap(),
            b"host's"
        );
        assert!(!dir.path().join("out/hostname").exists());
        let meta = std::fs::symlink_metadata(root.join("etc/hostname")).unwrap();
        assert!(meta.is_file(), "the link was replaced by a file");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "web-1\n"
        );
        // A directory that climbs out is resolved inside the root.
        std::fs::remove_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../out", root.join("etc")).unwrap();
        let written = crate::identity::write_hostname_files(&root, "web-2");
        assert!(!dir.path().join("out/hostname").exists(), "{written:?}");
        assert_eq!(
            std::fs::read(dir.path().join("out/hosts")).unwrap(),
            b"host's"
        );
    }
}
