//! `forkvm-bench`'s command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Measure forkvm against a reference VMM (QEMU microvm) and its own cold boots, side
/// by side on one host.
#[derive(Debug, Parser)]
#[command(name = "forkvm-bench", version = forkvm_version::VERSION)]
pub struct Cli {
    /// Log filter (e.g. `debug`); also read from RUST_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
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
    /// Guest↔host TCP throughput (iperf3) and HTTP request latency of a forkvm VM
    /// against a runc container on the same bridge, alternating.
    Net(BenchNetArgs),
    /// Sequential read/write throughput and small-file create/stat/delete on a shared
    /// host directory (virtio-fs) in a forkvm VM, against a runc container's bind mount
    /// and the VM's own root, alternating.
    Fs(BenchFsArgs),
    /// One OCI bundle run by runc and by forkvm-runtime with a shared root and with a
    /// root disk, alternating: `create`, `start` to exit, process starts and a file read
    /// inside.
    Runtime(BenchRuntimeArgs),
}

/// `forkvm bench runtime`.
#[derive(Debug, Args)]
pub struct BenchRuntimeArgs {
    /// Measured rounds per side (the order of the sides rotates round by round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// MiB of the file in the root (what a root disk copies, what the process reads).
    #[arg(long, default_value_t = 32)]
    pub mib: u32,
    /// Processes the container starts, one after another.
    #[arg(long, default_value_t = 200)]
    pub execs: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
}

/// `forkvm bench fs`.
#[derive(Debug, Args)]
pub struct BenchFsArgs {
    /// Measured rounds per side (the order of the sides rotates round by round).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// MiB written and read sequentially.
    #[arg(long, default_value_t = 64)]
    pub mib: u32,
    /// Small (empty) files created, checked and deleted.
    #[arg(long, default_value_t = 10_000)]
    pub files: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
}

/// `forkvm bench net`.
#[derive(Debug, Args)]
pub struct BenchNetArgs {
    /// Measured rounds per side (alternating which side goes first).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Seconds of each iperf3 run (one each way per round).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// HTTP GETs per side, spread over the rounds.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
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

/// Whether forked children are jailed, for `bench fork --jail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JailMode {
    /// Jailed, as forkvm runs VMs.
    On,
    /// Not jailed (`--no-jail`).
    Off,
}

/// What `bench fork` takes as a child's T2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum T2Mode {
    /// Its guest agent confirmed its own identity (the time the child records in its
    /// home): nothing else connects to the child, so its memory is an idle child's.
    Identity,
    /// Its guest agent first answers a ping over vsock with the child's hostname (a
    /// connection, which costs the child's guest memory of its own).
    Ping,
}

/// `forkvm bench fork`.
#[derive(Debug, Args)]
pub struct BenchForkArgs {
    /// Children per fork, comma-separated: one measured series per count (the largest
    /// count is the limit on how many children run at once).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub children: Vec<u32>,
    /// Fork pool sizes, comma-separated: the parent keeps this many warm processes ready
    /// (0: none, every child starts from scratch). One parent and one series per size.
    #[arg(long, value_delimiter = ',', default_value = "0,10")]
    pub pool: Vec<u32>,
    /// Jail settings, comma-separated: one parent and one series per setting and pool
    /// size, its children jailed (`on`: seccomp, capabilities, cgroup) or not (`off`).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    pub jail: Vec<JailMode>,
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
    /// Kernel command line before the idle command (default: forkvm's default), e.g.
    /// to measure what a parameter does to the children's memory.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// How long the children idle, after all answered, before their memory is read (ms).
    #[arg(long, default_value_t = 2000)]
    pub idle_ms: u64,
    /// What a child's T2 is: its identity confirmed, or its agent answering a ping.
    #[arg(long, value_enum, default_value_t = T2Mode::Identity)]
    pub t2: T2Mode,
    /// Pause between one child's agent pings while waiting for its answer (us).
    #[arg(long, default_value_t = 1000)]
    pub poll_us: u64,
    /// Limit in seconds for the parent or a cold boot to answer, and for a round's
    /// children to answer.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Also count the first child of each fork's copied guest pages by what its guest
    /// uses them for (its `/proc/kpageflags`, read through its agent after its memory).
    #[arg(long)]
    pub page_types: bool,
    /// Write the parent's and every fork child's console here (`parent.log`,
    /// `fork<N>-<child>.log`; in the virtual host, export the directory with `--rw`).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Also draw T1 and T2 against the number of children, one line per pool size, into
    /// this SVG file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
}
