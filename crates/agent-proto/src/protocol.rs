//! The host↔agent control protocol: newline-delimited JSON, one request then one
//! response. An [`Request::Exec`] answered with [`Response::Started`] switches its
//! connection to the binary frames of [`crate::frame`]. The full contract, with
//! examples, is `docs/agent-protocol.md`.

use serde::{Deserialize, Serialize};

/// vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Version of this protocol; sent in every [`Response::Pong`]. Bumped when a message
/// changes meaning or a request the host may rely on is added (3: [`Request::Network`];
/// 4: [`Request::DnsRelay`], [`Request::Unplug`]; 5: [`Request::Network`] replaces a
/// NIC's addresses and routes, and may name nameservers; 6: [`Request::Mount`]; 7:
/// [`ProcessSpec`]'s capabilities, `no_new_privileges`, `oom_score_adj` and `umask`,
/// [`Request::Container`]; 8: [`Request::Cgroup`], [`Request::Filesystems`], [`Request::Hooks`],
/// [`DeviceNode::host_has`], [`Request::Container`]'s `domainname`; 9: [`FsMount`]s of
/// type `file`, and a root shared by virtio-fs, `forkvm.rootfstype=virtiofs`; 10:
/// [`Request::Container`]'s `user_namespace`, [`Request::Identity`]'s `time_ns`; 11:
/// the containers of a pod, [`Request::CreateContainer`], [`Request::InContainer`],
/// [`Request::DestroyContainer`]; 12: a `virtiofs` [`FsMount`] of a directory in a
/// share, `TAG/PATH`; 13: [`Request::Stats`]; 14: [`Request::Forward`]; 15:
/// [`ProcessSpec`]'s `pid_namespace`).
pub const PROTOCOL_VERSION: u32 = 15;
/// The guest device of the identity port: a second UART (COM2) over which a fork
/// child's VMM sends [`Request::Identity`] (and [`Request::Ping`]) lines and reads the
/// answers, without a vsock connection (`forkvm_vmm::identity_port`).
pub const IDENTITY_PORT_DEVICE: &str = "/dev/ttyS1";
/// The line the agent writes on the identity port when it reads it.
pub const IDENTITY_PORT_ANNOUNCE: &str = "forkvm-agent identity-port 2";
/// Longest request or response line either side reads.
pub const MAX_LINE: usize = 64 * 1024;
/// `PATH` used for the executable search when [`ProcessSpec::env`] has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the host asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Are you there? Answered with [`Response::Pong`].
    Ping,
    /// Become this fork child: reseed entropy, set hostname and MACs.
    Identity {
        /// New hostname.
        hostname: String,
        /// Fresh randomness (at least 32 bytes) for the kernel's entropy pool: a JSON
        /// array of bytes, or (read since the identity port, where each byte the host
        /// sends is two port accesses of the guest) a string of hex digits.
        #[serde(deserialize_with = "seed_bytes")]
        seed: Vec<u8>,
        /// New MAC per NIC (eth0, eth1, ...), as `aa:bb:cc:dd:ee:ff`.
        macs: Vec<String>,
        /// The host's wall-clock time as it sent the request, nanoseconds since the
        /// epoch: a guest clock behind it, or far ahead, is set to it. Since version 10.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        time_ns: Option<u64>,
    },
    /// Take over the network of the container's namespace: each NIC (found by the MAC
    /// the VMM gave it, the namespace interface's) gets that interface's name, MTU and
    /// addresses and is brought up; then the routes are added. Since version 3. Since
    /// version 5 the addresses replace those the NIC had and a route replaces one to the
    /// same destination (a fork child's NIC takes its own address over its parent's), and
    /// `nameservers`, when given, become the container's `/etc/resolv.conf`.
    Network {
        /// The NICs.
        interfaces: Vec<NetInterface>,
        /// Routes through them.
        #[serde(default)]
        routes: Vec<NetRoute>,
        /// Nameserver addresses for the container's `/etc/resolv.conf` (at most 8);
        /// none leaves the file as it is.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nameservers: Vec<String>,
    },
    /// Answer DNS over UDP on port 53 of each of `addresses` (loopback addresses the
    /// container's `resolv.conf` names but only its network namespace serves, such as
    /// Docker's embedded resolver at `127.0.0.11`; in the guest they are its own
    /// loopback), relaying every query to the host (see [`crate::dns`]). At most 8
    /// addresses, each a loopback address. Since version 4.
    DnsRelay {
        /// The addresses, e.g. `127.0.0.11`.
        addresses: Vec<String>,
    },
    /// Take every NIC but the loopback down, keeping its addresses and routes: a fork
    /// child of a container whose network gives it no address of its own must not show
    /// up there with its parent's. Answered with [`Response::Unplugged`]. Since
    /// version 4.
    Unplug,
    /// Mount the host directories shared with the VM (virtio-fs devices, by tag) into
    /// the container's root, in the order given (PID-1 mode only). Since version 6.
    Mount {
        /// The shares (at most [`MAX_SHARES`]).
        shares: Vec<ShareMount>,
    },
    /// Make the container's cgroup in the guest with these limits: the processes the
    /// agent starts from then on join it in a cgroup namespace of their own, and a
    /// `cgroup` filesystem of [`Request::Filesystems`] shows it as the root, as a
    /// container on a host sees its own (PID-1 mode only). Since version 8.
    Cgroup {
        /// The limits (absent ones: none).
        limits: CgroupLimits,
    },
    /// Mount the container's filesystems (the OCI `mounts` entries, its volumes as
    /// `virtiofs` shares) in its root, in this order, in place of the ones the guest mounted there at boot
    /// (`/proc`, `/sys`, `/dev` and what is under it) at the destinations named; before
    /// its volumes (PID-1 mode only). Since version 8.
    Filesystems {
        /// The mounts (at most [`MAX_FILESYSTEMS`]).
        mounts: Vec<FsMount>,
    },
    /// Apply the rest of the container's spec in its root (the OCI `linux.devices`,
    /// `linux.sysctl`, `maskedPaths`, `readonlyPaths`), after its volumes are mounted
    /// and before its process starts (PID-1 mode only). Since version 7.
    Container {
        /// Device nodes to create (the guest kernel must have each device).
        #[serde(default)]
        devices: Vec<DeviceNode>,
        /// Kernel parameters (`net.ipv4.ip_forward`) and their values.
        #[serde(default)]
        sysctls: std::collections::BTreeMap<String, String>,
        /// Paths hidden from the container (absolute, as the container sees them).
        #[serde(default)]
        masked_paths: Vec<String>,
        /// Paths the container may only read.
        #[serde(default)]
        readonly_paths: Vec<String>,
        /// The container's root is read-only (`root.readonly`), its own mounts aside.
        #[serde(default)]
        readonly_root: bool,
        /// The guest's NIS domain name (the OCI `domainname`). Since version 8.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domainname: Option<String>,
        /// The container's seccomp filters (the OCI `linux.seccomp`, compiled by the
        /// host), installed on every process the agent starts from then on, its hooks
        /// aside: BPF programs in hex, 16 digits per instruction (code, jt, jf, k), at
        /// most [`MAX_SECCOMP_FILTERS`] of at most 4096 instructions. Since version 8.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        seccomp: Vec<String>,
        /// The container's user namespace (the OCI `user` namespace with its id maps):
        /// made once, and every container process the agent starts from then on runs in
        /// it. Since version 10.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_namespace: Option<UserNamespace>,
    },
    /// Run OCI hooks of one kind in the container's root (`createContainer` at create,
    /// `startContainer` at start), in order, the state on each one's stdin; the first
    /// that fails is the error (PID-1 mode only). Since version 8.
    Hooks {
        /// `createContainer` or `startContainer`: how errors name the hooks.
        kind: String,
        /// The hooks (at most [`MAX_HOOKS`]).
        hooks: Vec<GuestHook>,
        /// The runtime spec's state of the container, as JSON.
        state: String,
    },
    /// Start a process. Answered with [`Response::Started`] (the connection then carries
    /// frames), [`Response::ExecFailed`] or [`Response::Error`].
    Exec {
        /// What to run and how.
        process: ProcessSpec,
    },
    /// Send `signal` to `pid`, a process this agent started and has not yet seen exit.
    Signal {
        /// Process id in the guest, as in [`Response::Started`].
        pid: i32,
        /// Signal number (15 = SIGTERM, 9 = SIGKILL, ...).
        signal: i32,
    },
    /// Stop every process and power the VM off (PID-1 mode only).
    Shutdown,
    /// Make another container in this VM, besides the one it booted with (a pod's app
    /// container, the boot container being its sandbox): its root is a directory the
    /// guest can reach, bound at a place of its own; it has no cgroup, seccomp filters,
    /// user namespace, mounts or processes until [`Request::InContainer`] requests give
    /// them (PID-1 mode only; at most [`MAX_CONTAINERS`]). Since version 11.
    CreateContainer {
        /// Its name, for [`Request::InContainer`] and [`Request::DestroyContainer`]
        /// (see [`check_container_id`]).
        id: String,
        /// Where its root filesystem is.
        root: ContainerRoot,
    },
    /// Carry out `request` for the container `id` (made by [`Request::CreateContainer`])
    /// instead of the boot container: one of [`Request::Mount`], [`Request::Cgroup`],
    /// [`Request::Filesystems`], [`Request::Container`], [`Request::Hooks`],
    /// [`Request::Exec`] or [`Request::Signal`], answered as that request is. An
    /// [`Request::Exec`] with `init` starts the container's main process: when it exits,
    /// the rest of the container's processes are killed, and the VM runs on. Since
    /// version 11.
    InContainer {
        /// The container.
        id: String,
        /// What to do in it.
        request: Box<Request>,
    },
    /// What the container uses: its cgroup's CPU time, memory and tasks, answered with
    /// [`Response::Stats`] (PID-1 mode only; for a container made by
    /// [`Request::CreateContainer`], inside [`Request::InContainer`]). Since version 13.
    Stats,
    /// Connect to TCP `port` on the guest's loopback (`127.0.0.1`, where a pod's
    /// containers listen) and, once [`Response::Ok`] is answered, carry the bytes of
    /// this connection to it and back, each direction half-closed at its end of file:
    /// the guest end of a pod's port-forward ([`crate::forward`]). At most
    /// [`crate::forward::MAX_FORWARDS`] at a time. Since version 14.
    Forward {
        /// The guest's port.
        port: u16,
    },
    /// Kill every process of the container `id` (those whose root is in its root, and
    /// its cgroup's), unmount its root and everything mounted in it, remove its cgroup
    /// and forget it (PID-1 mode only). Since version 11.
    DestroyContainer {
        /// The container.
        id: String,
    },
}

