//! `forkvm logs [-f]`: the guest's console output, from the VM's API while it runs and
//! from its console log afterwards.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::vm::find;
use crate::cli::LogsArgs;

/// Runs `forkvm logs`.
pub fn run(args: LogsArgs, root: &Path) -> Result<i32> {
    let home = find(root, &args.vm)?;
    let state = home.state()?;
    let mut out = std::io::stdout().lock();
    if state.is_alive() {
        let client = forkvm_api::Client::new(home.socket_path());
        let mut written = 0usize;
        let streamed = client.console(args.follow, |d| {
            written += d.len();
            out.write_all(d)?;
            out.flush()
        });
        match streamed {
            Ok(()) => return Ok(0),
            // It stopped before answering: the log file has it all.
            Err(e) if written == 0 => tracing::debug!(error = %e, "reading the log file instead"),
            Err(e) => return Err(e).context("the console stream broke"),
        }
    }
    let path = home.console_path();
    match std::fs::read(&path) {
        Ok(bytes) => out.write_all(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    out.flush()?;
    Ok(0)
}
