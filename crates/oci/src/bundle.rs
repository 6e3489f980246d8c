//! OCI runtime bundles: reads `<bundle>/config.json` (runtime spec 1.x) and turns it into a
//! [`ContainerPlan`], the part of the spec a forkvm VM can honour, or an error naming the
//! file and field that it cannot.
//!
//! A container here is a whole VM, so the VM is the isolation boundary. Fields that only
//! harden a process inside a shared kernel are safe to ignore (with a warning); fields
//! that would make the container see or touch something on the host cannot be honoured
//! and are refused.
//!
//! | Field | Handling | Why |
//! |---|---|---|
//! | `ociVersion` | must start with `1.` | the only major version this parser knows |
//! | `root.path` | resolved against the bundle; must be a directory | the VM's root filesystem: by default the directory itself, shared by virtio-fs, so the container's writes reach it as with runc; with the annotation `io.forkvm.rootfs: disk` an ext4 copy under a private overlay in guest memory, which the VM can fork with ([`RootMode`]) |
//! | `root.readonly` | [`ContainerPlan::rootfs_readonly`] | the guest agent remounts the container's root read-only after its mounts (theirs stay as they are); a fork child's hostname files are still written |
//! | `process.args`/`env`/`cwd`/`user` (with `umask`)/`terminal`/`rlimits` | mapped to [`ProcessSpec`] | `cwd` must be absolute, `args` non-empty |
//! | `process.capabilities` (all five sets) | [`ProcessSpec::capabilities`] | applied by the guest agent as runc applies them: bounding set dropped, capabilities kept across the user switch, `capset`, ambient raised; a capability forkvm does not know is left out with a warning |
//! | `process.noNewPrivileges`, `oomScoreAdj` | [`ProcessSpec::no_new_privileges`], [`ProcessSpec::oom_score_adj`] | applied by the guest agent before the exec |
//! | `process.consoleSize` | [`ProcessSpec::console_size`] | the guest pty's size before the process starts |
//! | `process.user.username` | warning | it is for Windows; `uid` and `gid` are used |
//! | `process.apparmorProfile`, `selinuxLabel` | warning | host LSM confinement does not apply inside a VM; the VM is the boundary |
//! | `linux.seccomp` | [`ContainerPlan::seccomp`] | compiled on the host ([`crate::seccomp`]) and installed by the guest agent on the container's processes (exec'd ones too; not its hooks), as runc installs it: defence in depth. As runc: names this kernel lacks are left out (one warning), rules of the default action skipped, an argument named twice makes one rule per condition. `SCMP_ACT_NOTIFY`, `listenerPath`, an `errnoRet` over 4095 and more than 16 filters or 32 768 instructions are refused; `flags` are not applied (warning); 32-bit calls end the process |
//! | `process.scheduler`, `ioPriority`, `execCPUAffinity` | ignored | per-process tuning inside the guest |
//! | `hostname` | [`ContainerPlan::hostname`] | empty: the container's ID's first 12 characters |
//! | `domainname` | [`ContainerPlan::domainname`] | set by the guest agent (the guest's UTS namespace is the container's) |
//! | `mounts` of type `proc`, `sysfs`, `tmpfs`, `devpts`, `mqueue`, `cgroup`, `cgroup2` | [`ContainerPlan::filesystems`] | mounted by the guest agent in the container's root in the spec's order with their options (flags, propagation, data), in place of the guest's own at `/proc`, `/sys`, `/dev`; `devpts` is the guest's pty filesystem bound in with the entry's flags (its data options aside); `cgroup` mounts the guest's cgroup v2 hierarchy |
//! | `mounts`: bind of a regular file (Docker's and podman's `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, podman's `/run/.containerenv`) | copied ([`ContainerPlan::files`]), with a warning | the file is copied when the container is created (after the `createRuntime` hooks) and the copy bound at the destination in the spec's order (a shared root), or written into the root disk; later changes on either side are not shared. Over a root disk, the guest adds its hostname to `/etc/hosts` and writes `/etc/hostname` itself |
//! | `mounts`: bind onto `/proc`, `/sys`, `/sys/fs/cgroup`, `/dev` or `/dev/{pts,shm,mqueue}` (containerd CRI's sandbox `/dev/shm`) | warning; [`ContainerPlan::filesystems`] | the guest mounts its own filesystem there (`ro` kept) |
//! | `mounts`: bind of a directory (`-v DIR:/p`, `--mount type=bind`, named volumes) | [`ContainerPlan::volumes`] | shared into the VM by a virtio-fs device: the container's monitor binds the directory, under its own name, in a directory of the container's state (in its own mount namespace), which is the share, and the guest agent binds that directory of the share at `destination`, so that the mount table names it as runc's does; read-only with the `ro` option (the host's bind too); other options (propagation, `nosuid`, ...) are not applied. A VM with volumes forks (its children serve the same directories); it cannot be saved as a template |
//! | `mounts`: bind of anything else (a socket, a device node), or of a source that is missing or relative | **error** | only directories are shared and regular files copied |
//! | `mounts`: any other filesystem type | **error** | the guest cannot mount it |
//! | `linux.namespaces`: `mount`, `uts`, `ipc` | [`ContainerPlan::namespaces`] | the container's monitor (the host process `state` names, or its holder in those namespaces when the container has one, see `pid`: hooks and engines enter them) is in them as runc's container process would be: a new one without `path`, the one at `path` joined, the runtime's own when the type is not listed. Inside the VM the container has every namespace of its own. The monitor stacks the container's root over `/` and binds its volumes only in a mount namespace it made: volumes and a pod's sandbox need one (**error** otherwise). A `mount` namespace by path must show the runtime's processes in its `/proc`, where the monitor finds itself (one made from the runtime's by `unshare --mount` does; another container's does not: **error**) |
//! | `linux.namespaces`: `pid` | [`MonitorNamespaces::pid`], [`HolderNamespaces::pid`] | with `path`: joined by the monitor (and the VM process it starts; not with a `mount` namespace by path too: **error**, the monitor learns its host pid from `/proc`). Without `path` (but for a pod's container, whose sandbox's VM holds it: warning): the container's **holder** (`runtime/holder.rs`), a process that only stands for the container on the host, is the init of a new pid namespace as runc's container process is, and is the state's `pid` and `--pid-file`'s: it joins the monitor's mount, UTS, IPC and network namespaces, exits with the container's exit code, and a SIGKILL of it ends the container. In the guest, the container's process is PID 1 of a new pid namespace too (`ProcessSpec::pid_namespace`), its `/proc` that namespace's (its masked and read-only paths under `/proc` applied again), and its exec'd processes join it (its `createContainer` and `startContainer` hooks run before it, in the guest's; with a user namespace the pid namespace is owned by the guest's, not the container's, so root in the container cannot mount a proc of its own); a pod's container that names a pid namespace by path (`shareProcessNamespace`: its sandbox's) joins its sandbox's in the pod's VM. The monitor stays in the runtime's pid namespace (or the one by path); the VM process is the first of a VM family in a pid namespace of its own below it (`forkvm_jail::family`), whose root holds the monitor's procfs, where it and its fork children read their host pids |
//! | `linux.namespaces`: `cgroup` | [`HolderNamespaces::cgroup`]; with `path`: **error** | the holder (above) makes one on the host, rooted at the cgroup `create` ran in (the engine's), and the guest's kernel the container's (a pod's container has no holder: warning); the VM process has none: it moves into the container's `cgroupsPath` and out of it when it ends, which a cgroup namespace of its own would forbid |
//! | `linux.namespaces`: `time` | warning; with `path`: **error** | made inside the VM only (the guest kernel's) |
//! | `linux.namespaces`: `network` with `path` (podman/netavark, CNI, containerd's CRI) | [`ContainerPlan::network`] = [`NetworkPlan::Join`] | the VM joins that network: each interface gets a TAP tied to it, and the guest takes its MAC, MTU, addresses and routes (`forkvm-net`) |
//! | `linux.namespaces`: `network` without `path` (Docker, `ctr run`) | [`NetworkPlan::New`] | the runtime makes a namespace for the container's monitor, the `prestart`/`createRuntime` hooks configure it (Docker's `libnetwork-setkey` moves the veth in), then the VM joins it as above |
//! | no `network` namespace, or the runtime's own by `path` (`--network host`) | [`NetworkPlan::Host`], warning | the monitor stays in the runtime's network namespace as the spec says, but a VM cannot share the host's network stack: its guest has only loopback (no NIC; the host's interfaces are never tied to it), as with Kata Containers, and its VM process has an empty network namespace of its own. A pod template cannot fork such a pod (**error**) |
//! | `linux.namespaces`: `user` with `path` | **error** | the container's user namespace is made inside the VM (below); a host one cannot be joined from there |
//! | `linux.devices` | [`ContainerPlan::devices`] | created by the guest agent in the container's root (type, major, minor, mode, owner). A device this host has must be one the guest's kernel has: a host-only device such as `/dev/kvm` fails `create` naming it. A device neither has is made as runc makes it; a FIFO always. Type `a` is refused: it is a cgroup rule |
//! | `linux.namespaces`: `user` with `linux.uidMappings`/`gidMappings` | [`ContainerPlan::user_namespace`], [`HolderNamespaces::user`] | on the host the container's holder (above) is in a new user namespace with those maps, which engines read from `/proc/<pid>/uid_map`; inside, made by the guest agent with those maps, their "host" ids the guest's; every container process (exec'd ones and `createContainer`/`startContainer` hooks too) joins it. A `user` namespace without both maps, or maps without the namespace, is an **error**, as in runc. The guest's other namespaces stay the guest root's: the container's root may bind low ports and ping (the agent sets `ip_unprivileged_port_start` and `ping_group_range`) but not set the hostname or mount. A shared root's files are created with the guest's ids (a container root mapped to 1000 writes as uid 1000) |
//! | `linux.sysctl`, `maskedPaths`, `readonlyPaths` | [`ContainerPlan::sysctls`], [`ContainerPlan::masked_paths`], [`ContainerPlan::readonly_paths`] | applied by the guest agent as runc applies them, before the process starts: kernel parameters written to the guest's `/proc/sys` (the guest's kernel is the container's own), masked paths hidden (`/dev/null` over a file, an empty read-only tmpfs over a directory), read-only paths bound read-only; paths resolve inside the container's root, missing ones are skipped |
//! | `linux.resources.memory.limit` | [`ContainerPlan::mem_mib`] | rounded up to MiB, at least 128; absent or not positive (`-1`: unlimited) → 512 |
//! | `linux.resources.cpu.quota`/`period` | [`ContainerPlan::vcpus`] | `ceil(quota / period)` (period defaults to 100 000 µs) |
//! | `linux.resources.cpu.cpus` | [`ContainerPlan::vcpus`] | when there is no quota: the number of CPUs in the cpuset; else 1 |
//! | `annotations`: `io.kubernetes.cri.sandbox-memory`, `io.kubernetes.cri.sandbox-cpu-quota`/`period` (a pod's sandbox) | [`ContainerPlan::pod_size`] | the whole pod's limits (containerd 1.6.7 on passes kubelet's sum of the containers' limits) size the pod's VM where they ask more than the sandbox's own `linux.resources` (or the 512 MiB default): memory the pod's limit + 128 MiB for the guest itself, vCPUs `ceil(quota / period)`; `0` or absent: as the sandbox's spec says; not a number, or a VM over 1 TiB: an error |
//! | `linux.cgroupsPath`, `linux.resources.pids.limit` | [`ContainerPlan::cgroup`] | the VM process's cgroup (a path, or systemd's `slice:prefix:name`): `memory.max` = the guest memory it may hold (its RAM and its forks' overlays) + the VMM's, `pids.max` the limit (else 4096) |
//! | `linux.resources.memory.limit`, `pids.limit`, `cpu.quota`/`period`, `cpu.shares` | [`ContainerPlan::guest_cgroup`] | also the limits of the container's cgroup inside the guest (`memory.max`, `pids.max`, `cpu.max`, `cpu.weight` by runc's conversion), which its processes join in a cgroup namespace of their own, so its `/sys/fs/cgroup` shows them |
//! | other `linux.resources`, `rootfsPropagation`, `mountLabel` | ignored | host cgroup/kernel details with no meaning inside the VM |
//! | `annotations` | [`ContainerPlan::annotations`] | reported by `state`; `io.forkvm.rootfs` (`shared` or `disk`, anything else an error) chooses the [`RootMode`]; `io.kubernetes.cri.container-type` and `io.kubernetes.cri.sandbox-id` make a container a Kubernetes pod's ([`ContainerPlan::pod`]): a `sandbox` boots the pod's VM with the pod directory shared in, a `container` is made inside its sandbox's running VM ([`crate::pod`], docs/kubernetes.md); a pod's container's namespace paths (the sandbox's) are accepted, its bound files copied into the pod directory, its bound directories bound there, a root disk refused by name |
//! | `hooks.prestart`, `createRuntime` | [`ContainerPlan::hooks`] | run by `create` as runc runs them, on the host, with the state (`pid`: the container's monitor) on stdin, before the VM boots |
//! | `hooks.poststart`, `poststop` | [`ContainerPlan::hooks`] | run after `start`, and by `delete`; a failure is logged, as the spec says |
//! | `hooks.createContainer`, `startContainer` | [`ContainerPlan::guest_hooks`] | run by the guest agent in the container's root, with the state on stdin, at create (after the container's mounts and device nodes, before its kernel parameters, masked and read-only paths and read-only root, as runc orders them) and at start (before its process); the path must exist in the container; a failure (exit, or past `timeout`; at most 50 s for all of a kind) fails `create` or `start`, naming the hook |

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use forkvm_agent_proto::{Capabilities, ProcessSpec, Rlimit, User};
use forkvm_jail::CgroupSpec;
use oci_spec::runtime::{
    Hook, Hooks, Linux, LinuxCapabilities, LinuxDeviceType, LinuxNamespaceType, Mount, Process,
    Spec,
};
use serde::{Deserialize, Serialize};

