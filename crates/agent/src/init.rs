//! PID-1 mode: the agent as the guest's init in an initramfs without a shell. Boot
//! (mounts, console, modules, `lo`, hostname, the container root), the ready line, and
//! power-off. Everything that needs a real VM lives here, kept small; the pure parts
//! (kernel command line, module list, hosts file) are unit-tested.
//!
//! Reads: `/proc/cmdline` (`forkvm.hostname=`, `forkvm.rootfs=`, `forkvm.rootfstype=`)
//! `/etc/forkvm/modules` (one absolute module path per line, loaded in order) and
//! `/etc/forkvm/module-devices` (the drivers among them to skip without their devices).

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::identity;
use crate::layout::{LOWER, ROOTFS, RW};
use crate::power::halt;
use crate::protocol::AGENT_PORT;
use crate::server::{self, Agent, AgentConfig, Mode};

/// Modules to load at boot, one absolute path per line ([`parse_modules`]).
pub const MODULES_FILE: &str = "/etc/forkvm/modules";
/// Which of them only certain virtio devices need ([`parse_module_devices`]); without
/// it, every module loads.
pub const MODULE_DEVICES_FILE: &str = "/etc/forkvm/module-devices";
/// Prefix of the line printed once the agent can be reached (the boot benchmark greps it).
pub const READY_PREFIX: &str = "forkvm-init: ready uptime=";
/// How long boot waits for the rootfs block device (or share) to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// `finit_module` flag: the kernel decompresses the module itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// A fatal boot error.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A system call on a path failed.
    #[error("{what} {path}: {source}")]
    Os {
        /// The operation.
        what: &'static str,
        /// Its object.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The rootfs device never appeared.
    #[error("rootfs device {0} did not appear within {DEVICE_WAIT:?}")]
    NoDevice(String),
}

/// What the kernel command line asks of PID 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// `forkvm.hostname=NAME`.
    pub hostname: Option<String>,
    /// `forkvm.rootfs=/dev/vdX`: the container's root filesystem (with `virtiofs`, the
    /// tag of the VMM's share).
    pub rootfs: Option<String>,
    /// `forkvm.rootfstype=TYPE` (default `ext4`; `virtiofs` for a shared directory).
    pub rootfstype: String,
}

