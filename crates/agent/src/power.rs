//! Ending the VM from inside: the agent as PID 1 stops every process, unmounts the
//! container root and powers the machine off (it must never exit).

use std::ffi::CString;
use std::time::Duration;

use crate::layout::CONTAINER_MOUNTS;
use crate::reaper::Reaper;

/// How long [`crate::Request::Shutdown`] lets processes handle SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Unmounts the container root's mounts, deepest first; failures are ignored.
fn unmount_container() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| CONTAINER_MOUNTS.iter().any(|m| t.starts_with(m)))
        .collect();
    targets.reverse();
    for t in targets {
        let Ok(c) = CString::new(t) else {
            continue;
        };
        // SAFETY: a valid, NUL-terminated path string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Syncs and powers off; never returns (PID 1 must not exit).
pub fn halt() -> ! {
    // SAFETY: sync and reboot have no memory preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        // SAFETY: pause has no preconditions; the VM is going down.
        unsafe { libc::pause() };
    }
}

/// SIGKILL for every process but PID 1 (the agent), the VM running on.
pub fn kill_others() {
    // SAFETY: kill(-1) signals every process but PID 1; no memory preconditions.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Ends the VM: with a `grace`, SIGTERM to every process and up to `grace` for them to
/// exit; then SIGKILL to the rest, sync, unmount, power off.
pub fn power_off(reaper: &Reaper, grace: Option<Duration>) -> ! {
    if let Some(grace) = grace {
        // SAFETY: kill(-1) signals every process but PID 1; no memory preconditions.
        unsafe { libc::kill(-1, libc::SIGTERM) };
        reaper.wait_idle(grace);
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reaper.wait_idle(Duration::from_secs(1));
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    unmount_container();
    halt()
}
