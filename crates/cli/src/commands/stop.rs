//! `forkvm stop [-t SECONDS]`: shut VMs down through their API, kill them after the
//! timeout.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::vm::{each, short, stop};
use crate::cli::StopArgs;

/// Runs `forkvm stop`; stops every VM it can, fails if any could not be stopped.
pub fn run(args: StopArgs, root: &Path) -> Result<i32> {
    Ok(each(root, &args.vms, |home| {
        if !stop(home, Duration::from_secs(args.time))? {
            eprintln!("forkvm: VM {} was not running", short(home.id()));
        }
        Ok(())
    }))
}