impl BootConfig {
    /// Parses `/proc/cmdline`; unknown words are ignored, the last of a repeated key wins.
    pub fn parse(cmdline: &str) -> BootConfig {
        let mut cfg = BootConfig {
            rootfstype: "ext4".into(),
            ..BootConfig::default()
        };
        for word in cmdline.split_whitespace() {
            if word == "--" {
                break;
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            match key {
                "forkvm.hostname" if !value.is_empty() => cfg.hostname = Some(value.into()),
                "forkvm.rootfs" if !value.is_empty() => cfg.rootfs = Some(value.into()),
                "forkvm.rootfstype" if !value.is_empty() => cfg.rootfstype = value.into(),
                _ => {}
            }
        }
        cfg
    }
}

/// Module paths of a modules file: one per line, blank lines and `#` comments skipped.
pub fn parse_modules(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// The module-devices file: for each module needed only with certain virtio devices,
/// its path and their types (`/lib/modules/failover.ko 1,19`). A line this agent cannot
/// read names no condition (the module loads).
pub fn parse_module_devices(text: &str) -> HashMap<PathBuf, Vec<u32>> {
    text.lines()
        .filter_map(|l| {
            let (path, types) = l.trim().split_once(char::is_whitespace)?;
            let types: Option<Vec<u32>> = types.trim().split(',').map(|t| t.parse().ok()).collect();
            Some((PathBuf::from(path), types?))
        })
        .collect()
}

/// The types of the virtio devices the guest's transports found
/// (`/sys/bus/virtio/devices/*/device`, `0x0001`); `None` when sysfs cannot say.
fn virtio_devices_present() -> Option<Vec<u32>> {
    let mut types = Vec::new();
    for entry in std::fs::read_dir("/sys/bus/virtio/devices").ok()? {
        let id = std::fs::read_to_string(entry.ok()?.path().join("device")).ok()?;
        types.push(u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok()?);
    }
    Some(types)
}

/// Prints a line on the console; a console error is not worth dying for.
fn console(msg: &str) {
    let _ = writeln!(io::stderr(), "{msg}");
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// `mkdir -p target`, then mount; an already-mounted target (EBUSY) is fine.
fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|source| InitError::Os {
        what: "mkdir",
        path: target.to_owned(),
        source,
    })?;
    let (src, tgt, fs, dat) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    match crate::mounts::mount(Some(&src), &tgt, Some(&fs), flags, Some(&dat)) {
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => Err(InitError::Os {
            what: "mount",
            path: target.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// The initramfs's own mounts.
fn mount_base() -> Result<(), InitError> {
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, "")?;
    mount("sysfs", "/sys", "sysfs", NOSUID | NODEV | NOEXEC, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", NOSUID, "mode=0755")?;
    open_console();
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        NOSUID | NOEXEC,
        "mode=0620,ptmxmode=0666",
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", NOSUID | NODEV, "mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "mode=1777")?;
    Ok(())
}

/// Points any closed fd among 0, 1, 2 at `/dev/console`.
fn open_console() {
    let closed = |fd| {
        // SAFETY: F_GETFD only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) < 0 }
    };
    if !(0..3).any(closed) {
        return;
    }
    let c = cstr("/dev/console");
    // SAFETY: a valid path; the new descriptor is ours.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if target != fd && closed(target) {
            // SAFETY: dup2 onto a closed standard descriptor.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
    }
}

/// Loads each module of [`MODULES_FILE`] in order, but a driver whose devices the VM
/// does not have; failures (other than "already loaded") are printed and boot continues.
fn load_modules() {
    let Ok(text) = std::fs::read_to_string(MODULES_FILE) else {
        return;
    };
    let devices = std::fs::read_to_string(MODULE_DEVICES_FILE)
        .map(|t| parse_module_devices(&t))
        .unwrap_or_default();
    for path in parse_modules(&text) {
        // A driver for devices this VM lacks is skipped (tens of milliseconds each).
        // Asked again for each: a transport loaded since may have found more.
        if let Some(wanted) = devices.get(&path) {
            if virtio_devices_present().is_some_and(|have| !wanted.iter().any(|t| have.contains(t)))
            {
                continue;
            }
        }
        if let Err(e) = load_module(&path) {
            console(&format!("forkvm-agent: module {}: {e}", path.display()));
        }
    }
}

fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let compressed = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("xz" | "zst" | "gz")
    );
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: finit_module reads the open file and a valid empty parameter string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Mounts the container's root at [`ROOTFS`], with `/proc`, `/sys` and the container's
/// `/dev` ([`container_dev`]) inside: for `virtiofs`, the VMM's share tagged `source`
/// itself (writes reach the host's directory, as a runc container's reach its bundle);
/// else the block device `source` read-only under an overlay with a tmpfs upper.
fn assemble_rootfs(source: &str, fstype: &str) -> Result<(), InitError> {
    if fstype == "virtiofs" {
        // The tag is known once the driver probed the device (EINVAL until then).
        let start = Instant::now();
        while let Err(e) = mount(source, ROOTFS, "virtiofs", 0, "") {
            if start.elapsed() > DEVICE_WAIT {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        overlay_root(source, fstype)?;
    }
    let root = Path::new(ROOTFS);
    mount_in(root, "proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, "")?;
    mount_in(
        root,
        "sysfs",
        "/sys",
        "sysfs",
        NOSUID | NODEV | NOEXEC | libc::MS_RDONLY,
        "",
    )?;
    container_dev(root)
}

/// Mounts `device` read-only under an overlay with a tmpfs upper at [`ROOTFS`].
fn overlay_root(device: &str, fstype: &str) -> Result<(), InitError> {
    let start = Instant::now();
    while !Path::new(device).exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(InitError::NoDevice(device.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let data = if fstype == "ext4" { "noload" } else { "" };
    mount(device, LOWER, fstype, libc::MS_RDONLY, data)?;
    mount("tmpfs", RW, "tmpfs", NOSUID | NODEV, "mode=0755")?;
    for dir in ["upper", "work"] {
        let path = format!("{RW}/{dir}");
        std::fs::create_dir_all(&path).map_err(|source| InitError::Os {
            what: "mkdir",
            path,
            source,
        })?;
    }
    mount(
        "overlay",
        ROOTFS,
        "overlay",
        0,
        &format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"),
    )
}

/// The directory `target` (absolute, as the container sees it) names inside `root`,
/// resolved there (`RESOLVE_IN_ROOT`: an image's `dev -> /` cannot point it at the
/// guest's own root) and created where missing.
fn dir_in(root: &Path, target: &str) -> Result<std::os::fd::OwnedFd, InitError> {
    let failed = |e: String| InitError::Os {
        what: "resolve",
        path: format!("{}{target}", root.display()),
        source: io::Error::other(e),
    };
    let root_fd = crate::shares::open_root(root).map_err(failed)?;
    crate::shares::resolve_dir(&root_fd, target).map_err(failed)
}

/// [`mount`] onto `target` inside `root` ([`dir_in`]), through its descriptor.
fn mount_in(
    root: &Path,
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let dir = dir_in(root, target)?;
    mount(
        source,
        &format!("/proc/self/fd/{}", dir.as_raw_fd()),
        fstype,
        flags,
        data,
    )
    .map_err(|e| match e {
        InitError::Os { what, source, .. } => InitError::Os {
            what,
            path: format!("{}{target}", root.display()),
            source,
        },
        other => other,
    })
}

/// The character devices every container's `/dev` has (runc's defaults): name, major,
/// minor. Created with mode 0666, owned by root.
pub const DEFAULT_DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symlinks every container's `/dev` has: name and target.
pub const DEFAULT_DEV_LINKS: [(&str, &str); 6] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
    ("core", "/proc/kcore"),
];

/// The container's `/dev` in `root`, as runc makes one: a tmpfs holding only the
/// [`DEFAULT_DEVICES`] and [`DEFAULT_DEV_LINKS`], the guest's ptys at `pts` (where the
/// agent opens the container's terminals), a tmpfs at `shm` and POSIX message queues
/// at `mqueue`. None of the guest's own devices (its disks, vsock) are there.
fn container_dev(root: &Path) -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    mount_in(
        root,
        "tmpfs",
        "/dev",
        "tmpfs",
        NOSUID | libc::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    // The new tmpfs, through its descriptor.
    let dev = dir_in(root, "/dev")?;
    populate_dev(Path::new(&format!("/proc/self/fd/{}", dev.as_raw_fd())))?;
    mount_in(root, "/dev/pts", "/dev/pts", "", libc::MS_BIND, "")?;
    mount_in(
        root,
        "shm",
        "/dev/shm",
        "tmpfs",
        NOSUID | NODEV | NOEXEC,
        "mode=1777,size=65536k",
    )?;
    // A kernel without POSIX message queues still runs containers, without them.
    if let Err(e) = mount_in(
        root,
        "mqueue",
        "/dev/mqueue",
        "mqueue",
        NOSUID | NODEV | NOEXEC,
        "",
    ) {
        console(&format!("forkvm-agent: {e}"));
    }
    Ok(())
}

/// Creates the [`DEFAULT_DEVICES`] (mode 0666 whatever the umask) and
/// [`DEFAULT_DEV_LINKS`] in `dev`.
pub fn populate_dev(dev: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| InitError::Os { what, path, source }
    };
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = dev.join(name);
        let c = cstr(&path.to_string_lossy());
        // SAFETY: a valid NUL-terminated path; mknod reads nothing else.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(failed("mknod", &path)(io::Error::last_os_error()));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(failed("chmod", &path))?;
    }
    for (name, target) in DEFAULT_DEV_LINKS {
        let path = dev.join(name);
        match std::os::unix::fs::symlink(target, &path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(failed("symlink", &path)(e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn boot() -> Result<Infallible, InitError> {
    mount_base()?;
    load_modules();
    if let Err(e) = identity::link_up("lo") {
        console(&format!("forkvm-agent: lo: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = BootConfig::parse(&cmdline);
    if let Some(h) = &cfg.hostname {
        if let Err(e) = identity::set_hostname(h) {
            console(&format!("forkvm-agent: {e}"));
        }
    }
    let root = match &cfg.rootfs {
        Some(source) => {
            assemble_rootfs(source, &cfg.rootfstype)?;
            if identity::root_takes_hostname_files(Path::new(ROOTFS)) {
                let name = cfg.hostname.clone().unwrap_or_else(identity::hostname);
                if let Err(e) = identity::write_hostname_files(Path::new(ROOTFS), &name) {
                    console(&format!("forkvm-agent: {ROOTFS}/etc: {e}"));
                }
            }
            PathBuf::from(ROOTFS)
        }
        None => PathBuf::from("/"),
    };
    let listener = server::listen_vsock(AGENT_PORT).map_err(|source| InitError::Os {
        what: "listen on vsock port",
        path: AGENT_PORT.to_string(),
        source,
    })?;
    let _ = writeln!(io::stdout(), "{READY_PREFIX}{}", uptime());
    let agent = Agent::new(AgentConfig::new(root, Mode::Init));
    agent.serve_listener(listener)
}

/// PID 1's main: boots, then serves forever; a fatal error powers the VM off.
pub fn run() -> ! {
    let message = match std::panic::catch_unwind(boot) {
        Ok(Ok(never)) => match never {},
        Ok(Err(e)) => e.to_string(),
        Err(_) => "panic".to_owned(),
    };
    console(&format!("forkvm-agent: fatal: {message}"));
    halt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keys_are_read_and_the_rest_ignored() {
        let c = BootConfig::parse(
            "console=ttyS0 quiet forkvm.hostname=web-1 forkvm.rootfs=/dev/vdb panic=-1\n",
        );
        assert_eq!(
            c,
            BootConfig {
                hostname: Some("web-1".into()),
                rootfs: Some("/dev/vdb".into()),
                rootfstype: "ext4".into(),
            }
        );
        let c = BootConfig::parse("forkvm.rootfs=/dev/vda forkvm.rootfstype=xfs forkvm.hostname=");
        assert_eq!(c.rootfstype, "xfs");
        assert_eq!(c.hostname, None);
        let c = BootConfig::parse("forkvm.rootfs forkvm.rootfs= -- forkvm.hostname=x");
        assert_eq!(c, BootConfig::parse(""));
        assert_eq!(BootConfig::parse("").rootfstype, "ext4");
    }

    #[test]
    fn module_list_keeps_order_and_skips_comments() {
        let m = parse_modules("# net\n/lib/modules/a.ko\n\n  /lib/modules/b.ko.xz  \n#x\n");
        assert_eq!(
            m,
            [
                PathBuf::from("/lib/modules/a.ko"),
                PathBuf::from("/lib/modules/b.ko.xz")
            ]
        );
    }

    #[test]
    fn module_devices_name_each_drivers_virtio_types() {
        let d = parse_module_devices(
            "/lib/modules/b.ko 1,19\n\n/lib/modules/c.ko 1,x\n/lib/modules/d.ko\n \
             /lib/modules/e.ko  26 \n",
        );
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[Path::new("/lib/modules/b.ko")], [1, 19]);
        // Types it cannot read, or none: no condition, the module loads.
        assert!(!d.contains_key(Path::new("/lib/modules/c.ko")));
        assert!(!d.contains_key(Path::new("/lib/modules/d.ko")));
        assert_eq!(d[Path::new("/lib/modules/e.ko")], [26]);
    }

    #[test]
    fn a_container_dev_holds_runcs_devices_and_links_only() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        populate_dev(dir.path()).unwrap();
        // Twice: an existing node or link is fine (a restarted init).
        populate_dev(dir.path()).unwrap();
        for (name, major, minor) in DEFAULT_DEVICES {
            let m = std::fs::metadata(dir.path().join(name)).unwrap();
            assert!(m.file_type().is_char_device(), "{name}");
            assert_eq!(m.rdev(), libc::makedev(major, minor), "{name}");
            assert_eq!(
                m.mode() & 0o777,
                0o666,
                "{name}: whatever the umask (0022 here)"
            );
            assert_eq!((m.uid(), m.gid()), (0, 0));
        }
        for (name, target) in DEFAULT_DEV_LINKS {
            assert_eq!(
                std::fs::read_link(dir.path().join(name)).unwrap(),
                PathBuf::from(target)
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "core", "fd", "full", "null", "ptmx", "random", "stderr", "stdin", "stdout", "tty",
                "urandom", "zero"
            ]
        );
    }

    #[test]
    fn the_container_dev_goes_inside_the_root_whatever_its_symlinks_say() {
        forkvm_test_support::in_own_mounts(|dir| {
            let root = dir.join("root");
            // An image whose /dev is an absolute symlink: without resolving inside the
            // root, the mounts and nodes would land at the guest's own /<name>.
            let name = format!("forkvm-test-outside-{}", std::process::id());
            std::fs::create_dir_all(root.join(&name)).unwrap();
            std::os::unix::fs::symlink(format!("/{name}"), root.join("dev")).unwrap();
            container_dev(&root).unwrap();
            assert!(!Path::new(&format!("/{name}")).exists());
            let dev = root.join(&name);
            assert!(dev.join("null").exists());
            assert!(dev.join("pts").is_dir() && dev.join("shm").is_dir());
            assert_eq!(
                std::fs::read_link(dev.join("ptmx")).unwrap(),
                PathBuf::from("pts/ptmx")
            );
        });
    }
}