/// What a container uses, read from its cgroup (v2) in the guest: the figures
/// containerd's CRI reports (`kubectl top`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUse {
    /// CPU time used, in µs (`cpu.stat` `usage_usec`).
    pub cpu_usec: u64,
    /// Of which in user mode (`user_usec`).
    pub cpu_user_usec: u64,
    /// Of which in the kernel (`system_usec`).
    pub cpu_system_usec: u64,
    /// Memory charged to it, in bytes (`memory.current`).
    pub memory_bytes: u64,
    /// Its memory limit in bytes (`memory.max`); `None`: none.
    pub memory_limit: Option<u64>,
    /// Anonymous memory (`memory.stat` `anon`).
    pub memory_anon: u64,
    /// Page cache (`memory.stat` `file`).
    pub memory_file: u64,
    /// Page cache on the inactive list (`inactive_file`): what the working set leaves out.
    pub memory_inactive_file: u64,
    /// Its tasks (`pids.current`).
    pub tasks: u64,
    /// Its task limit (`pids.max`); `None`: none.
    pub tasks_limit: Option<u64>,
}

/// Most containers [`Request::CreateContainer`] makes in one VM, its boot container
/// aside.
pub const MAX_CONTAINERS: usize = 64;

/// Where the root filesystem of a [`Request::CreateContainer`] is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRoot {
    /// The VMM's virtio-fs share (its tag) the root is in; the agent mounts the share
    /// once, outside every container. Absent: `path` is a directory of the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<String>,
    /// The root directory: relative to the share's root (resolved inside it, `..` and
    /// symlinks included), or an absolute path in the guest without a share.
    pub path: String,
}

