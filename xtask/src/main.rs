//! `cargo xtask`: project automation entry points (`vhost`, `caps`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forkvm_vhost::{run_in_kvm_host, Capabilities, HostChoice, VhostOptions};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "forkvm project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command where hardware KVM exists: directly, or in the virtual KVM host
    /// (QEMU/TCG with nested SVM). Exits with the command's exit code.
    Vhost {
        /// Timeout in seconds (boot included).
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Virtual host memory in MiB.
        #[arg(long, default_value_t = 4096)]
        mem: u32,
        /// Virtual host vCPUs (more than one is less reliable: see forkvm_vhost::DEFAULT_SMP).
        #[arg(long, default_value_t = forkvm_vhost::DEFAULT_SMP)]
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
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let agent = target
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
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
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
        Cmd::Vhost {
            timeout,
            mem,
            smp,
            force,
            writable,
            envs,
            command,
        } => {
            let opts = VhostOptions {
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
                ..VhostOptions::default()
            };
            let out = run_in_kvm_host(&command, &opts)
                .with_context(|| format!("running {command:?} in the KVM host"))?;
            eprintln!(
                "xtask vhost: exit code {} ({:?} mode, {:.1?}); log: {}",
                out.exit_code,
                out.mode,
                out.wall,
                out.log_path.display()
            );
            Ok(ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1)))
        }
    }
}