/// The bundle's configuration file name, per the runtime spec.
pub const CONFIG_FILE: &str = "config.json";
/// Guest memory when the spec sets no (or an unlimited) memory limit.
pub const DEFAULT_MEM_MIB: u64 = 512;
/// The smallest guest memory a plan asks for; lower limits are raised to it.
pub const MIN_MEM_MIB: u64 = 128;
/// The CFS period the kernel uses when a spec sets a quota without one.
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Mount destinations the guest's kernel fills: a bind of a host directory there (the
/// CRI's sandbox `/dev/shm`) becomes the guest's own filesystem (type, options).
const GUEST_MOUNTS: &[(&str, &str, &[&str])] = &[
    ("/proc", "proc", &["nosuid", "noexec", "nodev"]),
    (
        "/dev",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    ),
    ("/dev/pts", "devpts", &["nosuid", "noexec"]),
    (
        "/dev/shm",
        "tmpfs",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    ),
    ("/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
    ("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
    (
        "/sys/fs/cgroup",
        "cgroup2",
        &["nosuid", "noexec", "nodev", "ro"],
    ),
];
fn clamp_u16(n: u64) -> u16 {
    n.min(u64::from(u16::MAX)) as u16
}

/// A host file bind-mounted into the container, copied into the VM's root instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCopy {
    /// The host file (the mount's `source`), absolute.
    pub source: PathBuf,
    /// Where the container sees it (absolute).
    pub destination: PathBuf,
}

/// What a forkvm VM runs for one OCI container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPlan {
    /// The container's root filesystem: absolute, resolved against the bundle.
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub rootfs_readonly: bool,
    /// How the VM gets the root filesystem ([`ROOTFS_ANNOTATION`]).
    pub root_mode: RootMode,
    /// The container's main process (`init` and `stdin` set).
    pub process: ProcessSpec,
    /// `hostname`, when set and non-empty.
    pub hostname: Option<String>,
    /// Virtual CPUs, from the CPU quota or cpuset.
    pub vcpus: u8,
    /// Guest memory in MiB, from the memory limit.
    pub mem_mib: u64,
    /// The VM process's cgroup, from `linux.cgroupsPath` (limits: guest memory and the
    /// VMM's, `linux.resources.pids.limit`); `None`: forkvm's own for the VM.
    pub cgroup: Option<CgroupSpec>,
    /// Bind-mounted host files, copied: into the root disk ([`RootMode::Disk`]), or
    /// into a directory shared read-only, the `i`th as file `i`, and bound at their
    /// destinations in the spec's order as `file` filesystems ([`RootMode::Shared`]).
    pub files: Vec<FileCopy>,
    /// Bind-mounted host directories, shared into the VM, in the spec's order.
    pub volumes: Vec<crate::vm::Volume>,
    /// Every mount but the copied files, in the spec's order (`proc`, `tmpfs`, ..., the
    /// volumes as `virtiofs` shares of [`ContainerPlan::volumes`]): the guest agent
    /// mounts them in the container's root.
    pub filesystems: Vec<forkvm_agent_proto::FsMount>,
    /// The limits of the container's cgroup inside the guest (`linux.resources`).
    pub guest_cgroup: forkvm_agent_proto::CgroupLimits,
    /// `linux.seccomp` compiled ([`crate::seccomp`]): the guest agent installs it on
    /// the container's processes.
    pub seccomp: Vec<String>,
    /// The `user` namespace with `linux.uidMappings` and `gidMappings`: the guest
    /// agent makes it and starts the container's processes in it.
    pub user_namespace: Option<forkvm_agent_proto::UserNamespace>,
    /// The container's network namespace, which the VM joins (a pod's container: the
    /// sandbox's, which its VM joined already).
    pub network: NetworkPlan,
    /// The monitor's other namespaces on the host (a pod's container's are its
    /// sandbox's: not planned here).
    pub namespaces: MonitorNamespaces,
    /// What the container is to a Kubernetes pod, if anything.
    pub pod: Option<PodRole>,
    /// A pod sandbox's VM size from the whole pod's limits ([`CRI_SANDBOX_MEMORY`],
    /// [`CRI_SANDBOX_CPU_QUOTA`]), where containerd gave them: [`ContainerPlan::vcpus`]
    /// and [`ContainerPlan::mem_mib`] are at least these; a template forked for the pod
    /// must have them ([`PodSize::short_of`]).
    pub pod_size: PodSize,
    /// The hooks the runtime runs on the host.
    pub hooks: HostHooks,
    /// The hooks the guest agent runs in the container: `createContainer`, then
    /// `startContainer`.
    pub guest_hooks: GuestHooks,
    /// `domainname`, when set and non-empty.
    pub domainname: Option<String>,
    /// The spec's `annotations`.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `linux.devices`: nodes the guest agent creates (for devices the guest has).
    pub devices: Vec<forkvm_agent_proto::DeviceNode>,
    /// `linux.sysctl`: kernel parameters the guest agent sets (the guest's kernel is
    /// the container's).
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// `linux.maskedPaths`, hidden by the guest agent.
    pub masked_paths: Vec<String>,
    /// `linux.readonlyPaths`, made read-only by the guest agent.
    pub readonly_paths: Vec<String>,
    /// A pod's container's `pid` namespace path (`/proc/PID/ns/pid`: its sandbox's, or
    /// with Kubernetes' `TARGET` mode another of the pod's containers'), for its
    /// monitor to find the container in the pod's VM whose namespace it shares.
    pub pod_pid_path: Option<PathBuf>,
    /// Parts of the spec that were ignored, one human-readable line each.
    pub warnings: Vec<String>,
}

