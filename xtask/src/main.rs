//! `cargo xtask`: project automation entry points (`test`, `testhost`, `caps`,
//! `prepare-guest`, `prepare-conformance`, `install`).

mod conformance;
mod suite;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forkvm_testhost::{run_in_kvm_host, Capabilities, HostChoice, TestHostOptions};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "forkvm project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole test suite: the host tests as `cargo test` runs them, then the
    /// end-to-end tests (`*_e2e` targets), one process per test, as many at once as
    /// there are virtual-host slots. Ends with a table of the end-to-end tests.
    Test {
        /// Only these test targets (e.g. `fork_e2e vsock_e2e`); without, all of them,
        /// unit and doc tests included.
        targets: Vec<String>,
    },
    /// Run a command where hardware KVM exists: directly, or in the virtual KVM host
    /// (QEMU/TCG with nested SVM). Exits with the command's exit code.
    #[command(alias = "vhost")]
    Testhost {
        /// Timeout in seconds (boot included).
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Virtual host memory in MiB.
        #[arg(long, default_value_t = 4096)]
        mem: u32,
        /// Virtual host vCPUs (more than one is less reliable: see forkvm_testhost::DEFAULT_SMP).
        #[arg(long, default_value_t = forkvm_testhost::DEFAULT_SMP)]
        smp: u32,
        /// Always use the virtual host, even with hardware KVM.
        #[arg(long)]
        force: bool,
        /// Host directory the command may write to (repeatable; `/` is read-only otherwise).
        #[arg(long = "rw", value_name = "DIR")]
        writable: Vec<PathBuf>,
        /// Extra environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
        envs: Vec<(String, String)>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Print what this machine offers for running KVM guests.
    Caps,
    /// Fetch the default guest kernel and build its initramfs into the cache (the cache
    /// is read-only inside the virtual host, so do this before entering it).
    PrepareGuest,
    /// Build the OCI runtime-tools validation suite vendored in third_party/runtime-tools
    /// into the target directory (once), for the conformance test.
    PrepareConformance,
    /// Build forkvm (release) and install it like runc: the programs in PREFIX/bin, the
    /// guest agent in PREFIX/lib/forkvm, PREFIX/etc/forkvm/forkvm.toml (an existing one
    /// is kept); then prepare the guest kernel and initramfs in the configured cache.
    Install {
        /// The installation prefix.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// The VM state root to configure (default: /run/forkvm for root).
        #[arg(long)]
        root: Option<PathBuf>,
        /// The image store to configure (default: /var/lib/forkvm/images for root).
        #[arg(long)]
        store: Option<PathBuf>,
        /// The guest kernel and initramfs cache to configure and fill (default:
        /// /var/lib/forkvm/cache when installing as root).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

/// Builds the installed programs (release) and returns the directory they are in.
fn build_programs() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--release", "--locked"]);
    for p in [
        "forkvm",
        "forkvm-oci",
        "forkvm-shim",
        "forkvm-vm-process",
        "forkvm-bench",
    ] {
        cmd.args(["--package", p]);
    }
    let status = cmd.status().context("running cargo to build forkvm")?;
    anyhow::ensure!(status.success(), "building forkvm failed ({status})");
    Ok(target_dir()?.join("release"))
}

/// The workspace's root directory.
fn workspace_root() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf())
}

/// The workspace's target directory.
fn target_dir() -> anyhow::Result<PathBuf> {
    let root = workspace_root()?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target")))
}

/// The guest agent's target: static, so it runs in any guest.
const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the guest agent (static, release) and returns its path.
fn build_agent() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--package",
            "forkvm-agent",
            "--target",
            AGENT_TARGET,
        ])
        .status()
        .context("running cargo to build the guest agent")?;
    anyhow::ensure!(
        status.success(),
        "building the guest agent failed ({status})"
    );
    let agent = target_dir()?
        .join(AGENT_TARGET)
        .join("release")
        .join("forkvm-agent");
    anyhow::ensure!(
        agent.is_file(),
        "the guest agent was built but {} is missing",
        agent.display()
    );
    Ok(agent)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Test { targets } => Ok(
            if suite::run(&workspace_root()?, &target_dir()?, &targets)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            },
        ),
        Cmd::Caps => {
            println!("{}", Capabilities::detect());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PrepareGuest => {
            let agent = build_agent()?;
            let guest = forkvm_guest_kernel::default_guest_with(Some(&agent))
                .context("preparing the default guest kernel and initramfs")?;
            let container = forkvm_guest_kernel::container_guest(&agent)
                .context("preparing the container guest initramfs")?;
            println!("agent:  {}", agent.display());
            println!("kernel: {}", guest.kernel.display());
            println!("initrd: {}", guest.initrd.display());
            println!("container initrd: {}", container.initrd.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PrepareConformance => {
            let suite = conformance::prepare(&workspace_root()?, &target_dir()?)
                .context("building the OCI runtime-tools validation suite")?;
            println!("suite: {}", suite.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Install {
            prefix,
            root,
            store,
            cache,
        } => {
            let prefix = std::path::absolute(&prefix)?;
            let is_root = std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
                .unwrap_or(false);
            let cache = cache.or_else(|| is_root.then(|| PathBuf::from("/var/lib/forkvm/cache")));
            let bin = build_programs()?;
            let agent = build_agent()?;
            let config = forkvm_config::Config {
                root,
                store,
                cache: cache.clone(),
                agent: None,
                template_key: None,
            };
            let installed = forkvm_config::install::install(&bin, &agent, &prefix, &config)
                .with_context(|| format!("installing into {}", prefix.display()))?;
            for p in forkvm_config::install::PROGRAMS {
                println!("installed {}", installed.program(p).display());
            }
            println!(
                "installed {}",
                prefix.join(forkvm_config::install::AGENT).display()
            );
            let (used, _) =
                forkvm_config::Config::read_first(std::slice::from_ref(&installed.config))
                    .with_context(|| format!("reading {}", installed.config.display()))?;
            println!(
                "{} {}",
                if installed.config_written {
                    "wrote"
                } else {
                    "kept"
                },
                installed.config.display()
            );
            // The guests go where the installed programs will look for them.
            if let Some(c) = &used.cache {
                std::fs::create_dir_all(c).with_context(|| format!("creating {}", c.display()))?;
                std::env::set_var("FORKVM_CACHE", c);
            }
            let agent = used.agent.unwrap_or(agent);
            forkvm_guest_kernel::default_guest_with(Some(&agent))
                .context("preparing the default guest kernel and initramfs")?;
            let container = forkvm_guest_kernel::container_guest(&agent)
                .context("preparing the container guest initramfs")?;
            println!(
                "prepared the guests in {}",
                container
                    .initrd
                    .parent()
                    .map_or_else(String::new, |p| p.display().to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Testhost {
            timeout,
            mem,
            smp,
            force,
            writable,
            envs,
            command,
        } => {
            let opts = TestHostOptions {
                timeout: Duration::from_secs(timeout),
                mem_mib: mem,
                smp,
                envs,
                stream: true,
                host: if force {
                    HostChoice::Virtual
                } else {
                    HostChoice::Auto
                },
                writable,
                ..TestHostOptions::default()
            };
            let out = run_in_kvm_host(&command, &opts)
                .with_context(|| format!("running {command:?} in the KVM host"))?;
            eprintln!(
                "xtask testhost: exit code {} ({:?} mode, {:.1?}); log: {}",
                out.exit_code,
                out.mode,
                out.wall,
                out.log_path.display()
            );
            Ok(ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1)))
        }
    }
}
