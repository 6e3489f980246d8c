//! Mounts in the container's root, as runc makes them: the agent's one `mount(2)`
//! wrapper ([`mount`]), and the spec's filesystems
//! ([`forkvm_agent_proto::Request::Filesystems`]: the `mounts` entries, the container's
//! volumes among them as `virtiofs` shares) mounted in the spec's order with their
//! options ([`apply`]).
//!
//! Each destination resolves inside the root as the container sees it (`openat2` with
//! `RESOLVE_IN_ROOT`: an image's symlinks cannot point it outside), missing directories
//! are created, and the mount goes onto the resolved directory through its descriptor.
//! What the guest mounted in the root at boot (`/proc`, `/sys`, `/dev` with its `pts`,
//! `shm` and `mqueue`) is detached first where the spec mounts the same destination,
//! so the mount table shows the spec's mounts in the spec's order. A `tmpfs` at `/dev`
//! gets runc's default devices and links ([`crate::init::populate_dev`]); `devpts` is
//! the guest's own pty filesystem bound in (the agent opens the container's terminals
//! there), with the spec's flags; `cgroup` and `cgroup2` mount the guest's cgroup v2
//! hierarchy rooted at the container's group ([`crate::cgroup`]; without one, refused).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use forkvm_agent_proto::{FsMount, FS_TYPES, MAX_FILESYSTEMS};

use crate::layout::FILE_SHARES;

/// `mount(2)`; `None` passes a null pointer.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call;
    // the data argument, when given, is a string, as every filesystem mounted here
    // takes.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The path that reaches what `fd` refers to (`/proc/self/fd/N`).
pub fn fd_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

/// A C string of `s`, or an error naming what held a NUL byte.
fn c(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("the {what} holds a NUL byte"))
}

/// What the guest mounts in the container's root at boot: detached where the spec
/// mounts the same destination (with what is under it).
const BOOT_MOUNTS: [&str; 3] = ["/dev", "/sys", "/proc"];

/// The options of one mount, split as `mount(2)` takes them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// The propagation to set after the mount (`MS_SHARED`, `MS_PRIVATE`, ... with
    /// `MS_REC` for the `r` forms); 0: left as it is.
    pub propagation: libc::c_ulong,
    /// The rest, for the filesystem (`mode=755,size=65536k`).
    pub data: String,
    /// `tmpcopyup` (podman's, for a tmpfs): what the directory held is copied in.
    pub copy_up: bool,
}

/// The `MS_*` bit a `mount(8)` flag sets, or clears: `(set, clear)`.
fn flag(name: &str) -> Option<(libc::c_ulong, libc::c_ulong)> {
    Some(match name {
        "defaults" => (0, 0),
        "ro" => (libc::MS_RDONLY, 0),
        "rw" => (0, libc::MS_RDONLY),
        "nosuid" => (libc::MS_NOSUID, 0),
        "suid" => (0, libc::MS_NOSUID),
        "nodev" => (libc::MS_NODEV, 0),
        "dev" => (0, libc::MS_NODEV),
        "noexec" => (libc::MS_NOEXEC, 0),
        "exec" => (0, libc::MS_NOEXEC),
        "sync" => (libc::MS_SYNCHRONOUS, 0),
        "async" => (0, libc::MS_SYNCHRONOUS),
        "dirsync" => (libc::MS_DIRSYNC, 0),
        "mand" => (libc::MS_MANDLOCK, 0),
        "nomand" => (0, libc::MS_MANDLOCK),
        "noatime" => (libc::MS_NOATIME, 0),
        "atime" => (0, libc::MS_NOATIME),
        "nodiratime" => (libc::MS_NODIRATIME, 0),
        "diratime" => (0, libc::MS_NODIRATIME),
        "relatime" => (libc::MS_RELATIME, 0),
        "norelatime" => (0, libc::MS_RELATIME),
        "strictatime" => (libc::MS_STRICTATIME, 0),
        "nostrictatime" => (0, libc::MS_STRICTATIME),
        "silent" => (libc::MS_SILENT, 0),
        "loud" => (0, libc::MS_SILENT),
        "iversion" => (libc::MS_I_VERSION, 0),
        "noiversion" => (0, libc::MS_I_VERSION),
        "acl" => (libc::MS_POSIXACL, 0),
        "noacl" => (0, libc::MS_POSIXACL),
        "nosymfollow" => (libc::MS_NOSYMFOLLOW, 0),
        "symfollow" => (0, libc::MS_NOSYMFOLLOW),
        _ => return None,
    })
}

