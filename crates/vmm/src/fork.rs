//! Forking a running VM into child VMs, each in its own VM process.
//!
//! The parent pauses its vCPUs, captures its state ([`VmSnapshot`]), freezes its memory
//! (see [`crate::memory`]: nothing is copied on a first fork, only pages written since
//! the last fork on later ones) and resumes: that is the whole parent pause, and it does
//! not grow with guest memory. Then it launches each child as a `forkvm-vmm` process
//! (see [`crate::launch`]) with its identity in its launch, and beside it the fork's
//! [`ForkState`] (snapshot and memory layout, encoded once per request into a sealed
//! memory file every child reads) and the memory files; a warm process of the parent's [`ChildPool`] when one
//! is ready (its KVM VM and vCPUs already made, its home staged), a new one otherwise.
//! The child registers itself under the parent's [`ChildHomes`] (a warm one publishes
//! the home it staged: one rename), maps the files copy-on-write,
//! builds (or fills in) its KVM VM, restores every vCPU and device, resumes and reports
//! that it runs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_registry::VmHome;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::control::{error_chain, ChildInfo, ChildSpec, ControlError, ForkOutcome, ForkRequest};
use crate::identity_port::IdentityPort;
use crate::launch::{
    ChildHomes, ConsoleSpec, HomeSpec, Launch, ProcessOptions, Report, Start, VmProcess,
};
use crate::memory::{GuestRam, MemoryLayout};
use crate::pool::ChildPool;
use crate::snapshot::{ChildIdentity, VmSnapshot};
use crate::steps::Steps;
use crate::vmm::{Vmm, VmmError};
use crate::warm::Prepared;

/// Most children one fork request may create.
pub const MAX_CHILDREN: u32 = 1024;
/// How long a fork's children may take to report that they run: this, plus
/// [`CHILD_START_EACH`] per child (they start at once and share the host's CPUs).
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// What each child of a fork adds to [`CHILD_START_TIMEOUT`].
const CHILD_START_EACH: Duration = Duration::from_secs(1);

/// How long the children of a fork of `count` may take to report that they run.
pub fn start_deadline(count: u32) -> Duration {
    CHILD_START_TIMEOUT + CHILD_START_EACH * count.min(MAX_CHILDREN)
}

/// What a fork child starts from: the fork's [`ForkState`] and its own identity (its
/// memory files travel beside it).
#[derive(Debug)]
pub struct ChildPayload {
    snapshot: VmSnapshot,
    layout: MemoryLayout,
    identity: ChildIdentity,
    together: bool,
}

/// What every child of one fork starts from: the parent's state and memory layout.
/// Encoded once per fork request into a sealed memory file that each child receives
/// ahead of the memory files; only a child's identity travels in its own launch.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForkState {
    pub(crate) snapshot: VmSnapshot,
    pub(crate) layout: MemoryLayout,
    /// The fork's children start together: each, once restored, waits until all are
    /// (see [`Reports`]).
    pub(crate) together: bool,
}

/// Largest fork state a child reads (a VM's state is kilobytes; this bounds the file).
const MAX_FORK_STATE: u64 = forkvm_snapshot::MAX_PAYLOAD + 64;

impl ForkState {
    /// Encodes the state into a new sealed memory file.
    pub(crate) fn into_file(self) -> Result<File, ControlError> {
        let failed = |e: String| ControlError::Failed(format!("cannot encode the fork state: {e}"));
        let blob = forkvm_snapshot::encode(&self).map_err(|e| failed(e.to_string()))?;
        let file = crate::memory::create_memfd(c"forkvm-fork-state")
            .map_err(|e| failed(error_chain(&e)))?;
        (&file)
            .write_all(&blob)
            .map_err(|e| failed(e.to_string()))?;
        crate::memory::seal(&file).map_err(|e| failed(error_chain(&e)))?;
        Ok(file)
    }

    /// Reads and validates the state from `file` (at most [`MAX_FORK_STATE`] bytes);
    /// the child with `identity` starts from it.
    pub(crate) fn read(
        file: File,
        identity: ChildIdentity,
    ) -> Result<ChildPayload, ForkChildError> {
        use std::os::unix::fs::FileExt;
        let bad = |e: std::io::Error| ForkChildError::State(e.to_string());
        let len = file.metadata().map_err(bad)?.len();
        if len > MAX_FORK_STATE {
            return Err(ForkChildError::State(format!("{len} bytes")));
        }
        // Read at offsets: every child of the fork shares the file's position.
        let mut blob = vec![0u8; len as usize];
        file.read_exact_at(&mut blob, 0).map_err(bad)?;
        let state: ForkState =
            forkvm_snapshot::decode(&blob).map_err(|e| ForkChildError::State(error_chain(&e)))?;
        let mut payload = ChildPayload {
            snapshot: state.snapshot,
            layout: state.layout,
            identity,
            together: state.together,
        };
        payload.adopt_identity();
        Ok(payload)
    }
}

/// Errors in a fork child before its VM runs.
#[derive(Debug, thiserror::Error)]
pub enum ForkChildError {
    /// No memory file came with the payload.
    #[error("the fork payload carried no guest memory")]
    NoMemory,
    /// The fork's state file is unreadable or invalid.
    #[error("invalid fork state: {0}")]
    State(String),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The VM could not be restored.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The payload's configuration is not the child's own.
    #[error("the fork payload gives the child no identity of its own: {0}")]
    Identity(String),
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: getrandom writes at most `n - filled` bytes into the buffer's tail.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r > 0 {
            filled += r as usize;
        }
    }
    buf
}

fn random_u32() -> u32 {
    u32::from_le_bytes(random_bytes(4).try_into().expect("4 bytes"))
}

/// A fresh CID: any value from 3 to 2^32-2 (0-2 are reserved, -1 is "any").
fn random_cid() -> u64 {
    3 + u64::from(random_u32()) % (u64::from(u32::MAX) - 4)
}

/// Who child number `seq` of a VM configured as `cfg` is, with `spec`'s overrides.
fn child_identity(
    cfg: &VmConfig,
    seq: u32,
    spec: &ChildSpec,
) -> Result<ChildIdentity, ControlError> {
    // Names on the host (sockets, TAPs) carry this process's host pid: its pid in a VM
    // family's namespace is another family's too (each family's first VM process is 2).
    let me = forkvm_registry::ProcessIdentity::current().pid;
    let (cid, vsock_uds) = match &cfg.vsock {
        Some(v) => (
            Some(spec.cid.unwrap_or_else(random_cid)),
            Some(
                spec.vsock_uds
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("{}.{me}-{seq}", v.uds.display()))),
            ),
        ),
        None => (None, None),
    };
    if let Some(c) = cid {
        if !(3..u64::from(u32::MAX)).contains(&c) {
            return Err(ControlError::Invalid(format!(
                "CID {c} is reserved or out of range"
            )));
        }
    }
    let nics = cfg.nets.len();
    if !spec.taps.is_empty() && spec.taps.len() != nics {
        return Err(ControlError::Invalid(format!(
            "{} TAP names given for {nics} NICs",
            spec.taps.len()
        )));
    }
    let taps = if spec.taps.is_empty() {
        (0..nics)
            .map(|i| format!("fk{}c{seq}n{i}", me % 100_000))
            .collect()
    } else {
        spec.taps.clone()
    };
    if !spec.macs.is_empty() && spec.macs.len() != nics {
        return Err(ControlError::Invalid(format!(
            "{} MACs given for {nics} NICs",
            spec.macs.len()
        )));
    }
    let macs: Vec<[u8; 6]> = match spec.macs.is_empty() {
        true => (0..nics)
            .map(|_| {
                forkvm_devices::virtio::net::random_mac()
                    .map_err(|e| ControlError::Failed(format!("cannot make a MAC: {e}")))
            })
            .collect::<Result<_, _>>()?,
        false => spec
            .macs
            .iter()
            .map(|m| crate::config::parse_mac(m).map_err(ControlError::Invalid))
            .collect::<Result<_, _>>()?,
    };
    if let Some((i, m)) = macs
        .iter()
        .enumerate()
        .find(|(i, m)| macs[..*i].contains(m))
    {
        return Err(ControlError::Invalid(format!(
            "MAC {} is given to NIC {i} and to an earlier one",
            crate::config::format_mac(m)
        )));
    }
    let hostname = match &spec.hostname {
        Some(h) => {
            crate::config::check_hostname(h).map_err(ControlError::Invalid)?;
            h.clone()
        }
        None => format!("fork-{:08x}", random_u32()),
    };
    let mut shares: Vec<(String, PathBuf)> = Vec::with_capacity(spec.shares.len());
    for s in &spec.shares {
        if !cfg.shares.iter().any(|c| c.tag == s.tag) {
            return Err(ControlError::Invalid(format!(
                "the VM has no share tagged {:?}",
                s.tag
            )));
        }
        if shares.iter().any(|(t, _)| *t == s.tag) {
            return Err(ControlError::Invalid(format!(
                "share {:?} is given two directories",
                s.tag
            )));
        }
        if !s.host_path.is_absolute() {
            return Err(ControlError::Invalid(format!(
                "share {:?}: {} is not an absolute path",
                s.tag,
                s.host_path.display()
            )));
        }
        // The child is bound by the forking process's rules and sees what it sees.
        if !s.host_path.is_dir() {
            return Err(ControlError::Invalid(format!(
                "share {:?}: {} is not a directory (one this VM process can reach)",
                s.tag,
                s.host_path.display()
            )));
        }
        let writable = cfg.shares.iter().any(|c| c.tag == s.tag && !c.read_only);
        if writable {
            forkvm_jail::landlock::check_writable(&format!("share {:?}", s.tag), &s.host_path)
                .map_err(ControlError::Invalid)?;
        }
        shares.push((s.tag.clone(), s.host_path.clone()));
    }
    Ok(ChildIdentity {
        cid,
        vsock_uds,
        taps,
        macs,
        hostname,
        seed: random_bytes(64),
        shares,
    })
}

