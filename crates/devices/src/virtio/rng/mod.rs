//! virtio-rng (virtio 1.2 §5.4): one request queue whose device-writable buffers the
//! device fills with bytes from the host's `getrandom(2)`.
//!
//! Follows the life cycle in [`crate::virtio`]: `activate` stores the queue and writes the
//! `activate_evt`; on that event the event loop registers the kick fd; each kick drains the
//! queue.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::activation::Activation;
use super::{device_type, VirtioDevice};
use crate::Persist;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request, so one chain cannot keep the event loop busy.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Why an rng device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating the activation eventfd failed.
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state acknowledges features the device does not offer.
    #[error(transparent)]
    BadFeatures(#[from] crate::virtio::activation::UnofferedFeatures),
}

/// What of an [`Rng`] survives a snapshot; its queue is saved by the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The feature bits the driver accepted.
    pub acked_features: u64,
}

/// A virtio entropy device.
#[derive(Debug)]
pub struct Rng {
    activation: Activation,
    buf: Vec<u8>,
}

impl Rng {
    /// A new, not yet activated, rng device.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            activation: Activation::new("virtio-rng").map_err(RngError::EventFd)?,
            buf: Vec::new(),
        })
    }

    /// The eventfd the device writes on activation (registered in `init`).
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.evt()
    }

    /// Fills every available chain with random bytes and signals the guest if it asked.
    fn process_queue(&mut self) {
        let Some(active) = self.activation.active_mut() else {
            return;
        };
        let buf = &mut self.buf;
        active.serve_chains(0, "virtio-rng", |mem, chain| {
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    crate::guest_warn!("virtio-rng: skipping a device-readable descriptor");
                    continue;
                }
                let len = desc.len().min(MAX_BYTES_PER_REQUEST - written) as usize;
                if len == 0 {
                    break;
                }
                buf.resize(len, 0);
                if let Err(e) = getrandom::fill(buf) {
                    crate::guest_error!(error = %e, "virtio-rng: getrandom failed");
                    break;
                }
                if let Err(e) = mem.write_slice(buf, desc.addr()) {
                    crate::guest_warn!(error = %e, "virtio-rng: descriptor outside guest memory");
                    break;
                }
                // `len` is at most MAX_BYTES_PER_REQUEST, which fits a u32.
                written += len as u32;
            }
            written
        });
    }
}

impl Persist<'_> for Rng {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = RngError;

    fn save(&self) -> Result<RngState, RngError> {
        Ok(RngState {
            acked_features: self.activation.acked_features(),
        })
    }

    /// Rebuilds a device from `state`; the transport's restore activates it.
    fn restore((): (), state: &RngState) -> Result<Self, RngError> {
        let mut rng = Self::new()?;
        rng.activation
            .restore_acked_features(state.acked_features, AVAIL_FEATURES)?;
        Ok(rng)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // No configuration space.
        crate::guest_warn!(offset, "virtio-rng: config read");
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(offset, "virtio-rng: config write");
    }

    super::activation_field!();
}

super::single_queue_subscriber!(Rng);

#[cfg(test)]
mod tests;
