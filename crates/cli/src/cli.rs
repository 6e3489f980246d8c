//! Command-line syntax: clap structs only; behaviour lives in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// forkvm: virtual machines that feel like containers and fork like processes.
#[derive(Debug, Parser)]
#[command(name = "forkvm", version, about)]
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
    /// Internal: run a fork child (started by a forking VMM with its socket on fd 3).
    #[command(name = "__fork-child", hide = true)]
    ForkChild,
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
    /// A virtio-net card on a TAP device: `tap=NAME[,mac=52:54:00:12:34:56]`.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<String>,
    /// The virtio-vsock device: `cid=N[,uds=PATH]`.
    #[arg(long, value_name = "cid=N[,uds=PATH]")]
    pub vsock: Option<String>,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    pub no_rng: bool,
    /// Run in the background: print the VM's ID once its API answers.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// A name for the VM, usable wherever an ID is.
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the VM's state when it stops.
    #[arg(long)]
    pub rm: bool,
}

/// `forkvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remove the VM's state when it stops.
    #[arg(long)]
    pub rm: bool,
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

/// `forkvm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot the same guest with forkvm and QEMU microvm, alternating, and compare
    /// boot-to-init time, time to exit and VMM memory.
    Boot(BenchBootArgs),
    /// Fork a running guest into children and measure time to running, time to the
    /// guest agent answering, the parent's pause and each idle child's private memory,
    /// beside a cold boot of the same guest.
    Fork(BenchForkArgs),
}

/// Output format of `forkvm bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    /// A human-readable table.
    Table,
    /// One JSON document with the environment, every sample and the summaries.
    Json,
}

/// `forkvm bench boot`.
#[derive(Debug, Args)]
pub struct BenchBootArgs {
    /// Measured runs per VMM (after the warm-up runs).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Unmeasured warm-up runs per VMM (page cache, CPU frequency).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Guest kernel (bzImage). Default: forkvm's default guest kernel.
    #[arg(long, requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs whose init prints the ready marker and powers off. Default: forkvm's
    /// busybox initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for both VMMs (the same `console=ttyS0 ...` for both;
    /// ` -- true` is appended when it has no ` -- `).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Leave out the virtio-rng device (in both VMMs).
    #[arg(long)]
    pub no_rng: bool,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Per-run limit in seconds, from spawn to exit.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Re-run a boot that failed or timed out up to this many times (each retry is
    /// listed in the report); 0 stops at the first failure.
    #[arg(long, default_value_t = 0)]
    pub retries: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
    /// Save each run's console here as `<vmm>-<run>.log`, every line prefixed with the
    /// host time since spawn (in the virtual host, export the directory with `--rw`).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
}

/// `forkvm bench fork`.
#[derive(Debug, Args)]
pub struct BenchForkArgs {
    /// Children per fork, comma-separated: one measured series per count (the largest
    /// count is the limit on how many children run at once).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub children: Vec<u32>,
    /// Measured forks per count; counts above 10 get fewer (about `rounds x 10`
    /// children per count, at least one fork).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Unmeasured warm-up forks of one child before the measured ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Cold boots of the same guest to compare with (0: none).
    #[arg(long, default_value_t = 5)]
    pub cold_runs: usize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// How long the children idle, after all answered, before their memory is read (ms).
    #[arg(long, default_value_t = 2000)]
    pub idle_ms: u64,
    /// Pause between one child's agent pings while waiting for its answer (us).
    #[arg(long, default_value_t = 1000)]
    pub poll_us: u64,
    /// Limit in seconds for the parent or a cold boot to answer, and for a round's
    /// children to answer.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Write the parent's and every fork child's console here (`parent.log`,
    /// `fork<N>-<child>.log`; in the virtual host, export the directory with `--rw`).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
}
