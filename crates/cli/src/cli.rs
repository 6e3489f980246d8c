//! Command-line syntax: clap structs only; behaviour lives in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// forkvm: virtual machines that feel like containers and fork like processes.
#[derive(Debug, Parser)]
#[command(name = "forkvm", version = forkvm_version::VERSION, about)]
pub struct Cli {
    /// Log filter (e.g. `debug`, `forkvm_vmm=trace`); also read from RUST_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// Where VM state lives (default: $FORKVM_ROOT, else /run/forkvm as root, else
    /// $XDG_RUNTIME_DIR/forkvm or /tmp/forkvm-UID).
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command from an OCI image in a new VM, like `podman run`.
    Run(RunArgs),
    /// List the images in the image store.
    Images(ImagesArgs),
    /// Remove images from the image store.
    Rmi(RmiArgs),
    /// Pull an image from a registry into the image store.
    Pull(PullArgs),
    /// Import images from an OCI layout directory, an OCI archive or a `docker save`
    /// archive.
    Load(LoadArgs),
    /// Boot a Linux guest with its serial console on this terminal.
    Boot(BootArgs),
    /// List VMs (running, paused, exited and dead).
    Ps(PsArgs),
    /// Show everything about a VM as JSON.
    Inspect(VmArg),
    /// Print a VM's console output.
    Logs(LogsArgs),
    /// Pause a VM's vCPUs.
    Pause(VmArg),
    /// Resume a paused VM.
    Resume(VmArg),
    /// Stop a VM: ask its VMM to stop, kill it after a timeout.
    Stop(StopArgs),
    /// Remove stopped or dead VMs' state.
    Rm(RmArgs),
    /// Fork a running VM into children that resume from its exact state.
    Fork(ForkArgs),
    /// Save a VM as a template directory, and fork children from one (after a restart).
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Measure forkvm against a reference VMM (QEMU microvm), side by side.
    Bench(BenchArgs),
}

/// The jail a VM process started by a command is put in.
pub fn jail(no_jail: bool) -> forkvm_jail::JailSpec {
    if no_jail {
        forkvm_jail::JailSpec::disabled()
    } else {
        forkvm_jail::JailSpec::default()
    }
}

/// `forkvm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel (bzImage or ELF vmlinux). Default: Debian's cloud kernel, fetched
    /// into the cache, with forkvm's default initramfs.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs. Default: forkvm's busybox initramfs when the kernel is the default one.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A raw disk image, `FILE[,ro]`; repeat for more disks (vda, vdb, ...).
    #[arg(long = "disk", value_name = "FILE[,ro]")]
    pub disks: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Kernel command line (devices are announced through ACPI); text after ` -- ` goes
    /// to init.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// A virtio-net card on a TAP device: `tap=NAME[,mac=52:54:00:12:34:56]`; with
    /// `bridge=BR` the TAP is put on that host bridge and brought up.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,bridge=BR]")]
    pub nets: Vec<String>,
    /// The virtio-vsock device: `cid=N[,uds=PATH]`.
    #[arg(long, value_name = "cid=N[,uds=PATH]")]
    pub vsock: Option<String>,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    pub no_rng: bool,
    /// Warm VM processes to keep ready for this VM's forks (each an idle `forkvm-vmm`
    /// with an empty KVM VM: a few MiB); 0 keeps none and each fork starts its children
    /// from scratch.
    #[arg(long, value_name = "N", default_value_t = forkvm_vmm::pool::DEFAULT_FORK_POOL,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(forkvm_vmm::pool::MAX_FORK_POOL)))]
    pub fork_pool: u32,
    /// Run in the background: print the VM's ID once its API answers.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// A name for the VM, usable wherever an ID is.
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the VM's state when it stops.
    #[arg(long)]
    pub rm: bool,
    /// Run the VM process without its jail (seccomp filters, dropped capabilities, its
    /// own cgroup; see docs/security.md): for debugging only.
    #[arg(long)]
    pub no_jail: bool,
}

