//! forkvm's containerd shim v2 (`io.containerd.forkvm.v1`, binary
//! `containerd-shim-forkvm-v1`): containerd's per-container process that serves the
//! ttrpc Task API and drives an OCI runtime binary through runc's command line, the way
//! `containerd-shim-runc-v2` drives runc. The runtime is `forkvm-runtime` (each
//! container a VM) unless configured otherwise, and any runc-compatible binary works.
//!
//! | Module | Owns |
//! |---|---|
//! | [`shim`] | the binary's actions (`start`, the ttrpc server, `delete`) and the shim's lifetime |
//! | [`service`] | the Task service: containers, execs, their states, exit statuses and events |
//! | [`runtime`] | the runtime binary: which one, its command lines, running them, their errors |
//! | [`stdio`] | containerd's stdio FIFOs, console sockets and ptys |
//! | [`exits`] | children's exit statuses, collected by the one reaper and claimed by pid |
//! | [`error`] | the shim's errors and the ttrpc codes containerd sees |
//!
//! # Contract with the runtime
//!
//! The pid the runtime writes to `--pid-file` (for `create` and for `exec`) is a host
//! process whose lifetime is the container's (or the exec's): it exits with the
//! process's exit code, or is killed by a signal (reported as 128 + signo). It
//! reparents to the shim, a child subreaper, which reaps it. The container is signalled
//! with `RUNTIME kill`; an exec by signalling its pid directly.
//!
//! See `docs/containerd.md` for configuring containerd and Kubernetes.

pub mod error;
pub mod exits;
pub mod runtime;
pub mod service;
pub mod shim;
pub mod stdio;

pub use error::{Error, Result};
pub use service::Service;
pub use shim::RUNTIME_ID;
