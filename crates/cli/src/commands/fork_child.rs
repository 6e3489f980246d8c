//! `forkvm __fork-child`: the process a fork child's VM runs in (internal verb); see
//! [`forkvm_oci::vm::fork_child`].

use anyhow::Result;

/// Restores the VM the parent sent on fd 3 and runs it; returns the exit code.
pub fn run() -> Result<i32> {
    forkvm_oci::vm::fork_child()
}