/// `forkvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remove the VM's state when it stops.
    #[arg(long)]
    pub rm: bool,
    /// Run the VM process without its jail (seccomp filters, dropped capabilities, its
    /// own cgroup; see docs/security.md): for debugging only.
    #[arg(long)]
    pub no_jail: bool,
    /// Keep stdin open and pass it to the container's process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal (the guest's pty, this terminal in raw mode).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (`K=V`, or `K` to pass this process's value).
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// vCPUs; a fraction rounds up (`--cpus 1.5` gives 2).
    #[arg(long, default_value = "1")]
    pub cpus: String,
    /// Guest memory, with a unit: `512m`, `1g` (b, k, m, g).
    #[arg(short, long, default_value = "512m")]
    pub memory: String,
    /// A name for the VM, usable wherever an ID is.
    #[arg(long)]
    pub name: Option<String>,
    /// The guest's hostname (default: the VM's short ID).
    #[arg(long, short = 'H')]
    pub hostname: Option<String>,
    /// Run as this user: `NAME`, `UID` or `UID:GID` (default: the image's user).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Working directory (default: the image's).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Replace the image's entrypoint (an empty string clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// The network: `bridge` (forkvm's own, with NAT to the outside and the host's
    /// nameservers; the default as root, which it takes) or `none` (only the loopback;
    /// the default otherwise).
    #[arg(long)]
    pub network: Option<String>,
    /// Publish a guest TCP port on the host: `[IP:]HOST_PORT:CONTAINER_PORT[/tcp]`.
    #[arg(short, long = "publish", value_name = "[IP:]HOST:CONTAINER")]
    pub publish: Vec<String>,
    /// Share a host directory with the container: `HOST_DIR:CONTAINER_DIR[:ro|:rw]`
    /// (virtio-fs; changes show both ways; `ro` refuses writes on the host too).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volumes: Vec<String>,
    /// Image: a name from `forkvm images`, or an ID (prefix).
    pub image: String,
    /// Command and arguments (default: the image's Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `forkvm images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Print only image IDs.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print full IDs.
    #[arg(long)]
    pub no_trunc: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PsFormat::Table)]
    pub format: PsFormat,
}

/// `forkvm rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Image names or IDs.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `forkvm pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Reference: `[REGISTRY/]NAME[:TAG|@DIGEST]`.
    pub reference: String,
    /// Speak plain HTTP to the registry (loopback registries always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Print nothing but the image ID.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `forkvm load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The OCI layout directory, OCI archive or `docker save` archive.
    #[arg(short, long, value_name = "PATH")]
    pub input: PathBuf,
    /// Name the image (when the source holds exactly one).
    #[arg(long)]
    pub tag: Option<String>,
    /// Print nothing but the image IDs.
    #[arg(short, long)]
    pub quiet: bool,
}

/// A VM: its name, full ID or a unique ID prefix.
#[derive(Debug, Args)]
pub struct VmArg {
    /// Name, ID or unique ID prefix.
    pub vm: String,
}

/// `forkvm fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Name, ID or unique ID prefix of the VM to fork, or the id of a running container
    /// of forkvm-runtime (its children become containers too).
    pub vm: String,
    /// Number of children.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u32,
    /// Leave the parent paused afterwards: it becomes a template to fork again.
    #[arg(long)]
    pub freeze: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// forkvm-runtime's state root, where containers are looked up (its `--root`).
    #[arg(long, default_value = forkvm_oci::state::DEFAULT_ROOT)]
    pub runtime_root: PathBuf,
}

/// `forkvm template ...`.
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Save a running VM's memory and complete state into DIR; the VM runs on.
    Save {
        /// Name, ID or unique ID prefix of the VM.
        vm: String,
        /// Template directory (created if needed).
        dir: PathBuf,
        /// Save a VM forkvm has no launch record of (a child of a fork asked for
        /// through the API, a VM another program started) with the configuration its
        /// VM process reports. That process may have been taken over by its guest:
        /// the template's children would open the disks and shares it names.
        #[arg(long)]
        trust_vm_config: bool,
    },
    /// Start children from a template directory, in new VMM processes.
    Fork {
        /// Template directory written by `forkvm template save`.
        dir: PathBuf,
        /// Number of children.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Output format of `forkvm ps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PsFormat {
    /// A table.
    Table,
    /// A JSON array.
    Json,
}

/// `forkvm ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = PsFormat::Table)]
    pub format: PsFormat,
    /// Print full IDs.
    #[arg(long)]
    pub no_trunc: bool,
    /// Print only IDs.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `forkvm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Name, ID or unique ID prefix.
    pub vm: String,
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    pub follow: bool,
}

/// `forkvm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Names, IDs or unique ID prefixes.
    #[arg(required = true)]
    pub vms: Vec<String>,
    /// Seconds to wait for the VMM to stop before killing it.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
}

/// `forkvm rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Names, IDs or unique ID prefixes.
    #[arg(required = true)]
    pub vms: Vec<String>,
    /// Stop (kill) running VMs first.
    #[arg(short, long)]
    pub force: bool,
}

/// `forkvm bench`: the benchmarks, run by `forkvm-bench` (a separate program).
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Arguments for `forkvm-bench` (`boot ...`, `fork ...`, `--help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}
