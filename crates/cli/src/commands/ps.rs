//! `forkvm ps`: every VM under the root, like `podman ps -a`.

use std::path::Path;

use anyhow::Result;
use forkvm_registry::{Observed, VmState};
use serde_json::json;

use super::vm::short;
use crate::cli::{PsArgs, PsFormat};

fn status_text(s: &VmState) -> String {
    match (s.observe(), &s.exit) {
        (Observed::Exited, Some(e)) => format!("exited ({}) {}", e.code, e.reason),
        (o, _) => o.to_string(),
    }
}

/// Runs `forkvm ps`.
pub fn run(args: PsArgs, root: &Path) -> Result<i32> {
    let entries = forkvm_registry::list(root)?;
    if args.quiet {
        for e in &entries {
            println!("{}", if args.no_trunc { &e.id } else { short(&e.id) });
        }
        return Ok(0);
    }
    let now = forkvm_registry::time::now_ms();
    if args.format == PsFormat::Json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| match &e.state {
                Ok(s) => json!({
                    "id": e.id,
                    "name": s.name,
                    "status": s.observe(),
                    "vcpus": s.vcpus,
                    "mem_mib": s.mem_mib,
                    "pid": s.process.map(|p| p.pid),
                    "parent": s.parent,
                    "created": forkvm_registry::time::rfc3339(s.created_ms),
                    "exit": s.exit,
                }),
                Err(err) => json!({"id": e.id, "status": "unknown", "error": err.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut rows = vec![[
        "VM ID", "NAME", "STATUS", "VCPUS", "MEMORY", "CREATED", "PID",
    ]
    .map(String::from)];
    for e in &entries {
        let id = if args.no_trunc {
            e.id.clone()
        } else {
            short(&e.id).to_owned()
        };
        rows.push(match &e.state {
            Ok(s) => [
                id,
                s.name.clone().unwrap_or_default(),
                status_text(s),
                s.vcpus.to_string(),
                format!("{} MiB", s.mem_mib),
                forkvm_registry::time::ago(s.created_ms, now),
                s.process.map_or(String::new(), |p| p.pid.to_string()),
            ],
            Err(err) => [
                id,
                String::new(),
                format!("unknown ({err})"),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        });
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(0)
}
