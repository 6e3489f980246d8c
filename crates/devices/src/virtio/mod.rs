//! Virtio: the device trait every virtio device implements, the interrupt it raises, and
//! the MMIO transport that presents it to the guest.
//!
//! Life of a virtio device:
//! 1. The VMM builds the device and wraps it in an `MmioTransport` registered on the MMIO
//!    bus. The transport owns one kick `EventFd` per queue (the VMM registers each as a KVM
//!    ioeventfd on the transport's `QueueNotify` register, datamatch = queue index) and the
//!    [`Interrupt`] (whose `EventFd` the VMM registers as a KVM irqfd on the device's GSI).
//! 2. The device is also added to the VMM's `event_manager::EventManager` as a
//!    `MutEventSubscriber`. In `init` it registers only its `activate_evt`.
//! 3. When the driver sets DRIVER_OK, the transport calls [`VirtioDevice::activate`] with
//!    the guest memory, the configured queues and their kick fds. The device stores them and
//!    writes its `activate_evt`; on that event (on the event-loop thread) it registers the
//!    kick fds and its backend fds (TAP, Unix socket, ...) with the event manager. Every
//!    device does its part of this through one [`activation::Activation`].
//! 4. Kicks and backend readiness arrive as events; the device processes its queues and
//!    calls [`Interrupt::signal_used_queue`] when it has put buffers in a used ring.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;
use activation::Activation;

pub mod activation;
pub mod block;
pub mod fs;
#[cfg(test)]
mod hostile;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_driver;
pub mod vsock;

/// `InterruptStatus` bit: the device has used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// `InterruptStatus` bit: the device's configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Virtio device IDs (virtio spec 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// Shared filesystem.
    pub const FS: u32 = 26;
}

/// The interrupt line of one virtio-mmio device: the `InterruptStatus` register the guest
/// reads and acknowledges, and the irqfd that injects the interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl Interrupt {
    /// An interrupt that signals through `irq_evt` (registered by the VMM as an irqfd).
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
        }
    }

    /// The eventfd the VMM registers as the device's irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Current value of the `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Restores the `InterruptStatus` register (snapshot restore).
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Raises the interrupt line again when the status has bits set: an interrupt the
    /// saved device had signalled may not have reached the saved interrupt controller
    /// (KVM injects an irqfd's IOAPIC interrupt asynchronously), and the restored guest
    /// must not wait for it forever. A spurious one costs the guest a status read.
    /// Only once the interrupt controllers and vCPUs are restored: restoring them
    /// after would drop it, or leave a level-triggered line waiting for an EOI.
    pub fn resignal_pending(&self) -> std::io::Result<()> {
        match self.status() {
            0 => Ok(()),
            _ => self.irq_evt.write(1),
        }
    }

    /// The guest wrote `InterruptACK`: clear the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Tells the guest a queue has new used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the guest the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq_evt.write(1)
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a queue the device cannot use.
    #[error("queue {index} is not usable: {reason}")]
    BadQueue {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The driver configured a different number of queues than the device needs.
    #[error("expected {expected} queues, the driver configured {actual}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        actual: usize,
    },
    /// Signalling the event loop failed.
    #[error("cannot signal the activation event")]
    Signal(#[source] std::io::Error),
}

/// Most chains a device serves from one queue per event before it kicks itself for the
/// rest: a guest that keeps posting cannot keep the device loop (which also serves the
/// VM's control requests and the other devices) to itself.
pub const MAX_CHAINS_PER_EVENT: usize = 64;

/// One queue as handed to a device at activation: the queue and the eventfd the guest
/// kicks it through.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The configured virtqueue.
    pub queue: virtio_queue::Queue,
    /// Written (through KVM's ioeventfd) when the guest notifies this queue.
    pub kick: EventFd,
}

impl ActiveQueue {
    /// Kicks the queue again after `device` served [`MAX_CHAINS_PER_EVENT`] chains of
    /// it: the loop comes back to the rest after the other events waiting.
    pub fn rekick(&self, device: &str) {
        if let Err(e) = self.kick.write(1) {
            crate::guest_error!(error = %e, device, "cannot re-kick a queue");
        }
    }
}

