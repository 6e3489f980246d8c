//! forkvm's OCI runtime: each OCI container is a forkvm VM.
//!
//! | Module | Owns |
//! |---|---|
//! | [`bundle`] | reading an OCI bundle's `config.json` into a [`bundle::ContainerPlan`] (rootfs, process, vCPUs, memory, files to copy in), refusing what a VM cannot honour |
//! | [`hooks`] | running the spec's host hooks (`prestart`, `createRuntime`, `poststart`, `poststop`) as runc does: state on stdin, a deadline, errors naming the hook |
//! | [`state`] | the per-container state directory under `--root`: atomic JSON state files, per-container locks, liveness, the runtime spec's `state` output |
//! | [`rootfs`] | the VM's root: the bundle's root directory shared with the copies of the files it binds, or a root disk made from it |
//! | [`pod`] | a Kubernetes pod's directory on the host: shared into the pod sandbox's VM, its containers' roots bound into it |
//! | [`seccomp`] | the container's seccomp profile compiled into the BPF programs the guest agent installs on its processes |
//! | [`pod_template`] | pod templates: a booted pod VM saved as a template, from which a pod's sandbox starts by fork |
//! | [`vm`] | booting a container VM in this process and running a session with its agent (shared with `forkvm run`) |
//! | [`term`] | signal forwarding, raw terminals, host ptys and `--console-socket` |
//! | [`runtime`] | the runc-compatible command line (`forkvm-runtime`): `create`, `start`, `state`, `kill`, `delete`, `exec`, `ps`, `list`, `features`, ... and the per-container monitor process |

pub mod bundle;
pub mod hooks;
pub mod pod;
pub mod pod_template;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod state;
pub mod term;
pub mod vm;
