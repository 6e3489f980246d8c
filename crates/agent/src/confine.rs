//! The container's kernel parameters and its masked and read-only paths
//! ([`forkvm_agent_proto::Request::Confine`]), applied as runc applies the OCI
//! `linux.sysctl`, `linux.maskedPaths` and `linux.readonlyPaths`, in that order, after
//! the container's volumes are mounted and before its process starts.
//!
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
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Most entries of each kind one request may carry.
pub const MAX_ENTRIES: usize = 1024;

/// Applies `sysctls` (under `proc_sys`, the guest's `/proc/sys`), then masks
/// `masked` and makes `readonly` read-only inside `root`. The first failure stops it,
/// naming the field and the entry.
pub fn apply(
    root: &Path,
    proc_sys: &Path,
    sysctls: &BTreeMap<String, String>,
    masked: &[String],
    readonly: &[String],
) -> Result<(), String> {
    for (what, n) in [
        ("linux.sysctl", sysctls.len()),
        ("linux.maskedPaths", masked.len()),
        ("linux.readonlyPaths", readonly.len()),
    ] {
        if n > MAX_ENTRIES {
            return Err(format!("{what}: {n} entries, at most {MAX_ENTRIES}"));
        }
    }
    for (key, value) in sysctls {
        let path = proc_sys.join(sysctl_path(key).map_err(|e| format!("linux.sysctl {key}: {e}"))?);
        std::fs::write(&path, value).map_err(|e| format!("linux.sysctl {key}={value}: {e}"))?;
    }
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the container root {}: {e}", root.display()))?;
    for path in masked {
        mask(&root_fd, path).map_err(|e| format!("linux.maskedPaths {path}: {e}"))?;
    }
    for path in readonly {
        make_readonly(&root_fd, path).map_err(|e| format!("linux.readonlyPaths {path}: {e}"))?;
    }
    Ok(())
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
fn resolve(root: &OwnedFd, path: &str) -> Result<Option<OwnedFd>, String> {
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    let relative = format!(".{path}");
    match openat2(
        root,
        relative.as_str(),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(format!("cannot open it: {e}")),
    }
}

/// `/proc/self/fd/N` for `fd`: where a mount onto the file `fd` holds goes.
fn fd_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

fn sys_mount(
    source: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
) -> Result<(), String> {
    let ptr = |s: Option<&CString>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call;
    // no data argument.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(format!("mount: {}", std::io::Error::last_os_error())),
    }
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
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
    for (st_flag, ms_flag) in [
        (rustix::fs::StatVfsMountFlags::NOSUID, libc::MS_NOSUID),
        (rustix::fs::StatVfsMountFlags::NODEV, libc::MS_NODEV),
        (rustix::fs::StatVfsMountFlags::NOEXEC, libc::MS_NOEXEC),
    ] {
        if st.f_flag.contains(st_flag) {
            flags |= ms_flag;
        }
    }
    sys_mount(None, &fd_path(&top), None, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::fs::create_dir_all(sys.join("net/ipv4")).unwrap();
        std::fs::write(sys.join("net/ipv4/ip_forward"), "0").unwrap();
        let mut sysctls = BTreeMap::new();
        sysctls.insert("net.ipv4.ip_forward".to_owned(), "1".to_owned());
        apply(dir.path(), &sys, &sysctls, &[], &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(sys.join("net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        sysctls.insert("kernel.no_such_knob".to_owned(), "1".to_owned());
        let e = apply(dir.path(), &sys, &sysctls, &[], &[]).unwrap_err();
        assert!(e.starts_with("linux.sysctl kernel.no_such_knob=1: "), "{e}");
        let mut bad = BTreeMap::new();
        bad.insert("../x".to_owned(), "1".to_owned());
        let e = apply(dir.path(), &sys, &bad, &[], &[]).unwrap_err();
        assert!(e.contains("not a kernel parameter name"), "{e}");
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("/p{i}")).collect();
        let e = apply(dir.path(), &sys, &BTreeMap::new(), &many, &[]).unwrap_err();
        assert!(e.contains("linux.maskedPaths: 1025 entries"), "{e}");
    }

    /// Runs `f` with a fresh container root, on a thread in a mount namespace of its
    /// own (the mounts go away with it).
    fn in_own_mounts(f: fn(&Path)) {
        std::thread::spawn(move || {
            // SAFETY: unshare takes no pointers; this thread gets its own mount
            // namespace and filesystem information.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
            // SAFETY: NUL-terminated strings that outlive the call; no data.
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0);
            let dir = tempfile::tempdir().unwrap();
            f(dir.path());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn masked_paths_are_hidden_and_readonly_paths_refuse_writes() {
        in_own_mounts(|dir| {
            let root = &dir.join("root");
            std::fs::write(dir.join("outside"), "host").unwrap();
            std::fs::create_dir_all(root.join("proc/acpi")).unwrap();
            std::fs::write(root.join("proc/acpi/table"), "secret").unwrap();
            std::fs::write(root.join("proc/kcore"), "core").unwrap();
            std::fs::create_dir_all(root.join("proc/sys")).unwrap();
            std::fs::write(root.join("proc/sys/knob"), "0").unwrap();
            // An image's symlinks that try to point a mask at the guest's own files.
            std::os::unix::fs::symlink("/etc/hostname", root.join("escape")).unwrap();
            std::os::unix::fs::symlink("../../outside", root.join("climb")).unwrap();
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/hostname"), "inside").unwrap();
            apply(
                root,
                Path::new("/proc/sys"),
                &BTreeMap::new(),
                &[
                    "/proc/acpi".into(),
                    "/proc/kcore".into(),
                    "/proc/missing".into(),
                    "/escape".into(),
                    "/climb".into(),
                ],
                &["/proc/sys".into(), "/not/there".into()],
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
            assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"");
            assert_eq!(std::fs::read(dir.join("outside")).unwrap(), b"host");
            let e = std::fs::write(root.join("proc/sys/knob"), "1").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            assert_eq!(
                std::fs::read_to_string(root.join("proc/sys/knob")).unwrap(),
                "0"
            );
            let e = apply(
                root,
                Path::new("/proc/sys"),
                &BTreeMap::new(),
                &["x".into()],
                &[],
            )
            .unwrap_err();
            assert_eq!(e, "linux.maskedPaths x: not an absolute path");
        });
    }
}