/// Refuses a child identity that gives another directory to a share whose guest holds
/// more than its root in `snapshot` (its files are its parent's directory's, which the
/// child goes on serving: [`forkvm_devices::virtio::fs`]).
pub(crate) fn check_share_overrides(
    snapshot: &VmSnapshot,
    identities: &[ChildIdentity],
) -> Result<(), ControlError> {
    for id in identities {
        for (tag, _) in &id.shares {
            let Some(state) = snapshot.share_state(tag) else {
                return Err(ControlError::Invalid(format!(
                    "the VM has no share tagged {tag:?}"
                )));
            };
            if !state.table.holds_only_root() {
                return Err(ControlError::Invalid(format!(
                    "share {tag:?} cannot be given another directory: its guest has files \
                     of it in use ({} nodes, {} open)",
                    state.table.inodes.len(),
                    state.table.handles.len()
                )));
            }
        }
    }
    Ok(())
}

/// Checks a fork request against the VM it forks.
pub(crate) fn check_request(cfg: &VmConfig, req: &ForkRequest) -> Result<(), ControlError> {
    if req.count == 0 || req.count > MAX_CHILDREN {
        return Err(ControlError::Invalid(format!(
            "count must be 1 to {MAX_CHILDREN}, got {}",
            req.count
        )));
    }
    if req.children.len() > req.count as usize {
        return Err(ControlError::Invalid(format!(
            "{} child specs for {} children",
            req.children.len(),
            req.count
        )));
    }
    // Children are named on the host by their pids (their homes, `forkvm ps`, an OCI
    // container's state), which they read from the procfs their parent's root holds:
    // the launcher's (a VM family's, see `forkvm_jail::family`), not one of a pid
    // namespace below the host's.
    if !forkvm_registry::ProcessIdentity::children_learn_host_pids() {
        return Err(ControlError::Invalid(
            "this VM's process sees a procfs of a pid namespace below the host's: \
             its fork children could not be named by their host pids, so it does not fork"
                .to_owned(),
        ));
    }
    if let Some(d) = cfg.disks.iter().find(|d| !d.read_only) {
        return Err(ControlError::Invalid(format!(
            "the VM has a writable disk ({}); parent and children would write the same image: attach it read-only to fork",
            d.path.display()
        )));
    }
    // A child is bound by its parent's file-system rules: the paths it makes lie where
    // they let it write.
    for (i, c) in req.children.iter().enumerate() {
        if let Some(path) = &c.console {
            forkvm_jail::landlock::check_writable(&format!("child {i}'s console"), path)
                .map_err(ControlError::Invalid)?;
        }
        if let Some(path) = &c.vsock_uds {
            let what = format!("child {i}'s vsock socket");
            forkvm_jail::landlock::check_socket(&what, path).map_err(ControlError::Invalid)?;
            // Where only sockets may be made, a file already there cannot be replaced.
            let bound = forkvm_jail::landlock::bound();
            if bound.is_some_and(|b| !b.writable.allows(path)) && path.symlink_metadata().is_ok() {
                return Err(ControlError::Invalid(format!(
                    "{what} {}: a file is there already, which the VM process's jail does not \
                     let it replace; remove it or name another",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses to save a VM as a template, naming the first share whose guest holds more
/// than its root: the files a share's guest has open are host descriptors
/// ([`forkvm_devices::virtio::fs`]), which a running process can hand to its fork
/// children but no file can hold. A share whose guest holds only its root is saved: a
/// child serves its configured directory, or the one its fork request gives it.
pub(crate) fn refuse_shares_in_templates(snapshot: &VmSnapshot) -> Result<(), ControlError> {
    for s in &snapshot.config.shares {
        let in_use = snapshot
            .share_state(&s.tag)
            .is_none_or(|state| !state.table.holds_only_root());
        if in_use {
            return Err(ControlError::Invalid(format!(
                "the VM's guest has files of its share {} (tag {:?}) in use; such a VM cannot \
                 be saved as a template (the files its guest has open on the share are host \
                 descriptors, which only a running VM can pass on: fork it instead, or save \
                 the template before the guest mounts the share)",
                s.host_path.display(),
                s.tag
            )));
        }
    }
    Ok(())
}

/// Identities for every child of `req`, numbered from `*seq + 1`.
pub(crate) fn identities(
    cfg: &VmConfig,
    req: &ForkRequest,
    seq: &mut u32,
) -> Result<Vec<ChildIdentity>, ControlError> {
    (0..req.count as usize)
        .map(|i| {
            *seq += 1;
            child_identity(
                cfg,
                *seq,
                req.children.get(i).unwrap_or(&ChildSpec::default()),
            )
        })
        .collect()
}

/// The children of one fork on their way to running: [`Launching::start`] hands them
/// to warm processes (quick: done while the parent is paused, so that its resumed
/// vCPUs do not compete with the sending), [`Launching::finish`] starts new processes
/// for the rest and waits for every child's report.
pub(crate) struct Launching {
    /// The fork's state (first), memory files and the host files its devices hold
    /// ([`VmSnapshot::take_host_files`]), as each child receives them.
    files: Vec<File>,
    launch: Launch,
    consoles: Vec<Option<PathBuf>>,
    /// Children handed to a process, in order, and whether it was warm.
    started: Vec<(VmProcess, ChildIdentity, bool)>,
    /// Children left for new processes: their index and identity.
    rest: Vec<(usize, ChildIdentity)>,
    t0: Instant,
}

impl Launching {
    /// Encodes `snapshot` and `layout` once, then launches one child per identity over
    /// the memory `files` (base first), registered under `homes`, in warm processes of
    /// `pool` while it has some; times are measured from `t0`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        snapshot: VmSnapshot,
        layout: &MemoryLayout,
        files: Vec<File>,
        identities: Vec<ChildIdentity>,
        req: &ForkRequest,
        homes: &ChildHomes,
        pool: Option<&ChildPool>,
        t0: Instant,
    ) -> Result<Self, ControlError> {
        check_share_overrides(&snapshot, &identities)?;
        // The state is encoded once; every child gets the same file, ahead of the memory,
        // and the host files its devices hold after the memory.
        let host_files = snapshot.take_host_files();
        let state = ForkState {
            snapshot,
            layout: layout.clone(),
            together: identities.len() > 1,
        }
        .into_file()?;
        let mut this = Self {
            files: std::iter::once(state)
                .chain(files)
                .chain(host_files)
                .collect(),
            launch: Launch {
                home: HomeSpec::New(homes.clone()),
                console: ConsoleSpec::Log,
                start: Start::Restore(Box::default()),
                // A child is jailed as its parent is; one started by a jailed VM process
                // has its seccomp filter already (it is inherited).
                jail: forkvm_jail::JailSpec::inherited(),
            },
            consoles: (0..identities.len())
                .map(|i| req.children.get(i).and_then(|c| c.console.clone()))
                .collect(),
            started: Vec::with_capacity(identities.len()),
            rest: Vec::new(),
            t0,
        };
        for (i, identity) in identities.into_iter().enumerate() {
            let warm = match pool.and_then(ChildPool::take) {
                Some(mut p) => {
                    let (blob, console) = this.encode(i, &identity)?;
                    let pid = p.pid();
                    match with_console(&mut this.files, console, |f| p.send(&blob, f)) {
                        Ok(()) => Some(p),
                        Err(e) => {
                            tracing::warn!(pid, "a warm fork process failed: {e}");
                            None
                        }
                    }
                }
                None => None,
            };
            match warm {
                Some(p) => this.started.push((p, identity, true)),
                None => this.rest.push((i, identity)),
            }
        }
        Ok(this)
    }

    /// The launch of child `i` with `identity`, and its console file if it has one
    /// (opened here: the child's jail may not let it create or reopen the file), to be
    /// sent last (see [`with_console`]).
    fn encode(
        &mut self,
        i: usize,
        identity: &ChildIdentity,
    ) -> Result<(Vec<u8>, Option<[File; 2]>), ControlError> {
        self.launch.start = Start::Restore(Box::new(identity.clone()));
        let (console, spec) = match &self.consoles[i] {
            Some(path) => {
                let file = open_console(path).map_err(|e| {
                    ControlError::Failed(format!(
                        "cannot create the console file {}: {e}",
                        path.display()
                    ))
                })?;
                (Some(file), ConsoleSpec::File(path.clone()))
            }
            None => (None, ConsoleSpec::Log),
        };
        self.launch.console = spec;
        let blob = crate::launch::encode(&self.launch)
            .map_err(|e| ControlError::Failed(format!("cannot encode the fork payload: {e}")))?;
        Ok((blob, console))
    }

    /// Starts a new process for each child no warm process took, then waits until every
    /// child reports that it runs.
    pub(crate) fn finish(mut self) -> Result<Vec<ChildInfo>, ControlError> {
        let t0 = self.t0;
        let mut reports = Reports::new(std::mem::take(&mut self.started), t0);
        if let Err(e) = self.start_rest(&mut reports) {
            // The children started so far end without running (those waiting for the
            // others when they lose their socket) or are left to themselves.
            reports.abandon();
            return Err(e);
        }
        tracing::info!(
            children = reports.waiting.len(),
            sent_after_us = t0.elapsed().as_micros() as u64,
            "fork payloads sent"
        );
        reports.wait()
    }

    /// Starts a new process for each child no warm process took.
    fn start_rest(&mut self, reports: &mut Reports) -> Result<(), ControlError> {
        if self.rest.is_empty() {
            return Ok(());
        }
        let exe = crate::launch::vmm_executable()
            .map_err(|e| ControlError::Failed(format!("cannot start fork children: {e}")))?;
        for (i, identity) in std::mem::take(&mut self.rest) {
            let (blob, console) = self.encode(i, &identity)?;
            // A daemon: not killed with the thread that starts it (this one ends with
            // the fork).
            let child = with_console(&mut self.files, console, |f| {
                VmProcess::spawn_encoded(&exe, &blob, f, ProcessOptions::daemon())
            })
            .map_err(|e| ControlError::Failed(format!("cannot start fork child {i}: {e}")))?;
            reports.add(child, identity, false);
            // The reports that came meanwhile, so that a child's time is its own, not
            // the rest's spawning.
            reports.read_ready(Duration::ZERO, Instant::now() + start_deadline(1));
        }
        Ok(())
    }
}

/// A fork's children waiting to report that they run, read as their reports come; the
/// children are listed in the order they were started, each with its time from `t0`.
///
/// The children of a fork of more than one start together ([`ForkState::together`]):
/// each, once restored, reports so and waits; when every child has (or failed), all are
/// told to run at once. Where children share CPUs, the first ones to run would
/// otherwise take them from the restores of the rest (a fork's last child ran 1.3 s
/// after the request of a fork of ten on one CPU, its guest-less restore was a fraction
/// of that); where each has a CPU, it costs the first ones the wait for the slowest.
struct Reports {
    waiting: Vec<Option<(VmProcess, ChildIdentity, bool)>>,
    /// Which children reported their VM restored and wait to be told to run.
    restored: Vec<bool>,
    /// Whether the restored children were told to run.
    released: bool,
    children: Vec<Option<ChildInfo>>,
    failure: Option<ControlError>,
    t0: Instant,
}

impl Reports {
    fn new(started: Vec<(VmProcess, ChildIdentity, bool)>, t0: Instant) -> Self {
        let mut this = Self {
            waiting: Vec::with_capacity(started.len()),
            restored: Vec::with_capacity(started.len()),
            released: false,
            children: Vec::with_capacity(started.len()),
            failure: None,
            t0,
        };
        for (child, identity, warm) in started {
            this.add(child, identity, warm);
        }
        this
    }

    /// One more child, started now.
    fn add(&mut self, child: VmProcess, identity: ChildIdentity, warm: bool) {
        self.waiting.push(Some((child, identity, warm)));
        self.restored.push(false);
        self.children.push(None);
    }

    /// Once every child still waiting has reported its VM restored, tells them all to
    /// run (only when all were added: [`Reports::wait`]); or, if a child failed, none:
    /// the fork fails, and children that never ran are not left behind for a caller
    /// that learns none of them (each ends when its socket closes).
    fn start_together_once_restored(&mut self) {
        let open = self.open();
        if self.released || open.is_empty() || open.iter().any(|&i| !self.restored[i]) {
            return;
        }
        self.released = true;
        if self.failure.is_some() {
            self.abandon();
            return;
        }
        for i in open {
            let sent = match &self.waiting[i] {
                Some((child, _, _)) => child.start_together().map_err(|e| (child.pid(), e)),
                None => continue,
            };
            if let Err((pid, e)) = sent {
                self.failure.get_or_insert_with(|| {
                    ControlError::Failed(format!("fork child {pid} could not be started: {e}"))
                });
                if let Some((child, _, _)) = self.waiting[i].take() {
                    let _ = child.detach();
                }
            }
        }
    }

    /// Leaves every child still waiting to itself: one restored and waiting for the
    /// others ends when it loses its socket.
    fn abandon(&mut self) {
        for w in &mut self.waiting {
            if let Some((child, _, _)) = w.take() {
                let _ = child.detach();
            }
        }
    }

    /// The children still silent.
    fn open(&self) -> Vec<usize> {
        (0..self.waiting.len())
            .filter(|&i| self.waiting[i].is_some())
            .collect()
    }

    /// Reads the reports that come within `timeout` (a report is written at once: what
    /// is readable is read at once, each within `deadline`); returns whether any came.
    fn read_ready(&mut self, timeout: Duration, deadline: Instant) -> bool {
        let open = self.open();
        if open.is_empty() {
            return false;
        }
        match reports_ready(&self.waiting, &open, timeout) {
            Ok(ready) if !ready.is_empty() => {
                self.read(ready, Duration::from_millis(100), deadline);
                true
            }
            Ok(_) => false,
            Err(e) => {
                // Each waited for in turn, within the deadline; not one that waits to be
                // told to run (it has nothing more to say until then).
                tracing::warn!("cannot poll the fork's children: {e}");
                let left = deadline.saturating_duration_since(Instant::now());
                let talking: Vec<usize> = open
                    .into_iter()
                    .filter(|&i| self.released || !self.restored[i])
                    .collect();
                if talking.is_empty() {
                    std::thread::sleep(left.min(Duration::from_millis(10)));
                    return false;
                }
                self.read(talking, left, deadline);
                true
            }
        }
    }

    /// Reads the reports of children `which`, waiting at most `each` (and never past
    /// `deadline`) for each.
    fn read(&mut self, which: Vec<usize>, each: Duration, deadline: Instant) {
        for i in which {
            let Some((child, identity, warm)) = self.waiting[i].take() else {
                continue;
            };
            let pid = child.pid();
            let left = deadline.saturating_duration_since(Instant::now());
            match child.wait_report(each.min(left).max(Duration::from_millis(1))) {
                Ok(Report::Restored) if !self.restored[i] && !self.released => {
                    // It waits to be told to run.
                    self.restored[i] = true;
                    self.waiting[i] = Some((child, identity, warm));
                    continue;
                }
                Ok(Report::Restored) => {
                    self.failure.get_or_insert_with(|| {
                        ControlError::Failed(format!(
                            "fork child {pid} reported its VM restored out of turn"
                        ))
                    });
                }
                Ok(Report::Running) => {
                    self.children[i] = Some(ChildInfo {
                        pid,
                        cid: identity.cid,
                        vsock_uds: identity.vsock_uds,
                        running_after_us: self.t0.elapsed().as_micros() as u64,
                        warm,
                    })
                }
                Err(e) => {
                    self.failure.get_or_insert_with(|| {
                        ControlError::Failed(format!("fork child {pid} did not start: {e}"))
                    });
                }
            }
            // Its lifetime is its own (reaped in the background, or by init).
            let _ = child.detach();
        }
    }

    /// Waits until every child reports (or the fork's deadline, counted from now,
    /// passes: then every child still silent failed).
    fn wait(mut self) -> Result<Vec<ChildInfo>, ControlError> {
        let deadline = Instant::now() + start_deadline(self.waiting.len() as u32);
        loop {
            self.start_together_once_restored();
            let open = self.open();
            if open.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.read_ready(left, deadline) && Instant::now() >= deadline {
                // Every child still silent failed; the fork's error names one that
                // never restored its VM rather than one that waited for it.
                let mut open = open;
                open.sort_by_key(|&i| self.restored[i]);
                self.read(open, Duration::from_millis(1), deadline);
            }
        }
        match self.failure {
            Some(e) => Err(e),
            None => Ok(self.children.into_iter().flatten().collect()),
        }
    }
}

/// Waits until every child of `started` reports that it runs (see [`Reports`]).
#[cfg(test)]
fn wait_for_reports(
    started: Vec<(VmProcess, ChildIdentity, bool)>,
    t0: Instant,
) -> Result<Vec<ChildInfo>, ControlError> {
    Reports::new(started, t0).wait()
}

/// Which of the `open` children of `waiting` have something to read (a report, or the
/// end of their socket), waiting at most `timeout`.
fn reports_ready(
    waiting: &[Option<(VmProcess, ChildIdentity, bool)>],
    open: &[usize],
    timeout: Duration,
) -> std::io::Result<Vec<usize>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds: Vec<PollFd<'_>> = open
        .iter()
        .filter_map(|&i| waiting[i].as_ref())
        .map(|(child, _, _)| PollFd::new(child.socket(), PollFlags::IN))
        .collect();
    // A limit past what a timespec holds is no limit.
    match poll(&mut fds, Timespec::try_from(timeout).ok().as_ref()) {
        Ok(_) => Ok(fds
            .iter()
            .zip(open)
            .filter(|(p, _)| !p.revents().is_empty())
            .map(|(_, &i)| i)
            .collect()),
        Err(rustix::io::Errno::INTR) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `send` with the fork's `files` and, last, a child's `console` file (what its
/// VM process takes for a [`ConsoleSpec::File`]); the fork's files stay as they were.
fn with_console<R>(
    files: &mut Vec<File>,
    console: Option<[File; 2]>,
    send: impl FnOnce(&[File]) -> R,
) -> R {
    let n = files.len();
    files.extend(console.into_iter().flatten());
    let sent = send(files);
    files.truncate(n);
    sent
}

/// Opens a fork child's console file at `path` as the child writes it: appending, and
/// again for reading and writing (a file over its bound is cut in place through that
/// one); made empty if it is a regular file (`/dev/null`, a FIFO or a terminal are used
/// as they are).
fn open_console(path: &Path) -> std::io::Result<[File; 2]> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if !f.metadata()?.is_file() {
        // Never cut (its length stays 0); a second reader would keep a FIFO open.
        let same = f.try_clone()?;
        return Ok([f, same]);
    }
    f.set_len(0)?;
    // The file just opened, not whatever the path names by now.
    let cutter = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    Ok([f, cutter])
}

/// A fork whose children have their launch and whose parent runs again: what is left
/// (starting the children no warm process took, waiting for every child's report,
/// refilling the pool) runs off the parent's event loop, so that its devices and
/// control requests are served meanwhile ([`Vmm::start_fork`]).
pub(crate) struct PendingFork {
    launching: Launching,
    refill: Option<crate::pool::Refill>,
    parent_pause_us: u64,
}

/// Refills a pool when dropped.
struct RefillOnDrop(Option<crate::pool::Refill>);

impl Drop for RefillOnDrop {
    fn drop(&mut self) {
        if let Some(refill) = self.0.take() {
            refill.refill();
        }
    }
}

impl PendingFork {
    /// Starts the remaining children, waits until every child runs (or the fork's
    /// deadline passes), then refills the pool.
    pub(crate) fn finish(self) -> Result<ForkOutcome, ControlError> {
        // Refilled (or started, on a child's first fork) once the children run, or the
        // fork failed, whichever way it ends.
        let refill = RefillOnDrop(self.refill);
        let started =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.launching.finish()))
                .unwrap_or_else(|_| {
                    Err(ControlError::Failed(
                        "the fork failed while its children started (a bug: see the VM's log)"
                            .into(),
                    ))
                });
        drop(refill);
        let children = started?;
        let warm = children.iter().filter(|c| c.warm).count();
        tracing::info!(
            children = children.len(),
            warm,
            parent_pause_us = self.parent_pause_us,
            "forked"
        );
        Ok(ForkOutcome {
            children,
            parent_pause_us: self.parent_pause_us,
        })
    }
}

impl Vmm {
    /// Forks this VM into `req.count` children (see the module documentation), as far as
    /// the parent pause goes: the parent runs again when this returns, and the
    /// [`PendingFork`] finishes the fork.
    pub(crate) fn start_fork(&mut self, req: &ForkRequest) -> Result<PendingFork, ControlError> {
        let t0 = Instant::now();
        check_request(&self.cfg, req)?;
        let homes = self.child_homes.clone().ok_or_else(|| {
            ControlError::Failed("this VM has no state root to register its children under".into())
        })?;
        let identities = identities(&self.cfg, req, &mut self.fork_seq)?;

        // The parent pause: pause, capture, freeze memory, resume.
        let was_paused = self.is_paused();
        let pause_start = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        let captured = self.capture().and_then(|snap| {
            let (files, layout) = self.ram.freeze_for_fork().map_err(|e| {
                ControlError::Failed(format!("cannot share guest memory: {}", error_chain(&e)))
            })?;
            let files = files
                .into_iter()
                .map(|f| f.try_clone())
                .collect::<Result<Vec<File>, _>>()
                .map_err(|e| ControlError::Failed(format!("cannot share guest memory: {e}")))?;
            Ok((snap, files, layout))
        });
        let frozen_at = pause_start.elapsed();
        // Warm children get their launch before the parent's vCPUs take the CPU back.
        let launching = captured.and_then(|(snapshot, files, layout)| {
            Launching::start(
                snapshot,
                &layout,
                files,
                identities,
                req,
                &homes,
                self.pool.as_ref(),
                t0,
            )
        });
        let sent_at = pause_start.elapsed();
        if !was_paused && !req.freeze {
            self.resume()?;
        }
        let parent_pause_us = pause_start.elapsed().as_micros() as u64;
        tracing::debug!(
            ?frozen_at,
            ?sent_at,
            parent_pause_us,
            "parent paused, captured, froze and launched its warm children"
        );
        let launching = match launching {
            Ok(l) => l,
            Err(e) => {
                // Whatever it took from the pool is replaced.
                self.fill_fork_pool();
                return Err(e);
            }
        };
        // A child's first fork starts its pool, held until the children run; warm
        // processes started from now on map the memory as this fork's children do.
        self.start_fork_pool(false);
        self.give_pool_memory();
        Ok(PendingFork {
            launching,
            refill: self.pool.as_ref().map(ChildPool::refiller),
            parent_pause_us,
        })
    }
}

impl ChildPayload {
    /// Whether this child, once restored, waits until every child of its fork is
    /// ([`crate::launch::Launched::wait_for_siblings`]) before its vCPUs run.
    pub fn starts_together(&self) -> bool {
        self.together
    }

    /// Makes the snapshot's configuration the child's own: its CID, vsock socket, TAPs,
    /// MACs and the directories of shares it was given (done as the child receives it).
    pub(crate) fn adopt_identity(&mut self) {
        let id = &self.identity;
        let cfg = &mut self.snapshot.config;
        if let (Some(v), Some(cid), Some(uds)) = (&mut cfg.vsock, id.cid, &id.vsock_uds) {
            v.cid = cid;
            v.uds = uds.clone();
        }
        for (i, net) in cfg.nets.iter_mut().enumerate() {
            if let Some(tap) = id.taps.get(i) {
                net.tap = tap.clone();
            }
            net.mac = id.macs.get(i).copied();
        }
        for (tag, dir) in &id.shares {
            if let Some(share) = cfg.shares.iter_mut().find(|s| s.tag == *tag) {
                share.host_path = dir.clone();
            }
        }
    }

    /// Checks that the configuration the devices are built from carries the child's
    /// own vsock CID and socket and TAPs: a child must never take over its parent's
    /// socket (binding it unlinks the parent's) or TAPs.
    fn check_identity(&self) -> Result<(), ForkChildError> {
        let id = &self.identity;
        let cfg = &self.snapshot.config;
        if let Some(v) = &cfg.vsock {
            if id.cid != Some(v.cid) || id.vsock_uds.as_ref() != Some(&v.uds) {
                return Err(ForkChildError::Identity(format!(
                    "its vsock is CID {} on {}",
                    v.cid,
                    v.uds.display()
                )));
            }
        }
        for (i, net) in cfg.nets.iter().enumerate() {
            if id.taps.get(i) != Some(&net.tap) {
                return Err(ForkChildError::Identity(format!(
                    "its NIC {i} is on TAP {}",
                    net.tap
                )));
            }
        }
        Ok(())
    }

    /// The child's configuration (with its own identity).
    pub fn config(&self) -> &VmConfig {
        &self.snapshot.config
    }

    /// Restores the VM over the memory `files` with its console on `console`, paused
    /// (the caller lets it run: [`Vmm::release_vcpus`]); its children register under
    /// `homes`. Then
    /// [`ChildPayload::apply_identity_in_background`] has the guest take the identity.
    /// `prepared` is the VM a warm process made while it waited, if any. Each step's
    /// time goes to `steps`.
    pub fn restore(
        &self,
        mut files: Vec<File>,
        console: Box<dyn Write + Send>,
        homes: ChildHomes,
        mut prepared: Option<Prepared>,
        steps: &mut Steps,
    ) -> Result<Vmm, ForkChildError> {
        if files.is_empty() {
            return Err(ForkChildError::NoMemory);
        }
        self.check_identity()?;
        // After the base and the overlays: the host files the devices hold.
        let host_files = files.split_off((1 + self.layout.overlays.len()).min(files.len()));
        self.snapshot
            .give_host_files(host_files)
            .map_err(ForkChildError::State)?;
        // A share given another directory serves it, not its parent's: the parent's
        // descriptors (of a root the guest holds alone: checked by the parent) go.
        for (tag, _) in &self.identity.shares {
            if let Some(state) = self.snapshot.share_state(tag) {
                drop(state.files.take());
            }
        }
        let base = files.remove(0);
        // The memory a warm process mapped ahead (in its VM's slots) takes this fork's
        // files over it; else it is mapped now.
        let vcpus = self.snapshot.config.vcpus;
        let ahead = prepared
            .as_mut()
            .filter(|p| p.fits(vcpus))
            .and_then(|p| p.memory.take());
        let (ram, extents) = match ahead {
            Some(mut ram) => {
                let mapped = ram.relayer(base, files, &self.layout)?;
                (ram, mapped)
            }
            None => (
                GuestRam::from_layers(base, files, &self.layout)?,
                self.layout.overlays.iter().map(Vec::len).sum(),
            ),
        };
        steps.mark("map memory");
        steps.count("extents mapped", extents);
        let mut vmm = Vmm::build(
            &self.snapshot.config,
            ram,
            console,
            Some(&self.snapshot),
            prepared,
            steps,
        )?;
        vmm.set_child_homes(homes);
        tracing::debug!(
            overlays = self.layout.overlays.len(),
            extents = self.layout.overlays.iter().map(Vec::len).sum::<usize>(),
            "restored"
        );
        Ok(vmm)
    }

    /// Has the guest agent apply the child's identity (entropy, clock, hostname, MACs),
    /// on a thread of its own: over the identity `port` when the guest's agent reads it
    /// (no connection: an idle child's guest copies ~700 KiB fewer pages), else over
    /// vsock when the VM has it. Records in `home`'s state when the guest took it. Then
    /// NICs on forkvm's own network take addresses of their own and join their bridge
    /// ([`crate::bridged`]), recorded in `home`'s state. A NIC whose guest did not take
    /// its identity never joins.
    pub fn apply_identity_in_background(
        &self,
        home: &VmHome,
        port: IdentityPort,
    ) -> std::io::Result<()> {
        let uds = self.identity.vsock_uds.clone();
        if uds.is_none() && !port.announced() {
            return Ok(());
        }
        let identity = self.identity.clone();
        let nets = self.snapshot.config.nets.clone();
        let (root, id) = (home.root().to_owned(), home.id().to_owned());
        let record = move |update: &dyn Fn(&mut forkvm_registry::VmState)| {
            if let Err(e) = VmHome::open(&root, &id).and_then(|h| h.update(update)) {
                tracing::warn!("cannot record the child's identity: {e}");
            }
        };
        // Everything it holds (the request, the answer, the records) is dropped when it
        // returns, then what the heap has free goes back.
        let take = move || {
            let via = match take_identity(&port, uds.as_deref(), &identity) {
                Ok((took, via)) => {
                    tracing::info!(?took, via, "guest agent applied the child identity");
                    via
                }
                Err(e) => {
                    tracing::warn!("guest agent did not apply the child identity: {e}");
                    return;
                }
            };
            let at_us = crate::snapshot::realtime_ns() / 1000;
            record(&|s| {
                s.identity = Some(forkvm_registry::IdentityTaken {
                    at_us,
                    via: via.to_owned(),
                })
            });
            if let Some(uds) = uds.filter(|_| nets.iter().any(|n| n.bridge.is_some())) {
                match crate::bridged::take_own_addresses(&nets, &identity.macs, &uds) {
                    Ok(addresses) => {
                        tracing::info!(?addresses, "on forkvm's network with addresses of its own");
                        record(&|s| s.addresses = addresses.clone());
                    }
                    Err(e) => tracing::warn!("the child stays off its network: {e}"),
                }
            }
        };
        std::thread::Builder::new()
            .name("identity".into())
            .spawn(move || {
                take();
                forkvm_jail::limits::release_free_heap();
            })
            .map(drop)
    }
}

/// Has the guest agent apply `id`: over the identity `port` when the agent reads it,
/// else (or when the port did not answer in half of [`AGENT_TIMEOUT`]) over the vsock
/// device's socket `uds`, all within [`AGENT_TIMEOUT`]. Returns how long it took and
/// the way (`identity-port` or `vsock`).
fn take_identity(
    port: &IdentityPort,
    uds: Option<&std::path::Path>,
    id: &ChildIdentity,
) -> Result<(Duration, &'static str), String> {
    let start = Instant::now();
    let deadline = start + AGENT_TIMEOUT;
    let over_port = match port.announced() {
        true => {
            let port_deadline = match uds {
                Some(_) => start + AGENT_TIMEOUT / 2,
                None => deadline,
            };
            match identity_over_port(port, id, port_deadline) {
                Ok(()) => {
                    // The guest set its clock from a time stamped as the request was
                    // sent: one read long after (a starved guest) may have set it back
                    // by as long. The same identity again, freshly stamped, sets it right.
                    if start.elapsed() > CLOCK_STAMP_STALE {
                        if let Err(e) = identity_over_port(port, id, deadline) {
                            tracing::warn!("identity port: the clock's second stamp: {e}");
                        }
                    }
                    return Ok((start.elapsed(), "identity-port"));
                }
                Err(e) => Some(e),
            }
        }
        false => None,
    };
    match (uds, over_port) {
        (Some(uds), port_error) => {
            if let Some(e) = port_error {
                tracing::warn!("identity port: {e}; trying vsock");
            }
            apply_identity_until(uds, id, deadline).map(|_| (start.elapsed(), "vsock"))
        }
        (None, Some(e)) => Err(format!("identity port: {e}")),
        (None, None) => Err("the VM has neither vsock nor an identity port".to_owned()),
    }
}

/// How long after its time was stamped an identity may be taken before it is sent
/// again with a fresh stamp: half the agent's slack for a clock ahead of the host's
/// (`CLOCK_AHEAD_SLACK_NS`, 10 s), beyond which the agent sets the clock back.
const CLOCK_STAMP_STALE: Duration = Duration::from_secs(5);

/// The identity request for `id`, with the host's time as of now.
fn identity_request(id: &ChildIdentity) -> forkvm_agent_proto::Request {
    forkvm_agent_proto::Request::Identity {
        hostname: id.hostname.clone(),
        seed: id.seed.clone(),
        macs: id
            .macs
            .iter()
            .map(forkvm_devices::virtio::net::format_mac)
            .collect(),
        // The guest sets its clock to it if it reads earlier (or far later) than that.
        time_ns: Some(crate::snapshot::realtime_ns()),
    }
}

/// Sends `id` over the identity port and reads the agent's answer, by `deadline`.
pub fn identity_over_port(
    port: &IdentityPort,
    id: &ChildIdentity,
    deadline: Instant,
) -> Result<(), String> {
    // The seed as hex digits: half the bytes of a JSON array, and every byte is two
    // port accesses of the guest.
    let mut request = serde_json::to_value(identity_request(id)).map_err(|e| e.to_string())?;
    request["seed"] = serde_json::Value::String(forkvm_agent_proto::protocol::hex(&id.seed));
    let line = request.to_string();
    // The answer is the first line that is a response: anything else the guest wrote
    // is not.
    let answer = port
        .call(
            line.as_bytes(),
            |l| serde_json::from_slice::<forkvm_agent_proto::Response>(l).ok(),
            deadline,
        )
        .map_err(|e| e.to_string())?;
    match answer {
        forkvm_agent_proto::Response::Ok => Ok(()),
        other => Err(format!("agent answered {other:?}")),
    }
}

/// How long a child keeps trying to reach its guest's agent. Generous: a child that
/// gives up keeps its parent's entropy and hostname, and a loaded host is slow.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects to the guest agent through the vsock device's host socket (the
/// `CONNECT <port>` convention) and sends the child's identity: entropy, hostname, MACs.
pub fn apply_identity(uds: &std::path::Path, id: &ChildIdentity) -> Result<Duration, String> {
    apply_identity_until(uds, id, Instant::now() + AGENT_TIMEOUT)
}

/// [`apply_identity`], trying until `deadline`.
fn apply_identity_until(
    uds: &std::path::Path,
    id: &ChildIdentity,
    deadline: Instant,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last_err = String::from("no attempt");
    // The guest answers at once unless it is slow (a loaded host): each attempt that
    // ran out of time gives the next twice as long, so that children starved of CPU
    // are not flooded with connections they must turn away. A connection the guest
    // accepted is waited on longer. The device holds a request until the guest has
    // handled its transport reset, so the first attempt's limit covers that too; one
    // that ends at once (no agent listening yet) is followed by the next at once, and
    // attempts that keep failing at once come less often.
    let mut handshake = FRESH_CHILD_HANDSHAKE;
    let mut pause = Duration::from_millis(2);
    while Instant::now() < deadline {
        let answer = handshake.max(IDENTITY_ANSWER);
        // The host's time as of this attempt.
        let req = identity_request(id);
        let attempt = Instant::now();
        match agent_call_timeout(uds, &req, handshake, answer) {
            Ok(forkvm_agent_proto::Response::Ok) => return Ok(start.elapsed()),
            Ok(other) => return Err(format!("agent answered {other:?}")),
            Err(e) => last_err = e,
        }
        if attempt.elapsed() >= handshake {
            handshake = (handshake * 2).min(Duration::from_secs(4));
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
    Err(last_err)
}

/// How long the first connection to a fork child's guest agent waits for the guest to
/// accept it (later ones, after a wait that ran out, twice as long each time). The
/// device holds the request until the guest has handled its transport reset (about
/// 0.1 s in the traces of a child under nested emulation; a request sent before would
/// make a socket the reset kills). 50 ms with quick retries once turned a fork of ten on one CPU into a flood
/// of connections, 11 s to its children's identities.
pub const FRESH_CHILD_HANDSHAKE: Duration = Duration::from_millis(250);

/// How long the identity request waits at least for the agent's answer once the guest
/// accepted the connection (it reseeds, renames and answers: hundreds of ms under
/// nested emulation; with 250 ms, 4 of 9 measured children gave up on an answer).
const IDENTITY_ANSWER: Duration = Duration::from_secs(1);

/// One request to the guest agent over the vsock device's host socket.
pub fn agent_call(
    uds: &std::path::Path,
    req: &forkvm_agent_proto::Request,
) -> Result<forkvm_agent_proto::Response, String> {
    let limit = Duration::from_secs(5);
    agent_call_timeout(uds, req, limit, limit)
}

/// [`agent_call`], giving up when the guest takes longer than `handshake` to accept
/// the connection or than `answer` to answer the request.
pub fn agent_call_timeout(
    uds: &std::path::Path,
    req: &forkvm_agent_proto::Request,
    handshake: Duration,
    answer: Duration,
) -> Result<forkvm_agent_proto::Response, String> {
    use forkvm_agent_proto::client;
    let mut conn = client::connect_vsock(uds, forkvm_agent_proto::AGENT_PORT, handshake)
        .map_err(|e| format!("connect {}: {e}", uds.display()))?;
    client::call_within(&mut conn, req, answer).map_err(|e| format!("agent call: {e}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{NetConfig, VsockConfig};

    /// A payload forked from a VM with vsock (CID 3 on `parent.vsock`) and one NIC on
    /// `tap-parent`, for a child with `identity`.
    fn payload(identity: ChildIdentity) -> ChildPayload {
        let mut config = VmConfig::new("/nonexistent/kernel");
        config.vsock = Some(VsockConfig {
            cid: 3,
            uds: PathBuf::from("/run/parent.vsock"),
        });
        config.nets = vec![NetConfig {
            tap: "tap-parent".into(),
            mac: None,
            bridge: None,
            guest_ip: None,
        }];
        ChildPayload {
            snapshot: VmSnapshot::empty(config),
            layout: MemoryLayout {
                ranges: Vec::new(),
                overlays: Vec::new(),
            },
            identity,
            together: false,
        }
    }

    fn child_identity() -> ChildIdentity {
        ChildIdentity {
            cid: Some(77),
            vsock_uds: Some(PathBuf::from("/run/child.vsock")),
            taps: vec!["tap-child".into()],
            macs: vec![[2, 0, 0, 0, 0, 1]],
            hostname: "fork-1".into(),
            seed: vec![1; 64],
            shares: Vec::new(),
        }
    }

    /// `n` processes that stand in for VM processes (until [`end_all`]).
    fn sleepers(n: usize) -> Vec<std::process::Child> {
        (0..n)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect()
    }

    fn end_all(processes: &mut [std::process::Child]) {
        for p in processes {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// A launched child standing in for a VM process: `p`, with CID `cid`, and the
    /// other end of its launch socket.
    fn stand_in(
        p: &std::process::Child,
        cid: u64,
    ) -> (
        (VmProcess, ChildIdentity, bool),
        std::os::unix::net::UnixStream,
    ) {
        let pidfd = crate::reap::pidfd_open(p.id()).unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let identity = ChildIdentity {
            cid: Some(cid),
            ..child_identity()
        };
        (
            (VmProcess::forked(p.id(), pidfd, ours), identity, false),
            theirs,
        )
    }

    /// [`stand_in`] for each of `processes`, with CIDs from `first_cid` on.
    #[allow(clippy::type_complexity)]
    fn stand_ins_from(
        processes: &[std::process::Child],
        first_cid: u64,
    ) -> (
        Vec<(VmProcess, ChildIdentity, bool)>,
        Vec<std::os::unix::net::UnixStream>,
    ) {
        processes
            .iter()
            .zip(first_cid..)
            .map(|(p, cid)| stand_in(p, cid))
            .unzip()
    }

    /// Reports "running" on each of `ends`, last first, 200 ms apart, on a thread.
    fn report_last_first(
        ends: Vec<std::os::unix::net::UnixStream>,
    ) -> std::thread::JoinHandle<Vec<std::os::unix::net::UnixStream>> {
        use std::io::Write as _;
        std::thread::spawn(move || {
            for end in ends.iter().rev() {
                std::thread::sleep(Duration::from_millis(200));
                (&*end)
                    .write_all(&crate::launch::REPORT_RUNNING.to_le_bytes())
                    .unwrap();
            }
            ends
        })
    }

    #[test]
    fn reports_are_read_as_they_come_and_children_listed_in_start_order() {
        let mut stand_ins = sleepers(4);
        // Each report comes 200 ms after the one of the child started after it.
        let (started, ends) = stand_ins_from(&stand_ins[..3], 10);
        let t0 = Instant::now();
        let reporter = report_last_first(ends);
        let children = wait_for_reports(started, t0).unwrap();
        let _ends = reporter.join().unwrap();
        assert_eq!(
            children.iter().map(|c| c.cid).collect::<Vec<_>>(),
            [Some(10), Some(11), Some(12)]
        );
        let t: Vec<u64> = children.iter().map(|c| c.running_after_us).collect();
        assert!(
            t[2] + 100_000 < t[1] && t[1] + 100_000 < t[0],
            "each child's time is its report's: {t:?}"
        );

        // One that ends its socket without a word fails the fork, by its pid.
        let (mut started, ends) = stand_ins_from(&stand_ins[..3], 20);
        let (silent, silent_end) = stand_in(&stand_ins[3], 30);
        started.push(silent);
        let reporter = report_last_first(ends);
        drop(silent_end);
        let e = wait_for_reports(started, Instant::now()).unwrap_err();
        let _ends = reporter.join().unwrap();
        let pid = stand_ins[3].id();
        assert!(
            matches!(&e, ControlError::Failed(m) if m.contains(&format!("fork child {pid} did not start"))),
            "{e:?}"
        );
        end_all(&mut stand_ins);
    }

    /// Plays the children of a fork that start together on `ends`: each reports its VM
    /// restored, last first, 200 ms apart, checking that none is told to run before the
    /// last has reported; then each waits to be told and reports running. Returns
    /// whether each was told.
    fn restore_last_first(
        ends: Vec<std::os::unix::net::UnixStream>,
    ) -> std::thread::JoinHandle<Vec<bool>> {
        use std::io::{Read as _, Write as _};
        std::thread::spawn(move || {
            let told = |end: &std::os::unix::net::UnixStream, wait: Duration| {
                end.set_read_timeout(Some(wait)).unwrap();
                let mut b = [0u8; 8];
                (&*end).read_exact(&mut b).is_ok()
                    && u64::from_le_bytes(b) == crate::launch::START_TOGETHER
            };
            for (n, end) in ends.iter().rev().enumerate() {
                (&*end)
                    .write_all(&crate::launch::REPORT_RESTORED.to_le_bytes())
                    .unwrap();
                if n + 1 < ends.len() {
                    std::thread::sleep(Duration::from_millis(200));
                    for waiting in ends.iter().rev().take(n + 1) {
                        assert!(
                            !told(waiting, Duration::from_millis(1)),
                            "a child was told to run before every child was restored"
                        );
                    }
                }
            }
            ends.iter()
                .map(|end| {
                    let ran = told(end, Duration::from_secs(10));
                    if ran {
                        (&*end)
                            .write_all(&crate::launch::REPORT_RUNNING.to_le_bytes())
                            .unwrap();
                    }
                    ran
                })
                .collect()
        })
    }

    #[test]
    fn children_that_start_together_run_once_the_last_is_restored() {
        let mut stand_ins = sleepers(4);
        let (started, ends) = stand_ins_from(&stand_ins[..3], 10);
        let t0 = Instant::now();
        let children = restore_last_first(ends);
        let reported = wait_for_reports(started, t0).unwrap();
        assert_eq!(children.join().unwrap(), [true, true, true]);
        assert_eq!(
            reported.iter().map(|c| c.cid).collect::<Vec<_>>(),
            [Some(10), Some(11), Some(12)]
        );
        let t: Vec<u64> = reported.iter().map(|c| c.running_after_us).collect();
        assert!(
            t.iter().all(|&t| t >= 400_000),
            "each ran after the last was restored: {t:?}"
        );

        // One that ends its socket before it is restored fails the fork, by its pid;
        // the others, once restored, are never told to run: their sockets close.
        let (mut started, ends) = stand_ins_from(&stand_ins[..3], 20);
        let (silent, silent_end) = stand_in(&stand_ins[3], 30);
        started.push(silent);
        drop(silent_end);
        let children = restore_last_first(ends);
        let e = wait_for_reports(started, Instant::now()).unwrap_err();
        assert_eq!(children.join().unwrap(), [false, false, false]);
        let pid = stand_ins[3].id();
        assert!(
            matches!(&e, ControlError::Failed(m) if m.contains(&format!("fork child {pid} did not start"))),
            "{e:?}"
        );
        end_all(&mut stand_ins);
    }

    #[test]
    fn a_child_spec_names_its_macs_hostname_and_shares_or_is_refused_naming_why() {
        let mut cfg = payload(ChildIdentity::default()).snapshot.config;
        cfg.shares = vec![crate::config::FsConfig {
            tag: "forkvm-pod".into(),
            host_path: "/run/template-pod".into(),
            read_only: false,
        }];
        let pod = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            macs: vec!["0a:58:0a:58:00:05".into()],
            hostname: Some("web-1".into()),
            shares: vec![crate::control::ChildShare {
                tag: "forkvm-pod".into(),
                host_path: pod.path().to_owned(),
            }],
            ..ChildSpec::default()
        };
        let id = super::child_identity(&cfg, 1, &spec).unwrap();
        assert_eq!(id.macs, [[0x0a, 0x58, 0x0a, 0x58, 0, 5]]);
        assert_eq!(id.hostname, "web-1");
        assert_eq!(
            id.shares,
            [("forkvm-pod".to_owned(), pod.path().to_owned())]
        );
        // Adopted, the child's share serves the directory it was given.
        let mut p = payload(id);
        p.snapshot.config = cfg.clone();
        p.adopt_identity();
        assert_eq!(p.config().shares[0].host_path, pod.path());
        // Defaults: fresh ones.
        let id = super::child_identity(&cfg, 2, &ChildSpec::default()).unwrap();
        assert!(id.hostname.starts_with("fork-") && id.shares.is_empty());
        assert_eq!(id.macs.len(), 1);

        let refused = |spec: ChildSpec| match super::child_identity(&cfg, 3, &spec) {
            Err(ControlError::Invalid(m)) => m,
            other => panic!("not refused: {other:?}"),
        };
        let e = refused(ChildSpec {
            macs: vec!["0a:58:0a:58:00:05".into(), "0a:58:0a:58:00:06".into()],
            ..ChildSpec::default()
        });
        assert!(e.contains("2 MACs given for 1 NICs"), "{e}");
        let e = refused(ChildSpec {
            macs: vec!["01:00:5e:00:00:01".into()],
            ..ChildSpec::default()
        });
        assert!(e.contains("multicast"), "{e}");
        let e = refused(ChildSpec {
            hostname: Some("no spaces".into()),
            ..ChildSpec::default()
        });
        assert!(e.contains("hostname \"no spaces\""), "{e}");
        let share = |tag: &str, path: &str| crate::control::ChildShare {
            tag: tag.into(),
            host_path: path.into(),
        };
        for (shares, needle) in [
            (vec![share("other", "/run/x")], "no share tagged \"other\""),
            (
                vec![share("forkvm-pod", "relative")],
                "not an absolute path",
            ),
            (
                vec![share("forkvm-pod", "/tmp"), share("forkvm-pod", "/")],
                "given two directories",
            ),
            (
                vec![share("forkvm-pod", "/nonexistent/pod")],
                "/nonexistent/pod is not a directory",
            ),
        ] {
            let e = refused(ChildSpec {
                shares,
                ..ChildSpec::default()
            });
            assert!(e.contains(needle), "{e}");
        }
        let mut two = cfg.clone();
        two.nets.push(two.nets[0].clone());
        let e = match super::child_identity(
            &two,
            4,
            &ChildSpec {
                macs: vec!["0a:58:0a:58:00:05".into(), "0a:58:0a:58:00:05".into()],
                ..ChildSpec::default()
            },
        ) {
            Err(ControlError::Invalid(m)) => m,
            other => panic!("not refused: {other:?}"),
        };
        assert!(e.contains("given to NIC 1 and to an earlier one"), "{e}");
    }

    #[test]
    fn only_a_share_whose_guest_holds_its_root_alone_is_given_another_directory_or_saved() {
        use forkvm_devices::virtio::fs::{FsState, SavedInode, SavedTable};
        let fs = |nodes: u64| crate::devices::VirtioSnapshot {
            device: crate::devices::DeviceState::Fs(FsState {
                table: SavedTable {
                    protocol: (7, 31),
                    inodes: (1..=nodes)
                        .map(|node| SavedInode {
                            node,
                            refcount: 1,
                            mode: libc::S_IFDIR,
                            ino: node,
                            dev: 0,
                            mnt: 0,
                        })
                        .collect(),
                    ..SavedTable::default()
                },
                ..FsState::default()
            }),
            transport: Default::default(),
        };
        let share = |tag: &str| crate::config::FsConfig {
            tag: tag.into(),
            host_path: format!("/run/{tag}").into(),
            read_only: false,
        };
        let mut snap = VmSnapshot::empty(VmConfig::new("/nonexistent/kernel"));
        snap.config.shares = vec![share("forkvm-pod"), share("forkvm-root")];
        snap.virtio = vec![fs(1), fs(3)];
        let given = |tag: &str| ChildIdentity {
            shares: vec![(tag.to_owned(), PathBuf::from("/run/elsewhere"))],
            ..ChildIdentity::default()
        };
        check_share_overrides(&snap, &[given("forkvm-pod")]).unwrap();
        let e = check_share_overrides(&snap, &[given("forkvm-root")]).unwrap_err();
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains("\"forkvm-root\" cannot be given another directory") && m.contains("3 nodes")),
            "{e:?}"
        );
        // A template: refused for the share in use, by name; saved without it.
        let e = refuse_shares_in_templates(&snap).unwrap_err();
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains("tag \"forkvm-root\"")),
            "{e:?}"
        );
        snap.virtio.truncate(1);
        snap.config.shares.truncate(1);
        refuse_shares_in_templates(&snap).unwrap();
    }

    /// Set for the child the test below starts in a pid namespace of its own.
    const IN_PIDNS: &str = "FORKVM_VMM_TEST_IN_PIDNS";

    #[test]
    fn a_vm_process_that_sees_a_procfs_of_its_pid_namespace_does_not_fork() {
        let cfg = VmConfig::new("/nonexistent/kernel");
        let req = ForkRequest {
            count: 1,
            ..ForkRequest::default()
        };
        if std::env::var_os(IN_PIDNS).is_some() {
            // Its host pid, read first, as a VM process does.
            let _ = forkvm_registry::ProcessIdentity::current();
            // A VM family's process, whose root holds the launcher's procfs: its
            // children read their host pids there.
            check_request(&cfg, &req).expect("a family's VM process forks");
            // One whose procfs is its own pid namespace's (a container's joined by path
            // and mounted so) could not name them.
            forkvm_test_support::in_own_mounts(move |_| {
                // SAFETY: NUL-terminated strings that outlive the call; no data. The
                // mount is this thread's namespace's (every mount private).
                let rc = unsafe {
                    libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                let e = check_request(&cfg, &req).unwrap_err().to_string();
                assert!(e.contains("pid namespace below the host's"), "{e}");
            });
            println!("refused");
            return;
        }
        check_request(&cfg, &req).expect("the host's pid namespace forks");
        let (_, out) = forkvm_test_support::rerun_in_new_pid_namespace(
            "fork::tests::a_vm_process_that_sees_a_procfs_of_its_pid_namespace_does_not_fork",
            IN_PIDNS,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("refused\n"),
            "{stdout}"
        );
    }

    #[test]
    fn a_child_builds_its_devices_from_its_own_identity() {
        let mut p = payload(child_identity());
        p.adopt_identity();
        p.check_identity()
            .expect("the adopted identity is the child's own");
        let cfg = p.config();
        let vsock = cfg.vsock.as_ref().unwrap();
        assert_eq!(
            (vsock.cid, vsock.uds.as_path()),
            (77, "/run/child.vsock".as_ref())
        );
        assert_eq!(cfg.nets[0].tap, "tap-child");
        assert_eq!(cfg.nets[0].mac, Some([2, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn the_fork_state_is_encoded_once_and_read_by_each_child_with_its_identity() {
        let parent = payload(ChildIdentity::default());
        let state = ForkState {
            snapshot: parent.snapshot,
            layout: parent.layout,
            together: true,
        }
        .into_file()
        .unwrap();
        // Sealed: nobody changes what the children read.
        assert!((&state).write_all(b"x").is_err());
        for (cid, name) in [(77, "fork-1"), (78, "fork-2")] {
            let id = ChildIdentity {
                cid: Some(cid),
                hostname: name.into(),
                ..child_identity()
            };
            let child = ForkState::read(state.try_clone().unwrap(), id).unwrap();
            child.check_identity().expect("adopted on reading");
            assert_eq!(child.config().vsock.as_ref().unwrap().cid, cid);
            assert_eq!(child.identity.hostname, name);
            assert!(child.starts_together());
        }
    }

    #[test]
    fn a_damaged_fork_state_is_refused() {
        use std::io::{Seek, SeekFrom};
        let parent = payload(ChildIdentity::default());
        let blob = forkvm_snapshot::encode(&ForkState {
            snapshot: parent.snapshot,
            layout: parent.layout,
            together: false,
        })
        .unwrap();
        let mut damaged = blob.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        for bytes in [&blob[..blob.len() / 2], &damaged[..], &b""[..]] {
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(bytes).unwrap();
            file.seek(SeekFrom::Start(0)).unwrap();
            let err = ForkState::read(file, child_identity()).unwrap_err();
            assert!(matches!(err, ForkChildError::State(_)), "{err}");
        }
    }

    #[test]
    fn a_child_never_takes_its_parents_socket_or_taps() {
        // Not adopted: the configuration is still the parent's.
        let p = payload(child_identity());
        assert!(matches!(
            p.check_identity(),
            Err(ForkChildError::Identity(_))
        ));

        // An identity without a CID leaves the parent's vsock in place.
        let mut p = payload(ChildIdentity {
            cid: None,
            ..child_identity()
        });
        p.adopt_identity();
        let err = p.check_identity().unwrap_err().to_string();
        assert!(err.contains("/run/parent.vsock"), "{err}");

        // Too few TAPs leaves the parent's TAP in place.
        let mut p = payload(ChildIdentity {
            taps: Vec::new(),
            ..child_identity()
        });
        p.adopt_identity();
        let err = p.check_identity().unwrap_err().to_string();
        assert!(err.contains("tap-parent"), "{err}");
    }
}
