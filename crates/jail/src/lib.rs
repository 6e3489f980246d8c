//! `forkvm-jail`: what confines a VM process, so that a guest that takes over its device
//! code gains as little as possible on the host.
//!
//! A VM process is jailed unless its launch says otherwise (`--no-jail`, for
//! debugging). [`Jail::enter`], at the start of the process, before the VM is built:
//! - moves the process into a cgroup of its own ([`cgroup`]): `memory.max` and `pids.max`;
//! - sets `no_new_privs` and installs the process's seccomp allow-list on every thread
//!   ([`seccomp`], [`ThreadKind::Process`]); whatever the process starts inherits it;
//! - moves it into a mount namespace of its own whose root holds only its places
//!   ([`root`]): what it writes and what it reads once jailed (its kernel, disks and
//!   shares, its executable and the system's libraries), nothing else of the host's;
//! - binds it to the places it may change ([`landlock`]): its state root, its cgroups,
//!   its disks, shares and sockets, the devices it opens; elsewhere it and whatever it
//!   starts can no longer create, write, truncate, rename or remove files (Landlock does
//!   not rule a file's mode or times: a uid-0 process may still change those of the
//!   files it owns, see `docs/security.md`).
//!
//! Then [`Jail::set_up`], once the VM is built, drops every capability but those later
//! work needs ([`caps`]). vCPU and API threads, started while the VM is built, confine
//! themselves when they start ([`confine_thread`]): a stricter filter stacked on the
//! process's, and no capabilities at all.
//!
//! The first VM process of a family starts in a pid namespace of its own, made by its
//! launcher ([`family`]): it, its fork children and its warm pool can signal no process
//! outside it.
//!
//! [`limits`] raises the process's open-file limit, before any of this (a VM that forks
//! many children, or serves a shared directory, needs more than the usual 1024).
//!
//! [`JailStatus`] reads what the kernel says of a process (`/proc/<pid>/status` and
//! `cgroup`): what `forkvm inspect` shows and the tests check.

pub mod binds;
pub mod caps;
pub mod cgroup;
pub mod family;
pub mod landlock;
pub mod limits;
pub mod root;
pub mod seccomp;
pub mod uid;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use forkvm_config::logging::error_chain;
use serde::{Deserialize, Serialize};

pub use cgroup::{Cgroup, CgroupError, CgroupSpec};
pub use landlock::{Restricted, Writable};
pub use root::{Access, Place, RootError, Rooted};
pub use seccomp::{SeccompError, ThreadKind};
pub use uid::FamilySpec;

