//! `forkvm bench ...`: runs `forkvm-bench ...`, the benchmarks' own program (kept out
//! of this binary), in this process's place.

use std::os::unix::process::CommandExt;

use anyhow::{Context, Result};

use crate::cli::BenchArgs;

/// Replaces this process with `forkvm-bench ARGS`; returns only if that fails.
pub fn run(args: BenchArgs) -> Result<i32> {
    let bench = forkvm_config::find_program("forkvm-bench")
        .context("the benchmarks are a separate program")?;
    let err = std::process::Command::new(&bench).args(&args.args).exec();
    Err(err).with_context(|| format!("cannot run {}", bench.display()))
}