/// A container name is 1 to 64 bytes of ASCII letters, digits, `_`, `-` and `.`, and
/// does not start with `.` (it names a directory and a cgroup in the guest).
pub fn check_container_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "container id {id:?}: {} bytes, it must have 1 to 64",
            id.len()
        ));
    }
    if id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "container id {id:?}: only ASCII letters, digits, '_', '-' and '.' (not first) are allowed"
        ));
    }
    Ok(())
}

/// Most shares one [`Request::Mount`] may name.
pub const MAX_SHARES: usize = 64;

/// One share of [`Request::Mount`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The virtio-fs tag the VMM gave the share.
    pub tag: String,
    /// Where it goes in the container, an absolute path (missing directories are
    /// created; symlinks on the way resolve inside the container's root).
    pub target: String,
    /// Mounted read-only (the host refuses writes too).
    pub read_only: bool,
}

/// The limits of [`Request::Cgroup`], as cgroup v2 files take them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// `memory.max`, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// `pids.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `cpu.max`: the quota and the period, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<(u64, u64)>,
    /// `cpu.weight` (1 to 10 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
}

/// Most seccomp filters one [`Request::Container`] may carry.
pub const MAX_SECCOMP_FILTERS: usize = 16;

/// Most ranges one id map of a [`UserNamespace`] may have (the kernel's limit).
pub const MAX_ID_MAPPINGS: usize = 340;

