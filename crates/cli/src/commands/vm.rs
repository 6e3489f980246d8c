//! What the VM-management verbs share: finding a VM, reaching its API, stopping it.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use forkvm_api::Client;
use forkvm_registry::{Ending, ExitRecord, Status, VmHome, VmState};

/// Finds a VM by name, ID or unique ID prefix.
pub fn find(root: &Path, query: &str) -> Result<VmHome> {
    forkvm_registry::resolve(root, query)
        .map_err(|e| anyhow::anyhow!("{e} (under {})", root.display()))
}

/// Does `action` to each VM `queries` names, printing the ID of each one done and a
/// `forkvm: QUERY: why` line for each that failed; exit code 1 if any failed.
pub fn each(root: &Path, queries: &[String], action: impl Fn(&VmHome) -> Result<()>) -> i32 {
    let mut code = 0;
    for q in queries {
        match find(root, q).and_then(|home| action(&home).map(|()| home)) {
            Ok(home) => println!("{}", home.id()),
            Err(e) => {
                eprintln!("forkvm: {q}: {e:#}");
                code = 1;
            }
        }
    }
    code
}

/// The first 12 digits of an ID, as tables show it.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The VM's state and a client of its API; an error when it is not running.
pub fn live(home: &VmHome) -> Result<(VmState, Client)> {
    let state = home.state()?;
    if !state.is_alive() {
        bail!(
            "VM {} is not running ({})",
            short(home.id()),
            state.observe()
        );
    }
    Ok((state, Client::new(home.socket_path())))
}

fn wait_gone(state: &VmState, limit: Duration) -> bool {
    forkvm_registry::liveness::wait_gone(limit, || state.is_alive())
}

/// Asks the VMM to stop, kills it when it has not stopped within `timeout`, and makes
/// sure the exit is recorded. Returns false when it was not running.
pub fn stop(home: &VmHome, timeout: Duration) -> Result<bool> {
    let state = home.state()?;
    if !state.is_alive() {
        return Ok(false);
    }
    let process = state.process.context("a live VM has a process")?;
    let client = Client::new(home.socket_path()).with_timeout(Duration::from_secs(5));
    if let Err(e) = client.shutdown() {
        tracing::warn!(error = %e, "the VM did not take the shutdown request; killing it");
    } else if wait_gone(&state, timeout) {
        return Ok(true);
    }
    if process.signal(libc::SIGKILL) && !wait_gone(&state, Duration::from_secs(5)) {
        bail!(
            "VM {} (pid {}) survived SIGKILL",
            short(home.id()),
            process.pid
        );
    }
    if home.state()?.status != Status::Exited {
        home.record_exit(ExitRecord::new(128 + libc::SIGKILL, Ending::Killed))?;
    }
    Ok(true)
}
