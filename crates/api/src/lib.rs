//! Named VMs and their control plane.
//!
//! Every VM forkvm starts gets an ID (32 random hex digits) and optionally a name, and a
//! home: a directory `<root>/<id>/` (mode 0700) holding
//!
//! * `state.json`: the [`VmState`] (schema-versioned, written atomically: temp file,
//!   fsync, rename, fsync of the directory),
//! * `console.log`: the guest's serial output,
//! * `api.sock`: the per-VM HTTP API (mode 0600), served by [`serve`] on its own thread
//!   with a current-thread tokio runtime and hyper, inside the VM's VMM process.
//!
//! There is no daemon: each VMM process owns its home. A VMM that died without
//! recording its exit is detected by [`liveness`] (the pid and its start time from
//! `/proc`, so a reused pid is not mistaken for the VMM) and reported as
//! [`Observed::Dead`].
//!
//! The CLI talks to a VM through the blocking [`Client`]; VMs are found by name, full ID
//! or unique ID prefix with [`resolve`]. The routes are listed in [`server::ROUTES`] and
//! documented in `docs/api/openapi.yaml` (a test keeps the two in step).
//!
//! # Registering a VM (boot, fork children)
//!
//! ```no_run
//! # fn demo(vmm: &mut forkvm_vmm::Vmm) -> Result<(), forkvm_api::Error> {
//! let root = forkvm_api::default_root();
//! let home = forkvm_api::VmHome::create(&root, Some("web"), None)?;
//! home.record_machine(2, 512)?;
//! let server = forkvm_api::serve(home, vmm.control_handle())?;
//! let exit = vmm.run();
//! server.finish_run(&exit); // records poweroff / reboot / stopped / failed
//! # Ok(()) }
//! ```

pub mod client;
mod error;
pub mod home;
pub mod liveness;
pub mod metrics;
pub mod server;
pub mod state;
pub mod time;

pub use client::{Client, ClientError};
pub use error::Error;
pub use home::{
    default_root, list, new_id, resolve, validate_name, Entry, VmHome, ENV_ID, ENV_ROOT,
};
pub use liveness::ProcessIdentity;
pub use server::{serve, ApiServer, VmDescription};
pub use state::{ExitRecord, Observed, Status, VmState, SCHEMA_VERSION};
