//! A container's root filesystem as containerd hands it over (mounts onto the
//! bundle's `rootfs`), and the cleanup of a container whose shim is gone.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::types::mount::Mount;

use super::{read_pid, timestamp, RuntimeRecord};
use crate::error::{Error, Result};
use crate::exits::Exits;
use crate::runtime::{self, Runtime};

/// Mounts containerd's rootfs mounts onto `target` in order (as runc-v2 does); whether
/// anything was mounted.
pub(super) fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    std::fs::create_dir_all(target).map_err(Error::io(format!("create {}", target.display())))?;
    for m in mounts {
        if let Err(e) = containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            target,
        ) {
            unmount_rootfs(target);
            return Err(e.into());
        }
    }
    Ok(true)
}

pub(super) fn unmount_rootfs(target: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), libc::MNT_DETACH) {
        tracing::warn!(target = %target.display(), error = %e, "cannot unmount the rootfs");
    }
}

/// Cleans up after a shim that is gone (the shim binary's `delete` action, run by
/// containerd in the bundle): force-deletes the container in the runtime recorded in
/// the bundle and unmounts its rootfs. The exit status is SIGKILL's, as with runc-v2.
pub fn cleanup(bundle: &Path, namespace: &str, id: &str, exits: Arc<Exits>) -> api::DeleteResponse {
    let record = RuntimeRecord::load(bundle).or_else(|_| {
        let exe = std::env::current_exe().ok();
        runtime::select_binary(
            "",
            std::env::var_os(runtime::RUNTIME_ENV).as_deref(),
            exe.as_deref(),
            std::env::var_os("PATH").as_deref(),
        )
        .map(|binary| RuntimeRecord {
            binary,
            root: runtime::runtime_root("", namespace),
        })
    });
    match record {
        Ok(r) => {
            let rt = Runtime::new(r.binary, r.root, bundle.join("log.json"), exits);
            match rt.delete(id, true) {
                Err(e) if !e.is_runtime_not_found() => {
                    tracing::warn!(id, error = %e, "cannot delete the container");
                    eprintln!("forkvm shim cleanup: {e}");
                }
                _ => {}
            }
        }
        Err(e) => eprintln!("forkvm shim cleanup: {e}"),
    }
    unmount_rootfs(&bundle.join("rootfs"));
    api::DeleteResponse {
        pid: read_pid(&bundle.join("init.pid")).unwrap_or(0),
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(timestamp(SystemTime::now())).into(),
        ..Default::default()
    }
}
