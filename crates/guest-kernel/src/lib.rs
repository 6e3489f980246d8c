//! Owns guest kernels for forkvm: Debian kernel packages fetched into the local
//! cache ([`ensure_kernel`]), module dependency resolution ([`resolve_modules`]),
//! and busybox initramfs images ([`InitramfsBuilder`], [`cpio::CpioWriter`]).
//!
//! ```no_run
//! use forkvm_guest_kernel::{ensure_kernel, resolve_modules, Flavour, InitramfsBuilder};
//!
//! # fn main() -> Result<(), forkvm_guest_kernel::Error> {
//! let tree = ensure_kernel(Flavour::CloudAmd64)?;
//! let modules = resolve_modules(&tree, &["virtio_mmio", "virtio_blk"])?;
//! let mut b = InitramfsBuilder::new();
//! b.busybox_from_host()?;
//! b.modules(&modules)?;
//! b.init_script(&format!("#!/bin/sh\n{}exec sh\n", b.insmod_script()));
//! let image: Vec<u8> = b.build()?;
//! # let _ = image; Ok(()) }
//! ```

pub mod cpio;
mod guest_image;
mod initramfs;
mod kernel;
mod modules;
pub mod vmlinux;

use std::io;
use std::path::PathBuf;

pub use guest_image::{
    container_guest, default_guest, default_guest_with, find_agent, init_script, module_devices,
    module_list, GuestImage, CONTAINER_MODULES, GUEST_MODULES, MODULE_DEVICES, MODULE_LIST,
    READY_MARKER,
};
pub use initramfs::InitramfsBuilder;
pub use kernel::{cache_dir, ensure_kernel, ensure_kernel_in, Flavour, KernelTree};
pub use modules::{
    generate_modules_dep, normalize_module_name, plan_modules, read_modinfo, resolve_modules,
    ModuleDeps, PlannedModule,
};

/// Errors from fetching kernels, resolving modules and building initramfs images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No cache directory could be determined.
    #[error("cannot determine the cache directory: set FORKVM_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A filesystem operation failed.
    #[error("{}", path.display())]
    Io {
        /// The path being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command could not be started.
    #[error("fetching {package}: cannot run `{command}`")]
    Spawn {
        /// The package being fetched.
        package: String,
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command exited unsuccessfully.
    #[error("fetching {package}: `{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The package being fetched.
        package: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The package layout is not what was expected.
    #[error("package {package}: {what}")]
    BadPackage {
        /// The package.
        package: String,
        /// What is wrong.
        what: String,
    },
    /// A module is not listed in `modules.dep`.
    #[error("unknown kernel module `{0}`")]
    UnknownModule(String),
    /// The uncompressed kernel could not be extracted from a bzImage.
    #[error("cannot extract the uncompressed kernel from {}", path.display())]
    Vmlinux {
        /// The bzImage.
        path: PathBuf,
        /// What failed.
        #[source]
        source: vmlinux::VmlinuxError,
    },
    /// Module dependencies form a cycle.
    #[error("kernel module dependency cycle through `{0}`")]
    ModuleCycle(String),
    /// `modules.dep` has a line without `:`.
    #[error("modules.dep line {line}: cannot parse {text:?}")]
    ModulesDepSyntax {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// Writing the cpio archive failed.
    #[error("building initramfs entry {entry}")]
    Cpio {
        /// The archive entry being written.
        entry: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}