/// A driver's read of `data.len()` bytes at `offset` of a configuration space whose
/// bytes are `config`: what lies past its end reads as zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// Implements [`VirtioDevice::activation`] and [`VirtioDevice::activation_mut`] for a
/// device that keeps its [`Activation`] in a field named `activation`.
macro_rules! activation_field {
    () => {
        fn activation(&self) -> &$crate::virtio::activation::Activation {
            &self.activation
        }
        fn activation_mut(&mut self) -> &mut $crate::virtio::activation::Activation {
            &mut self.activation
        }
    };
}
pub(crate) use activation_field;

/// Implements `MutEventSubscriber` for a device with one queue: the event loop watches
/// its activation eventfd and its queue's kick, [`Activation::single_queue_event`]
/// handles both, and the device's `process_queue` runs once it is activated.
macro_rules! single_queue_subscriber {
    ($device:ty) => {
        impl event_manager::MutEventSubscriber for $device {
            fn process(
                &mut self,
                events: event_manager::Events,
                ops: &mut event_manager::EventOps,
            ) {
                use $crate::virtio::activation::{SINGLE_QUEUE_ACTIVATE, SINGLE_QUEUE_KICK};
                if self.activation.single_queue_event(
                    &events,
                    ops,
                    SINGLE_QUEUE_ACTIVATE,
                    SINGLE_QUEUE_KICK,
                ) {
                    self.process_queue();
                }
            }

            fn init(&mut self, ops: &mut event_manager::EventOps) {
                self.activation
                    .register(ops, $crate::virtio::activation::SINGLE_QUEUE_ACTIVATE);
            }
        }
    };
}
pub(crate) use single_queue_subscriber;

/// Behaviour every virtio device implements; the transport calls it. A device says what
/// it is and offers and keeps its [`Activation`]; the life cycle the transport drives
/// (accepted features, activation with one queue per [`VirtioDevice::queue_max_sizes`]
/// entry, queue states, reset) comes from that activation, so no device writes it again.
pub trait VirtioDevice: Send {
    /// Virtio device ID (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (`VIRTIO_F_VERSION_1` included).
    fn avail_features(&self) -> u64;
    /// The guest reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The guest writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The device's activation: accepted features, queues, kick registrations.
    fn activation(&self) -> &Activation;
    /// [`VirtioDevice::activation`], mutable.
    fn activation_mut(&mut self) -> &mut Activation;

    /// What the device drops on a driver reset besides its activation (work in flight
    /// for the old queues); nothing by default.
    fn reset_device(&mut self) {}
    /// Serves every request the guest has queued, before the device is saved (its
    /// vCPUs paused): for a device whose requests change the host, a restored copy
    /// would otherwise serve them a second time. Nothing by default.
    fn finish_queued(&mut self) {}
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64 {
        self.activation().acked_features()
    }
    /// Records the feature bits the driver accepted (masked to `avail_features`).
    fn set_acked_features(&mut self, features: u64) {
        let offered = self.avail_features();
        self.activation_mut().set_acked_features(features & offered);
    }
    /// DRIVER_OK: start processing the queues (one per `queue_max_sizes` entry).
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_max_sizes().len();
        self.activation_mut()
            .activate(mem, interrupt, queues, expected)
    }
    /// Whether [`VirtioDevice::activate`] has run.
    fn is_activated(&self) -> bool {
        self.activation().is_active()
    }
    /// The queues handed to [`VirtioDevice::activate`], in the same order, as they stand
    /// now (`next_avail`/`next_used` included); empty before activation. The transport saves
    /// them in its snapshot, so an activated device that does not report them cannot be
    /// snapshotted (the transport's `save` fails).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.activation().queue_states()
    }
    /// The driver reset an activated device (wrote 0 to `Status`): drop the queues, go back
    /// to the state before [`VirtioDevice::activate`] (acked features cleared) and be ready
    /// to be activated again. Kick fds the event loop still watches stay open until the
    /// device's next `sync` deregisters them (the activation wakes the event loop for
    /// that). Returns `false` if the device cannot be reset; the transport then leaves it
    /// FAILED.
    fn reset(&mut self) -> bool {
        self.activation_mut().reset();
        self.reset_device();
        true
    }
}
