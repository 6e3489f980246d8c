//! The containers of one VM: the one it booted with (`/rootfs`, or `/` in a guest
//! without a container) and, in a pod's VM, the app containers the host makes with
//! [`forkvm_agent_proto::Request::CreateContainer`].
//!
//! A [`Container`] is a root directory and what its spec gives every process started
//! in it from then on, each set once: its cgroup ([`crate::cgroup`]), its seccomp
//! filters ([`crate::seccomp`]) and its user namespace ([`crate::userns`]); and
//! whether its main (`init`) process was started.
//!
//! An app container's root is assembled under the agent's containers directory
//! (`/run/forkvm/containers/ID/rootfs`): the directory the host named, bound there (in
//! a virtio-fs share the agent mounts once under `/run/forkvm/containers/.shares/TAG`,
//! resolved inside the share so that `..` and symlinks cannot leave it, or a directory
//! of the guest). Its mounts go on that bind, so [`Container::destroy`] takes them all
//! away. The containers share the guest's kernel, network and hostname (a pod's); each
//! app container's processes run in a mount namespace of its own ([`crate::mntns`]: a
//! slave copy of the agent's whose root is the container's, with no other mount of the
//! guest's), in its cgroup and, once its main process started in one, in its PID
//! namespace (its own, or its pod's: [`forkvm_agent_proto::PidNamespace`]). That keeps
//! a pod's containers apart from each other's files, mounts and (unless they share a
//! PID namespace) processes, even a root process that leaves its root; the VM, not the
//! container, is the boundary forkvm guarantees.
//!
//! Ending an app container ([`Container::kill_all`]) kills every process in its mount
//! namespace or whose root is in the container's root, and its cgroup's processes
//! (`cgroup.kill`) when it has one, so that what its processes started goes too. A
//! destroyed container refuses what comes after ([`Container::lifecycle`]): a request
//! that found it before it was destroyed finds it gone when it runs.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use forkvm_agent_proto::{check_container_id, CgroupLimits, ContainerRoot, UserNamespace};
use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};

use crate::reaper::Reaper;

/// Where app containers are assembled, each in a directory named by its id.
pub const CONTAINERS: &str = "/run/forkvm/containers";

/// Under the containers directory: the shares app container roots and volumes come
/// from, each mounted once at its tag (no container id starts with `.`).
pub(crate) const SHARES: &str = ".shares";

/// How long [`Container::destroy`] waits for the processes of a killed cgroup to go.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How many times [`Container::kill_all`] looks for processes left in the container's
/// root (each look kills what it finds; a process may fork while it is killed).
const KILL_ROUNDS: usize = 8;

/// Most mounts [`Container::destroy`] detaches at the container's root (a share
/// mounted over the root stacks on its bind).
const MAX_STACKED: usize = 16;

/// One container of the VM.
pub struct Container {
    /// `None`: the boot container.
    id: Option<String>,
    root: PathBuf,
    /// An app container's directory (its root's bind mount is `rootfs` in it).
    home: Option<PathBuf>,
    cgroup: OnceLock<crate::cgroup::Group>,
    seccomp: OnceLock<Vec<Vec<libc::sock_filter>>>,
    userns: OnceLock<OwnedFd>,
    /// The PID namespace of its main process, when it was started in one of its own or
    /// its sandbox's: where its later processes start.
    pidns: OnceLock<OwnedFd>,
    /// An app container's mount namespace ([`crate::mntns`]), where its processes run.
    mntns: Option<crate::mntns::MountNs>,
    /// Its read-only and masked paths under `/proc`, to apply again over a `/proc` of
    /// its PID namespace ([`crate::container::stack_proc`]).
    proc_paths: std::sync::Mutex<(Vec<String>, Vec<String>)>,
    init_started: AtomicBool,
    /// True once destroyed; held for reading while a request acts on the container.
    destroyed: RwLock<bool>,
}

