//! `forkvm-bench`: forkvm's benchmarks, a program of their own so the product binaries
//! carry no benchmark code; `forkvm bench ARGS` runs `forkvm-bench ARGS`. Each prints a
//! table (or JSON) comparing forkvm with a reference measured in the same run.

mod bench;
mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let filter = cli
        .log
        .as_deref()
        .map(tracing_subscriber::EnvFilter::new)
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = forkvm_config::load() {
        eprintln!("forkvm-bench: {e}");
        std::process::exit(2);
    }
    match bench::run(cli.what) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("forkvm-bench: {e:#}");
            std::process::exit(1);
        }
    }
}
