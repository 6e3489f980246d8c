//! virtio-blk (virtio 1.2 §5.2) over a raw image file: one request queue, requests run
//! synchronously (pread/pwrite/fsync) on the event-loop thread.
//!
//! Follows the life cycle in [`crate::virtio`]: `activate` stores the queue and writes the
//! `activate_evt`; on that event the event loop registers the kick fd; each kick drains the
//! queue.

mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::EventFd;

pub use request::SECTOR_SIZE;

use super::activation::Activation;
use super::{device_type, VirtioDevice};
use crate::Persist;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max`: data segments per request; the header and status take two descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the configuration space this device implements: `capacity`, `size_max`,
/// `seg_max`. Reads past it return zeros.
const CONFIG_LEN: usize = 16;

/// Why a block device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image's size cannot be determined.
    #[error("cannot determine the size of disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image is a directory.
    #[error("disk image {} is a directory", path.display())]
    IsDirectory {
        /// The image.
        path: PathBuf,
    },
    /// Creating the activation eventfd failed.
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state acknowledges features the device does not offer.
    #[error(transparent)]
    BadFeatures(#[from] crate::virtio::activation::UnofferedFeatures),
    /// The image changed size since the state was saved; the guest would see a different
    /// disk than the one it probed.
    #[error("disk image {} has {actual} sectors, the saved state {saved}", path.display())]
    CapacityChanged {
        /// The image.
        path: PathBuf,
        /// Capacity in the saved state, in 512-byte sectors.
        saved: u64,
        /// Capacity of the image now.
        actual: u64,
    },
}

/// How to build a block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Raw disk image (a regular file or a block device).
    pub path: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
}

/// What of a [`Block`] survives a snapshot; its queue is saved by the transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The feature bits the driver accepted.
    pub acked_features: u64,
    /// The capacity the guest saw, in 512-byte sectors.
    pub capacity: u64,
}

/// A virtio block device backed by a raw image.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    file: File,
    capacity: u64,
    avail_features: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config_space: [u8; CONFIG_LEN],
    activation: Activation,
    buf: Vec<u8>,
}

/// The device ID (`GET_ID`): the image's file name, truncated to 20 bytes, NUL-padded.
fn disk_id(path: &Path) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or(b"forkvm-blk");
    let n = name.len().min(id.len());
    id[..n].copy_from_slice(&name[..n]);
    id
}

impl Block {
    /// Opens the image in `config` (read-only if asked).
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let path = &config.path;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        let is_dir = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?
            .is_dir();
        if is_dir {
            return Err(BlockError::IsDirectory { path: path.clone() });
        }
        // Seeking to the end sizes block devices too, where metadata reports 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let capacity = size / SECTOR_SIZE;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                "virtio-blk: image size is not a multiple of 512; the tail is not visible"
            );
        }

        let mut avail_features =
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[0..8].copy_from_slice(&capacity.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Self {
            id: disk_id(path),
            config,
            file,
            capacity,
            avail_features,
            config_space,
            activation: Activation::new("virtio-blk").map_err(BlockError::EventFd)?,
            buf: Vec::new(),
        })
    }

    /// The backend configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The eventfd the device writes on activation (registered in `init`).
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.evt()
    }

    /// Runs every available request and signals the guest if it asked.
    fn process_queue(&mut self) {
        let Some(active) = self.activation.active_mut() else {
            return;
        };
        let disk = request::Disk {
            file: &self.file,
            read_only: self.config.read_only,
            capacity_sectors: self.capacity,
            id: &self.id,
        };
        let buf = &mut self.buf;
        active.serve_chains(0, "virtio-blk", |mem, chain| {
            let descs: Vec<_> = chain.collect();
            request::execute(mem, &disk, &descs, buf)
        });
    }
}

impl Persist<'_> for Block {
    type State = BlockState;
    /// The disk as the VM is configured now: a restore opens this image, never one
    /// named by the saved state.
    type ConstructorArgs = BlockConfig;
    type Error = BlockError;

    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(BlockState {
            acked_features: self.activation.acked_features(),
            capacity: self.capacity,
        })
    }

    /// Opens the configured image and checks it still has the size the guest saw; the
    /// transport's restore activates the device.
    fn restore(config: BlockConfig, state: &BlockState) -> Result<Self, BlockError> {
        let mut block = Self::new(config)?;
        if block.capacity != state.capacity {
            return Err(BlockError::CapacityChanged {
                path: block.config.path.clone(),
                saved: state.capacity,
                actual: block.capacity,
            });
        }
        let avail = block.avail_features;
        block
            .activation
            .restore_acked_features(state.acked_features, avail)?;
        Ok(block)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        crate::guest_warn!(offset, "virtio-blk: config write ignored");
    }

    super::activation_field!();
}

super::single_queue_subscriber!(Block);

#[cfg(test)]
mod tests;