impl Container {
    /// The container the VM booted with, whose root is `root`.
    pub fn boot(root: &Path) -> Container {
        Container {
            id: None,
            root: root.to_owned(),
            home: None,
            cgroup: OnceLock::new(),
            seccomp: OnceLock::new(),
            userns: OnceLock::new(),
            pidns: OnceLock::new(),
            mntns: None,
            proc_paths: Default::default(),
            init_started: AtomicBool::new(false),
            destroyed: RwLock::new(false),
        }
    }

    /// Makes the app container `id` under `containers` (see the module documentation).
    pub fn create(containers: &Path, id: &str, root: &ContainerRoot) -> Result<Container, String> {
        check_container_id(id)?;
        let source = open_root_source(containers, root)?;
        let home = containers.join(id);
        let rootfs = home.join("rootfs");
        std::fs::create_dir_all(containers)
            .map_err(|e| format!("cannot make {}: {e}", containers.display()))?;
        // Its own: one left by a container whose end could not remove it is not reused.
        std::fs::create_dir(&home).map_err(|e| format!("cannot make {}: {e}", home.display()))?;
        if let Err(e) = std::fs::create_dir(&rootfs) {
            let _ = std::fs::remove_dir(&home);
            return Err(format!("cannot make {}: {e}", rootfs.display()));
        }
        let target = CString::new(rootfs.as_os_str().as_encoded_bytes()).expect("no NUL");
        let bound = crate::mounts::mount(
            Some(&crate::mounts::fd_path(&source)),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .and_then(|()| {
            // What is mounted where its root came from does not appear in it; what the
            // agent mounts in it from now on reaches the container's mount namespace,
            // which holds a slave copy of this (shared) mount.
            crate::mounts::mount(None, &target, None, libc::MS_REC | libc::MS_PRIVATE, None)?;
            crate::mounts::mount(None, &target, None, libc::MS_REC | libc::MS_SHARED, None)
        })
        .map_err(|e| format!("cannot bind the container's root: {e}"))
        .and_then(|()| crate::mntns::create(&rootfs));
        let mntns = match bound {
            Ok(ns) => ns,
            Err(e) => {
                let _ = detach(&target);
                let _ = std::fs::remove_dir(&rootfs);
                let _ = std::fs::remove_dir(&home);
                return Err(e);
            }
        };
        Ok(Container {
            id: Some(id.to_owned()),
            root: rootfs,
            home: Some(home),
            mntns: Some(mntns),
            ..Container::boot(Path::new("/"))
        })
    }

    /// Holds the container for a request: `None` once it was destroyed (the request must
    /// not act on it), else a guard [`Container::destroy`] waits for.
    pub fn lifecycle(&self) -> Option<RwLockReadGuard<'_, bool>> {
        let guard = self.destroyed.read().unwrap_or_else(|e| e.into_inner());
        (!*guard).then_some(guard)
    }

    /// The id an app container was made with; `None` for the boot container.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The root directory its processes run in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Marks its main process started; false when it was already.
    pub fn start_init(&self) -> bool {
        !self.init_started.swap(true, Ordering::SeqCst)
    }

    /// Its main process could not be started after all.
    pub fn init_failed(&self) {
        self.init_started.store(false, Ordering::SeqCst);
    }

    /// Makes its cgroup with `limits`: `container` for the boot container (as a guest
    /// with one container always had), `containers/ID` for an app container.
    pub fn set_cgroup(&self, limits: &CgroupLimits) -> Result<(), String> {
        if self.cgroup.get().is_some() {
            return Err("the container's cgroup is made already".into());
        }
        let name = match &self.id {
            None => "container".to_owned(),
            Some(id) => format!("containers/{id}"),
        };
        // An app container's group is its own: one left behind is not taken over.
        let group = crate::cgroup::setup(&name, limits, self.id.is_some())?;
        self.cgroup
            .set(group)
            .map_err(|_| "the container's cgroup is made already".to_owned())
    }

    /// What it uses, from its cgroup; an error before [`Container::set_cgroup`].
    pub fn usage(&self) -> Result<forkvm_agent_proto::ResourceUse, String> {
        self.cgroup
            .get()
            .ok_or_else(|| "the container has no cgroup (yet)".to_owned())?
            .usage()
    }

