//! A container's cgroup inside the guest ([`forkvm_agent_proto::Request::Cgroup`]),
//! so the container sees its limits where a container on a host sees them.
//!
//! The guest's cgroup v2 hierarchy is mounted at `/sys/fs/cgroup` (in the guest, outside
//! the container's root); the `cpu`, `memory` and `pids` controllers are enabled down
//! to the container's [`Group`] (`container` for the boot container, `containers/ID`
//! for a pod's app container, [`crate::containers`]), which gets the spec's
//! `memory.max`, `pids.max`, `cpu.max` and `cpu.weight`. From then on every process the
//! agent starts in that container ([`crate::spawn`]) joins that group and takes a cgroup namespace of its own, rooted
//! there (`/proc/self/cgroup` reads `0::/`), and the container's `cgroup` mount
//! ([`mount_namespaced`]) is made from inside such a namespace, so its
//! `/sys/fs/cgroup` is the group itself, with its limits in `memory.max` and the rest.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_agent_proto::{CgroupLimits, ResourceUse};

use crate::reaper::Reaper;

/// Where the guest's cgroup v2 hierarchy is mounted.
pub const HIERARCHY: &str = "/sys/fs/cgroup";

/// The controllers a container's group is given, where the guest's kernel has them.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// `statfs`'s magic number of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// A container's group.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    procs: CString,
}

impl Group {
    /// Its `cgroup.procs`, for a process to join it.
    pub fn procs(&self) -> &CStr {
        &self.procs
    }

    /// Its directory in the hierarchy.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in it and in the groups below (`cgroup.kill`).
    pub fn kill(&self) -> Result<(), String> {
        let file = self.dir.join("cgroup.kill");
        std::fs::write(&file, "1").map_err(|e| format!("{}: {e}", file.display()))
    }

    /// What its processes use (see [`usage_of`]).
    pub fn usage(&self) -> Result<ResourceUse, String> {
        usage_of(&self.dir)
    }

    /// Removes it once no process is left in it (`cgroup.events` says `populated 0`),
    /// waiting until `deadline` at most.
    pub fn remove(&self, deadline: Instant) -> Result<(), String> {
        let events = self.dir.join("cgroup.events");
        loop {
            let text = std::fs::read_to_string(&events)
                .map_err(|e| format!("{}: {e}", events.display()))?;
            if text.lines().any(|l| l.trim() == "populated 0") {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: processes are still in it after they were killed",
                    self.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))
    }
}

/// Longest cgroup file read for [`usage_of`] (`memory.stat` is a few KiB).
const MAX_STAT_FILE: u64 = 64 * 1024;

/// What the processes of the group at `dir` use, from its `cpu.stat`, `memory.current`,
/// `memory.max`, `memory.stat`, `pids.current` and `pids.max`; a controller the group
/// does not have reads as zero (no limit).
pub fn usage_of(dir: &Path) -> Result<ResourceUse, String> {
    use std::io::Read;
    let read = |name: &str| -> Option<String> {
        let mut text = String::new();
        std::fs::File::open(dir.join(name))
            .ok()?
            .take(MAX_STAT_FILE)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    };
    if !dir.is_dir() {
        return Err(format!("{}: no such group", dir.display()));
    }
    let keyed = |text: &Option<String>, key: &str| -> u64 {
        text.as_deref()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    };
    let number =
        |name: &str| -> u64 { read(name).and_then(|t| t.trim().parse().ok()).unwrap_or(0) };
    // `max` (or a controller not there) is no limit.
    let limit = |name: &str| -> Option<u64> { read(name).and_then(|t| t.trim().parse().ok()) };
    let cpu = read("cpu.stat");
    let memory = read("memory.stat");
    Ok(ResourceUse {
        cpu_usec: keyed(&cpu, "usage_usec"),
        cpu_user_usec: keyed(&cpu, "user_usec"),
        cpu_system_usec: keyed(&cpu, "system_usec"),
        memory_bytes: number("memory.current"),
        memory_limit: limit("memory.max"),
        memory_anon: keyed(&memory, "anon"),
        memory_file: keyed(&memory, "file"),
        memory_inactive_file: keyed(&memory, "inactive_file"),
        tasks: number("pids.current"),
        tasks_limit: limit("pids.max"),
    })
}

/// Makes the group `name` (`container`, `containers/ID`) under [`HIERARCHY`] with
/// `limits`, the hierarchy mounted first if it is not; with `fresh`, a group of that
/// name that exists already is an error (not taken over).
pub fn setup(name: &str, limits: &CgroupLimits, fresh: bool) -> Result<Group, String> {
    setup_in(Path::new(HIERARCHY), name, limits, fresh, true)
}

