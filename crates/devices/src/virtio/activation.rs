//! The activation handshake every virtio device shares (steps 3 and 4 of the life cycle in
//! [`crate::virtio`]): what the driver hands over at `DRIVER_OK`, and getting the queues'
//! kick fds on and off the event loop's watch list as the driver activates and resets the
//! device.
//!
//! `activate` and `reset` run on a vCPU thread (the transport's register writes); the event
//! manager's `EventOps` exist only on the event-loop thread. So [`Activation`] records
//! what changed and writes its eventfd, and the device calls [`Activation::sync`] from its
//! event handler. A reset's kick fds stay open until `sync` has deregistered them: closing
//! a watched fd first would leave the event loop a stale registration.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueue, Interrupt};
use crate::GuestMemory;

/// A saved state acknowledges features the device does not offer (a state from another
/// build, or forged): refused rather than masked, as restore treats its input as hostile.
#[derive(Debug, thiserror::Error)]
#[error("saved acked features {acked:#x} are not offered ({avail:#x})")]
pub struct UnofferedFeatures {
    /// Saved acked features.
    pub acked: u64,
    /// Features the device offers.
    pub avail: u64,
}

/// The event token of a single-queue device's activation eventfd.
pub const SINGLE_QUEUE_ACTIVATE: u32 = 0;
/// The event token of a single-queue device's kick.
pub const SINGLE_QUEUE_KICK: u32 = 1;

/// What the driver handed over at activation; present until the device is reset.
#[derive(Debug)]
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in the device's queue order, with their kick fds.
    pub queues: Vec<ActiveQueue>,
}

impl Active {
    /// Serves the chains waiting on queue `index`, at most
    /// [`MAX_CHAINS_PER_EVENT`](super::MAX_CHAINS_PER_EVENT) of them: `serve` handles one
    /// and says how many bytes it wrote into it; each goes to the used ring. A queue that
    /// had more kicks itself for the rest, and the guest is interrupted for what was
    /// used. Returns how many chains were served. `device` names the device in logs.
    pub fn serve_chains<F>(&mut self, index: usize, device: &str, mut serve: F) -> usize
    where
        F: FnMut(&GuestMemory, virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
    {
        let mem = &self.mem;
        let Some(aq) = self.queues.get_mut(index) else {
            return 0;
        };
        let mut used_any = false;
        let mut served = 0;
        while served < super::MAX_CHAINS_PER_EVENT {
            let Some(chain) = aq.queue.pop_descriptor_chain(mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            let written = serve(mem, chain);
            match aq.queue.add_used(mem, head, written) {
                Ok(()) => used_any = true,
                Err(e) => crate::guest_error!(device, error = %e, "cannot add a used buffer"),
            }
        }
        if served == super::MAX_CHAINS_PER_EVENT && aq.queue.is_valid(mem) {
            // More may be waiting: come back after the other devices' events.
            aq.rekick(device);
        }
        if used_any {
            self.notify_used(index, device);
        }
        served
    }

    /// Interrupts the guest for the used buffers of queue `index`, unless its driver
    /// suppressed that (event index). When the suppression cannot be read the guest is
    /// interrupted anyway: a spurious interrupt is harmless, a missing one hangs the
    /// driver. `device` names the device in log messages.
    pub fn notify_used(&mut self, index: usize, device: &str) {
        let Some(aq) = self.queues.get_mut(index) else {
            return;
        };
        let needed = aq.queue.needs_notification(&self.mem).unwrap_or_else(|e| {
            crate::guest_warn!(device, queue = index, error = %e, "cannot check notification suppression");
            true
        });
        if needed {
            if let Err(e) = self.interrupt.signal_used_queue() {
                crate::guest_error!(device, error = %e, "cannot signal the guest");
            }
        }
    }
}

/// One device's activation state and its registrations with the event loop.
#[derive(Debug)]
pub struct Activation {
    /// The device's name in log messages (`virtio-blk`, `net`, ...).
    device: &'static str,
    /// Written when the watch list must change; the device registers it in `init`.
    evt: EventFd,
    active: Option<Active>,
    /// The current queues' kick fds are registered with the event loop.
    kicks_registered: bool,
    /// Kick fds of a reset activation, kept open until the event loop deregisters them.
    retired: Vec<EventFd>,
    /// The feature bits the driver accepted.
    acked_features: u64,
}

impl Activation {
    /// A device that is not activated yet; `device` names it in log messages.
    pub fn new(device: &'static str) -> io::Result<Self> {
        Ok(Self {
            device,
            evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            kicks_registered: false,
            retired: Vec::new(),
            acked_features: 0,
        })
    }

    /// The eventfd written whenever the event loop must update its watch list.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Registers [`Self::evt`] with `token` (from the device's `init`).
    pub fn register(&self, ops: &mut EventOps, token: u32) {
        if let Err(e) = ops.add(Events::with_data(&self.evt, token, EventSet::IN)) {
            crate::guest_error!(error = ?e, device = self.device, "cannot register the activation eventfd");
        }
    }

    /// Wakes the event loop, so the device's next `sync` runs (registrations besides the
    /// kicks, such as a backend's, changed).
    pub fn wake(&self) {
        if let Err(e) = self.evt.write(1) {
            crate::guest_warn!(error = %e, device = self.device, "cannot wake the event loop");
        }
    }

    /// What the driver handed over, while the device is activated.
    pub fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// [`Self::active`], mutable.
    pub fn active_mut(&mut self) -> Option<&mut Active> {
        self.active.as_mut()
    }

    /// The feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the feature bits the driver accepted (the device masks them first).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// Restores the feature bits a saved driver accepted, `acked`, refusing any the
    /// device does not offer (`avail`).
    pub fn restore_acked_features(
        &mut self,
        acked: u64,
        avail: u64,
    ) -> Result<(), UnofferedFeatures> {
        if acked & !avail != 0 {
            return Err(UnofferedFeatures { acked, avail });
        }
        self.acked_features = acked;
        Ok(())
    }

    /// The driver reset the device: [`Self::deactivate`], and the accepted features are
    /// forgotten.
    pub fn reset(&mut self) {
        self.deactivate();
        self.acked_features = 0;
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The queues' states (none while not activated).
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.queue.state()))
            .collect()
    }