/// The annotation that chooses a container's [`RootMode`]: `shared` (the default) or
/// `disk`.
pub const ROOTFS_ANNOTATION: &str = "io.forkvm.rootfs";

/// containerd's CRI annotation that says what a container is to Kubernetes: `sandbox`
/// (a pod's pause container) or `container` (one of the pod's containers).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// containerd's CRI annotation naming the pod sandbox a container belongs to.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// containerd's CRI annotation (1.6.7 on) on a pod's sandbox: the memory limit of the
/// whole pod in bytes, the sum kubelet makes of its containers' limits (the CRI's
/// `LinuxPodSandboxConfig.resources`); `0` or absent: none.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// containerd's CRI annotations (1.6.7 on) on a pod's sandbox: the whole pod's CFS
/// quota and period in µs (kubelet's sum of its containers' CPU limits); a quota of
/// `0` or less, or none: no limit.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`CRI_SANDBOX_CPU_QUOTA`].
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// What a pod's VM holds beside its containers' memory limits (the guest kernel, the
/// agent, the pause process, page cache): a pod whose containers may use `N` MiB gets a
/// VM of `N + POD_GUEST_MIB` MiB, or what its sandbox's spec gives where that is more
/// (kubelet counts a container without a limit as 0: the sum alone could starve it).
pub const POD_GUEST_MIB: u64 = 128;

/// How a container's VM gets its root filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RootMode {
    /// The bundle's root directory shared into the VM by virtio-fs: the container reads
    /// and writes the bundle's files, as a runc container does (`docker diff`, `cp` and
    /// `commit` see its changes). Its VM cannot fork: the children would write the
    /// same files.
    #[default]
    Shared,
    /// A copy of the root directory as an ext4 image under a private overlay in guest
    /// memory: writes stay in the VM, and the VM forks, each child with its own copy.
    Disk,
}

impl RootMode {
    /// The annotation's value for this mode.
    pub fn name(self) -> &'static str {
        match self {
            RootMode::Shared => "shared",
            RootMode::Disk => "disk",
        }
    }

    /// The mode `annotations` choose ([`ROOTFS_ANNOTATION`]); `None` for a value that
    /// is neither `shared` nor `disk`.
    pub fn of(annotations: &std::collections::BTreeMap<String, String>) -> Option<RootMode> {
        match annotations.get(ROOTFS_ANNOTATION).map(String::as_str) {
            None | Some("shared") => Some(RootMode::Shared),
            Some("disk") => Some(RootMode::Disk),
            Some(_) => None,
        }
    }
}

/// What a container on the host's network gets (a bundle with no network namespace, or
/// naming the runtime's own): the warning `create` gives.
pub const HOST_NETWORK: &str = "the container is on the host's network (--network host), which a VM cannot share: its monitor stays in the runtime's network namespace, and its guest has only loopback; give it a container network to reach anything";

/// What a container is to a Kubernetes pod (containerd's CRI annotations
/// [`CRI_CONTAINER_TYPE`] and [`CRI_SANDBOX_ID`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodRole {
    /// The pod's sandbox (its pause container): it boots the pod's VM, which shares a
    /// pod directory ([`crate::pod::POD_SHARE_TAG`]) the pod's containers' roots are
    /// bound into.
    Sandbox,
    /// One of the pod's containers: made inside the running VM of sandbox `sandbox` by
    /// its guest agent, with its own root and process tree, the pod's network.
    Member {
        /// The sandbox's container ID.
        sandbox: String,
    },
}

/// The size a pod's limits ask of its VM: each part `None` where the pod sets no such
/// limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSize {
    /// `ceil(quota / period)` of the pod's CPU limits.
    pub vcpus: Option<u8>,
    /// The pod's memory limit in MiB (rounded up) plus [`POD_GUEST_MIB`].
    pub mem_mib: Option<u64>,
}

impl PodSize {
    /// What a VM of `vcpus` and `mem_mib` lacks for this size, in words; `None` if it
    /// has enough.
    pub fn short_of(&self, vcpus: u8, mem_mib: u64) -> Option<String> {
        let mut short = Vec::new();
        if let Some(want) = self.vcpus.filter(|&w| w > vcpus) {
            short.push(format!(
                "its limits ask for {want} vCPUs ({CRI_SANDBOX_CPU_QUOTA}/period), the template has {vcpus}"
            ));
        }
        if let Some(want) = self.mem_mib.filter(|&w| w > mem_mib) {
            short.push(format!(
                "its memory limits need a VM of {want} MiB ({CRI_SANDBOX_MEMORY} + {POD_GUEST_MIB} MiB for the guest), the template has {mem_mib} MiB"
            ));
        }
        (!short.is_empty()).then(|| short.join("; "))
    }
}

/// Where a container's network namespace comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkPlan {
    /// The engine made it and names it (`network` with a `path`).
    Join(PathBuf),
    /// The runtime makes one for the container's monitor (`network` without a `path`);
    /// the engine's hooks configure it, as they would for runc.
    New,
    /// No `network` namespace (or the runtime's own by path): the monitor and the VM
    /// process stay in the runtime's, and the guest has loopback only.
    Host,
}

/// One of the container monitor's namespaces on the host, as `linux.namespaces` gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostNamespace {
    /// The type is not listed: the runtime's own.
    #[default]
    Inherit,
    /// Listed without a `path`: a new one.
    New,
    /// Listed with a `path`: that one, joined.
    Join(PathBuf),
}

