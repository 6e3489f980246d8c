//! virtio-rng (virtio 1.2 §5.4): one request queue whose device-writable buffers the
//! device fills with bytes from the host's `getrandom(2)`.
//!
//! Follows the life cycle in [`crate::virtio`]: `activate` stores the queue and writes the
//! `activate_evt`; on that event the event loop registers the kick fd; each kick drains the
//! queue.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{device_type, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::GuestMemory;

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
    #[error("saved acked features {acked:#x} are not offered ({avail:#x})")]
    BadFeatures {
        /// Saved acked features.
        acked: u64,
        /// Features the device offers.
        avail: u64,
    },
}

/// What of an [`Rng`] survives a snapshot; its queue is saved by the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The feature bits the driver accepted.
    pub acked_features: u64,
}

/// The device's run-time half, present between activation and reset.
#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    kick: EventFd,
}

/// A virtio entropy device.
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// Whether the active kick fd is registered with the event loop.
    kick_registered: bool,
    /// Kick fds of a reset activation, kept open until the event loop deregisters them.
    retired_kicks: Vec<EventFd>,
    buf: Vec<u8>,
}

impl Rng {
    /// A new, not yet activated, rng device.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd)?,
            active: None,
            kick_registered: false,
            retired_kicks: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// Rebuilds a device from `state`; the transport's restore activates it.
    pub fn restore(state: &RngState) -> Result<Self, RngError> {
        if state.acked_features & !AVAIL_FEATURES != 0 {
            return Err(RngError::BadFeatures {
                acked: state.acked_features,
                avail: AVAIL_FEATURES,
            });
        }
        let mut rng = Self::new()?;
        rng.acked_features = state.acked_features;
        Ok(rng)
    }

    /// The device's state.
    pub fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    /// The eventfd the device writes on activation (registered in `init`).
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Fills every available chain with random bytes and signals the guest if it asked.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    warn!("virtio-rng: skipping a device-readable descriptor");
                    continue;
                }
                let len = desc.len().min(MAX_BYTES_PER_REQUEST - written) as usize;
                if len == 0 {
                    break;
                }
                self.buf.resize(len, 0);
                if let Err(e) = getrandom::fill(&mut self.buf) {
                    error!(error = %e, "virtio-rng: getrandom failed");
                    break;
                }
                if let Err(e) = mem.write_slice(&self.buf, desc.addr()) {
                    warn!(error = %e, "virtio-rng: descriptor outside guest memory");
                    break;
                }
                // `len` is at most MAX_BYTES_PER_REQUEST, which fits a u32.
                written += len as u32;
            }
            if let Err(e) = active.queue.add_used(mem, head, written) {
                error!(error = %e, "virtio-rng: cannot add a used buffer");
                continue;
            }
            used_any = true;
        }
        if !used_any {
            return;
        }
        match active.queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    error!(error = %e, "virtio-rng: cannot signal the guest");
                }
            }
            Err(e) => error!(error = %e, "virtio-rng: cannot read the queue's event index"),
        }
    }

    /// Drops the run-time half. A registered kick fd stays open until the event loop,
    /// woken through `activate_evt`, deregisters it.
    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            if self.kick_registered {
                self.kick_registered = false;
                self.retired_kicks.push(active.kick);
                if let Err(e) = self.activate_evt.write(1) {
                    error!(error = %e, "virtio-rng: cannot wake the event loop");
                }
            }
        }
    }

    /// On `activate_evt`: drop the kicks of a reset activation, register the current one.
    fn on_activate_evt(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        for kick in self.retired_kicks.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&kick)) {
                warn!(error = ?e, "virtio-rng: cannot deregister a retired kick fd");
            }
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if !self.kick_registered {
            match ops.add(Events::new(&active.kick, EventSet::IN)) {
                Ok(()) => self.kick_registered = true,
                Err(e) => error!(error = ?e, "virtio-rng: cannot register the kick fd"),
            }
        }
        // The driver may have queued buffers before the kick fd was watched.
        self.process_queue();
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

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // No configuration space.
        warn!(offset, "virtio-rng: config read");
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn!(offset, "virtio-rng: config write");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let actual = queues.len();
        let Ok([ActiveQueue { queue, kick }]) = <[ActiveQueue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                actual,
            });
        };
        if self.active.is_some() {
            warn!("virtio-rng: activated twice without a reset");
            self.deactivate();
        }
        self.activate_evt.write(1).map_err(ActivateError::Signal)?;
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
            kick,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn reset(&mut self) -> bool {
        self.deactivate();
        self.acked_features = 0;
        true
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.on_activate_evt(ops);
        } else if let Some(active) = self.active.as_ref().filter(|a| a.kick.as_raw_fd() == fd) {
            let _ = active.kick.read();
            self.process_queue();
        } else if let Some(kick) = self.retired_kicks.iter().find(|k| k.as_raw_fd() == fd) {
            // Reset, awaiting deregistration on the pending activate_evt.
            let _ = kick.read();
        } else {
            warn!(fd, "virtio-rng: event on an unknown fd");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            error!(error = ?e, "virtio-rng: cannot register the activation eventfd");
        }
    }
}

#[cfg(test)]
mod tests;
