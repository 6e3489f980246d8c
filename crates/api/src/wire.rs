//! The API's wire types: what a VM reports, what a fork or a template save asks and
//! answers, and the requests the API server hands to the VMM ([`crate::Control`]). Plain
//! serde structs; the HTTP routes carry them as JSON (`docs/api/openapi.yaml`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether the guest is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// A device as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `block`, `net`, `vsock` or `rng`.
    pub kind: String,
    /// Human detail: image path, TAP name and MAC, CID and socket.
    pub detail: String,
    /// Base of its MMIO window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
}

/// What the VMM reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Running or paused.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Devices in MMIO order (legacy devices not listed).
    pub devices: Vec<DeviceInfo>,
    /// Milliseconds since the VM was created.
    pub uptime_ms: u64,
    /// vCPU exits by reason, summed over vCPUs.
    pub exits: BTreeMap<String, u64>,
    /// Resident memory of the VMM process, bytes.
    pub rss_bytes: u64,
    /// Private (not shared with other processes) memory of the VMM process, bytes.
    pub private_bytes: u64,
    /// Process IDs of the warm VM processes waiting to become this VM's fork children.
    #[serde(default)]
    pub fork_pool: Vec<u32>,
    /// The file-system rules the VM process is bound by (Landlock); none when it is not
    /// jailed or the kernel has no Landlock.
    #[serde(default)]
    pub landlock: Option<forkvm_jail::landlock::Bound>,
}

/// Per-child settings of a fork.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSpec {
    /// vsock CID (default: a fresh one).
    pub cid: Option<u64>,
    /// Host socket for the child's vsock (default: next to the parent's, suffixed).
    pub vsock_uds: Option<PathBuf>,
    /// TAP devices for the child's NICs, in order (default: created as `fk<id>n<i>`).
    pub taps: Vec<String>,
    /// Where the child's console goes (default: discarded).
    pub console: Option<PathBuf>,
    /// MAC per NIC, in order, as `02:00:00:00:00:01` (default: fresh random ones).
    #[serde(default)]
    pub macs: Vec<String>,
    /// The guest's hostname (default: `fork-` and 8 random hex digits).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Shares served from another host directory than the parent's: only a share whose
    /// guest holds nothing but its root (never mounted, or nothing looked up yet).
    #[serde(default)]
    pub shares: Vec<ChildShare>,
}

/// A fork child's share given a directory of its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildShare {
    /// The share's tag.
    pub tag: String,
    /// The host directory the child's share serves.
    pub host_path: PathBuf,
}

/// A request to fork the running VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRequest {
    /// Number of children.
    pub count: u32,
    /// Keep the parent paused afterwards (it becomes a template).
    pub freeze: bool,
    /// Per-child settings; missing entries use the defaults.
    pub children: Vec<ChildSpec>,
}

/// One child of a fork.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildInfo {
    /// Process ID of the child's VMM.
    pub pid: u32,
    /// Its vsock CID, if it has a vsock device.
    pub cid: Option<u64>,
    /// Its vsock host socket.
    pub vsock_uds: Option<PathBuf>,
    /// Microseconds from the fork request until the child's vCPUs were running.
    pub running_after_us: u64,
    /// Whether it started in a warm process of the parent's fork pool.
    #[serde(default)]
    pub warm: bool,
}

/// What a fork did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOutcome {
    /// The children, in request order.
    pub children: Vec<ChildInfo>,
    /// Microseconds the parent's vCPUs were paused.
    pub parent_pause_us: u64,
}

/// What saving a template did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// The template directory.
    pub dir: PathBuf,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Bytes written (pages that are not all zeros).
    pub stored_bytes: u64,
    /// Microseconds the VM was paused.
    pub pause_us: u64,
}

/// A request to the VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Report state, devices and counters.
    Info,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Stop the VM now (the VMM exits).
    Stop,
    /// Fork the VM.
    Fork(ForkRequest),
    /// Save the VM as a template in a directory.
    SaveTemplate(PathBuf),
}

/// The VMM's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Info`].
    Info(VmInfo),
    /// The request was carried out.
    Done,
    /// Answer to [`Request::Fork`].
    Forked(ForkOutcome),
    /// Answer to [`Request::SaveTemplate`].
    TemplateSaved(TemplateInfo),
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ControlError {
    /// The request does not fit the VM's current state (e.g. resume while running).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request is malformed or impossible.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Carrying it out failed.
    #[error("{0}")]
    Failed(String),
    /// The VMM is gone.
    #[error("the VMM is not running")]
    Gone,
    /// The VMM did not answer within the request's deadline (busy or stuck).
    #[error("{0}")]
    TimedOut(String),
}

pub use forkvm_config::logging::error_chain;