/// The container monitor's namespaces besides its network's: what the host process the
/// state's pid names is in, as runc's container process would be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonitorNamespaces {
    /// Its mount namespace: only one it made holds the container's root over `/` and
    /// its volumes' binds.
    pub mount: HostNamespace,
    /// Its UTS namespace.
    pub uts: HostNamespace,
    /// Its IPC namespace.
    pub ipc: HostNamespace,
    /// A pid namespace it (and the VM process it starts) joins (`pid` with a `path`).
    pub pid: Option<PathBuf>,
    /// The namespaces the container's holder process makes on the host
    /// (`runtime/holder.rs`): `pid`, `cgroup` and `user` without a path.
    pub holder: HolderNamespaces,
}

/// What the container's holder process (its process on the host when the spec gives it
/// pid, cgroup or user namespaces of its own) makes beyond the monitor's namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HolderNamespaces {
    /// A pid namespace it is the init of.
    pub pid: bool,
    /// A cgroup namespace rooted at its cgroup.
    pub cgroup: bool,
    /// A user namespace with the spec's maps (the same maps the guest's has).
    pub user: Option<forkvm_agent_proto::UserNamespace>,
}

impl HolderNamespaces {
    /// Whether the container needs a holder at all.
    pub fn any(&self) -> bool {
        self.pid || self.cgroup || self.user.is_some()
    }
}

/// The spec's hooks that run in the container, inside its VM, in spec order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestHooks {
    /// `hooks.createContainer`: run by `create`, after the container's mounts.
    pub create_container: Vec<forkvm_agent_proto::GuestHook>,
    /// `hooks.startContainer`: run by `start`, before the container's process.
    pub start_container: Vec<forkvm_agent_proto::GuestHook>,
}

/// The spec's hooks that run on the host, in the runtime's namespaces, in spec order.
/// (`createContainer` and `startContainer` run in the container's namespaces, which are
/// inside the VM, and are refused.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHooks {
    /// `prestart` (deprecated in the spec, still what Docker 20.10 uses), run by `create`.
    pub prestart: Vec<Hook>,
    /// `createRuntime`, run by `create` after `prestart`.
    pub create_runtime: Vec<Hook>,
    /// `poststart`, run after the process started.
    pub poststart: Vec<Hook>,
    /// `poststop`, run by `delete`.
    pub poststop: Vec<Hook>,
}

/// Why a bundle cannot run as a forkvm VM.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory or its `config.json` could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or not a runtime spec.
    #[error("{} is not a valid OCI runtime config: {source}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// `ociVersion` is not a 1.x version.
    #[error("{}: ociVersion {version:?} is not supported (expected 1.x)", path.display())]
    UnsupportedVersion {
        /// The config file.
        path: PathBuf,
        /// The version found.
        version: String,
    },
    /// A required field is absent.
    #[error("{}: {field} is missing", path.display())]
    Missing {
        /// The config file.
        path: PathBuf,
        /// The field, as a JSON path (`process.args`).
        field: &'static str,
    },
    /// A field holds a value the spec or forkvm does not allow.
    #[error("{}: {field}: {reason}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The field, as a JSON path.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `root.path` is not a directory.
    #[error("{}: root.path {}: not a directory", config.display(), rootfs.display())]
    RootfsMissing {
        /// The config file.
        config: PathBuf,
        /// The resolved root filesystem path.
        rootfs: PathBuf,
    },
    /// A bind mount from the host that cannot go into the VM.
    #[error("mount {}: cannot bind {} into the VM: {reason}", destination.display(), host_path.display())]
    BindMount {
        /// Where the container would see it.
        destination: PathBuf,
        /// The host path (the mount's `source`).
        host_path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A mount of a filesystem type the guest cannot provide.
    #[error("mount {}: filesystem type {fs_type:?} is not supported", destination.display())]
    MountType {
        /// Where the container would see it.
        destination: PathBuf,
        /// The `type` field (empty when absent).
        fs_type: String,
    },
    /// A spec feature that cannot be honoured inside a VM.
    #[error("{}: {field}: {reason}", path.display())]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The field, as a JSON path.
        field: String,
        /// Why forkvm cannot honour it.
        reason: &'static str,
    },
}

/// Reads `<bundle>/config.json` and plans the VM for it.
pub fn load(bundle: &Path) -> Result<ContainerPlan, BundleError> {
    let bundle = bundle.canonicalize().map_err(|source| BundleError::Read {
        path: bundle.to_owned(),
        source,
    })?;
    let config = bundle.join(CONFIG_FILE);
    let bytes = std::fs::read(&config).map_err(|source| BundleError::Read {
        path: config.clone(),
        source,
    })?;
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|source| BundleError::Parse {
        path: config.clone(),
        source,
    })?;
    plan(&spec, &bundle, &config)
}

/// Reads an `exec --process` file (a runtime spec `process` object) into the spec of an
/// extra process in a running container. Warnings are dropped: the fields they are about
/// were already reported for the container.
pub fn exec_process(path: &Path) -> Result<ProcessSpec, BundleError> {
    let bytes = std::fs::read(path).map_err(|source| BundleError::Read {
        path: path.to_owned(),
        source,
    })?;
    let process: Process = serde_json::from_slice(&bytes).map_err(|source| BundleError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut planner = Planner::new(path);
    let mut spec = planner.process(Some(&process))?;
    spec.init = false;
    Ok(spec)
}

/// Plans the VM for an already parsed spec. `bundle` must be absolute; `config` names the
/// file in errors.
pub fn plan(spec: &Spec, bundle: &Path, config: &Path) -> Result<ContainerPlan, BundleError> {
    let mut planner = Planner::new(config);
    planner.check_version(spec.version())?;
    let annotations: std::collections::BTreeMap<String, String> = spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    planner.root_mode = RootMode::of(&annotations).ok_or_else(|| {
        planner.invalid(
            format!("annotations.{ROOTFS_ANNOTATION}"),
            format!(
                "{:?} is neither \"shared\" nor \"disk\"",
                annotations[ROOTFS_ANNOTATION]
            ),
        )
    })?;
    // A Kubernetes pod's container joins its sandbox's namespaces by path: inside the
    // pod's VM, they are the VM's own.
    let pod = match annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) {
        Some("sandbox") => Some(PodRole::Sandbox),
        Some("container") => {
            let sandbox = annotations
                .get(CRI_SANDBOX_ID)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    planner.invalid(
                        format!("annotations.{CRI_SANDBOX_ID}"),
                        "a pod's container must name its pod sandbox",
                    )
                })?;
            Some(PodRole::Member {
                sandbox: sandbox.clone(),
            })
        }
        _ => None,
    };
    planner.pod_member = matches!(pod, Some(PodRole::Member { .. }));
    if pod == Some(PodRole::Sandbox) {
        planner.pod_size = planner.pod_size(&annotations)?;
    }
    if planner.pod_member && planner.root_mode == RootMode::Disk {
        return Err(planner.unsupported(
            format!("annotations.{ROOTFS_ANNOTATION} (disk, of a pod's container)"),
            "a pod's container's root is its directory, shared into the pod's VM",
        ));
    }
    let (rootfs, rootfs_readonly) = planner.rootfs(spec, bundle)?;
    let mut process = planner.process(spec.process().as_ref())?;
    if let Some(mounts) = spec.mounts() {
        for mount in mounts {
            planner.mount(mount)?;
        }
    }
    let (hooks, guest_hooks) = match spec.hooks() {
        Some(hooks) => planner.hooks(hooks)?,
        None => Default::default(),
    };
    let (vcpus, mem_mib, cgroup) = match spec.linux() {
        Some(linux) => planner.linux(linux)?,
        None => (
            planner.pod_size.vcpus.unwrap_or(1).max(1),
            planner
                .pod_size
                .mem_mib
                .unwrap_or(DEFAULT_MEM_MIB)
                .max(DEFAULT_MEM_MIB),
            None,
        ),
    };
    process.pid_namespace = planner.guest_pid.take();
    let network = match planner.network.take() {
        Some(network) => network,
        None => {
            planner.warn(format!(
                "linux.namespaces has no network namespace: {HOST_NETWORK}"
            ));
            NetworkPlan::Host
        }
    };
    let namespaces = std::mem::take(&mut planner.namespaces);
    // What the monitor mounts for the container lives in a mount namespace it made.
    if namespaces.mount != HostNamespace::New && !planner.pod_member {
        let why = "the container's monitor binds it in a mount namespace of the container's \
                   own, and linux.namespaces gives none (no `mount`, or one by path)";
        if !planner.volumes.is_empty() {
            return Err(planner.unsupported("mounts (bind of a directory)", why));
        }
        if pod == Some(PodRole::Sandbox) {
            return Err(planner.unsupported("a pod sandbox's pod directory", why));
        }
    }
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    Ok(ContainerPlan {
        rootfs,
        rootfs_readonly,
        root_mode: planner.root_mode,
        process,
        hostname,
        vcpus,
        mem_mib,
        cgroup,
        files: planner.files,
        volumes: planner.volumes,
        filesystems: planner.filesystems,
        guest_cgroup: std::mem::take(&mut planner.guest_cgroup),
        seccomp: std::mem::take(&mut planner.seccomp),
        user_namespace: planner.user_namespace.take(),
        network,
        namespaces,
        pod,
        pod_size: planner.pod_size,
        hooks,
        guest_hooks,
        domainname: spec.domainname().clone().filter(|d| !d.is_empty()),
        annotations,
        devices: std::mem::take(&mut planner.devices),
        sysctls: linux_field(spec, |l| {
            l.sysctl().clone().map(|s| s.into_iter().collect())
        }),
        masked_paths: linux_field(spec, |l| l.masked_paths().clone()),
        readonly_paths: linux_field(spec, |l| l.readonly_paths().clone()),
        pod_pid_path: planner.pod_pid_path.take(),
        warnings: planner.warnings,
    })
}

