//! End to end, in a KVM host: real Docker ([`docker`]) and real podman ([`podman`])
//! drive `forkvm-runtime` as they drive runc, with what both share in [`engines`].
//!
//! One test binary, one test and one virtual-host session per engine: the two sessions
//! (about 11 minutes each in the virtual host) run side by side where the machine has
//! the CPUs for two virtual hosts.
//!
//! `cargo test -p forkvm-oci --test engines_e2e docker -- --nocapture` runs one engine.

mod docker;
mod engines;
mod podman;