/// The propagation an option sets.
fn propagation(name: &str) -> Option<libc::c_ulong> {
    Some(match name {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

/// Splits a spec's mount options as runc does: flags `mount(8)` knows set or clear
/// their bit (a recursive `r` form, `rro`, is its plain one: a new filesystem has no
/// mounts under it yet), propagation is kept for after the mount, podman's
/// `tmpcopyup` is noted, anything else is the filesystem's data. A bind or a remount
/// is not a filesystem mount: refused.
pub fn parse_options(options: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_str();
        if let Some(p) = propagation(opt) {
            o.propagation = p;
            continue;
        }
        let recursive = opt.strip_prefix('r').and_then(flag).filter(|_| opt != "rw");
        match (opt, flag(opt).or(recursive)) {
            ("bind" | "rbind" | "remount", _) => {
                return Err(format!("option {opt:?}: not one of a filesystem mount"))
            }
            ("tmpcopyup", _) => o.copy_up = true,
            ("notmpcopyup", _) => o.copy_up = false,
            (_, Some((set, clear))) => o.flags = (o.flags | set) & !clear,
            (other, None) => {
                if other.contains(',') {
                    return Err(format!("option {other:?} holds a comma"));
                }
                data.push(other);
            }
        }
    }
    o.data = data.join(",");
    Ok(o)
}

/// The share tag and file name of a `file` entry's source, `TAG/NAME`: each a plain
/// name (no `/`, not `.` or `..`), the tag at most 36 bytes and not starting with `.`
/// (the copies of a share's files are in `.TAG`).
fn file_source(source: &str) -> Result<(&str, &str), String> {
    let plain = |n: &str| !matches!(n, "" | "." | "..") && !n.contains(['/', '\0']);
    source
        .split_once('/')
        .filter(|(t, n)| plain(t) && !t.starts_with('.') && plain(n) && t.len() <= 36)
        .ok_or_else(|| "the source is not TAG/NAME".to_owned())
}

/// Binds a copy of file `NAME` of the VMM's share `TAG` (the entry's source) at the
/// entry's destination: a host file the container binds, copied by the runtime into a
/// directory it shares read-only. The share is mounted once, read-only, outside the
/// container's root (under [`FILE_SHARES`]); the file is copied again, with its mode
/// and owner, into the guest's memory beside it, so that the container may write it
/// (as a runc container writes the engine's file, though here the engine's is not
/// changed). A destination that is a link is followed inside the root; a missing one is
/// made as an empty file (its directories too), where a dangling link points if it is
/// one, as runc makes it.
fn bind_file(root: &OwnedFd, m: &FsMount, o: &Options, shares: &mut Shares) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;

    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let (tag, name) = file_source(&m.source)?;
    let share = shares.base.join(tag);
    if !shares.mounted.contains(tag) {
        std::fs::create_dir_all(&share)
            .map_err(|e| format!("cannot make {}: {e}", share.display()))?;
        let share_c = c(&share.to_string_lossy(), "share path")?;
        let tag_c = c(tag, "tag")?;
        mount(
            Some(&tag_c),
            &share_c,
            Some(c"virtiofs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )
        .map_err(|e| format!("cannot mount the share {tag:?}: {e}"))?;
        shares.mounted.insert(tag.to_owned());
    }
    let shared = share.join(name);
    let meta = std::fs::symlink_metadata(&shared)
        .ok()
        .filter(|m| m.is_file())
        .ok_or_else(|| format!("the share {tag:?} has no file {name:?}"))?;
    // The container's own copy, in the guest's memory.
    let copies = shares.base.join(format!(".{tag}"));
    std::fs::create_dir_all(&copies)
        .map_err(|e| format!("cannot make {}: {e}", copies.display()))?;
    let copy = copies.join(name);
    std::fs::copy(&shared, &copy)
        .and_then(|_| std::os::unix::fs::chown(&copy, Some(meta.uid()), Some(meta.gid())))
        .map_err(|e| format!("cannot copy {}: {e}", shared.display()))?;
    let open = |path: &str| {
        openat2(
            root,
            path.trim_start_matches('/'),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
    };
    let target = match open(&m.destination) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => {
            make_file(root, &m.destination)?;
            open(&m.destination).map_err(|e| format!("cannot open the file made: {e}"))?
        }
        Err(e) => return Err(format!("cannot open the destination: {e}")),
    };
    if rustix::fs::fstat(&target)
        .map_err(|e| e.to_string())?
        .st_mode
        & libc::S_IFMT
        == libc::S_IFDIR
    {
        return Err("the destination is a directory, not a file".into());
    }
    let copy_c = c(&copy.to_string_lossy(), "copy path")?;
    mount(Some(&copy_c), &fd_path(&target), None, libc::MS_BIND, None)
        .map_err(|e| format!("bind: {e}"))?;
    if o.flags != 0 {
        // A bind takes its flags from a remount of itself.
        let now = open(&m.destination).map_err(|e| format!("cannot open the bound file: {e}"))?;
        mount(
            None,
            &fd_path(&now),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | o.flags,
            None,
        )
        .map_err(|e| format!("remount: {e}"))?;
    }
    Ok(())
}

/// Makes the missing file `dest` (absolute, in `root`) empty, mode 0644, its
/// directories too; where `dest` is a dangling link, the file it points to (one link
/// followed, inside the root).
fn make_file(root: &OwnedFd, dest: &str) -> Result<(), String> {
    use rustix::fs::{Mode, OFlags};
    let create = |dest: &str| {
        let path = Path::new(dest);
        let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
            return Err(rustix::io::Errno::INVAL);
        };
        let dir = crate::shares::resolve_dir(root, &parent.to_string_lossy())
            .map_err(|_| rustix::io::Errno::NOENT)?;
        rustix::fs::openat(
            &dir,
            file,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(drop)
    };
    match create(dest) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => {
            // A dangling link: make what it points to.
            let path = Path::new(dest);
            let parent = path.parent().unwrap_or(Path::new("/"));
            let dir = crate::shares::resolve_dir(root, &parent.to_string_lossy())?;
            let file = path.file_name().unwrap_or_default();
            let target = rustix::fs::readlinkat(&dir, file, Vec::new())
                .map_err(|e| format!("cannot make the file: {e}"))?;
            let target = Path::new(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(target.as_bytes()),
            );
            let absolute = match target.is_absolute() {
                true => target.to_owned(),
                false => parent.join(target),
            };
            create(&absolute.to_string_lossy()).map_err(|e| {
                format!(
                    "cannot make {} (the link's target): {e}",
                    absolute.display()
                )
            })
        }
        Err(e) => Err(format!("cannot make the file: {e}")),
    }
}

/// Most entries `tmpcopyup` copies into one tmpfs.
const MAX_COPY_UP: usize = 100_000;

/// Copies what the directory `from` holds into `to` (a new tmpfs over it): files,
/// directories, symlinks and their modes and owners; other kinds are skipped. At most
/// [`MAX_COPY_UP`] entries, `budget` counting them.
fn copy_up(from: &Path, to: &Path, budget: &mut usize) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        *budget = budget.checked_sub(1).ok_or_else(|| {
            std::io::Error::other(format!("more than {MAX_COPY_UP} entries to copy"))
        })?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_up(&src, &dst, budget)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            continue;
        }
        if !kind.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

/// Mounts `mounts` in `root`, in order (see the module documentation); the first
/// failure stops it, naming the mount. Every entry is checked before anything changes.
pub fn apply(
    root: &Path,
    mounts: &[FsMount],
    guest_pts: &Path,
    cgroup_procs: Option<&CStr>,
) -> Result<(), String> {
    apply_in(
        root,
        mounts,
        guest_pts,
        cgroup_procs,
        &mut Shares::at(
            Path::new(FILE_SHARES),
            &Path::new(crate::containers::CONTAINERS).join(crate::containers::SHARES),
        ),
    )
}

/// Where the shares of `file` entries are mounted, and which are; where the shares that
/// volume directories are bound from are.
struct Shares {
    base: std::path::PathBuf,
    mounted: std::collections::HashSet<String>,
    /// See [`crate::shares::mounted`].
    volumes: std::path::PathBuf,
}

impl Shares {
    /// The shares of `file` entries under `base`, those mounted there already (by an
    /// earlier request) known as such; those of volume directories under `volumes`.
    fn at(base: &Path, volumes: &Path) -> Shares {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mounted = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter_map(|p| Path::new(p).strip_prefix(base).ok())
            .filter_map(|tag| tag.to_str().filter(|t| !t.is_empty() && !t.contains('/')))
            .map(str::to_owned)
            .collect();
        Shares {
            base: base.to_owned(),
            mounted,
            volumes: volumes.to_owned(),
        }
    }
}

/// [`apply`], with the shares of `file` entries and volumes where `shares` says.
fn apply_in(
    root: &Path,
    mounts: &[FsMount],
    guest_pts: &Path,
    cgroup_procs: Option<&CStr>,
    shares: &mut Shares,
) -> Result<(), String> {
    if mounts.len() > MAX_FILESYSTEMS {
        return Err(format!(
            "{} mounts, at most {MAX_FILESYSTEMS}",
            mounts.len()
        ));
    }
    let named = |m: &FsMount, e: String| format!("mount {} ({}): {e}", m.destination, m.fs_type);
    let mut parsed = Vec::with_capacity(mounts.len());
    for m in mounts {
        if !m.destination.starts_with('/') {
            return Err(named(m, "the destination is not absolute".into()));
        }
        if !FS_TYPES.contains(&m.fs_type.as_str())
            && !matches!(m.fs_type.as_str(), "virtiofs" | "file")
        {
            return Err(named(
                m,
                format!("not a type the guest mounts ({})", FS_TYPES.join(", ")),
            ));
        }
        if m.fs_type == "file" {
            file_source(&m.source).map_err(|e| named(m, e))?;
        }
        if m.fs_type == "virtiofs" {
            crate::shares::volume_source(&m.source).map_err(|e| named(m, e))?;
        }
        let o = parse_options(&m.options).map_err(|e| named(m, e))?;
        let cstrs = (
            c(&m.source, "source").map_err(|e| named(m, e))?,
            c(&o.data, "options").map_err(|e| named(m, e))?,
        );
        parsed.push((m, o, cstrs));
    }
    if root == Path::new("/") {
        return Err("the guest has no container root (it booted without one)".into());
    }
    let root_fd = crate::shares::open_root(root)?;
    for dest in BOOT_MOUNTS {
        if mounts
            .iter()
            .any(|m| Path::new(&m.destination) == Path::new(dest))
        {
            detach(&root_fd, dest)?;
        }
    }
    let mut dev_tmpfs = false;
    for (m, o, (source, data)) in parsed {
        if m.fs_type == "file" {
            bind_file(&root_fd, m, &o, shares).map_err(|e| named(m, e))?;
            continue;
        }
        let dir = crate::shares::resolve_dir(&root_fd, &m.destination).map_err(|e| named(m, e))?;
        if same_file(&dir, &root_fd) {
            // An image's `/proc -> /`: a mount there would cover the whole root.
            return Err(named(
                m,
                "the destination resolves to the container's root".into(),
            ));
        }
        if m.fs_type == "virtiofs" {
            // A volume, in its place among the others: the VMM's share of that tag, or
            // a directory in it.
            let bound = match crate::shares::volume_source(&m.source).map_err(|e| named(m, e))? {
                (tag, None) => {
                    let share = forkvm_agent_proto::ShareMount {
                        tag: tag.to_owned(),
                        target: m.destination.clone(),
                        read_only: o.flags & libc::MS_RDONLY != 0,
                    };
                    crate::shares::mount_one(&root_fd, &share)
                }
                (tag, Some(path)) => crate::shares::bind_from_share(
                    &shares.volumes,
                    (tag, path),
                    &root_fd,
                    &m.destination,
                    o.flags,
                ),
            };
            bound.map_err(|e| named(m, e))?;
            continue;
        }
        let target = fd_path(&dir);
        // What the directory held, for `tmpcopyup`: read through this descriptor once
        // the tmpfs covers the path.
        let below = match o.copy_up && m.fs_type == "tmpfs" {
            true => Some(
                rustix::fs::openat(
                    &dir,
                    ".",
                    rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| named(m, format!("tmpcopyup: {e}")))?,
            ),
            false => None,
        };
        let mounted = match m.fs_type.as_str() {
            "devpts" => {
                let pts = c(&guest_pts.to_string_lossy(), "guest's pts path")?;
                mount(Some(&pts), &target, None, libc::MS_BIND, None).and_then(|()| {
                    // A bind takes its flags from a remount of itself.
                    let now = crate::shares::resolve_dir(&root_fd, &m.destination)
                        .map_err(std::io::Error::other)?;
                    mount(
                        None,
                        &fd_path(&now),
                        None,
                        libc::MS_BIND | libc::MS_REMOUNT | o.flags,
                        None,
                    )
                })
            }
            // The container's own group as the root, when it has one.
            "cgroup" | "cgroup2" => match cgroup_procs {
                Some(procs) => crate::cgroup::mount_namespaced(
                    procs,
                    &target,
                    o.flags,
                    crate::reaper::Reaper::global(),
                ),
                // Not the guest's whole hierarchy (the agent's own groups with it).
                None => Err(std::io::Error::other(
                    "the container has no cgroup in the guest (the cgroup request comes first)",
                )),
            },
            fs_type => {
                let fs_type = c(fs_type, "type")?;
                let data = (!o.data.is_empty()).then_some(data.as_c_str());
                mount(Some(&source), &target, Some(&fs_type), o.flags, data)
            }
        };
        mounted.map_err(|e| named(m, e.to_string()))?;
        if o.propagation != 0 {
            let now =
                crate::shares::resolve_dir(&root_fd, &m.destination).map_err(|e| named(m, e))?;
            mount(None, &fd_path(&now), None, o.propagation, None)
                .map_err(|e| named(m, format!("propagation: {e}")))?;
        }
        if let Some(below) = below {
            let now =
                crate::shares::resolve_dir(&root_fd, &m.destination).map_err(|e| named(m, e))?;
            let path =
                |fd: &OwnedFd| std::path::PathBuf::from(fd_path(fd).to_string_lossy().into_owned());
            let mut budget = MAX_COPY_UP;
            copy_up(&path(&below), &path(&now), &mut budget)
                .map_err(|e| named(m, format!("tmpcopyup: {e}")))?;
        }
        dev_tmpfs |= m.fs_type == "tmpfs" && Path::new(&m.destination) == Path::new("/dev");
    }
    if dev_tmpfs {
        let dev = crate::shares::resolve_dir(&root_fd, "/dev")?;
        crate::init::populate_dev(Path::new(&fd_path(&dev).to_string_lossy().into_owned()))
            .map_err(|e| format!("mount /dev (tmpfs): the default devices: {e}"))?;
    }
    Ok(())
}

/// Whether `a` and `b` are the same file (device and inode).
pub(crate) fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Detaches the mount at `dest` in the root, and every mount under it; nothing when
/// the path is missing or not a mount point.
fn detach(root: &OwnedFd, dest: &str) -> Result<(), String> {
    let Some(dir) = crate::container::resolve(root, dest)? else {
        return Ok(());
    };
    // Only a mount inside the root: an image's `/proc -> /` resolves to the root itself,
    // which stays.
    let mount_id = |fd: &OwnedFd| {
        rustix::fs::statx(
            fd,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::MNT_ID,
        )
        .map(|st| st.stx_mnt_id)
        .map_err(|e| format!("cannot read the mount of {dest}: {e}"))
    };
    if mount_id(&dir)? == mount_id(root)? {
        return Ok(());
    }
    let path = fd_path(&dir);
    // SAFETY: a NUL-terminated path that lives across the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    match rc {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            e => Err(format!("cannot detach the guest's {dest}: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Result<Options, String> {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_propagation_and_data_as_runc_splits_them() {
        let o = opts(&[
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rshared",
        ])
        .unwrap();
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(o.propagation, libc::MS_SHARED | libc::MS_REC);
        assert_eq!(o.data, "mode=755,size=65536k");
        // A later option clears what an earlier one set.
        let o = opts(&["ro", "nodev", "rw", "dev", "noexec"]).unwrap();
        assert_eq!(o.flags, libc::MS_NOEXEC);
        assert_eq!(o.propagation, 0);
        assert_eq!(o.data, "");
        for bad in ["bind", "rbind", "remount"] {
            let e = opts(&["nosuid", bad]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(opts(&["mode=755,uid=0"]).unwrap_err().contains("comma"));
        // runc's other flags, the recursive forms as the plain ones, podman's tmpcopyup.
        let o = opts(&[
            "rro",
            "rnosuid",
            "nosymfollow",
            "silent",
            "tmpcopyup",
            "size=1k",
        ])
        .unwrap();
        assert_eq!(
            o.flags,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOSYMFOLLOW | libc::MS_SILENT
        );
        assert!(o.copy_up);
        assert_eq!(o.data, "size=1k");
        assert!(!opts(&["tmpcopyup", "notmpcopyup"]).unwrap().copy_up);
        assert_eq!(opts(&["rw", "rrw"]).unwrap().flags, 0);
    }

    #[test]
    fn bad_entries_are_refused_before_anything_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let m = |dest: &str, ty: &str, options: &[&str]| FsMount {
            destination: dest.into(),
            fs_type: ty.into(),
            source: ty.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        };
        let pts = Path::new("/dev/pts");
        for (mounts, wanted) in [
            (
                vec![m("relative", "tmpfs", &[])],
                "mount relative (tmpfs): the destination is not absolute",
            ),
            (
                vec![m("/x", "ext4", &[])],
                "mount /x (ext4): not a type the guest mounts",
            ),
            (
                vec![m("/ok", "tmpfs", &[]), m("/y", "tmpfs", &["bind"])],
                "mount /y (tmpfs): option \"bind\"",
            ),
        ] {
            let e = apply(dir.path(), &mounts, pts, None).unwrap_err();
            assert!(e.starts_with(wanted), "{e}");
            // The good entry before the bad one was not mounted (not even created).
            assert!(!dir.path().join("ok").exists());
        }
        let many = vec![m("/t", "tmpfs", &[]); MAX_FILESYSTEMS + 1];
        assert!(apply(dir.path(), &many, pts, None)
            .unwrap_err()
            .contains("at most"));
    }

    #[test]
    fn a_destination_that_is_the_root_is_refused_and_a_guest_without_one_too() {
        let e = apply(Path::new("/"), &[], Path::new("/dev/pts"), None).unwrap_err();
        assert!(e.contains("no container root"), "{e}");
        forkvm_test_support::in_own_mounts(|dir| {
            // The container's root is a mount of its own, as the guest's overlay is.
            let root = dir.join("root");
            std::fs::create_dir(&root).unwrap();
            let r = CString::new(root.to_str().unwrap()).unwrap();
            mount(Some(c"tmpfs"), &r, Some(c"tmpfs"), 0, None).unwrap();
            std::fs::write(root.join("marker"), "").unwrap();
            std::os::unix::fs::symlink("/", root.join("proc")).unwrap();
            let proc = FsMount {
                destination: "/proc".into(),
                fs_type: "proc".into(),
                source: "proc".into(),
                options: vec![],
            };
            let e = apply(&root, &[proc], Path::new("/dev/pts"), None).unwrap_err();
            assert_eq!(
                e,
                "mount /proc (proc): the destination resolves to the container's root"
            );
            // The root was neither detached nor covered.
            assert!(root.join("marker").exists());
        });
    }

    /// A volume given as `TAG/PATH` is that directory of the share, bound: the mount
    /// table names it (`/PATH` as the bind's root), the entry's flags apply to the bind,
    /// and a link in the share is not followed.
    #[test]
    fn a_directory_of_a_share_is_bound_with_its_path_as_the_mounts_root() {
        forkvm_test_support::in_own_mounts(|top| {
            let root = top.join("root");
            let base = top.join("shares");
            // The share, as the guest mounts it: here a tmpfs, holding the volume under
            // its name, and a link out of it.
            let share = base.join("forkvm-0");
            std::fs::create_dir_all(&share).unwrap();
            std::fs::create_dir(&root).unwrap();
            let dir = CString::new(share.to_str().unwrap()).unwrap();
            mount(Some(c"tmpfs"), &dir, Some(c"tmpfs"), 0, None).unwrap();
            std::fs::create_dir_all(share.join("etc/sub")).unwrap();
            std::fs::write(share.join("etc/sub/file"), "volume's").unwrap();
            std::os::unix::fs::symlink("/", share.join("out")).unwrap();
            let mut shares = Shares::at(&top.join("files"), &base);
            let v = |dest: &str, src: &str, options: &[&str]| FsMount {
                destination: dest.into(),
                fs_type: "virtiofs".into(),
                source: src.into(),
                options: options.iter().map(|s| s.to_string()).collect(),
            };
            let mounts = [
                v("/mnt/etc-ro", "forkvm-0/etc", &["ro"]),
                v("/mnt/sub", "forkvm-0/etc/sub", &[]),
            ];
            apply_in(&root, &mounts, Path::new("/dev/pts"), None, &mut shares).unwrap();
            let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
            assert_eq!(read("mnt/etc-ro/sub/file"), "volume's");
            assert_eq!(read("mnt/sub/file"), "volume's");
            assert!(crate::container::is_read_only(&root.join("mnt/etc-ro")));
            assert!(!crate::container::is_read_only(&root.join("mnt/sub")));
            std::fs::write(root.join("mnt/sub/new"), "written inside").unwrap();
            assert_eq!(
                std::fs::read_to_string(share.join("etc/sub/new")).unwrap(),
                "written inside"
            );
            // The mount table: each bind's root is its path in the share.
            let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let root_of = |at: &Path| {
                info.lines()
                    .map(|l| l.split(' ').collect::<Vec<_>>())
                    .find(|f| Path::new(f[4]) == at)
                    .map(|f| f[3].to_owned())
            };
            assert_eq!(root_of(&root.join("mnt/etc-ro")).as_deref(), Some("/etc"));
            assert_eq!(root_of(&root.join("mnt/sub")).as_deref(), Some("/etc/sub"));

            // A link in the share is not followed; the entry is named.
            let e = apply_in(
                &root,
                &[v("/mnt/out", "forkvm-0/out", &[])],
                Path::new("/dev/pts"),
                None,
                &mut shares,
            )
            .unwrap_err();
            assert!(
                e.contains("mount /mnt/out (virtiofs)") && e.contains("out in share"),
                "{e}"
            );
            assert!(std::fs::read_dir(root.join("mnt/out"))
                .unwrap()
                .next()
                .is_none());
            // Sources that are not TAG/PATH of plain names are refused before anything
            // is mounted.
            for bad in [
                "forkvm-0/../x",
                "forkvm-0/",
                "forkvm-0/a//b",
                "/etc",
                "forkvm-0/./a",
            ] {
                let e = apply_in(
                    &root,
                    &[v("/mnt/bad", bad, &[])],
                    Path::new("/dev/pts"),
                    None,
                    &mut shares,
                )
                .unwrap_err();
                assert!(e.contains("mount /mnt/bad (virtiofs)"), "{bad}: {e}");
                assert!(!root.join("mnt/bad").exists(), "{bad}: nothing made");
            }
            for at in ["mnt/etc-ro", "mnt/sub"] {
                let c = CString::new(root.join(at).to_str().unwrap()).unwrap();
                // SAFETY: a NUL-terminated path that outlives the call.
                assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
            }
            // SAFETY: a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::umount2(dir.as_ptr(), libc::MNT_DETACH) }, 0);
        });
    }

    #[test]
    fn bound_files_are_the_shared_copies_at_their_destinations() {
        forkvm_test_support::in_own_mounts(|root| {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            // The share of copies, as the guest mounts it: read-only, noexec.
            let base = tempfile::tempdir().unwrap();
            let copies = base.path().join("forkvm-files");
            std::fs::create_dir(&copies).unwrap();
            let dir = CString::new(copies.to_str().unwrap()).unwrap();
            mount(Some(c"tmpfs"), &dir, Some(c"tmpfs"), 0, None).unwrap();
            std::fs::write(copies.join("0"), "hosts copy").unwrap();
            std::fs::write(copies.join("1"), "resolv copy").unwrap();
            std::fs::write(copies.join("2"), "#!/bin/sh\necho run\n").unwrap();
            std::fs::set_permissions(copies.join("2"), PermissionsExt::from_mode(0o750)).unwrap();
            std::os::unix::fs::chown(copies.join("2"), Some(1000), Some(1001)).unwrap();
            let flags = libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOEXEC;
            // A process another test forks in this process holds our descriptors until
            // it execs or exits: while one of these files is open in it for writing,
            // the remount is refused (EBUSY). It does not last.
            let mut tries = 0;
            while let Err(e) = mount(None, &dir, None, flags, None) {
                tries += 1;
                assert!(e.raw_os_error() == Some(libc::EBUSY) && tries < 200, "{e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let mut shares = Shares::at(base.path(), base.path());
            shares.mounted.insert("forkvm-files".into());
            // The image's /etc/hosts, a resolv.conf that is a link (Ubuntu's), a
            // dangling link (systemd's stub that is not there yet).
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::create_dir_all(root.join("run/resolve")).unwrap();
            std::fs::write(root.join("etc/hosts"), "image's").unwrap();
            std::fs::write(root.join("run/resolve/stub.conf"), "image's").unwrap();
            std::os::unix::fs::symlink("/run/resolve/stub.conf", root.join("etc/resolv.conf"))
                .unwrap();
            std::os::unix::fs::symlink("../run/systemd/stub", root.join("etc/dangling")).unwrap();
            let f = |dest: &str, src: &str, options: &[&str]| FsMount {
                destination: dest.into(),
                fs_type: "file".into(),
                source: src.into(),
                options: options.iter().map(|s| s.to_string()).collect(),
            };
            let mounts = [
                f("/etc/hosts", "forkvm-files/0", &[]),
                f("/etc/resolv.conf", "forkvm-files/1", &["ro"]),
                f("/run/.containerenv", "forkvm-files/2", &[]),
                f("/etc/dangling", "forkvm-files/0", &[]),
            ];
            apply_in(root, &mounts, Path::new("/dev/pts"), None, &mut shares).unwrap();
            let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
            assert_eq!(read("etc/hosts"), "hosts copy");
            // The link was followed inside the root: its target is bound.
            assert_eq!(read("run/resolve/stub.conf"), "resolv copy");
            assert_eq!(
                read("run/systemd/stub"),
                "hosts copy",
                "a dangling link's target"
            );
            // The container's copy is its own: writable (the engine's is not touched)
            // and executable, unless the spec says `ro`; with the copy's owner and mode.
            assert!(crate::container::is_read_only(
                &root.join("run/resolve/stub.conf")
            ));
            std::fs::write(root.join("etc/hosts"), "written inside").unwrap();
            assert_eq!(
                std::fs::read_to_string(copies.join("0")).unwrap(),
                "hosts copy"
            );
            let script = root.join("run/.containerenv");
            let meta = std::fs::metadata(&script).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o777),
                (1000, 1001, 0o750)
            );
            // Waited for through the reaper, as everything in the agent is: the
            // reaper tests run in this process and collect every child.
            #[allow(clippy::zombie_processes)] // the reaper waits for it
            let mut ran = std::process::Command::new(&script)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let handle = crate::reaper::Reaper::global().claim(ran.id() as libc::pid_t);
            let mut out = String::new();
            std::io::Read::read_to_string(&mut ran.stdout.take().unwrap(), &mut out).unwrap();
            let status = handle
                .wait_timeout(std::time::Duration::from_secs(10))
                .expect("the script exits");
            assert_eq!((status, out.as_str()), (0, "run\n"));
            // Unmounted, the image's files are as they were: nothing was written in.
            for p in ["etc/hosts", "run/resolve/stub.conf", "run/.containerenv"] {
                let c = CString::new(root.join(p).to_str().unwrap()).unwrap();
                // SAFETY: a NUL-terminated path that outlives the call.
                assert_eq!(unsafe { libc::umount2(c.as_ptr(), 0) }, 0, "{p}");
            }
            assert_eq!(read("etc/hosts"), "image's");
            assert_eq!(read("run/resolve/stub.conf"), "image's");
            assert_eq!(
                read("run/.containerenv"),
                "",
                "made empty, as runc makes it"
            );

            // What cannot be bound: refused, naming the mount and why; a bad source
            // before anything is mounted.
            let mut err = |m: &[FsMount]| {
                apply_in(root, m, Path::new("/dev/pts"), None, &mut shares).unwrap_err()
            };
            let e = err(&[f("/etc", "forkvm-files/0", &[])]);
            assert!(
                e.contains("mount /etc (file): the destination is a directory"),
                "{e}"
            );
            for bad in [
                "forkvm-files/../../etc/passwd",
                "../0",
                "./0",
                ".x/0",
                "forkvm-files/",
            ] {
                let e = err(&[f("/y", "forkvm-files/0", &[]), f("/x", bad, &[])]);
                assert!(
                    e.contains("mount /x (file): the source is not TAG/NAME"),
                    "{e}"
                );
                assert!(!root.join("y").exists(), "nothing mounted before the check");
            }
            let e = err(&[f("/x", "forkvm-files/9", &[])]);
            assert!(e.contains("has no file \"9\""), "{e}");
            assert!(!root.join("x").exists(), "nothing made for a refused entry");
        });
    }

    #[test]
    fn filesystems_are_mounted_in_order_with_their_options_replacing_the_boot_ones() {
        forkvm_test_support::in_own_mounts(|root| {
            // What init mounts at boot: a /proc and a /dev with a tmpfs under it.
            let boot = |fs: &str, dest: &str| {
                let d = root.join(dest.trim_start_matches('/'));
                std::fs::create_dir_all(&d).unwrap();
                let (fs, d) = (
                    CString::new(fs).unwrap(),
                    CString::new(d.to_str().unwrap()).unwrap(),
                );
                mount(Some(&fs), &d, Some(&fs), 0, None).unwrap();
            };
            boot("tmpfs", "/dev");
            boot("tmpfs", "/dev/shm");
            std::fs::write(root.join("dev/boot-marker"), "").unwrap();
            let m = |dest: &str, ty: &str, src: &str, options: &[&str]| FsMount {
                destination: dest.into(),
                fs_type: ty.into(),
                source: src.into(),
                options: options.iter().map(|s| s.to_string()).collect(),
            };
            // An image's directory a tmpfs with tmpcopyup lands on, and a link out.
            std::fs::create_dir_all(root.join("etc/sub")).unwrap();
            std::fs::write(root.join("etc/sub/file"), "kept").unwrap();
            std::os::unix::fs::symlink("sub/file", root.join("etc/link")).unwrap();
            let mounts = [
                m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
                m(
                    "/dev",
                    "tmpfs",
                    "tmpfs",
                    &["nosuid", "strictatime", "mode=755", "size=65536k"],
                ),
                m(
                    "/dev/shm",
                    "tmpfs",
                    "shm",
                    &["nosuid", "noexec", "nodev", "mode=1777", "size=1k"],
                ),
                m(
                    "/sys",
                    "sysfs",
                    "sysfs",
                    &["nosuid", "noexec", "nodev", "ro"],
                ),
                m("/tmp/private", "tmpfs", "tmpfs", &["private", "size=1k"]),
                m("/etc", "tmpfs", "tmpfs", &["tmpcopyup", "size=1m"]),
            ];
            apply(root, &mounts, Path::new("/dev/pts"), None).unwrap();

            // The boot /dev went (its marker with it); the spec's has runc's devices.
            assert!(!root.join("dev/boot-marker").exists());
            assert!(root.join("dev/null").exists() && root.join("dev/ptmx").is_symlink());
            assert!(root.join("proc/self").exists(), "proc is mounted");
            assert!(root.join("sys/kernel").exists(), "sysfs is mounted");
            assert!(crate::container::is_read_only(&root.join("sys")));
            assert!(!crate::container::is_read_only(&root.join("dev")));
            let st = rustix::fs::statvfs(root.join("dev/shm")).unwrap();
            assert!(st.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC));
            assert_eq!(
                st.f_blocks * st.f_frsize,
                4096,
                "size=1k rounds up to a page"
            );

            // The mount table lists them in the spec's order, after the root.
            let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let prefix = root.to_str().unwrap();
            let order: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter_map(|p| p.strip_prefix(prefix))
                .filter(|p| !p.is_empty())
                .collect();
            // tmpcopyup: the tmpfs holds what the directory held.
            assert_eq!(
                std::fs::read_to_string(root.join("etc/sub/file")).unwrap(),
                "kept"
            );
            assert_eq!(
                std::fs::read_link(root.join("etc/link")).unwrap(),
                Path::new("sub/file")
            );
            assert_eq!(
                order,
                ["/proc", "/dev", "/dev/shm", "/sys", "/tmp/private", "/etc"],
                "{info}"
            );
        });
    }
}
