//! Guest agent: PID 1 inside the VM; runs the container process, streams stdio over vsock, serves exec, and applies a fork child's identity.
