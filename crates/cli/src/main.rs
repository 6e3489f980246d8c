//! The `forkvm` binary: parses the command line and hands each verb to its module.

mod cli;
mod commands;

use clap::Parser;

use cli::{Cli, Command};

/// Parses the command line. Help and version print as usual; a usage error becomes the
/// same one-line `forkvm: ...` error as every other failure, with exit status 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("forkvm: {}", usage_error_line(&e.to_string()));
            std::process::exit(2);
        }
    }
}

/// The first line of clap's error message, without its `error: ` prefix.
fn usage_error_line(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("invalid command line");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

fn main() {
    let cli = parse();
    forkvm_config::logging::init_stderr(cli.log.as_deref());
    if let Err(e) = forkvm_config::load() {
        eprintln!("forkvm: {e}");
        std::process::exit(2);
    }
    let root = cli
        .root
        .clone()
        .unwrap_or_else(forkvm_registry::default_root);
    // `run` reserves its exit codes for the container's process; its own failures use
    // 125, as `podman run` and `docker run` do.
    let failure_code = match cli.command {
        Command::Run(_) => commands::run::EXIT_RUNTIME_ERROR,
        _ => 1,
    };
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args, &root),
        Command::Images(args) => commands::images::list(args),
        Command::Rmi(args) => commands::images::remove(args),
        Command::Pull(args) => commands::images::pull(args),
        Command::Load(args) => commands::images::load(args),
        Command::Boot(args) => commands::boot::run(args, &root),
        Command::Ps(args) => commands::ps::run(args, &root),
        Command::Inspect(args) => commands::inspect::run(args, &root),
        Command::Logs(args) => commands::logs::run(args, &root),
        Command::Pause(args) => commands::pause::run(args, &root),
        Command::Resume(args) => commands::resume::run(args, &root),
        Command::Stop(args) => commands::stop::run(args, &root),
        Command::Rm(args) => commands::rm::run(args, &root),
        Command::Fork(args) => commands::fork::run(args, &root),
        Command::Template(cmd) => commands::template::run(cmd, &root),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("forkvm: {e:#}");
            std::process::exit(failure_code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_become_one_line() {
        let e = Cli::try_parse_from(["forkvm", "boot", "--frobnicate"]).unwrap_err();
        let line = usage_error_line(&e.to_string());
        assert!(line.contains("--frobnicate"), "{line}");
        assert!(!line.contains('\n') && !line.starts_with("error"), "{line}");
        let e = Cli::try_parse_from(["forkvm", "boot", "--vcpus", "300"]).unwrap_err();
        assert!(usage_error_line(&e.to_string()).contains("300"));
    }
}
