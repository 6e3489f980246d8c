//! The container's cgroup inside the guest ([`forkvm_agent_proto::Request::Cgroup`]),
//! so the container sees its limits where a container on a host sees them.
//!
//! The guest's cgroup v2 hierarchy is mounted at `/sys/fs/cgroup` (in the guest, outside
//! the container's root); the `cpu`, `memory` and `pids` controllers are enabled for
//! its children, and the group [`GROUP`] gets the spec's `memory.max`, `pids.max`,
//! `cpu.max` and `cpu.weight`. From then on every process the agent starts
//! ([`crate::spawn`]) joins that group and takes a cgroup namespace of its own, rooted
//! there (`/proc/self/cgroup` reads `0::/`), and the container's `cgroup` mount
//! ([`mount_namespaced`]) is made from inside such a namespace, so its
//! `/sys/fs/cgroup` is the group itself, with its limits in `memory.max` and the rest.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use forkvm_agent_proto::CgroupLimits;

use crate::reaper::Reaper;

/// Where the guest's cgroup v2 hierarchy is mounted.
pub const HIERARCHY: &str = "/sys/fs/cgroup";

/// The container's group, under [`HIERARCHY`].
pub const GROUP: &str = "/sys/fs/cgroup/container";

/// The controllers the container's group is given, where the guest's kernel has them.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// `statfs`'s magic number of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// `cgroup.procs` of the container's group, once [`setup`] made it.
static PROCS: OnceLock<CString> = OnceLock::new();

/// `cgroup.procs` of the container's group, for a process to join it; `None` before
/// [`setup`].
pub fn procs() -> Option<&'static CStr> {
    PROCS.get().map(CString::as_c_str)
}

/// Makes the container's group with `limits` (once: a second request is refused).
pub fn setup(limits: &CgroupLimits) -> Result<(), String> {
    setup_in(std::path::Path::new(HIERARCHY), limits, true)?;
    let procs = CString::new(format!("{GROUP}/cgroup.procs")).expect("no NUL");
    PROCS
        .set(procs)
        .map_err(|_| "the container's cgroup is made already".to_owned())
}

/// [`setup`] under `hierarchy` (mounted there first when `mount`).
fn setup_in(hierarchy: &std::path::Path, limits: &CgroupLimits, mount: bool) -> Result<(), String> {
    if PROCS.get().is_some() {
        return Err("the container's cgroup is made already".into());
    }
    if let Some(w) = limits.cpu_weight.filter(|w| !(1..=10_000).contains(w)) {
        return Err(format!("cpu.weight {w}: outside 1 to 10000"));
    }
    if let Some((quota, period)) = limits.cpu_max {
        if quota == 0 || !(1_000..=1_000_000).contains(&period) {
            return Err(format!(
                "cpu.max {quota} {period}: the quota must be positive and the period 1000 to 1000000 µs"
            ));
        }
    }
    // Mounted once: a second mount would stack on the first.
    let mounted =
        rustix::fs::statfs(hierarchy).is_ok_and(|st| st.f_type as u64 == CGROUP2_SUPER_MAGIC);
    if mount && !mounted {
        let target = CString::new(hierarchy.as_os_str().as_encoded_bytes()).expect("no NUL");
        crate::mounts::mount(
            Some(c"cgroup2"),
            &target,
            Some(c"cgroup2"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )
        .map_err(|e| format!("cannot mount the guest's cgroup hierarchy: {e}"))?;
    }
    let write = |file: &std::path::Path, value: &str| {
        std::fs::write(file, value).map_err(|e| format!("{}: {value}: {e}", file.display()))
    };
    // The controllers the kernel has; a limit whose controller it lacks is an error
    // naming both.
    let available = std::fs::read_to_string(hierarchy.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", hierarchy.join("cgroup.controllers").display()))?;
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    for (needed, limit) in [
        ("memory", limits.memory_max.is_some()),
        ("pids", limits.pids_max.is_some()),
        (
            "cpu",
            limits.cpu_max.is_some() || limits.cpu_weight.is_some(),
        ),
    ] {
        if limit && !has(needed) {
            return Err(format!(
                "the guest's kernel has no {needed} controller for the container's limit"
            ));
        }
    }
    let enable: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| has(c))
        .map(|c| format!("+{c}"))
        .collect();
    if !enable.is_empty() {
        write(&hierarchy.join("cgroup.subtree_control"), &enable.join(" "))?;
    }
    let group = hierarchy.join("container");
    match std::fs::create_dir(&group) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", group.display())),
    }
    if let Some(m) = limits.memory_max {
        write(&group.join("memory.max"), &m.to_string())?;
    }
    if let Some(p) = limits.pids_max {
        write(&group.join("pids.max"), &p.to_string())?;
    }
    if let Some((quota, period)) = limits.cpu_max {
        write(&group.join("cpu.max"), &format!("{quota} {period}"))?;
    }
    if let Some(w) = limits.cpu_weight {
        write(&group.join("cpu.weight"), &w.to_string())?;
    }
    Ok(())
}

