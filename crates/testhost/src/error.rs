//! What can go wrong running a command on a KVM host.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Errors from [`crate::run_in_kvm_host`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No command was given.
    #[error("empty command")]
    EmptyCommand,
    /// Fetching the kernel or building the initramfs failed.
    #[error(transparent)]
    Kernel(#[from] forkvm_guest_kernel::Error),
    /// A program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A filesystem or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The command (and the virtual host) was killed after the timeout.
    #[error("timed out after {timeout:?}; log: {}", log_path.display())]
    TimedOut {
        /// The timeout that expired.
        timeout: Duration,
        /// The run log.
        log_path: PathBuf,
    },
    /// The virtual host stopped writing its heartbeat: it froze (seen under nested
    /// emulation), and was killed (its log says what QEMU was doing).
    #[error("the virtual host stalled: no heartbeat for {silent:?}; log: {}", log_path.display())]
    Stalled {
        /// How long it had been silent.
        silent: Duration,
        /// The run log.
        log_path: PathBuf,
    },
    /// The virtual host stopped without reporting the command's exit code.
    #[error("the virtual host stopped ({qemu_status}) without reporting an exit code; log: {}", log_path.display())]
    NoExitCode {
        /// How QEMU exited.
        qemu_status: ExitStatus,
        /// The run log (kernel console).
        log_path: PathBuf,
    },
}