/// Why a VM process could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Its cgroup.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Its capabilities.
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    /// Its file-system rules.
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    /// `no_new_privs` could not be set.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// The process could not be made not dumpable.
    #[error("cannot make the VM process not dumpable")]
    Dumpable(#[source] std::io::Error),
    /// Its minimal root.
    #[error(transparent)]
    Root(#[from] RootError),
    /// Its own network namespace could not be made.
    #[error("cannot give the VM process a network namespace of its own")]
    Netns(#[source] std::io::Error),
    /// Its family's uid could not be taken.
    #[error(transparent)]
    Uid(#[from] uid::UidError),
}

/// Devices every VM process may open for writing: KVM, TUN (a fork child's TAPs) and
/// `/dev/null` (its root has these and `/dev/urandom`, see [`root::DEVICES`]).
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/null"];

/// Where a VM process may go once jailed: where it may change the file system (its
/// Landlock rules, links resolved) and what its minimal root holds (those places and
/// what it reads, as it names them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Places {
    /// Where it may create, write, rename and remove.
    pub writable: Writable,
    /// What its root holds besides what every VM process needs (see [`root`]).
    pub root: Vec<Place>,
}

impl Places {
    /// The directory `dir`, beneath which everything may change.
    pub fn dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.writable.dir(dir.as_ref());
        self.root.push(Place::new(dir, Access::Write));
        self
    }

    /// The file `file`, which may be written.
    pub fn file(&mut self, file: impl AsRef<Path>) -> &mut Self {
        self.writable.file(file.as_ref());
        self.root.push(Place::new(file, Access::Write));
        self
    }

    /// The directory `dir`, beneath which Unix sockets may be made.
    pub fn sockets(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.writable.sockets(dir.as_ref());
        self.root.push(Place::new(dir, Access::Write));
        self
    }

    /// The file or directory `path`, which is only read.
    pub fn read(&mut self, path: impl AsRef<Path>) -> &mut Self {
        self.root.push(Place::new(path, Access::Read));
        self
    }

    /// Adds everything in `other`.
    pub fn extend(&mut self, other: &Places) -> &mut Self {
        self.writable.extend(&other.writable);
        self.root.extend(other.root.iter().cloned());
        self
    }
}

/// Where forkvm keeps the address leases of bridged NICs (a fork child takes its own);
/// `forkvm_registry`'s leases live here.
pub const LEASE_ROOT: &str = "/run/forkvm-network";

/// How a VM process is to be jailed: part of its launch, passed on to the VMs it forks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// `false`: not jailed at all (`--no-jail`), for debugging.
    pub enabled: bool,
    /// The cgroup it joins; `None`: forkvm's own for the VM (see [`CgroupSpec::for_vm`]).
    #[serde(default)]
    pub cgroup: Option<CgroupSpec>,
    /// The process filter is installed already: the process was started by a jailed VM
    /// process (a fork child), and filters are inherited. Not stacked again.
    #[serde(default)]
    pub filter_inherited: bool,
    /// The process that started it is bound by file-system rules ([`landlock`]), which
    /// it inherits (with `filter_inherited`).
    #[serde(default)]
    pub writes_bound: bool,
    /// An empty network namespace of its own, made on entering: for a VM with no NIC
    /// that would otherwise sit in the host's (an OCI container on the host's network),
    /// so that a VM process its guest took over reaches nothing there.
    #[serde(default)]
    pub own_netns: bool,
    /// Its family's uid and cgroup ([`uid`]), given by the launcher that made the
    /// family; `None`: uid 0, forkvm's groups.
    #[serde(default)]
    pub family: Option<FamilySpec>,
    /// A container's VM (the OCI runtime's): its launcher gives its family no uid or
    /// group of its own (the engine's cgroup and the runtime's files are its).
    #[serde(default)]
    pub container: bool,
}

impl Default for JailSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: None,
            filter_inherited: false,
            writes_bound: false,
            own_netns: false,
            family: None,
            container: false,
        }
    }
}

impl JailSpec {
    /// Not jailed.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The jail of a VM this process starts (a fork child): as this process's, in a
    /// cgroup of its own.
    pub fn inherited() -> Self {
        Self {
            enabled: enabled(),
            cgroup: None,
            filter_inherited: PROCESS_FILTERED.load(Ordering::Relaxed),
            writes_bound: landlock::bound().is_some(),
            // A fork child starts in its parent's network namespace, an own one too.
            own_netns: false,
            family: family_spec().cloned(),
            container: false,
        }
    }
}

/// The family this process's VM processes belong to, once its jail is entered.
static FAMILY: std::sync::OnceLock<FamilySpec> = std::sync::OnceLock::new();

/// This process's family (its uid and cgroup), if it entered a jail as one's member,
/// or started the family's VM processes itself ([`set_family`]).
pub fn family_spec() -> Option<&'static FamilySpec> {
    FAMILY.get()
}

/// Makes `spec` the family of the VM processes this process starts with
/// [`JailSpec::inherited`]: a launcher that starts a family's VM processes itself
/// (`forkvm template fork`, see [`family::start_here`]). Once; later calls change
/// nothing.
pub fn set_family(spec: FamilySpec) {
    let _ = FAMILY.set(spec);
}

/// Whether this process confines its threads: cleared once by a VM process launched
/// with `--no-jail` (before any thread it confines starts); set otherwise, so that a
/// VMM built in any process (tests included) runs its vCPUs confined.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether this process has the process filter (installed or inherited).
static PROCESS_FILTERED: AtomicBool = AtomicBool::new(false);

