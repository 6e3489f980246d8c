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
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux guest with its serial console on this terminal.
    Boot(BootArgs),
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
}
