//! `forkvm fork VM [-n N] [--freeze]`: fork a running VM through its API; children are
//! VMs of their own (`forkvm ps` lists them with their parent). `forkvm fork CONTAINER`
//! forks a container of forkvm-runtime into new containers (see
//! [`forkvm_oci::runtime::fork`]).

use std::path::Path;

use anyhow::{Context, Result};
use forkvm_vmm::control::{ForkOutcome, ForkRequest, Request};

use super::vm::{find, live};
use crate::cli::ForkArgs;

/// Runs `forkvm fork`.
pub fn run(args: ForkArgs, root: &Path) -> Result<i32> {
    let home = match find(root, &args.vm) {
        Ok(home) => home,
        Err(e) => {
            let store = forkvm_oci::state::StateStore::open(&args.runtime_root)?;
            if forkvm_oci::state::validate_id(&args.vm).is_err() || store.load(&args.vm).is_err() {
                return Err(e.context(format!(
                    "no VM, and no container under {}, is named {:?}",
                    args.runtime_root.display(),
                    args.vm
                )));
            }
            return fork_container(&args);
        }
    };
    let (_, client) = live(&home)?;
    let req = ForkRequest {
        count: args.count,
        freeze: args.freeze,
        ..ForkRequest::default()
    };
    // Starting many children takes a while on a loaded host: wait as long as the VM
    // gives them (it answers by then).
    let client = client.with_timeout(forkvm_vmm::control::client_wait(&Request::Fork(
        req.clone(),
    )));
    let out = client
        .fork(&req)
        .with_context(|| format!("cannot fork VM {}", home.id()))?;
    // The children's launch is their parent's, as recorded (`template save` checks it).
    match forkvm_vmm::template::launched::launched(root, home.id()) {
        Ok(Some(cfg)) => record_children(root, Some(home.id()), &out, &cfg),
        Ok(None) => eprintln!(
            "forkvm: warning: VM {} has no launch record, so its children get none: \
             `template save` refuses them unless given --trust-vm-config",
            home.id()
        ),
        Err(e) => eprintln!("forkvm: warning: the children's launch is not recorded: {e}"),
    }
    print_outcome(home.id(), &out, args.json)?;
    Ok(0)
}

/// Records `cfg` as the launch of the children of `out` (under `root`, with `parent`),
/// warning about those it cannot record.
pub fn record_children(
    root: &Path,
    parent: Option<&str>,
    out: &ForkOutcome,
    cfg: &forkvm_vmm::VmConfig,
) {
    let pids: Vec<u32> = out.children.iter().map(|c| c.pid).collect();
    let (_, failed) = forkvm_vmm::template::launched::record_children(root, parent, &pids, cfg);
    for (id, e) in failed {
        eprintln!("forkvm: warning: the launch of VM {id} is not recorded: {e}");
    }
}

/// Prints a fork's children (and the parent's pause), as a table or JSON.
pub fn print_outcome(from: &str, out: &ForkOutcome, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    println!(
        "forked {from} into {} children; parent paused {:.3} ms",
        out.children.len(),
        out.parent_pause_us as f64 / 1000.0
    );
    for c in &out.children {
        let cid = c.cid.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  pid {:>7}  cid {:>10}  running after {:.3} ms",
            c.pid,
            cid,
            c.running_after_us as f64 / 1000.0
        );
    }
    Ok(())
}

/// `forkvm fork CONTAINER`: the container's children become containers.
fn fork_container(args: &ForkArgs) -> Result<i32> {
    if args.freeze {
        anyhow::bail!("--freeze does not apply to containers: their engine owns the parent");
    }
    let out = forkvm_oci::runtime::fork::fork_container(&args.runtime_root, &args.vm, args.count)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "forked container {} into {} containers; parent paused {:.3} ms",
        out.parent,
        out.children.len(),
        out.parent_pause_us as f64 / 1000.0
    );
    for c in &out.children {
        println!(
            "  {}  pid {:>7}  running after {:.3} ms",
            c.id,
            c.pid,
            c.running_after_us as f64 / 1000.0
        );
    }
    Ok(0)
}
