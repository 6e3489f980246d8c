//! The guest agent's wire protocol and the host's client for it: what the VMM, the
//! OCI runtime, `forkvm run` and the containerd shim link to talk to a guest, without
//! linking the guest agent (PID 1 of a container guest, `crates/agent`).
//!
//! [`protocol`]: one JSON object per line in each direction on vsock port
//! [`AGENT_PORT`], protocol version [`PROTOCOL_VERSION`] (the contract is
//! `docs/agent-protocol.md`). A peer answers a request it does not know with
//! [`Response::Error`], never by closing silently. An [`Request::Exec`] answered with
//! [`Response::Started`] turns its connection into the binary [`frame`]s carrying the
//! process's stdin, stdout, stderr, signals, terminal size and exit code.
//!
//! After a fork, the child's VMM sends [`Request::Identity`]: fresh entropy, the
//! hostname, and the NICs' new MACs.
//!
//! [`dns`]: the DNS relay's framing, for names only the container's namespace
//! resolves (Docker's `127.0.0.11`).
//!
//! [`forward`]: a TCP connection to the guest's loopback carried over one agent
//! connection ([`Request::Forward`], a pod's port-forward), and the copying both ends
//! share.
//!
//! [`client`]: the host side (the vsock `CONNECT` handshake, requests, exec sessions).
//! [`exit_code`]: a wait status as a process exit code, as both sides report it.

pub mod client;
pub mod dns;
pub mod forward;
pub mod frame;
pub mod protocol;

pub use protocol::{
    check_container_id, Capabilities, CgroupLimits, ContainerRoot, DeviceNode, FsMount, GuestHook,
    IdMapping, NetInterface, NetRoute, PidNamespace, ProcessSpec, Request, ResourceUse, Response,
    Rlimit, ShareMount, User, UserNamespace, AGENT_PORT, FS_TYPES, IDENTITY_PORT_ANNOUNCE,
    IDENTITY_PORT_DEVICE, MAX_CONTAINERS, MAX_FILESYSTEMS, MAX_HOOKS, MAX_ID_MAPPINGS,
    MAX_SECCOMP_FILTERS, MAX_SHARES, PROTOCOL_VERSION,
};

/// Exit code of a raw wait status: the exit status, or 128 + signal for a killed one.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        // Raw wait statuses: exit code in bits 8..16, terminating signal in bits 0..7.
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(255 << 8), 255);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 128 + libc::SIGTERM);
        // Killed by a signal with a core dump (0x80) is still 128 + signo.
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), 128 + libc::SIGSEGV);
    }
}
