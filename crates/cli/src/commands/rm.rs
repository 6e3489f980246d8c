//! `forkvm rm [-f]`: remove VMs' state directories; running VMs only with `-f`
//! (stopped first).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::vm::{each, short, stop};
use crate::cli::RmArgs;

/// Runs `forkvm rm`; removes every VM it can, fails if any could not be removed.
pub fn run(args: RmArgs, root: &Path) -> Result<i32> {
    Ok(each(root, &args.vms, |home| {
        match home.state() {
            Ok(s) if s.is_alive() => {
                if !args.force {
                    bail!(
                        "VM {} is {}; stop it first or use rm -f",
                        short(home.id()),
                        s.observe()
                    );
                }
                stop(home, Duration::from_secs(2))?;
            }
            Ok(_) => {}
            Err(e) if !args.force => bail!("{e}; use rm -f to remove it anyway"),
            Err(_) => {}
        }
        home.remove()?;
        Ok(())
    }))
}