/// A user namespace of [`Request::Container`]: the OCI `linux.uidMappings` and
/// `gidMappings`, where the "host" ids are the guest's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespace {
    /// User ids (at most [`MAX_ID_MAPPINGS`] ranges).
    pub uid_mappings: Vec<IdMapping>,
    /// Group ids (at most [`MAX_ID_MAPPINGS`] ranges).
    pub gid_mappings: Vec<IdMapping>,
}

/// One range of an id map: `size` ids from `container_id` in the namespace are the
/// guest's from `host_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    /// The first id inside the namespace.
    pub container_id: u32,
    /// The guest's id it is.
    pub host_id: u32,
    /// How many consecutive ids (at least 1).
    pub size: u32,
}

/// Most hooks one [`Request::Hooks`] may carry.
pub const MAX_HOOKS: usize = 64;

/// One hook of [`Request::Hooks`] (an OCI hook).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHook {
    /// The program, an absolute path in the container.
    pub path: String,
    /// Its whole argument vector, `argv[0]` included (the spec's `args`; empty: the
    /// path alone).
    #[serde(default)]
    pub args: Vec<String>,
    /// Its whole environment, `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds it may run before it is killed (absent: the agent's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
}

/// The filesystem types of [`FsMount`]: what the guest mounts for a container.
pub const FS_TYPES: [&str; 7] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// Most mounts one [`Request::Filesystems`] may carry.
pub const MAX_FILESYSTEMS: usize = 256;

/// One filesystem of [`Request::Filesystems`]: an OCI `mounts` entry that is not a bind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMount {
    /// Where it goes in the container (absolute; missing directories are created).
    pub destination: String,
    /// One of [`FS_TYPES`], `virtiofs` for a volume (the source is the tag of the
    /// VMM's share, mounted there, or, since version 12, `TAG/PATH`: the directory
    /// `PATH` of that share, bound there, so that the mount table shows `/PATH` as the
    /// bind's root; `ro` makes it read-only), or `file` for a host file bound in (the
    /// source is `TAG/NAME`: the file `NAME` of the VMM's share `TAG`). Since version 9.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// The source the mount table shows (`proc`, `tmpfs`, `shm`, ...).
    pub source: String,
    /// The spec's options: `mount(8)` flags (`ro`, `nosuid`, `strictatime`, ...),
    /// propagation (`private`, `rshared`, ...) and filesystem data (`mode=755`).
    #[serde(default)]
    pub options: Vec<String>,
}

/// A device node of [`Request::Container`] (the OCI `linux.devices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Where it goes in the container (absolute; missing directories are created).
    pub path: String,
    /// `c` (character), `b` (block) or `p` (FIFO).
    pub kind: String,
    /// Major number (character and block devices).
    #[serde(default)]
    pub major: u32,
    /// Minor number.
    #[serde(default)]
    pub minor: u32,
    /// Permission bits [0666].
    #[serde(default = "default_device_mode")]
    pub mode: u32,
    /// Owner.
    #[serde(default)]
    pub uid: u32,
    /// Group.
    #[serde(default)]
    pub gid: u32,
    /// The host has this device (character or block): the container means the real one,
    /// so a guest kernel without it is an error. A device the host has not either is
    /// made as a node all the same, as runc makes it. Since version 8; absent: true.
    #[serde(default = "yes")]
    pub host_has: bool,
}

