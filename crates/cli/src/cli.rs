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
    /// Kernel command line (virtio devices are appended); text after ` -- ` goes to init.
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

/// A VM: its name, full ID or a unique ID prefix.
#[derive(Debug, Args)]
pub struct VmArg {
    /// Name, ID or unique ID prefix.
    pub vm: String,
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