    /// `cgroup.procs` of its cgroup, for a process to join; `None` before
    /// [`Container::set_cgroup`].
    pub fn cgroup_procs(&self) -> Option<&CStr> {
        self.cgroup.get().map(crate::cgroup::Group::procs)
    }

    /// Decodes and keeps its seccomp filters (once).
    pub fn set_seccomp(&self, programs: &[String]) -> Result<(), String> {
        if self.seccomp.get().is_some() {
            return Err("the container's seccomp filters are set already".into());
        }
        let filters = crate::seccomp::decode_all(programs)?;
        self.seccomp
            .set(filters)
            .map_err(|_| "the container's seccomp filters are set already".to_owned())
    }

    /// Its seccomp filters, in order; empty before [`Container::set_seccomp`].
    pub fn seccomp(&self) -> &[Vec<libc::sock_filter>] {
        self.seccomp.get().map_or(&[], Vec::as_slice)
    }

    /// Makes and keeps its user namespace (once); `proc_sys` is the guest's
    /// `/proc/sys` (see [`crate::userns::create_for_container`]).
    pub fn set_userns(
        &self,
        ns: &UserNamespace,
        proc_sys: &Path,
        reaper: &Reaper,
    ) -> Result<(), String> {
        if self.userns.get().is_some() {
            return Err("the container's user namespace is made already".into());
        }
        let fd = crate::userns::create_for_container(ns, proc_sys, reaper)?;
        self.userns
            .set(fd)
            .map_err(|_| "the container's user namespace is made already".to_owned())
    }

    /// Its user namespace, once made.
    pub fn userns(&self) -> Option<std::os::fd::RawFd> {
        self.userns.get().map(AsRawFd::as_raw_fd)
    }

    /// The PID namespace its processes start in, once its main process started in one
    /// other than the guest's.
    pub fn pidns(&self) -> Option<std::os::fd::RawFd> {
        self.pidns.get().map(AsRawFd::as_raw_fd)
    }

    /// Keeps the PID namespace its main process started in (once).
    pub(crate) fn set_pidns(&self, ns: OwnedFd) -> Result<(), String> {
        self.pidns
            .set(ns)
            .map_err(|_| "the container's PID namespace is set already".to_owned())
    }

    /// Keeps those of `readonly` and `masked` that are under `/proc`.
    pub(crate) fn keep_proc_paths(&self, readonly: &[String], masked: &[String]) {
        let under_proc = |p: &&String| *p == "/proc" || p.starts_with("/proc/");
        let mut kept = self.proc_paths.lock().unwrap_or_else(|e| e.into_inner());
        kept.0.extend(readonly.iter().filter(under_proc).cloned());
        kept.1.extend(masked.iter().filter(under_proc).cloned());
    }

    /// Its read-only and masked paths under `/proc`.
    pub(crate) fn proc_paths(&self) -> (Vec<String>, Vec<String>) {
        self.proc_paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What a process started in it takes of it: its root, cgroup, user namespace, PID
    /// namespace and, with `seccomp` (not for its hooks), its filters.
    pub(crate) fn confines(&self, seccomp: bool) -> crate::spawn::Confines<'_> {
        crate::spawn::Confines {
            root: &self.root,
            mntns: self.mntns.as_ref().map(crate::mntns::MountNs::fd),
            seccomp: if seccomp { self.seccomp() } else { &[] },
            userns: self.userns(),
            cgroup_procs: self.cgroup_procs(),
            pid: self
                .pidns()
                .map_or(crate::spawn::PidStart::Agent, crate::spawn::PidStart::Join),
        }
    }

    /// After the agent mounted in its root: gives the mounts of its mount namespace
    /// the flags the agent's have ([`crate::mntns::sync_flags`]); nothing for a
    /// container without one.
    pub(crate) fn sync_mounts(&self) -> Result<(), String> {
        match &self.mntns {
            Some(ns) => crate::mntns::sync_flags(ns, &self.root),
            None => Ok(()),
        }
    }

