//! `forkvm stop [-t SECONDS]`: shut VMs down through their API, kill them after the
//! timeout.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::vm::{find, short, stop};
use crate::cli::StopArgs;

/// Runs `forkvm stop`; stops every VM it can, fails if any could not be stopped.
pub fn run(args: StopArgs, root: &Path) -> Result<i32> {
    let mut code = 0;
    for q in &args.vms {
        let result = find(root, q).and_then(|home| {
            if !stop(&home, Duration::from_secs(args.time))? {
                eprintln!("forkvm: VM {} was not running", short(home.id()));
            }
            Ok(home)
        });
        match result {
            Ok(home) => println!("{}", home.id()),
            Err(e) => {
                eprintln!("forkvm: {q}: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}
