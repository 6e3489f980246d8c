//! `forkvm-bench`: forkvm's benchmarks, a program of their own so the product binaries
//! carry no benchmark code; `forkvm bench ARGS` runs `forkvm-bench ARGS`. Each prints a
//! table (or JSON) comparing forkvm with a reference measured in the same run.

mod bench;
mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    forkvm_config::logging::init_stderr(cli.log.as_deref());
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
