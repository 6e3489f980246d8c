//! `forkvm resume`: resume a paused VM through its API.

use std::path::Path;

use anyhow::{Context, Result};

use super::vm::{find, live};
use crate::cli::VmArg;

/// Runs `forkvm resume`.
pub fn run(args: VmArg, root: &Path) -> Result<i32> {
    let home = find(root, &args.vm)?;
    let (_, client) = live(&home)?;
    client
        .resume()
        .with_context(|| format!("cannot resume VM {}", home.id()))?;
    println!("{}", home.id());
    Ok(0)
}