/// Joins the process calling it to the group whose `cgroup.procs` is `procs`, then
/// unshares its cgroup namespace (rooted at that group); `Err(errno)` on failure.
///
/// # Safety
///
/// Async-signal-safe: for the child of a fork in a multi-threaded process.
pub unsafe fn join_and_unshare(procs: &CStr) -> Result<(), i32> {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: a NUL-terminated path; `b"0"` is one readable byte.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
        let e = errno();
        libc::close(fd);
        if wrote != 1 {
            return Err(e);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            return Err(errno());
        }
    }
    Ok(())
}

/// Mounts cgroup v2 at `target` from inside the container's cgroup namespace (a child
/// joins the group, unshares, mounts, and exits), so the mount's root is the group.
pub fn mount_namespaced(
    procs: &CStr,
    target: &CStr,
    flags: libc::c_ulong,
    reaper: &Reaper,
) -> std::io::Result<()> {
    // SAFETY: the child only makes async-signal-safe calls (open, write, close,
    // unshare, mount, _exit) on strings allocated before the fork, and never returns.
    let child = unsafe {
        reaper.fork(|| {
            let code = match join_and_unshare(procs) {
                Err(e) => e,
                Ok(()) => {
                    match libc::mount(
                        c"cgroup2".as_ptr(),
                        target.as_ptr(),
                        c"cgroup2".as_ptr(),
                        flags,
                        std::ptr::null(),
                    ) {
                        0 => 0,
                        _ => std::io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO),
                    }
                }
            };
            libc::_exit(code.clamp(0, 255))
        })
    }?;
    match forkvm_agent_proto::exit_code(child.wait()) {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_where_cgroup_v2_takes_them_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let limits = CgroupLimits {
            memory_max: Some(256 << 20),
            pids_max: Some(100),
            cpu_max: Some((150_000, 100_000)),
            cpu_weight: Some(39),
        };
        setup_in(dir.path(), &limits, false).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("container/memory.max"), "268435456");
        assert_eq!(read("container/pids.max"), "100");
        assert_eq!(read("container/cpu.max"), "150000 100000");
        assert_eq!(read("container/cpu.weight"), "39");
        // Absent limits: nothing written.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("cgroup.controllers"), "cpu pids").unwrap();
        setup_in(other.path(), &CgroupLimits::default(), false).unwrap();
        // Only the controllers the kernel has are enabled; a limit without one is named.
        assert_eq!(
            std::fs::read_to_string(other.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +pids"
        );
        let e = setup_in(
            other.path(),
            &CgroupLimits {
                memory_max: Some(1 << 30),
                ..Default::default()
            },
            false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "the guest's kernel has no memory controller for the container's limit"
        );
        assert!(!other.path().join("container/memory.max").exists());
        for (bad, wanted) in [
            (
                CgroupLimits {
                    cpu_weight: Some(0),
                    ..Default::default()
                },
                "cpu.weight 0",
            ),
            (
                CgroupLimits {
                    cpu_max: Some((1000, 10)),
                    ..Default::default()
                },
                "cpu.max 1000 10",
            ),
        ] {
            let e = setup_in(other.path(), &bad, false).unwrap_err();
            assert!(e.starts_with(wanted), "{e}");
        }
    }
}
