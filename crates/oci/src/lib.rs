//! OCI runtime: the runc-compatible command line and the containerd shim, each container a forkvm VM.
