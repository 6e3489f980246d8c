//! The VM registry: every VM forkvm starts gets an ID (32 random hex digits),
//! optionally a name, and a home: a directory `<root>/<id>/` (mode 0700) holding
//!
//! * `state.json`: the [`VmState`] (schema-versioned, written atomically: temp file,
//!   fsync, rename, fsync of the directory),
//! * `console.log`: the guest's serial output, bounded ([`console`]),
//! * `api.sock`: the per-VM API socket (served by `forkvm-api` in the VM process).
//!
//! There is no daemon: each VM process owns its home. A VM process that died without
//! recording its exit is detected by [`liveness`] (the pid and its start time from
//! `/proc`, so a reused pid is not mistaken for it) and reported as
//! [`Observed::Dead`]. VMs are found by name, full ID or unique ID prefix with
//! [`resolve`].

pub mod console;
mod error;
pub mod home;
pub mod leases;
pub mod liveness;
pub mod state;
pub mod time;

pub use console::{position_after_cut, tail, ConsoleLog};
pub use error::Error;
pub use home::{
    default_root, is_id, list, new_id, prune_staged, resolve, staged_dir, validate_name, Entry,
    VmHome, ENV_ROOT,
};
pub use leases::{Lease, LeaseError, Leases, Subnet};
pub use liveness::ProcessIdentity;
pub use state::{
    write_atomic, Ending, ExitRecord, IdentityTaken, Observed, Status, VmState, SCHEMA_VERSION,
};
