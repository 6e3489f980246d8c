//! The container's user namespace ([`forkvm_agent_proto::Request::Container`]'s
//! `user_namespace`, from the OCI `user` namespace and its `linux.uidMappings` and
//! `gidMappings`): made once, kept by the container
//! ([`crate::containers::Container::set_userns`]), and joined by every process
//! [`crate::spawn`] starts in that container from then on, so that
//! `/proc/self/uid_map` in the container shows the spec's maps and its root is an
//! ordinary user of the guest.
//!
//! The container's other namespaces are the guest's own (the VM is the container) and
//! stay the guest root's: unlike root in a runc container with a user namespace, the
//! container's root cannot set the hostname or mount filesystems. It may bind low ports
//! and ping ([`UNPRIVILEGED_NET`]).
//!
//! The agent is multi-threaded and cannot unshare a user namespace itself: a child
//! does (`unshare(CLONE_NEWUSER)`), the agent writes its `uid_map` and `gid_map` (as
//! the guest's root, so any ranges the kernel takes), keeps a descriptor of
//! `/proc/CHILD/ns/user`, and lets the child exit. A process joins it with `setns`
//! after its `chroot`, `chdir` and rlimits (which need the guest's root) and before its
//! capabilities and user change (`setns` gives it every capability inside, and a full
//! bounding set, for those steps to narrow).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use forkvm_agent_proto::{IdMapping, UserNamespace, MAX_ID_MAPPINGS};

use crate::reaper::Reaper;

/// The longest id map file the kernel takes (one write, less than a page).
const MAX_MAP_BYTES: usize = 4096;

/// Kernel parameters [`set`] writes so that the container's root, an ordinary user to
/// the guest's network namespace, binds ports below 1024 and pings as runc's would.
pub const UNPRIVILEGED_NET: [(&str, &str); 2] = [
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
];

/// Makes the user namespace `ns` describes for a container (see [`create`]) and writes
/// [`UNPRIVILEGED_NET`] under `proc_sys` (the guest's `/proc/sys`).
pub fn create_for_container(
    ns: &UserNamespace,
    proc_sys: &Path,
    reaper: &Reaper,
) -> Result<OwnedFd, String> {
    let fd = create(ns, reaper)?;
    // The guest's network namespace stays the init user namespace's (the container's
    // network is the guest's own), so the container's root is an ordinary user to it:
    // as in a runc container with a network namespace of its own, it may bind any port
    // and ping. (The spec's `linux.sysctl`, applied later, may say otherwise.)
    for (key, value) in UNPRIVILEGED_NET {
        std::fs::write(proc_sys.join(key), value)
            .map_err(|e| format!("user namespace: {key} = {value}: {e}"))?;
    }
    Ok(fd)
}

/// The text of one id map file: `inside outside count` per line; the field's name in
/// errors.
pub fn map_text(field: &str, ranges: &[IdMapping]) -> Result<String, String> {
    if ranges.is_empty() {
        return Err(format!(
            "{field}: a user namespace needs at least one range"
        ));
    }
    if ranges.len() > MAX_ID_MAPPINGS {
        return Err(format!(
            "{field}: {} ranges, at most {MAX_ID_MAPPINGS}",
            ranges.len()
        ));
    }
    let mut text = String::new();
    for (i, m) in ranges.iter().enumerate() {
        let end = |start: u32| u64::from(start) + u64::from(m.size);
        if m.size == 0 {
            return Err(format!("{field}[{i}]: size is 0"));
        }
        if end(m.container_id) > u64::from(u32::MAX) || end(m.host_id) > u64::from(u32::MAX) {
            return Err(format!(
                "{field}[{i}]: {} ids from {} (inside) or {} (guest) pass the last id, {}",
                m.size,
                m.container_id,
                m.host_id,
                u32::MAX - 1
            ));
        }
        text.push_str(&format!("{} {} {}\n", m.container_id, m.host_id, m.size));
    }
    // The kernel takes a map in one write of less than a page.
    if text.len() >= MAX_MAP_BYTES {
        return Err(format!(
            "{field}: {} bytes as text, the kernel takes less than {MAX_MAP_BYTES}",
            text.len()
        ));
    }
    Ok(text)
}