/// Whether this process's threads are confined, and the VMs it starts jailed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Sets whether this process confines its threads and jails the VMs it starts: cleared
/// by a VM process launched with `--no-jail`, and by `forkvm bench fork` to measure forks
/// without the jail beside forks with it. Call it before any thread it concerns starts.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Confines the calling thread as a thread of `kind` (see [`ThreadKind`]): drops its
/// capabilities (vCPU and API threads need none) and stacks its seccomp filter. Nothing
/// when the process is not jailed.
pub fn confine_thread(kind: ThreadKind) -> Result<(), JailError> {
    if !enabled() {
        return Ok(());
    }
    if kind != ThreadKind::Process {
        caps::drop_all()?;
    }
    seccomp::apply(kind)?;
    Ok(())
}

/// A VM process's jail, entered.
#[derive(Debug)]
pub struct Jail {
    cgroup: Option<Cgroup>,
    landlock: Option<Restricted>,
}

impl Jail {
    /// Enters the jail `spec` describes, for VM `id` that may hold `guest_memory` bytes of
    /// guest memory (its RAM, and what its forks make it keep), may change the file
    /// system only in `places` (its state root and what its configuration writes; the
    /// jail adds its cgroups, the lease directory and the devices a VM opens) and sees
    /// only those and what `places` has it read: cgroup, a minimal root of its own
    /// (mounted on `home`'s [`root::MOUNT_DIR`]), `no_new_privs`, the
    /// file-system rules, the process's seccomp filter (see the crate doc). Call it
    /// before the VM is built, while the process has one thread; `None` for a VM that is
    /// not jailed. A process whose filter is inherited has its parent's root and
    /// file-system rules too (they are inherited as well): none are added.
    ///
    /// A family's first VM process (or one its launcher started, `forkvm template fork`)
    /// takes the family's uid ([`uid`]) when its fork children can reach `reopened` (the
    /// places they open by path: disks, the vsock socket's directory) as that uid, and
    /// its VM shares no directory; it stays uid 0 otherwise, and says why.
    pub fn enter(
        spec: &JailSpec,
        id: &str,
        guest_memory: u64,
        places: Places,
        home: &Path,
        reopened: &[Place],
    ) -> Result<Option<Self>, JailError> {
        set_enabled(spec.enabled);
        if !spec.enabled {
            return Ok(None);
        }
        // Its family's, if it is in the family's pid namespace (a launcher that could not
        // make one leaves it in its own, as no family's member).
        let family = spec.family.clone().filter(|_| family::in_a_family());
        if let Some(f) = &family {
            let _ = FAMILY.set(f.clone());
        }
        let cgroup_spec = spec.cgroup.clone().unwrap_or_else(|| {
            CgroupSpec::for_vm(id, guest_memory, family.as_ref().map(|f| f.group.as_str()))
        });
        let cgroup = match Cgroup::join(&cgroup_spec) {
            Ok(c) => Some(c),
            // The engine's group (a container's cgroupsPath) is the container's: required.
            Err(e) if spec.cgroup.is_some() => return Err(e.into()),
            // forkvm's own where the host has none to give (cgroup v1 only, a read-only
            // or delegated-away hierarchy, a user who cannot make groups): the VM runs
            // without one, and `forkvm inspect` shows it.
            // (A host with no cgroup v2 at all is said at info level: there it is the
            // host's choice, not a fault.)
            Err(e @ CgroupError::NoHierarchy) => {
                tracing::info!("the VM process has no cgroup of its own: {e}");
                None
            }
            Err(e) => {
                tracing::warn!(
                    "the VM process has no cgroup of its own (it stays in its launcher's): {}",
                    error_chain(&e)
                );
                None
            }
        };
        if spec.own_netns {
            // A thread started before would stay in the old namespace.
            landlock::one_thread()?;
            // SAFETY: unshare(2) reads no memory; the namespace is this (single-threaded)
            // process's.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(JailError::Netns(std::io::Error::last_os_error()));
            }
        }
        let places = with_system_places(places, cgroup.as_ref());
        let landlock = if spec.filter_inherited {
            // Its trap still writes the line, in this process too.
            seccomp::install_sigsys_handler()?;
            seccomp::mark(ThreadKind::Process);
            // Bound by its parent's rules, which cover at least what its own would.
            if spec.writes_bound {
                landlock::set_bound(landlock::Enforced::Inherited, places.writable);
            }
            None
        } else if PROCESS_FILTERED.load(Ordering::Relaxed) {
            // Entered before (a warm process whose jail did not fit its launch): its
            // root, filter and the rules it applied then hold (the filter has no mount
            // or Landlock calls).
            seccomp::mark(ThreadKind::Process);
            None
        } else {
            // The root first (the filter has no mount calls, and the rules are applied
            // to the places as the new root has them); `no_new_privs` before the rules,
            // as Landlock needs it; the rules before the filter (which has no Landlock
            // calls).
            // The others would keep the host's root, and be left unbound by the rules.
            landlock::one_thread()?;
            let uid = match family.as_ref().and_then(|f| f.uid) {
                Some(uid) if family_reaches(uid, home, reopened)? => Some(uid),
                _ => None,
            };
            if !family::in_a_family() {
                tracing::info!(
                    "the VM process is in its launcher's pid namespace (the launcher could \
                     not make one: no CAP_SYS_ADMIN, or user.max_pid_namespaces reached; or \
                     did not)"
                );
            }
            let mount_on = home.join(root::MOUNT_DIR);
            let t = std::time::Instant::now();
            match root::enter(&mount_on, &places.root)? {
                Rooted::Own => tracing::debug!(
                    us = t.elapsed().as_micros() as u64,
                    "the VM process is in its minimal root"
                ),
                Rooted::Not(why) => tracing::info!("the VM process keeps the host's root: {why}"),
            }
            set_no_new_privs()?;
            let restricted = restrict_writes(places.writable)?;
            if let Some(uid) = uid {
                uid::switch(uid, home)?;
            }
            seccomp::apply(ThreadKind::Process)?;
            Some(restricted)
        };
        // Every jailed VM process, its own root or its parent's: an exec (a fork child
        // or a zygote started from the VM-process executable) made it dumpable again.
        not_dumpable()?;
        PROCESS_FILTERED.store(true, Ordering::Relaxed);
        Ok(Some(Self { cgroup, landlock }))
    }

    /// How far the kernel enforces the file-system rules this process applied; `None`
    /// when they are its parent's (inherited).
    pub fn landlock(&self) -> Option<Restricted> {
        self.landlock
    }

    /// Once the VM is built: drops every capability but those `needs` keeps.
    pub fn set_up(&self, needs: caps::Needs) -> Result<(), JailError> {
        caps::drop_all_but(needs)?;
        Ok(())
    }

    /// The cgroup the process is in, if it has one of its own.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }
}

