//! `forkvm pause`: pause a VM's vCPUs through its API.

use std::path::Path;

use anyhow::{Context, Result};

use super::vm::{find, live};
use crate::cli::VmArg;

/// Runs `forkvm pause`.
pub fn run(args: VmArg, root: &Path) -> Result<i32> {
    let home = find(root, &args.vm)?;
    let (_, client) = live(&home)?;
    client
        .pause()
        .with_context(|| format!("cannot pause VM {}", home.id()))?;
    println!("{}", home.id());
    Ok(0)
}