/// A new user namespace with `ns`'s maps, as a descriptor of it.
pub fn create(ns: &UserNamespace, reaper: &Reaper) -> Result<OwnedFd, String> {
    let uid_map = map_text("linux.uidMappings", &ns.uid_mappings)?;
    let gid_map = map_text("linux.gidMappings", &ns.gid_mappings)?;
    let (ready_r, ready_w) = pipe()?;
    let (hold_r, hold_w) = pipe()?;
    let (ready_fd, hold_fd) = (ready_w.as_raw_fd(), hold_r.as_raw_fd());
    let theirs = [ready_r.as_raw_fd(), hold_w.as_raw_fd()];
    // SAFETY: the child makes only async-signal-safe calls (close, close_range,
    // unshare, write, read, _exit) on the descriptor numbers copied above.
    let child = unsafe {
        reaper.fork(|| {
            // The pipes' other ends closed by name: the hold pipe's end of file is the
            // signal to exit, whether or not the kernel has close_range. Nothing else
            // of the agent's stays open either (a file the agent is writing).
            for fd in theirs {
                libc::close(fd);
            }
            let (lo, hi) = (ready_fd.min(hold_fd), ready_fd.max(hold_fd));
            libc::syscall(libc::SYS_close_range, 3, lo - 1, 0);
            libc::syscall(libc::SYS_close_range, lo + 1, hi - 1, 0);
            libc::syscall(libc::SYS_close_range, hi + 1, u32::MAX, 0);
            let err: i32 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let bytes = err.to_be_bytes();
            libc::write(ready_fd, bytes.as_ptr().cast(), bytes.len());
            let mut b = 0u8;
            while libc::read(hold_fd, (&raw mut b).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::_exit(0)
        })
    }
    .map_err(|e| format!("user namespace: fork: {e}"))?;
    drop(ready_w);
    drop(hold_r);
    let made = (|| {
        let mut report = [0u8; 4];
        File::from(ready_r)
            .read_exact(&mut report)
            .map_err(|e| format!("user namespace: the child ended before reporting: {e}"))?;
        let errno = i32::from_be_bytes(report);
        if errno != 0 {
            return Err(format!(
                "user namespace: unshare: {}",
                std::io::Error::from_raw_os_error(errno)
            ));
        }
        let proc = format!("/proc/{}", child.pid());
        for (file, text, field) in [
            ("uid_map", &uid_map, "linux.uidMappings"),
            ("gid_map", &gid_map, "linux.gidMappings"),
        ] {
            // One write, as the kernel requires.
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("{proc}/{file}"))
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| format!("{field} ({}): {e}", text.trim().replace('\n', ", ")))?;
        }
        let ns = std::fs::File::open(format!("{proc}/ns/user"))
            .map_err(|e| format!("user namespace: open {proc}/ns/user: {e}"))?;
        Ok(OwnedFd::from(ns))
    })();
    // The child exits on the hold pipe's end of file.
    drop(hold_w);
    child.wait();
    made
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!(
            "user namespace: pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(container_id: u32, host_id: u32, size: u32) -> IdMapping {
        IdMapping {
            container_id,
            host_id,
            size,
        }
    }

    /// runtime-tools' `linux_uid_mappings` maps: root inside is the guest's 1000.
    fn suites_maps() -> UserNamespace {
        UserNamespace {
            uid_mappings: vec![range(0, 1000, 2000)],
            gid_mappings: vec![range(0, 1000, 3000)],
        }
    }

    #[test]
    fn maps_are_checked_before_the_kernel_sees_them() {
        assert_eq!(
            map_text("m", &[range(0, 1000, 2000), range(5000, 9000, 1)]).unwrap(),
            "0 1000 2000\n5000 9000 1\n"
        );
        let err = |r: &[IdMapping]| map_text("linux.uidMappings", r).unwrap_err();
        assert_eq!(
            err(&[]),
            "linux.uidMappings: a user namespace needs at least one range"
        );
        assert_eq!(err(&[range(0, 0, 0)]), "linux.uidMappings[0]: size is 0");
        assert!(err(&[range(0, 1, 2), range(u32::MAX - 1, 0, 2)])
            .starts_with("linux.uidMappings[1]: 2 ids from 4294967294"));
        let many = vec![range(0, 0, 1); MAX_ID_MAPPINGS + 1];
        assert_eq!(err(&many), "linux.uidMappings: 341 ranges, at most 340");
        // 200 ranges of ten-digit ids: fewer than 340, longer than a page as text.
        let long: Vec<_> = (0..200)
            .map(|i| range(4_000_000_000 + i * 2, 4_100_000_000 + i * 2, 1))
            .collect();
        assert_eq!(
            err(&long),
            "linux.uidMappings: 4800 bytes as text, the kernel takes less than 4096"
        );
    }

    #[test]
    fn a_namespace_gets_its_maps_and_a_bad_map_is_refused_by_name() {
        let fd = create(&suites_maps(), Reaper::global()).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let own = std::fs::read_link("/proc/self/ns/user").unwrap();
        assert!(link.to_string_lossy().starts_with("user:["), "{link:?}");
        assert_ne!(link, own, "a namespace of its own");
        // Overlapping ranges: the kernel refuses them, and the error names the field.
        let bad = UserNamespace {
            uid_mappings: vec![range(0, 1000, 10), range(5, 5000, 10)],
            gid_mappings: vec![range(0, 1000, 1)],
        };
        let e = create(&bad, Reaper::global()).unwrap_err();
        assert!(
            e.starts_with("linux.uidMappings (0 1000 10, 5 5000 10): "),
            "{e}"
        );
    }

    #[test]
    fn a_container_process_runs_inside_with_the_spec_caps_and_the_guest_sees_its_ids() {
        use crate::spawn::{spawn_inner, Confines, ProcessIo};
        let fd = create(&suites_maps(), Reaper::global()).unwrap();
        let dir = std::env::temp_dir().join(format!("forkvm-userns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let chown = 1u64; // CAP_CHOWN, capability 0
        let mut spec = forkvm_agent_proto::ProcessSpec::new([
            "sh".to_owned(),
            "-c".to_owned(),
            format!(
                "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
                 grep -E '^Cap(Bnd|Eff)' /proc/self/status; touch {}/made",
                dir.display()
            ),
        ]);
        spec.env = vec!["PATH=/usr/bin:/bin".into()];
        spec.capabilities = Some(forkvm_agent_proto::Capabilities {
            bounding: chown,
            effective: chown,
            permitted: chown,
            ..Default::default()
        });
        let container = Confines {
            root: std::path::Path::new("/"),
            mntns: None,
            seccomp: &[],
            userns: Some(fd.as_raw_fd()),
            cgroup_procs: None,
            pid: crate::spawn::PidStart::Agent,
        };
        let spawned = spawn_inner(&spec, "sh", &container, Reaper::global(), None).unwrap();
        let ProcessIo::Pipes {
            mut stdout,
            mut stderr,
            ..
        } = spawned.io
        else {
            unreachable!("no tty asked")
        };
        let (mut out, mut err) = (String::new(), String::new());
        stdout.read_to_string(&mut out).unwrap();
        stderr.read_to_string(&mut err).unwrap();
        let status = spawned.child.wait();
        assert_eq!(crate::reaper::exit_code(status), 0, "{out}{err}");
        let words: Vec<&str> = out.split_whitespace().collect();
        // The maps as the container reads them, and root inside.
        assert_eq!(
            words[..8],
            ["0", "1000", "2000", "0", "1000", "3000", "0", "0"],
            "{out}"
        );
        // Joining resets the bounding set to full: the spec's narrows it afterwards.
        assert!(out.contains("CapBnd:\t0000000000000001"), "{out}");
        assert!(out.contains("CapEff:\t0000000000000001"), "{out}");
        // The guest sees the container's root as its uid 1000.
        let made = std::fs::metadata(dir.join("made")).unwrap();
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&made),
                std::os::unix::fs::MetadataExt::gid(&made)
            ),
            (1000, 1000)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
