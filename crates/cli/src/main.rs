//! The `forkvm` binary: parses the command line and hands each verb to its module.

mod cli;
mod commands;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let filter = cli.log.as_deref().map(EnvFilter::new).unwrap_or_else(|| {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let root = cli.root.clone().unwrap_or_else(forkvm_api::default_root);
    let result = match cli.command {
        Command::Boot(args) => commands::boot::run(args, &root),
        Command::Ps(args) => commands::ps::run(args, &root),
        Command::Inspect(args) => commands::inspect::run(args, &root),
        Command::Logs(args) => commands::logs::run(args, &root),
        Command::Pause(args) => commands::pause::run(args, &root),
        Command::Resume(args) => commands::resume::run(args, &root),
        Command::Stop(args) => commands::stop::run(args, &root),
        Command::Rm(args) => commands::rm::run(args, &root),
        Command::Fork(args) => commands::fork::run(args, &root),
        Command::Bench(args) => commands::bench::run(args),
        Command::ForkChild => commands::fork_child::run(),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("forkvm: {e:#}");
            std::process::exit(1);
        }
    }
}