    /// Takes what the driver handed over, which must be `expected` queues, and wakes the
    /// event loop to watch their kicks. A second activation without a reset replaces the
    /// first.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        expected: usize,
    ) -> Result<(), ActivateError> {
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                actual: queues.len(),
            });
        }
        if self.active.is_some() {
            crate::guest_warn!(device = self.device, "activated twice without a reset");
            self.deactivate();
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.evt.write(1).map_err(ActivateError::Signal)
    }

    /// Drops what the driver handed over (a reset) and wakes the event loop, which
    /// deregisters the kicks before they are closed.
    pub fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            if self.kicks_registered {
                self.retired
                    .extend(active.queues.into_iter().map(|q| q.kick));
            }
        }
        self.kicks_registered = false;
        self.wake();
    }

    /// The whole event handling of a device with one queue, its activation eventfd
    /// registered as `token_activate` and its kick as `token_kick`: drains whichever
    /// fired, brings the watch list in line, and returns whether the device is activated
    /// (then it processes its queue: the driver may have queued work before its kick fd
    /// was watched).
    pub fn single_queue_event(
        &mut self,
        events: &Events,
        ops: &mut EventOps,
        token_activate: u32,
        token_kick: u32,
    ) -> bool {
        match events.data() {
            t if t == token_activate => self.drain_evt(),
            t if t == token_kick => self.drain_kick(0),
            other => crate::guest_warn!(token = other, device = self.device, "unexpected event"),
        }
        self.sync(ops, token_kick)
    }

    /// Drains the wake-up eventfd (on its event).
    pub fn drain_evt(&self) {
        drain(&self.evt, self.device);
    }

    /// Drains queue `index`'s kick (on its event); a kick of a reset activation, not yet
    /// deregistered, needs nothing.
    pub fn drain_kick(&self, index: usize) {
        if let Some(aq) = self.active.as_ref().and_then(|a| a.queues.get(index)) {
            drain(&aq.kick, self.device);
        }
    }

    /// Brings the kicks on the watch list in line: a reset's off (then closed), the current
    /// queues' on, queue `i`'s with token `first_kick_token + i`. Returns whether the
    /// device is activated.
    pub fn sync(&mut self, ops: &mut EventOps, first_kick_token: u32) -> bool {
        for kick in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&kick)) {
                crate::guest_warn!(error = ?e, device = self.device, "cannot deregister a retired queue kick");
            }
        }
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        if !self.kicks_registered {
            for (aq, token) in active.queues.iter().zip(first_kick_token..) {
                if let Err(e) = ops.add(Events::with_data(&aq.kick, token, EventSet::IN)) {
                    crate::guest_error!(error = ?e, device = self.device, token, "cannot register a queue kick");
                }
            }
            self.kicks_registered = true;
        }
        true
    }

    /// Whether a reset's kicks still wait for `sync` (tests).
    #[cfg(test)]
    pub fn has_retired_kicks(&self) -> bool {
        !self.retired.is_empty()
    }
}

/// Reads an eventfd to zero; nothing to read is not an error.
fn drain(evt: &EventFd, device: &'static str) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            crate::guest_warn!(error = %e, device, "cannot drain an eventfd");
        }
    }
}