/// Dropping the jail (the last thing a VM process does, on any way out) leaves its
/// cgroup and removes it.
impl Drop for Jail {
    fn drop(&mut self) {
        if let Some(c) = self.cgroup.take() {
            c.remove(std::time::Duration::from_secs(2));
        }
    }
}

/// Whether the family's fork children, as uid `uid`, can reach the places they open by
/// path (`reopened`), the state root where they register (the parent of `home`) and the
/// executable they run; said at start where not.
fn family_reaches(uid: u32, home: &Path, reopened: &[Place]) -> Result<bool, JailError> {
    let mut checks: Vec<_> = reopened
        .iter()
        .map(|p| (p.path.clone(), uid::access_mode(p)))
        .collect();
    if let Some(root) = home.parent() {
        checks.push((root.to_owned(), libc::W_OK | libc::X_OK));
    }
    if let Ok(exe) = std::env::current_exe() {
        checks.push((exe, libc::R_OK | libc::X_OK));
    }
    match uid::unreachable(uid, &checks)? {
        None => Ok(true),
        Some(path) => {
            tracing::info!(
                "the VM's family runs as uid 0, not uid {uid}: that uid cannot reach {}, \
                 which its fork children open",
                path.display()
            );
            Ok(false)
        }
    }
}

/// `places` with what every VM process changes: its family's cgroups (where its fork
/// children make theirs, where its own group is unless it is a container's, and
/// `exited`, which it joins on the way out; forkvm's for a VM of no family), the lease
/// directory and the devices
/// (its root has the whole cgroup hierarchy and the devices already, see [`root`]).
/// A container's group (the engine's `cgroupsPath`) and its siblings are not among them:
/// the process joined it and set its limits before; the runtime's `delete` removes it.
fn with_system_places(mut places: Places, cgroup: Option<&Cgroup>) -> Places {
    if cgroup.is_some() {
        let forkvm = cgroup::forkvm_groups(Path::new(cgroup::ROOT));
        // Made now: once bound, the process could not make it on its way out.
        if let Err(e) = std::fs::create_dir_all(forkvm.join("exited")) {
            tracing::debug!("cannot make {}/exited: {e}", forkvm.display());
        }
        places.writable.dir(forkvm);
    }
    // Made now, as `forkvm/exited`: a fork child takes its lease there.
    if let Err(e) = std::fs::create_dir_all(LEASE_ROOT) {
        tracing::debug!("cannot make {LEASE_ROOT}: {e}");
    }
    places.dir(LEASE_ROOT);
    for d in DEVICES {
        places.writable.file(d);
    }
    places
}