/// A field of the spec's `linux` object, or its default where either is absent.
fn linux_field<T: Default>(spec: &Spec, field: impl FnOnce(&Linux) -> Option<T>) -> T {
    spec.linux().as_ref().and_then(field).unwrap_or_default()
}

/// Whether this host has the character (`c`) or block (`b`) device `major:minor`.
fn host_has_device(kind: &str, major: u32, minor: u32) -> bool {
    let class = match kind {
        "c" => "char",
        "b" => "block",
        _ => return false,
    };
    Path::new(&format!("/sys/dev/{class}/{major}:{minor}")).exists()
}

impl ContainerPlan {
    /// The guest agent's request that makes the container's cgroup in the guest, with
    /// its limits (sent for every container: its processes and its `/sys/fs/cgroup` are
    /// the group's).
    pub fn cgroup_request(&self) -> forkvm_agent_proto::Request {
        forkvm_agent_proto::Request::Cgroup {
            limits: self.guest_cgroup.clone(),
        }
    }

    /// The guest agent's request that mounts the spec's filesystems; none when the
    /// spec has none (the guest's own stay).
    pub fn filesystems_request(&self) -> Option<forkvm_agent_proto::Request> {
        (!self.filesystems.is_empty()).then(|| forkvm_agent_proto::Request::Filesystems {
            mounts: self.filesystems.clone(),
        })
    }

    /// The guest agent's request that makes the user namespace and the device nodes and
    /// applies the kernel parameters, domain name, masked and read-only paths and
    /// `root.readonly`, when
    /// there are no `createContainer` hooks; none when there is nothing to apply.
    pub fn container_request(&self) -> Option<forkvm_agent_proto::Request> {
        self.container_part(true, true)
    }

    /// With `createContainer` hooks, the request splits around them as runc orders
    /// them: the user namespace and device nodes before the hooks (which run in the
    /// namespace), the rest after.
    pub fn devices_request(&self) -> Option<forkvm_agent_proto::Request> {
        self.container_part(true, false)
    }

    /// The part of [`ContainerPlan::container_request`] after the `createContainer`
    /// hooks (see [`ContainerPlan::devices_request`]).
    pub fn settings_request(&self) -> Option<forkvm_agent_proto::Request> {
        self.container_part(false, true)
    }

    fn container_part(&self, devices: bool, settings: bool) -> Option<forkvm_agent_proto::Request> {
        fn keep<T: Clone + Default>(on: bool, value: &T) -> T {
            if on {
                value.clone()
            } else {
                T::default()
            }
        }
        let part = |d: bool, s: bool| forkvm_agent_proto::Request::Container {
            devices: keep(d, &self.devices),
            sysctls: keep(s, &self.sysctls),
            masked_paths: keep(s, &self.masked_paths),
            readonly_paths: keep(s, &self.readonly_paths),
            readonly_root: s && self.rootfs_readonly,
            domainname: keep(s, &self.domainname),
            seccomp: keep(s, &self.seccomp),
            user_namespace: keep(d, &self.user_namespace),
        };
        let request = part(devices, settings);
        (request != part(false, false)).then_some(request)
    }
}

struct Planner<'a> {
    config: &'a Path,
    warnings: Vec<String>,
    files: Vec<FileCopy>,
    volumes: Vec<crate::vm::Volume>,
    filesystems: Vec<forkvm_agent_proto::FsMount>,
    guest_cgroup: forkvm_agent_proto::CgroupLimits,
    seccomp: Vec<String>,
    user_namespace: Option<forkvm_agent_proto::UserNamespace>,
    network: Option<NetworkPlan>,
    namespaces: MonitorNamespaces,
    devices: Vec<forkvm_agent_proto::DeviceNode>,
    root_mode: RootMode,
    /// A pod's container: the namespaces it names by path are its sandbox's, which
    /// are its VM's.
    pod_member: bool,
    /// The PID namespace of the container's main process in the guest.
    guest_pid: Option<forkvm_agent_proto::PidNamespace>,
    /// A pod's container's `pid` namespace path.
    pod_pid_path: Option<PathBuf>,
    /// A pod sandbox's size from the pod's limits.
    pod_size: PodSize,
}

impl<'a> Planner<'a> {
    fn new(config: &'a Path) -> Self {
        Self {
            config,
            warnings: Vec::new(),
            files: Vec::new(),
            volumes: Vec::new(),
            filesystems: Vec::new(),
            guest_cgroup: Default::default(),
            seccomp: Vec::new(),
            user_namespace: None,
            network: None,
            namespaces: MonitorNamespaces::default(),
            devices: Vec::new(),
            root_mode: RootMode::default(),
            pod_member: false,
            guest_pid: None,
            pod_pid_path: None,
            pod_size: PodSize::default(),
        }
    }

