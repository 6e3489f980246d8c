//! Guest agent: the program inside the VM that the host talks to over vsock, and the
//! host's client for it.
//!
//! Wire protocol ([`protocol`], [`frame`]; the contract is `docs/agent-protocol.md`):
//! one JSON object per line in each direction on vsock port [`AGENT_PORT`], protocol
//! version [`PROTOCOL_VERSION`]. A peer answers a request it does not know with
//! [`Response::Error`], never by closing silently. An [`Request::Exec`] answered with
//! [`Response::Started`] turns its connection into binary frames carrying the process's
//! stdin, stdout, stderr, signals, terminal size and exit code.
//!
//! After a fork, the child's VMM sends [`Request::Identity`]: fresh entropy (the agent
//! adds it to the kernel's pool and forces a CRNG reseed, so children never share
//! random numbers), the hostname, and the NICs' new MACs.
//!
//! Host side: [`client`]. Guest side: [`server`] (requests, in any mode), [`spawn`] and
//! [`session`] (running processes), [`reaper`] (every child's exit status), [`user`]
//! (`/etc/passwd` names), [`identity`] (fork identity), [`init`] (PID-1 boot and
//! power-off).
//!
//! ```no_run
//! use forkvm_agent::{client, ProcessSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (host, guest) = std::os::unix::net::UnixStream::pair()?;
//! let agent = forkvm_agent::server::Agent::new(forkvm_agent::server::AgentConfig {
//!     root: "/".into(),
//!     mode: forkvm_agent::server::Mode::Daemon,
//! });
//! std::thread::spawn(move || agent.serve(guest));
//! let session = client::exec(host, &ProcessSpec::new(["echo", "hi"]))?;
//! let code = session.pump(None, Box::new(std::io::stdout()), Box::new(std::io::sink()))?;
//! assert_eq!(code, 0);
//! # Ok(()) }
//! ```

pub mod client;
pub mod frame;
pub mod identity;
pub mod init;
pub mod protocol;
pub mod reaper;
pub mod server;
mod session;
pub mod spawn;
pub mod user;

pub use protocol::{ProcessSpec, Request, Response, Rlimit, User, AGENT_PORT, PROTOCOL_VERSION};
