//! OCI runtime groundwork: each OCI container becomes a forkvm VM.
//!
//! What exists now is the library the runtime will stand on:
//!
//! | Module | Owns |
//! |---|---|
//! | [`bundle`] | reading an OCI bundle's `config.json` into a [`bundle::ContainerPlan`] (rootfs, process, vCPUs, memory), refusing what a VM cannot honour |
//! | [`state`] | the per-container state directory under `--root`: atomic JSON state files, per-container locks, liveness, the runtime spec's `state` output |
//!
//! Still to come: the runc-compatible command-line binary (`create`, `start`, `state`,
//! `kill`, `delete`, ...) and the containerd shim, both built on these modules.

pub mod bundle;
pub mod state;