fn default_device_mode() -> u32 {
    0o666
}

fn yes() -> bool {
    true
}

/// One NIC of [`Request::Network`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The NIC's MAC, as `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The name it takes, e.g. `eth0` (at most 15 bytes).
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses, as `address/prefix` (`172.17.0.2/16`, `fd00::2/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// One route of [`Request::Network`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// The destination as `address/prefix`; absent for a default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The gateway; absent for a route straight onto the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The NIC (by its new name) the route leaves through.
    pub interface: String,
}

/// A process to start: the subset of an OCI runtime spec's `process` the agent applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Program and arguments; `args[0]` is searched in `PATH` unless it contains a `/`.
    pub args: Vec<String>,
    /// The complete environment, as `KEY=VALUE`; nothing is inherited from the agent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory inside the container root; it must exist.
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// Who the process runs as.
    #[serde(default)]
    pub user: User,
    /// Give the process a pseudo-terminal as stdin, stdout, stderr and controlling tty.
    #[serde(default)]
    pub tty: bool,
    /// Forward the host's stdin frames; when false the process reads `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Resource limits applied before the process starts.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// The container's main process: the VM powers off when it exits (PID-1 mode only).
    #[serde(default)]
    pub init: bool,
    /// The terminal's initial size as `[rows, columns]` (with `tty`; the OCI
    /// `process.consoleSize`), before the process starts. Absent: 24×80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_size: Option<[u16; 2]>,
    /// The capability sets the process starts with (the OCI `process.capabilities`);
    /// absent: the agent's own, every capability for root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `PR_SET_NO_NEW_PRIVS` before the exec: setuid binaries and file capabilities
    /// grant nothing.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// The process's `/proc/self/oom_score_adj` (-1000 to 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// The process's file mode creation mask; absent: the agent's (0022).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    /// For a main process (`init`), the PID namespace it starts in, which the
    /// container's later processes join; absent: the guest's. Ignored without `init`:
    /// every other process starts in its container's. Since version 15 (an older agent
    /// starts every process in the guest's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_namespace: Option<PidNamespace>,
}

/// The PID namespace of a container's main process ([`ProcessSpec::pid_namespace`]).
/// Either way the container's `/proc` (when it has one mounted) shows that namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PidNamespace {
    /// A new one, whose init (PID 1) the process is: the OCI `pid` namespace without a
    /// path.
    New,
    /// The boot container's main process's (a booted pod's sandbox): a pod's container
    /// that names its sandbox's `pid` namespace by path (`shareProcessNamespace`). The
    /// guest's when that process has none.
    Sandbox,
    /// The main process's of the app container with this id (the sandbox of a pod
    /// forked from a template is one of its VM's app containers), as `sandbox` is the
    /// boot container's.
    Container(String),
}

/// A process's capability sets, each a bit mask by capability number
/// (`1 << CAP_CHOWN`, ...), applied as runc applies the OCI ones: the bounding set
/// dropped to `bounding`, then (after the user is switched, capabilities kept)
/// `effective`, `permitted` and `inheritable` set, then `ambient` raised. Bits the guest
/// kernel does not know are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The bounding set.
    #[serde(default)]
    pub bounding: u64,
    /// The effective set.
    #[serde(default)]
    pub effective: u64,
    /// The permitted set.
    #[serde(default)]
    pub permitted: u64,
    /// The inheritable set.
    #[serde(default)]
    pub inheritable: u64,
    /// The ambient set.
    #[serde(default)]
    pub ambient: u64,
}

fn default_cwd() -> String {
    "/".to_owned()
}

impl ProcessSpec {
    /// `args` as root in `/`, no environment, no tty, no stdin.
    pub fn new<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: default_cwd(),
            user: User::default(),
            tty: false,
            stdin: false,
            rlimits: Vec::new(),
            init: false,
            console_size: None,
            capabilities: None,
            no_new_privileges: false,
            oom_score_adj: None,
            umask: None,
            pid_namespace: None,
        }
    }
}

