//! The per-VM API: its wire types, the HTTP server every VM process runs on its
//! `api.sock`, and the blocking client the CLI and the runtime use.
//!
//! The server ([`serve`]) runs on its own thread with a current-thread tokio runtime and
//! hyper, inside the VM process, and hands requests that change the VM to the VMM
//! through [`Control`]. The routes are listed in [`server::ROUTES`] and documented in
//! `docs/api/openapi.yaml` (a test keeps the two in step). The VM's home and state file
//! are the registry's (`forkvm-registry`); this crate depends on no VMM code, the VMM
//! depends on its [`wire`] types.
//!
//! # Serving a VM
//!
//! ```no_run
//! # fn demo(control: impl forkvm_api::Control) -> Result<(), forkvm_registry::Error> {
//! let root = forkvm_registry::default_root();
//! let home = forkvm_registry::VmHome::create(&root, Some("web"), None)?;
//! home.record_machine(2, 512)?;
//! let server = forkvm_api::serve(home, control)?;
//! // ... run the VM ...
//! server.finish(forkvm_registry::ExitRecord::new(0, forkvm_registry::Ending::PowerOff));
//! # Ok(()) }
//! ```

pub mod client;
pub mod metrics;
pub mod server;
pub mod wire;

pub use client::{Client, ClientError};
pub use server::{serve, ApiServer, Control, VmDescription};