    /// Kills every process of an app container: those in its mount namespace or whose
    /// root is in its root, and its cgroup's. The first failure is the error; every step
    /// is tried.
    pub fn kill_all(&self) -> Result<(), String> {
        if self.id.is_none() {
            return Err("the boot container's processes end with the VM".into());
        }
        let group = self.cgroup.get().map_or(Ok(()), crate::cgroup::Group::kill);
        kill_rooted_in(
            &self.root,
            self.mntns.as_ref().map(crate::mntns::MountNs::ino),
        );
        group
    }

    /// An app container's end, once the agent forgot it: marked destroyed (after the
    /// requests acting on it are done), its processes killed, its cgroup removed, its
    /// root and everything mounted in it detached, its directory removed. Everything is
    /// tried; the first failure is the error.
    pub fn destroy(&self) -> Result<(), String> {
        let mut destroyed = self.destroyed.write().unwrap_or_else(|e| e.into_inner());
        if *destroyed {
            return Ok(());
        }
        *destroyed = true;
        let mut first: Option<String> = None;
        let mut keep = |r: Result<(), String>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        keep(self.kill_all());
        if let Some(group) = self.cgroup.get() {
            keep(group.remove(Instant::now() + KILL_WAIT));
        }
        if let Some(home) = &self.home {
            let root = CString::new(self.root.as_os_str().as_encoded_bytes()).expect("no NUL");
            // The bind, and any mount stacked on it, with everything under them.
            let mut detached = 0;
            while detached < MAX_STACKED && detach(&root).is_ok() {
                detached += 1;
            }
            if detached == 0 {
                keep(Err(format!("cannot unmount {}", self.root.display())));
            }
            keep(
                std::fs::remove_dir(&self.root)
                    .and_then(|()| std::fs::remove_dir(home))
                    .map_err(|e| format!("cannot remove {}: {e}", home.display())),
            );
        }
        first.map_or(Ok(()), Err)
    }
}

/// Detaches the mount at `path` and every mount under it.
fn detach(path: &CStr) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path that outlives the call.
    match unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The directory an app container's root is bound from.
fn open_root_source(containers: &Path, root: &ContainerRoot) -> Result<OwnedFd, String> {
    let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match &root.share {
        None => {
            if !root.path.starts_with('/') {
                return Err(format!(
                    "root {:?}: without a share the path must be absolute",
                    root.path
                ));
            }
            rustix::fs::open(&root.path, dir, Mode::empty())
                .map_err(|e| format!("root {}: {e}", root.path))
        }
        Some(tag) => {
            let share = crate::shares::mounted(&containers.join(SHARES), tag)?;
            let share_fd = rustix::fs::open(&share, dir, Mode::empty())
                .map_err(|e| format!("share {tag:?}: {e}"))?;
            let inside = match root.path.trim_start_matches('/') {
                "" => ".",
                path => path,
            };
            openat2(
                &share_fd,
                inside,
                dir,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            )
            .map_err(|e| format!("root {} in share {tag:?}: {e}", root.path))
        }
    }
}

/// SIGKILL for every process in the mount namespace whose inode is `mntns` or whose
/// root lies at or below `root` as the agent sees it, looked for up to [`KILL_ROUNDS`]
/// times until none is found. (A process that made a mount namespace of its own inside
/// the container is neither: its container's cgroup, which [`Container::kill_all`]
/// kills too, has it.)
fn kill_rooted_in(root: &Path, mntns: Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    for round in 0..KILL_ROUNDS {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut found = 0;
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let in_ns = || {
                mntns.is_some_and(|ino| {
                    std::fs::metadata(entry.path().join("ns/mnt")).is_ok_and(|m| m.ino() == ino)
                })
            };
            if in_ns()
                || std::fs::read_link(entry.path().join("root")).is_ok_and(|r| r.starts_with(root))
            {
                // SAFETY: kill has no memory preconditions. The pid was read a moment
                // ago with its root in the container; one that ended since and whose
                // number was taken again by then is the risk of any kill by number.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                found += 1;
            }
        }
        if found == 0 {
            return;
        }
        if round + 1 < KILL_ROUNDS {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