/// Makes this process, when it runs as root, not dumpable: another VM process (uid 0
/// too, but without capabilities) can no longer reach its memory, descriptors or root
/// through `/proc/<pid>` (`mem`, `fd`, `root`, `environ`), nor trace it, and a crash
/// writes no core file of its guest's memory. Every jailed VM process (booted, fork
/// child, warm process) and a fork pool's zygote, whose warm processes inherit it. A
/// process of another user keeps it: its own `/proc/self/pagemap` (which forks scan)
/// would become root's.
pub fn not_dumpable() -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // SAFETY: prctl with PR_SET_DUMPABLE reads no memory.
    match unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(JailError::Dumpable(std::io::Error::last_os_error())),
    }
}

/// Sets `no_new_privs` (for good): nothing this process executes gains privileges.
fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS reads no memory.
    match unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(JailError::NoNewPrivs(std::io::Error::last_os_error())),
    }
}

/// Applies the file-system rules (see [`landlock`]).
fn restrict_writes(writable: Writable) -> Result<Restricted, JailError> {
    let (restricted, applied) = landlock::restrict(&writable)?;
    match restricted {
        Restricted::Fully => landlock::set_bound(landlock::Enforced::Fully, applied),
        Restricted::Partially => landlock::set_bound(landlock::Enforced::Partially, applied),
        Restricted::Not => {}
    }
    match restricted {
        Restricted::Fully => {}
        Restricted::Partially => tracing::info!(
            "this kernel's Landlock is older: the VM process's file-system rules hold in part"
        ),
        Restricted::Not => tracing::info!(
            "this kernel has no Landlock (ABI {}; forkvm needs 2, Linux 5.19): the VM process \
             may write wherever uid {} may",
            landlock::kernel_abi(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() }
        ),
    }
    Ok(restricted)
}