/// The identity a process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id (ignored when `name` is given).
    #[serde(default)]
    pub uid: u32,
    /// Group id (ignored when `name` is given).
    #[serde(default)]
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// `user[:group]`, each part a name or a number, resolved against the container's
    /// `/etc/passwd` and `/etc/group` (like an image's `USER`). Overrides `uid`/`gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One resource limit, named as in `setrlimit(2)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, `RLIMIT_NPROC`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// Protocol version.
        version: u32,
        /// Current hostname.
        hostname: String,
    },
    /// The request was carried out.
    Ok,
    /// Answer to [`Request::Unplug`]: the NICs taken down, by name.
    Unplugged {
        /// Their names (`eth0`).
        nics: Vec<String>,
    },
    /// The request failed or was not understood.
    Error {
        /// What went wrong.
        message: String,
    },
    /// [`Request::Exec`] started the process; binary frames follow on this connection.
    Started {
        /// Its process id in the guest.
        pid: i32,
    },
    /// Answer to [`Request::Stats`].
    Stats {
        /// What the container uses.
        usage: ResourceUse,
    },
    /// [`Request::Exec`] found the process could not be executed: a shell would exit
    /// with `exit_code` (127: not found, 126: not executable).
    ExecFailed {
        /// What went wrong, e.g. `exec "x": executable file not found in $PATH`.
        message: String,
        /// 127 or 126.
        exit_code: i32,
    },
}

/// `seed` as a JSON array of bytes or a string of hex digits ([`hex`]).
fn seed_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Bytes(Vec<u8>),
        Hex(String),
    }
    match Seed::deserialize(d)? {
        Seed::Bytes(b) => Ok(b),
        Seed::Hex(s) => from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("seed: not an even number of hex digits")),
    }
}

/// `bytes` as lowercase hex digits, two per byte.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The bytes of a string of hex digits (either case); `None` for anything else.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| char::from(c).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Parses one request line; malformed input is an error message, never a panic.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!(
            "request of {} bytes exceeds {MAX_LINE}",
            line.len()
        ));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// One JSON line for `value`.
