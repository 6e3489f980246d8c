//! Guest agent: the program inside the VM that the host talks to over vsock.
//!
//! It speaks the protocol of `forkvm-agent-proto` ([`protocol`], [`frame`]; the
//! contract is `docs/agent-protocol.md`), whose client the host links without this
//! crate. After a fork, the child's VMM sends [`Request::Identity`]: the agent adds the
//! fresh entropy to the kernel's pool and forces a CRNG reseed (so children never share
//! random numbers), then sets the hostname and the NICs' new MACs.
//!
//! [`server`] (requests, in any mode), [`containers`] (the VM's containers: the one it
//! booted with, a pod's app containers), [`spawn`] and [`session`] (running processes),
//! [`reaper`] (every child's exit status), [`user`] (`/etc/passwd` names), [`identity`]
//! (fork identity), [`identity_port`] (the UART it arrives on), [`init`] (PID-1 boot and power-off), [`network`] (the container
//! namespace's addresses and routes), [`dns`] (the relay for resolvers only that
//! namespace serves).
//!
//! ```no_run
//! use forkvm_agent_proto::{client, ProcessSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (host, guest) = std::os::unix::net::UnixStream::pair()?;
//! use forkvm_agent::server::{Agent, AgentConfig, Mode};
//! let agent = Agent::new(AgentConfig::new("/", Mode::Daemon));
//! std::thread::spawn(move || agent.serve(guest));
//! let session = client::exec(host, &ProcessSpec::new(["echo", "hi"]))?;
//! let code = session.pump(None, Box::new(std::io::stdout()), Box::new(std::io::sink()))?;
//! assert_eq!(code, 0);
//! # Ok(()) }
//! ```

pub use forkvm_agent_proto::{frame, protocol};
pub mod cgroup;
pub mod container;
pub mod containers;
pub mod dns;
pub mod hooks;
pub mod identity;
pub mod identity_port;
pub mod init;
pub mod layout;
pub mod mntns;
pub mod mounts;
pub mod network;
pub mod power;
pub mod reaper;
pub mod seccomp;
pub mod server;
mod session;
pub mod shares;
pub mod spawn;
pub mod user;
pub mod userns;

pub use protocol::{
    Capabilities, ProcessSpec, Request, Response, Rlimit, User, AGENT_PORT, PROTOCOL_VERSION,
};
