//! Guest agent: the program inside the VM that the host talks to over vsock.
//!
//! This library half is the wire protocol, shared by the agent and the host: one JSON
//! object per line in each direction on vsock port [`AGENT_PORT`]. Protocol version
//! [`PROTOCOL_VERSION`]; a peer answers a request it does not know with
//! [`Response::Error`], never by closing silently.
//!
//! After a fork, the child's VMM sends [`Request::Identity`]: fresh entropy (the agent
//! adds it to the kernel's pool and forces a CRNG reseed, so children never share
//! random numbers), the hostname, and the NICs' new MACs.

pub mod protocol;

pub use protocol::{Request, Response, AGENT_PORT, PROTOCOL_VERSION};
