//! Image store: imports OCI images and turns their layers into read-only root
//! filesystems cached by digest.
//!
//! Images come from OCI image layouts (directories or tars), `docker save` /
//! `podman save` archives ([`Store::load`]) and registries ([`Store::pull`]). Every
//! blob is verified against its sha256 digest before it is stored, and layers against
//! the config's `rootfs.diff_ids`. [`Store::rootfs`] unpacks an image's layers (with
//! OCI whiteouts, confined to the root) into an ext4 file that VMs boot from
//! read-only, built once per image ID.
//!
//! ```no_run
//! use forkvm_image::{NoProgress, Store};
//!
//! # fn main() -> Result<(), forkvm_image::Error> {
//! let store = Store::open(&Store::default_root())?;
//! let images = store.load("busybox.tar".as_ref(), None, &NoProgress)?;
//! let image = store.get("busybox")?; // localhost/busybox:latest
//! assert_eq!(image.id, images[0].id);
//! let rootfs = store.rootfs(&image, &NoProgress)?;
//! println!("{} ({} bytes)", rootfs.path.display(), rootfs.size);
//! # Ok(())
//! # }
//! ```
//!
//! The on-disk layout and its crash-consistency rules are described in the `store`
//! module; name normalization in [`normalize_name`].

mod digest;
mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod image;
mod import;
mod load;
mod progress;
mod pull;
mod reference;
mod rootfs;
mod source;
mod spec;
mod store;
mod unpack;

pub use error::Error;
pub use image::{Image, ImageConfig, Layer, Removed, Rootfs};
pub use progress::{NoProgress, Progress, TermProgress};
pub use pull::{client as registry_client, PullOptions};
pub use reference::normalize_name;
pub use rootfs::{make_ext4, system_tool};
pub use store::Store;