pub fn to_line<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string(value).expect("protocol types serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_seed_reads_as_bytes_or_hex_digits() {
        let seed: Vec<u8> = (0..64).map(|i| i * 4 + 3).collect();
        let array = to_line(&Request::Identity {
            hostname: "fork-1".into(),
            seed: seed.clone(),
            macs: vec![],
            time_ns: None,
        });
        let mut v: serde_json::Value = serde_json::from_str(&array).unwrap();
        assert!(v["seed"].is_array(), "hosts still send an array: {array}");
        v["seed"] = serde_json::Value::String(hex(&seed));
        let hex_line = v.to_string();
        assert!(hex_line.len() < array.len() * 2 / 3, "{hex_line}");
        for line in [array.as_str(), hex_line.as_str()] {
            match parse_request(line).unwrap() {
                Request::Identity { seed: got, .. } => assert_eq!(got, seed),
                other => panic!("{other:?}"),
            }
        }
        let upper = hex_line.replace(&hex(&seed), &hex(&seed).to_uppercase());
        assert!(parse_request(&upper).is_ok());
        for bad in ["abc", "zz", "0g"] {
            v["seed"] = serde_json::Value::String(bad.into());
            assert!(parse_request(&v.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_round_trip_as_tagged_json_lines() {
        let r = Request::Identity {
            hostname: "fork-1".into(),
            seed: vec![1, 2, 3],
            macs: vec!["02:00:00:00:00:01".into()],
            time_ns: Some(1_796_000_000_123_456_789),
        };
        let line = to_line(&r);
        assert!(line.ends_with('\n'));
        assert!(line.contains("\"op\":\"identity\""));
        assert_eq!(parse_request(&line).unwrap(), r);
        assert_eq!(parse_request("{\"op\":\"ping\"}").unwrap(), Request::Ping);
    }

    #[test]
    fn network_reads_as_the_documented_json() {
        let line = r#"{"op":"network","interfaces":[{"mac":"02:42:ac:11:00:02","name":"eth0","mtu":1500,"addresses":["172.17.0.2/16"]}],"routes":[{"gateway":"172.17.0.1","interface":"eth0"}]}"#;
        let want = Request::Network {
            interfaces: vec![NetInterface {
                mac: "02:42:ac:11:00:02".into(),
                name: "eth0".into(),
                mtu: 1500,
                addresses: vec!["172.17.0.2/16".into()],
            }],
            routes: vec![NetRoute {
                destination: None,
                gateway: Some("172.17.0.1".into()),
                interface: "eth0".into(),
            }],
            nameservers: Vec::new(),
        };
        assert_eq!(parse_request(line).unwrap(), want);
        assert_eq!(parse_request(&to_line(&want)).unwrap(), want);
    }

    #[test]
    fn exec_round_trips_and_defaults_apply() {
        let mut spec = ProcessSpec::new(["sh", "-c", "echo hi"]);
        spec.env = vec!["A=1".into()];
        spec.user.name = Some("www:www".into());
        spec.rlimits.push(Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            soft: 1024,
            hard: 4096,
        });
        spec.tty = true;
        spec.pid_namespace = Some(PidNamespace::Sandbox);
        let r = Request::Exec { process: spec };
        let line = to_line(&r);
        assert!(line.contains("\"type\":\"RLIMIT_NOFILE\""), "{line}");
        assert!(line.contains("\"pid_namespace\":\"sandbox\""), "{line}");
        assert_eq!(parse_request(&line).unwrap(), r);
        let mut spec = ProcessSpec::new(["true"]);
        spec.pid_namespace = Some(PidNamespace::Container("pod-1".into()));
        let line = to_line(&Request::Exec { process: spec });
        assert!(
            line.contains("\"pid_namespace\":{\"container\":\"pod-1\"}"),
            "{line}"
        );

        let minimal = parse_request(r#"{"op":"exec","process":{"args":["true"]}}"#).unwrap();
        assert_eq!(
            minimal,
            Request::Exec {
                process: ProcessSpec::new(["true"])
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"signal","pid":42,"signal":15}"#).unwrap(),
            Request::Signal {
                pid: 42,
                signal: 15
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"shutdown"}"#).unwrap(),
            Request::Shutdown
        );
    }

    #[test]
    fn container_requests_read_as_the_documented_json_and_ids_are_checked() {
        let line = r#"{"op":"in_container","id":"app","request":{"op":"exec","process":{"args":["nginx"],"init":true}}}"#;
        let mut process = ProcessSpec::new(["nginx"]);
        process.init = true;
        let want = Request::InContainer {
            id: "app".into(),
            request: Box::new(Request::Exec { process }),
        };
        assert_eq!(parse_request(line).unwrap(), want);
        assert_eq!(parse_request(&to_line(&want)).unwrap(), want);
        let create =
            r#"{"op":"create_container","id":"app","root":{"share":"pod","path":"app/rootfs"}}"#;
        assert_eq!(
            parse_request(create).unwrap(),
            Request::CreateContainer {
                id: "app".into(),
                root: ContainerRoot {
                    share: Some("pod".into()),
                    path: "app/rootfs".into()
                }
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"destroy_container","id":"app"}"#).unwrap(),
            Request::DestroyContainer { id: "app".into() }
        );
        for good in ["a", "app-1", "k8s_POD.0", &"f".repeat(64)] {
            check_container_id(good).unwrap();
        }
        for bad in ["", ".hidden", "..", "a/b", "a b", "é", &"f".repeat(65)] {
            assert!(check_container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "null",
            "{\"op\":\"format_disk\"}",
            "\u{0}\u{1}",
            "[1,2]",
            "{\"op\":\"exec\"}",
            "{\"op\":\"exec\",\"process\":{}}",
            "{\"op\":\"exec\",\"process\":{\"args\":\"sh\"}}",
            "{\"op\":\"signal\",\"pid\":\"1\",\"signal\":9}",
            "{\"op\":\"exec\",\"process\":{\"args\":[],\"user\":{\"uid\":-1}}}",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        assert!(parse_request(&"x".repeat(MAX_LINE + 1)).is_err());
    }

    #[test]
    fn responses_serialize_with_a_status_tag() {
        for resp in [
            Response::Error {
                message: "no".into(),
            },
            Response::Started { pid: 7 },
            Response::ExecFailed {
                message: "exec \"x\": executable file not found in $PATH".into(),
                exit_code: 127,
            },
        ] {
            let s = to_line(&resp);
            assert!(s.contains("\"status\":\""), "{s}");
            let back: Response = serde_json::from_str(s.trim()).unwrap();
            assert_eq!(back, resp);
        }
        assert!(to_line(&Response::Started { pid: 7 }).contains("\"status\":\"started\""));
        assert!(to_line(&Response::ExecFailed {
            message: String::new(),
            exit_code: 127
        })
        .contains("\"status\":\"exec_failed\""));
    }
}
