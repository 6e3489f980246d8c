//! `forkvm inspect`: the state file, paths and, while it runs, its process's jail and
//! what the VM's API says.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::vm::find;
use crate::cli::VmArg;

/// Runs `forkvm inspect`.
pub fn run(args: VmArg, root: &Path) -> Result<i32> {
    let home = find(root, &args.vm)?;
    let state = home.state()?;
    let mut out = json!({
        "id": state.id,
        "name": state.name,
        "status": state.observe(),
        "vcpus": state.vcpus,
        "mem_mib": state.mem_mib,
        "pid": state.process.map(|p| p.pid),
        "parent": state.parent,
        "children": home.children(),
        "created": forkvm_registry::time::rfc3339(state.created_ms),
        "exit": state.exit,
        "addresses": state.addresses,
        "identity": state.identity,
        "dir": home.dir(),
        "socket": home.socket_path(),
        "console_log": home.console_path(),
    });
    if state.is_alive() {
        // What the kernel says of the VM process's jail (seccomp, capabilities, cgroup).
        if let Some(pid) = state.process.map(|p| p.pid) {
            match forkvm_jail::JailStatus::of(pid) {
                Ok(jail) => {
                    out["jail"] = serde_json::to_value(jail)?;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the VM process's status"),
            }
        }
        match forkvm_api::Client::new(home.socket_path()).info() {
            Ok(info) => {
                let serde_json::Value::Object(info) = serde_json::to_value(info)? else {
                    unreachable!("a struct serializes to an object")
                };
                let obj = out.as_object_mut().expect("an object");
                for (k, v) in info {
                    obj.insert(k, v);
                }
            }
            Err(e) => tracing::warn!(error = %e, "the VM's API did not answer"),
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}