    fn missing(&self, field: &'static str) -> BundleError {
        BundleError::Missing {
            path: self.config.to_owned(),
            field,
        }
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> BundleError {
        BundleError::Invalid {
            path: self.config.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, field: impl Into<String>, reason: &'static str) -> BundleError {
        BundleError::Unsupported {
            path: self.config.to_owned(),
            field: field.into(),
            reason,
        }
    }

    fn check_version(&self, version: &str) -> Result<(), BundleError> {
        if version.starts_with("1.") {
            Ok(())
        } else {
            Err(BundleError::UnsupportedVersion {
                path: self.config.to_owned(),
                version: version.to_owned(),
            })
        }
    }

    fn rootfs(&self, spec: &Spec, bundle: &Path) -> Result<(PathBuf, bool), BundleError> {
        let root = spec.root().as_ref().ok_or_else(|| self.missing("root"))?;
        if root.path().as_os_str().is_empty() {
            return Err(self.missing("root.path"));
        }
        let joined = bundle.join(root.path());
        let rootfs = match joined.canonicalize() {
            Ok(path) if path.is_dir() => path,
            _ => {
                return Err(BundleError::RootfsMissing {
                    config: self.config.to_owned(),
                    rootfs: joined,
                });
            }
        };
        Ok((rootfs, root.readonly().unwrap_or(false)))
    }

    fn process(&mut self, process: Option<&Process>) -> Result<ProcessSpec, BundleError> {
        let process = process.ok_or_else(|| self.missing("process"))?;
        let args = process
            .args()
            .clone()
            .ok_or_else(|| self.missing("process.args"))?;
        if args.is_empty() || args[0].is_empty() {
            return Err(self.invalid("process.args", "must name a program"));
        }
        let cwd = process.cwd();
        if !cwd.is_absolute() {
            return Err(self.invalid(
                "process.cwd",
                format!("{} is not an absolute path", cwd.display()),
            ));
        }
        let cwd = cwd
            .to_str()
            .ok_or_else(|| self.invalid("process.cwd", "is not valid UTF-8"))?
            .to_owned();
        let oci_user = process.user();
        if oci_user.username().is_some() {
            self.warn("process.user.username is ignored (it is for Windows); uid and gid are used");
        }
        let user = User {
            uid: oci_user.uid(),
            gid: oci_user.gid(),
            additional_gids: oci_user.additional_gids().clone().unwrap_or_default(),
            name: None,
        };
        let rlimits = process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                kind: r.typ().to_string(),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect();
        let capabilities = process
            .capabilities()
            .as_ref()
            .map(|c| self.capabilities(c));
        if process
            .apparmor_profile()
            .as_deref()
            .is_some_and(|p| !p.is_empty())
        {
            self.warn("process.apparmorProfile is ignored: the VM, not an AppArmor profile, confines the container");
        }
        if process
            .selinux_label()
            .as_deref()
            .is_some_and(|l| !l.is_empty())
        {
            self.warn("process.selinuxLabel is ignored: the VM, not an SELinux label, confines the container");
        }
        Ok(ProcessSpec {
            args,
            env: process.env().clone().unwrap_or_default(),
            cwd,
            user,
            tty: process.terminal().unwrap_or(false),
            stdin: true,
            rlimits,
            init: true,
            console_size: process
                .console_size()
                .map(|b| [clamp_u16(b.height()), clamp_u16(b.width())]),
            capabilities,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            oom_score_adj: process.oom_score_adj(),
            umask: oci_user.umask(),
            // From linux.namespaces, once read.
            pid_namespace: None,
        })
    }

    /// The five sets as bit masks by capability number; a capability forkvm does not
    /// know is left out, with a warning.
    fn capabilities(&mut self, caps: &LinuxCapabilities) -> Capabilities {
        let mut unknown = Vec::new();
        let mut mask = |set: &Option<oci_spec::runtime::Capabilities>| {
            set.iter().flatten().fold(0u64, |mask, cap| {
                let name = format!("CAP_{cap}");
                match name.parse::<caps::Capability>() {
                    Ok(c) => mask | c.bitmask(),
                    Err(_) => {
                        unknown.push(name);
                        mask
                    }
                }
            })
        };
        let sets = Capabilities {
            bounding: mask(caps.bounding()),
            effective: mask(caps.effective()),
            permitted: mask(caps.permitted()),
            inheritable: mask(caps.inheritable()),
            ambient: mask(caps.ambient()),
        };
        unknown.sort();
        unknown.dedup();
        if !unknown.is_empty() {
            self.warn(format!(
                "process.capabilities: {} unknown, not granted",
                unknown.join(", ")
            ));
        }
        sets
    }

    fn mount(&mut self, mount: &Mount) -> Result<(), BundleError> {
        let destination = mount.destination();
        let fs_type = mount.typ().as_deref().unwrap_or("");
        let is_bind = fs_type == "bind"
            || mount
                .options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        let guest_mount = GUEST_MOUNTS
            .iter()
            .find(|(m, _, _)| destination == Path::new(m));
        if is_bind {
            if let Some((dest, fs_type, options)) = guest_mount {
                // containerd's CRI binds the sandbox's /dev/shm, for one.
                self.warn(format!(
                    "mount {dest}: the host's directory is not used; the guest mounts its own ({fs_type})"
                ));
                let mut options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
                if mount.options().iter().flatten().any(|o| o == "ro") {
                    options.push("ro".into());
                }
                return self.filesystem(dest, fs_type, fs_type.to_string(), options);
            }
            let source = mount.source().clone().unwrap_or_default();
            let refused = |reason| BundleError::BindMount {
                destination: destination.clone(),
                host_path: source.clone(),
                reason,
            };
            if !source.is_absolute() {
                return Err(refused("the source is not an absolute path"));
            }
            if !destination.is_absolute() {
                return Err(refused("the destination is not an absolute path"));
            }
            if source.is_dir() {
                // A VM's volume is a device of its own; a pod's container's is a
                // directory of the pod's share (bounded by the filesystems' limit).
                if !self.pod_member && self.volumes.len() == crate::vm::MAX_VOLUMES {
                    return Err(refused(
                        "a VM takes at most 11 directory volumes (one device each)",
                    ));
                }
                let target = destination
                    .to_str()
                    .ok_or_else(|| refused("the destination is not UTF-8"))?;
                let read_only = mount.options().iter().flatten().any(|o| o == "ro");
                let volume = crate::vm::Volume::new(&source, target, read_only)
                    .map_err(|_| refused("the source cannot be resolved to a directory"))?;
                // Mounted by the guest in its place among the spec's other mounts.
                let source = crate::vm::container_volume_source(self.volumes.len(), &volume);
                let options = match read_only {
                    true => vec!["ro".to_owned()],
                    false => Vec::new(),
                };
                self.filesystem(target, "virtiofs", source, options)?;
                self.volumes.push(volume);
                return Ok(());
            }
            if source.is_file() {
                self.warn(format!(
                    "mount {}: the host file {} is copied into the VM; later changes are not shared",
                    destination.display(),
                    source.display()
                ));
                if self.root_mode == RootMode::Shared {
                    // Bound by the guest in its place among the spec's other mounts.
                    let target = destination
                        .to_str()
                        .ok_or_else(|| refused("the destination is not UTF-8"))?;
                    let read_only = mount.options().iter().flatten().any(|o| o == "ro");
                    let options = match read_only {
                        true => vec!["ro".to_owned()],
                        false => Vec::new(),
                    };
                    let source = format!("{}/{}", crate::vm::FILES_TAG, self.files.len());
                    self.filesystem(target, "file", source, options)?;
                }
                self.files.push(FileCopy {
                    source,
                    destination: destination.clone(),
                });
                return Ok(());
            }
            return Err(refused(match source.exists() {
                true => {
                    "only directories (shared) and regular files (copied) can be bound into a VM"
                }
                false => "it does not exist",
            }));
        }
        if !forkvm_agent_proto::FS_TYPES.contains(&fs_type) {
            return Err(BundleError::MountType {
                destination: destination.clone(),
                fs_type: fs_type.to_owned(),
            });
        }
        let text = |p: &Path| p.to_str().map(str::to_owned);
        let (Some(target), true) = (text(destination), destination.is_absolute()) else {
            return Err(self.invalid(
                "mounts",
                format!(
                    "{}: the destination is not an absolute UTF-8 path",
                    destination.display()
                ),
            ));
        };
        let source = match mount.source() {
            Some(s) => text(s).ok_or_else(|| {
                self.invalid("mounts", format!("{target}: the source is not UTF-8"))
            })?,
            None => fs_type.to_owned(),
        };
        let options = mount.options().clone().unwrap_or_default();
        self.filesystem(&target, fs_type, source, options)
    }

    /// A filesystem the guest agent mounts, in the spec's order.
    fn filesystem(
        &mut self,
        destination: &str,
        fs_type: &str,
        source: String,
        options: Vec<String>,
    ) -> Result<(), BundleError> {
        if self.filesystems.len() == forkvm_agent_proto::MAX_FILESYSTEMS {
            return Err(self.invalid(
                "mounts",
                format!(
                    "more than {} filesystem mounts",
                    forkvm_agent_proto::MAX_FILESYSTEMS
                ),
            ));
        }
        self.filesystems.push(forkvm_agent_proto::FsMount {
            destination: destination.to_owned(),
            fs_type: fs_type.to_owned(),
            source,
            options,
        });
        Ok(())
    }

    #[allow(deprecated)] // `prestart` is deprecated in the spec, yet still honoured by runc.
    fn hooks(&mut self, hooks: &Hooks) -> Result<(HostHooks, GuestHooks), BundleError> {
        let create_container = hooks.create_container().clone().unwrap_or_default();
        let start_container = hooks.start_container().clone().unwrap_or_default();
        let host = HostHooks {
            prestart: hooks.prestart().clone().unwrap_or_default(),
            create_runtime: hooks.create_runtime().clone().unwrap_or_default(),
            poststart: hooks.poststart().clone().unwrap_or_default(),
            poststop: hooks.poststop().clone().unwrap_or_default(),
        };
        for (field, list) in [
            ("hooks.prestart", &host.prestart),
            ("hooks.createRuntime", &host.create_runtime),
            ("hooks.poststart", &host.poststart),
            ("hooks.poststop", &host.poststop),
            ("hooks.createContainer", &create_container),
            ("hooks.startContainer", &start_container),
        ] {
            for (i, hook) in list.iter().enumerate() {
                if !hook.path().is_absolute() {
                    return Err(self.invalid(
                        format!("{field}[{i}].path ({})", hook.path().display()),
                        "must be absolute",
                    ));
                }
                if hook.timeout().is_some_and(|t| t <= 0) {
                    return Err(
                        self.invalid(format!("{field}[{i}].timeout"), "must be greater than zero")
                    );
                }
            }
        }
        let mut guest = GuestHooks::default();
        for (field, list, into) in [
            (
                "hooks.createContainer",
                &create_container,
                &mut guest.create_container,
            ),
            (
                "hooks.startContainer",
                &start_container,
                &mut guest.start_container,
            ),
        ] {
            if list.len() > forkvm_agent_proto::MAX_HOOKS {
                return Err(self.invalid(
                    field,
                    format!("at most {} hooks", forkvm_agent_proto::MAX_HOOKS),
                ));
            }
            for (i, hook) in list.iter().enumerate() {
                let path = hook
                    .path()
                    .to_str()
                    .ok_or_else(|| self.invalid(format!("{field}[{i}].path"), "must be UTF-8"))?;
                into.push(forkvm_agent_proto::GuestHook {
                    path: path.to_owned(),
                    args: hook.args().clone().unwrap_or_default(),
                    env: hook.env().clone().unwrap_or_default(),
                    timeout: hook.timeout().map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
                });
            }
        }
        Ok((host, guest))
    }

    /// The limits of the container's cgroup in the guest, as cgroup v2 takes them (runc's
    /// conversion of `cpu.shares` to `cpu.weight`).
    fn guest_cgroup(
        &self,
        resources: Option<&oci_spec::runtime::LinuxResources>,
    ) -> Result<forkvm_agent_proto::CgroupLimits, BundleError> {
        let positive = |n: i64| u64::try_from(n).ok().filter(|&n| n > 0);
        let memory_max = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .and_then(positive);
        let pids_max = resources
            .and_then(|r| r.pids().as_ref())
            .and_then(|p| positive(p.limit()));
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let cpu_max = match cpu.and_then(|c| c.quota()).and_then(positive) {
            Some(quota) => {
                let period = cpu
                    .and_then(|c| c.period())
                    .unwrap_or(DEFAULT_CPU_PERIOD_US);
                if !(1_000..=1_000_000).contains(&period) {
                    return Err(self.invalid(
                        "linux.resources.cpu.period",
                        format!("{period}: outside 1000 to 1000000 µs"),
                    ));
                }
                Some((quota, period))
            }
            None => None,
        };
        let cpu_weight = cpu
            .and_then(|c| c.shares())
            .filter(|&s| s > 0)
            .map(|s| 1 + ((s.clamp(2, 262_144) - 2) * 9_999) / 262_142);
        Ok(forkvm_agent_proto::CgroupLimits {
            memory_max,
            pids_max,
            cpu_max,
            cpu_weight,
        })
    }

    /// The container's user namespace: made in the guest with the spec's id maps, whose
    /// "host" ids are the guest's. As runc: a `user` namespace needs both maps, and maps
    /// need the namespace.
    fn user_namespace(
        &self,
        linux: &Linux,
        wanted: bool,
    ) -> Result<Option<forkvm_agent_proto::UserNamespace>, BundleError> {
        let ranges = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
            maps.iter()
                .flatten()
                .map(|m| forkvm_agent_proto::IdMapping {
                    container_id: m.container_id(),
                    host_id: m.host_id(),
                    size: m.size(),
                })
                .collect::<Vec<_>>()
        };
        let (uids, gids) = (ranges(linux.uid_mappings()), ranges(linux.gid_mappings()));
        match (wanted, uids.is_empty() && gids.is_empty()) {
            (false, true) => Ok(None),
            (false, false) => Err(self.invalid(
                "linux.uidMappings/gidMappings",
                "id maps need a `user` namespace in linux.namespaces",
            )),
            (true, _) => {
                for (field, maps) in [("linux.uidMappings", &uids), ("linux.gidMappings", &gids)] {
                    if maps.is_empty() {
                        return Err(self.invalid(
                            field,
                            "a `user` namespace needs at least one range of each map",
                        ));
                    }
                    if maps.len() > forkvm_agent_proto::MAX_ID_MAPPINGS {
                        return Err(self.invalid(
                            field,
                            format!(
                                "{} ranges, at most {}",
                                maps.len(),
                                forkvm_agent_proto::MAX_ID_MAPPINGS
                            ),
                        ));
                    }
                }
                Ok(Some(forkvm_agent_proto::UserNamespace {
                    uid_mappings: uids,
                    gid_mappings: gids,
                }))
            }
        }
    }

    fn linux(&mut self, linux: &Linux) -> Result<(u8, u64, Option<CgroupSpec>), BundleError> {
        let mut kinds = Vec::new();
        let mut seen = HashSet::new();
        let mut user_namespace = false;
        for ns in linux.namespaces().iter().flatten() {
            if ns.typ() == LinuxNamespaceType::Network {
                if self.network.is_some() {
                    return Err(self.invalid(
                        "linux.namespaces[network]",
                        "a namespace type may appear only once",
                    ));
                }
                self.network = Some(match ns.path() {
                    Some(path) if !path.is_absolute() => {
                        return Err(self.invalid(
                            format!("linux.namespaces[network].path ({})", path.display()),
                            "must be absolute",
                        ))
                    }
                    Some(path) => NetworkPlan::Join(path.clone()),
                    None => NetworkPlan::New,
                });
                continue;
            }
            if ns.typ() == LinuxNamespaceType::Pid {
                // Inside the VM: a new one, or a pod's shared one (its sandbox's, which
                // containerd names by path). Another container's by path is in another
                // VM: the guest's then.
                self.guest_pid = match (ns.path(), self.pod_member) {
                    (None, _) => Some(forkvm_agent_proto::PidNamespace::New),
                    // The sandbox's, or another of the pod's containers' (`pod_pid_path`).
                    (Some(_), true) => Some(forkvm_agent_proto::PidNamespace::Sandbox),
                    (Some(_), false) => None,
                };
                if self.pod_member {
                    self.pod_pid_path = ns.path().clone();
                }
            }
            if ns.path().is_some() && self.pod_member {
                continue;
            }
            if let Some(path) = ns.path().as_ref().filter(|p| !p.is_absolute()) {
                return Err(self.invalid(
                    format!("linux.namespaces[{}].path ({})", ns.typ(), path.display()),
                    "must be absolute",
                ));
            }
            let host = match ns.path() {
                Some(path) => HostNamespace::Join(path.clone()),
                None => HostNamespace::New,
            };
            let slot = match ns.typ() {
                LinuxNamespaceType::Mount => &mut self.namespaces.mount,
                LinuxNamespaceType::Uts => &mut self.namespaces.uts,
                LinuxNamespaceType::Ipc => &mut self.namespaces.ipc,
                LinuxNamespaceType::Pid
                | LinuxNamespaceType::User
                | LinuxNamespaceType::Cgroup
                | LinuxNamespaceType::Time
                    if !seen.insert(ns.typ().to_string()) =>
                {
                    return Err(self.invalid(
                        format!("linux.namespaces[{}]", ns.typ()),
                        "a namespace type may appear only once",
                    ));
                }
                LinuxNamespaceType::Pid => {
                    if let HostNamespace::Join(path) = host {
                        self.namespaces.pid = Some(path);
                    } else if self.pod_member {
                        // A pod's container has no holder: its sandbox's VM is its own.
                        kinds.push(ns.typ().to_string());
                    } else {
                        self.namespaces.holder.pid = true;
                    }
                    continue;
                }
                LinuxNamespaceType::Cgroup if ns.path().is_none() && !self.pod_member => {
                    self.namespaces.holder.cgroup = true;
                    continue;
                }
                LinuxNamespaceType::User => {
                    if let Some(path) = ns.path() {
                        return Err(self.unsupported(
                            format!("linux.namespaces[user].path ({})", path.display()),
                            "the container's user namespace is made inside its VM, which \
                             cannot join a host one",
                        ));
                    }
                    user_namespace = true;
                    continue;
                }
                _ => {
                    if let Some(path) = ns.path() {
                        return Err(self.unsupported(
                            format!("linux.namespaces[{}].path ({})", ns.typ(), path.display()),
                            "this namespace is made inside the VM, which cannot join a host one",
                        ));
                    }
                    kinds.push(ns.typ().to_string());
                    continue;
                }
            };
            if *slot != HostNamespace::Inherit {
                return Err(self.invalid(
                    format!("linux.namespaces[{}]", ns.typ()),
                    "a namespace type may appear only once",
                ));
            }
            *slot = host;
        }
        // The monitor reads its host pid from `/proc`, which a mount namespace joined by
        // path may have replaced with one of that pid namespace's.
        if let (Some(pid), HostNamespace::Join(mount)) =
            (&self.namespaces.pid, &self.namespaces.mount)
        {
            return Err(self.unsupported(
                format!(
                    "linux.namespaces: pid ({}) and mount ({}) both by path",
                    pid.display(),
                    mount.display()
                ),
                "the container's monitor could not learn its host pid there (that mount \
                 namespace's /proc need not be the host's); join one of them only",
            ));
        }
        if !kinds.is_empty() {
            self.warn(format!(
                "linux.namespaces ({}) are made inside the VM only: the container's \
                 processes on the host stay in the runtime's",
                kinds.join(", ")
            ));
        }
        for d in linux.devices().iter().flatten() {
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => "c",
                LinuxDeviceType::B => "b",
                LinuxDeviceType::P => "p",
                LinuxDeviceType::A => {
                    return Err(self.invalid(
                        "linux.devices",
                        format!(
                            "{}: type \"a\" is for cgroup rules, not a node",
                            d.path().display()
                        ),
                    ))
                }
            };
            let path = d
                .path()
                .to_str()
                .filter(|p| p.starts_with('/'))
                .ok_or_else(|| {
                    self.invalid(
                        "linux.devices",
                        format!("{} is not an absolute UTF-8 path", d.path().display()),
                    )
                })?
                .to_owned();
            let number = |n: i64| u32::try_from(n).ok();
            let (Some(major), Some(minor)) = (number(d.major()), number(d.minor())) else {
                return Err(self.invalid(
                    "linux.devices",
                    format!(
                        "{path}: major {} minor {} out of range",
                        d.major(),
                        d.minor()
                    ),
                ));
            };
            self.devices.push(forkvm_agent_proto::DeviceNode {
                path,
                kind: kind.to_owned(),
                major,
                minor,
                mode: d.file_mode().unwrap_or(0o666) & 0o7777,
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
                host_has: host_has_device(kind, major, minor),
            });
        }
        if let Some(profile) = linux.seccomp() {
            let compiled =
                crate::seccomp::compile(profile).map_err(|e| self.invalid("linux.seccomp", e))?;
            for w in compiled.warnings {
                self.warn(w);
            }
            self.seccomp = compiled.filters;
        }
        self.user_namespace = self.user_namespace(linux, user_namespace)?;
        self.namespaces.holder.user = self.user_namespace.clone();
        let resources = linux.resources().as_ref();
        // A pod's sandbox: the larger of what the pod's limits and its own spec ask.
        let mem_mib = self.mem_mib(
            resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit()),
        );
        let mem_mib = self.pod_size.mem_mib.map_or(mem_mib, |p| p.max(mem_mib));
        let vcpus = match resources.and_then(|r| r.cpu().as_ref()) {
            Some(cpu) => self.vcpus(cpu.quota(), cpu.period(), cpu.cpus().as_deref())?,
            None => 1,
        };
        let vcpus = self.pod_size.vcpus.map_or(vcpus, |p| p.max(vcpus));
        self.guest_cgroup = self.guest_cgroup(resources)?;
        let cgroup = match linux.cgroups_path() {
            Some(path) => {
                let path = CgroupSpec::oci_path(&path.to_string_lossy())
                    .map_err(|e| self.invalid("linux.cgroupsPath", e.to_string()))?;
                let pids = resources
                    .and_then(|r| r.pids().as_ref())
                    .and_then(|p| u64::try_from(p.limit()).ok())
                    .filter(|&l| l > 0);
                Some(CgroupSpec {
                    path,
                    memory_max: Some(
                        forkvm_vmm::memory::guest_memory_budget(mem_mib << 20)
                            + forkvm_jail::cgroup::VMM_OVERHEAD,
                    ),
                    pids_max: Some(pids.unwrap_or(forkvm_jail::cgroup::DEFAULT_PIDS_MAX)),
                })
            }
            None => None,
        };
        Ok((vcpus, mem_mib, cgroup))
    }

    /// The size a pod sandbox's VM gets from the whole pod's limits, where containerd
    /// passed them ([`CRI_SANDBOX_MEMORY`], [`CRI_SANDBOX_CPU_QUOTA`] and
    /// [`CRI_SANDBOX_CPU_PERIOD`]): a value that is not a number is an error naming it.
    fn pod_size(
        &mut self,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<PodSize, BundleError> {
        let number = |key: &str| -> Result<Option<i64>, BundleError> {
            match annotations.get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
                    self.invalid(
                        format!("annotations.{key}"),
                        format!("{v:?} is not a whole number"),
                    )
                }),
            }
        };
        let memory = number(CRI_SANDBOX_MEMORY)?;
        let quota = number(CRI_SANDBOX_CPU_QUOTA)?;
        let period = number(CRI_SANDBOX_CPU_PERIOD)?;
        let mem_mib = memory
            .and_then(|b| u64::try_from(b).ok())
            .filter(|&b| b > 0)
            .map(|b| b.div_ceil(1 << 20) + POD_GUEST_MIB);
        if let Some(mib) = mem_mib.filter(|&m| m > forkvm_vmm::memory::MAX_MEM_MIB) {
            return Err(self.invalid(
                format!("annotations.{CRI_SANDBOX_MEMORY}"),
                format!(
                    "the pod's limits need a VM of {mib} MiB, more than forkvm's most ({} MiB)",
                    forkvm_vmm::memory::MAX_MEM_MIB
                ),
            ));
        }
        let vcpus = match quota.filter(|&q| q > 0) {
            Some(quota) => Some(self.vcpus(
                Some(quota),
                period.and_then(|p| u64::try_from(p).ok()),
                None,
            )?),
            None => None,
        };
        Ok(PodSize { vcpus, mem_mib })
    }

    fn mem_mib(&mut self, limit: Option<i64>) -> u64 {
        let Some(bytes) = limit.and_then(|l| u64::try_from(l).ok()).filter(|&l| l > 0) else {
            return DEFAULT_MEM_MIB;
        };
        let mib = bytes.div_ceil(1 << 20);
        if mib < MIN_MEM_MIB {
            self.warn(format!(
                "linux.resources.memory.limit ({bytes} bytes) raised to the minimum of {MIN_MEM_MIB} MiB"
            ));
            return MIN_MEM_MIB;
        }
        mib
    }

    fn vcpus(
        &mut self,
        quota: Option<i64>,
        period: Option<u64>,
        cpus: Option<&str>,
    ) -> Result<u8, BundleError> {
        let count = match quota.and_then(|q| u64::try_from(q).ok()).filter(|&q| q > 0) {
            Some(quota) => {
                let period = period.filter(|&p| p > 0).unwrap_or(DEFAULT_CPU_PERIOD_US);
                quota.div_ceil(period)
            }
            None => match cpus.filter(|c| !c.trim().is_empty()) {
                Some(set) => cpuset_count(set)
                    .map_err(|reason| self.invalid("linux.resources.cpu.cpus", reason))?,
                None => 1,
            },
        };
        match u8::try_from(count) {
            Ok(n) => Ok(n),
            Err(_) => {
                self.warn(format!(
                    "linux.resources.cpu asks for {count} CPUs; capped at {} vCPUs",
                    u8::MAX
                ));
                Ok(u8::MAX)
            }
        }
    }

    fn warn(&mut self, warning: impl Into<String>) {
        self.warnings.push(warning.into());
    }
}

/// The number of distinct CPUs in a cpuset list such as `0-3,6`.
fn cpuset_count(set: &str) -> Result<u64, String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{set:?} is not a CPU list (like 0-3,6)"))
    };
    let mut cpus = HashSet::new();
    for part in set.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (parse(first)?, parse(last)?);
                if first > last {
                    return Err(format!("{set:?}: range {first}-{last} is backwards"));
                }
                if last - first > 4096 {
                    return Err(format!("{set:?}: range {first}-{last} is too large"));
                }
                cpus.extend(first..=last);
            }
            None => {
                cpus.insert(parse(part)?);
            }
        }
    }
    Ok(cpus.len() as u64)
}

#[cfg(test)]
mod tests;
