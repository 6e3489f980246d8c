//! `forkvm __fork-child`: the process a fork child's VM runs in (internal verb).

use anyhow::{bail, Context, Result};
use forkvm_vmm::ExitReason;

/// Restores the VM the parent sent on fd 3 and runs it; returns the exit code.
pub fn run() -> Result<i32> {
    let reason = forkvm_vmm::fork::run_fork_child().context("fork child failed")?;
    match reason {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(0),
        ExitReason::Failed(why) => bail!("the forked guest stopped abnormally: {why}"),
    }
}