/// [`setup`] under `hierarchy` (mounted there first when `mount`).
fn setup_in(
    hierarchy: &Path,
    name: &str,
    limits: &CgroupLimits,
    fresh: bool,
    mount: bool,
) -> Result<Group, String> {
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("cgroup {name:?}: not a group name"));
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
    let write = |file: &Path, value: &str| {
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
    // The controllers reach the group through every level above it.
    let mut group = hierarchy.to_owned();
    let mut created = false;
    let last = name.split('/').count() - 1;
    for (i, part) in name.split('/').enumerate() {
        if !enable.is_empty() {
            write(&group.join("cgroup.subtree_control"), &enable.join(" "))?;
        }
        group.push(part);
        created = match std::fs::create_dir(&group) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !(fresh && i == last) => {
                false
            }
            Err(e) => return Err(format!("{}: {e}", group.display())),
        };
    }
    let limited = (|| {
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
    })();
    if let Err(e) = limited {
        // A group this request made goes with its failure: a later one starts afresh.
        if created {
            let _ = std::fs::remove_dir(&group);
        }
        return Err(e);
    }
    let procs = CString::new(
        group
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| format!("cgroup {name:?}: a NUL byte"))?;
    Ok(Group { dir: group, procs })
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
    fn usage_is_read_from_the_groups_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "4096000\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(
            d.join("memory.stat"),
            "anon 1000\nfile 2000\nkernel 5\nactive_file 1500\ninactive_file 500\n",
        )
        .unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("pids.max"), "100\n").unwrap();
        let u = usage_of(d).unwrap();
        assert_eq!(
            u,
            ResourceUse {
                cpu_usec: 1500,
                cpu_user_usec: 1000,
                cpu_system_usec: 500,
                memory_bytes: 4_096_000,
                memory_limit: None,
                memory_anon: 1000,
                memory_file: 2000,
                memory_inactive_file: 500,
                tasks: 3,
                tasks_limit: Some(100),
            }
        );
        // A group without the memory controller: zeros, no limit; no group: an error.
        std::fs::remove_file(d.join("memory.current")).unwrap();
        assert_eq!(usage_of(d).unwrap().memory_bytes, 0);
        assert!(usage_of(&d.join("gone"))
            .unwrap_err()
            .contains("no such group"));
    }

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
        setup_in(dir.path(), "container", &limits, false, false).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("container/memory.max"), "268435456");
        assert_eq!(read("container/pids.max"), "100");
        assert_eq!(read("container/cpu.max"), "150000 100000");
        assert_eq!(read("container/cpu.weight"), "39");
        // Absent limits: nothing written.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("cgroup.controllers"), "cpu pids").unwrap();
        setup_in(
            other.path(),
            "container",
            &CgroupLimits::default(),
            false,
            false,
        )
        .unwrap();
        // Only the controllers the kernel has are enabled; a limit without one is named.
        assert_eq!(
            std::fs::read_to_string(other.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +pids"
        );
        let e = setup_in(
            other.path(),
            "container",
            &CgroupLimits {
                memory_max: Some(1 << 30),
                ..Default::default()
            },
            false,
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
            let e = setup_in(other.path(), "container", &bad, false, false).unwrap_err();
            assert!(e.starts_with(wanted), "{e}");
        }
    }

    #[test]
    fn an_app_containers_group_gets_the_controllers_through_every_level() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids io").unwrap();
        let limits = CgroupLimits {
            pids_max: Some(7),
            ..Default::default()
        };
        let group = setup_in(dir.path(), "containers/app-1", &limits, true, false).unwrap();
        assert_eq!(group.dir(), dir.path().join("containers/app-1"));
        assert_eq!(
            group.procs().to_str().unwrap(),
            dir.path()
                .join("containers/app-1/cgroup.procs")
                .to_str()
                .unwrap()
        );
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(
            read("containers/cgroup.subtree_control"),
            "+cpu +memory +pids"
        );
        assert_eq!(read("containers/app-1/pids.max"), "7");
        // A second container beside it; a name that climbs is refused.
        setup_in(dir.path(), "containers/app-2", &limits, true, false).unwrap();
        assert!(dir.path().join("containers/app-2/pids.max").is_file());
        // A group left behind is not taken over by a new container of that name.
        let e = setup_in(dir.path(), "containers/app-2", &limits, true, false).unwrap_err();
        assert!(
            e.contains("containers/app-2") && e.contains("exists"),
            "{e}"
        );
        for bad in ["containers/..", "containers//x", "../x"] {
            let e = setup_in(dir.path(), bad, &limits, true, false).unwrap_err();
            assert!(e.contains("not a group name"), "{bad}: {e}");
        }
        // Killing writes cgroup.kill; removal waits for `populated 0`.
        group.kill().unwrap();
        assert_eq!(read("containers/app-1/cgroup.kill"), "1");
        std::fs::write(
            dir.path().join("containers/app-1/cgroup.events"),
            "populated 1\n",
        )
        .unwrap();
        let e = group
            .remove(Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert!(e.contains("still in it"), "{e}");
    }
}