/// What the kernel says of a process's confinement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailStatus {
    /// `Seccomp:` of its main thread (0 none, 2 filtered).
    pub seccomp: u8,
    /// How many filters are stacked on its main thread (`Seccomp_filters:`).
    pub seccomp_filters: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// Effective capabilities (`CapEff:`), as the kernel prints them.
    pub cap_eff: String,
    /// Permitted capabilities (`CapPrm:`).
    pub cap_prm: String,
    /// Bounding set (`CapBnd:`).
    pub cap_bnd: String,
    /// Its cgroup (v2), from `/proc/<pid>/cgroup`.
    pub cgroup: Option<String>,
    /// That group's `memory.max` and `pids.max`, as written there.
    pub memory_max: Option<String>,
    /// See `memory_max`.
    pub pids_max: Option<String>,
    /// Its mount namespace, as `/proc/<pid>/ns/mnt` names it (`mnt:[4026531841]`).
    #[serde(default)]
    pub mount_ns: Option<String>,
    /// Its pid namespace, as `/proc/<pid>/ns/pid` names it (`pid:[4026531836]`): its
    /// family's ([`family`]).
    #[serde(default)]
    pub pid_ns: Option<String>,
    /// Its root: the type and source of the mount it sees at `/` (`tmpfs forkvm-root`:
    /// its minimal root, see [`root`]).
    #[serde(default)]
    pub root: Option<String>,
    /// Its effective uid (`Uid:`): its family's own ([`uid`]), or 0.
    #[serde(default)]
    pub uid: Option<u32>,
}

impl JailStatus {
    /// Reads the status of process `pid`.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let mut s = Self::parse_status(&status);
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        s.cgroup = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned);
        if let Some(g) = &s.cgroup {
            let dir = PathBuf::from(cgroup::ROOT).join(g.trim_start_matches('/'));
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .ok()
                    .map(|v| v.trim().to_owned())
            };
            s.memory_max = read("memory.max");
            s.pids_max = read("pids.max");
        }
        let ns = |kind: &str| {
            std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
                .ok()
                .map(|l| l.to_string_lossy().into_owned())
        };
        s.mount_ns = ns("mnt");
        s.pid_ns = ns("pid");
        s.root = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .ok()
            .and_then(|m| Self::root_of(&m));
        Ok(s)
    }

    /// The type and source of the mount at `/` in a `/proc/<pid>/mountinfo` text (the
    /// last one mounted there: the one the process sees).
    pub fn root_of(mountinfo: &str) -> Option<String> {
        mountinfo
            .lines()
            .rev()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .and_then(|l| l.split_once(" - "))
            .map(|(_, fs)| fs.split(' ').take(2).collect::<Vec<_>>().join(" "))
    }

    /// The fields of a `/proc/<pid>/status` text.
    pub fn parse_status(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Seccomp" => s.seccomp = value.parse().unwrap_or(0),
                "Seccomp_filters" => s.seccomp_filters = value.parse().unwrap_or(0),
                "NoNewPrivs" => s.no_new_privs = value == "1",
                "CapEff" => s.cap_eff = value.to_owned(),
                "CapPrm" => s.cap_prm = value.to_owned(),
                "CapBnd" => s.cap_bnd = value.to_owned(),
                // Real, effective, saved, file system: the effective one.
                "Uid" => s.uid = value.split_whitespace().nth(1).and_then(|u| u.parse().ok()),
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let text = "Name:\tforkvm-vmm\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n\
                    CapPrm:\t0000000000001000\nCapEff:\t0000000000000000\n\
                    CapBnd:\t0000000000001000\nUid:\t0\t2147418113\t2147418113\t2147418113\n";
        let s = JailStatus::parse_status(text);
        assert_eq!(s.uid, Some(2147418113));
        assert_eq!(s.seccomp, 2);
        assert_eq!(s.seccomp_filters, 1);
        assert!(s.no_new_privs);
        assert_eq!(s.cap_eff, "0000000000000000");
        assert_eq!(s.cap_prm, "0000000000001000");
        assert_eq!(s.cap_bnd, "0000000000001000");
    }

    #[test]
    fn the_root_is_read_from_mountinfo() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    30 22 0:5 / /proc rw - proc proc rw\n\
                    41 22 0:40 / / ro,nosuid - tmpfs forkvm-root ro,size=1024k\n";
        assert_eq!(
            JailStatus::root_of(text).as_deref(),
            Some("tmpfs forkvm-root")
        );
        assert_eq!(
            JailStatus::root_of("30 22 0:5 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn the_default_is_jailed_with_forkvms_own_group() {
        let spec = JailSpec::default();
        assert!(spec.enabled);
        assert_eq!(spec.cgroup, None);
        assert!(!JailSpec::disabled().enabled);
    }
}
