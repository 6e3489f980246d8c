//! The virtio-mmio transport (virtio 1.2 §4.2.2, version 2 "modern" only): the register
//! window the guest driver programs, the status state machine, device activation on
//! DRIVER_OK, and the transport's serializable state.
//!
//! The guest is untrusted: bad accesses (wrong width, unknown offsets, out-of-order status
//! writes, unusable queues) are logged and ignored or answered with DEVICE_NEEDS_RESET;
//! nothing here panics on guest input.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::{BusDevice, GuestMemory, Persist};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2, the non-legacy virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` this transport reports.
pub const VENDOR_ID: u32 = 0;
/// Offset of the `QueueNotify` register, where the VMM places the queues' ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// Size of the whole MMIO window of one device (registers and configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Status bits the driver sets, in the order it must set them.
const INIT_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];
const ALL_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

/// Why a transport could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Creating a queue's kick eventfd failed.
    #[error("cannot create the kick eventfd of queue {index}")]
    KickEventFd {
        /// Queue index.
        index: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Kick eventfds made ahead for another number of queues than the device has.
    #[error("{given} kick eventfds for a device of {queues} queues")]
    Kicks {
        /// Eventfds given.
        given: usize,
        /// The device's queues.
        queues: usize,
    },
    /// The device offers a queue size virtio-queue rejects, or a saved queue is invalid.
    #[error("queue {index} is invalid")]
    Queue {
        /// Queue index.
        index: usize,
        /// The underlying error.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved state does not fit the device it is restored onto.
    #[error("invalid transport state: {0}")]
    InvalidState(String),
    /// Re-activating the device of a restored, running transport failed.
    #[error("cannot activate the restored device")]
    Activate(#[source] ActivateError),
    /// An activated device did not report the state of its queues (see
    /// [`VirtioDevice::queue_states`]).
    #[error(
        "the activated device reported {actual} queue states, the transport handed it {expected}"
    )]
    QueueStates {
        /// Queues handed to the device at activation.
        expected: usize,
        /// Queue states the device reported.
        actual: usize,
    },
}

/// Serializable mirror of [`virtio_queue::QueueState`] (which has no serde support).
///
/// It is untrusted input on restore: it becomes a `Queue` only through virtio-queue's
/// validating `TryFrom<QueueState>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueueState {
    /// The maximum size in elements offered by the device.
    pub max_size: u16,
    /// Tail position of the available ring.
    pub next_avail: u16,
    /// Head position of the used ring.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// The queue size in elements the driver selected.
    pub size: u16,
    /// Whether the driver finished configuring the queue.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

/// Converts between [`SavedQueueState`] and `virtio_queue`'s `QueueState` (which has
/// no serde), field by field, both ways from one list.
macro_rules! convert_queue_state {
    ($($field:ident),+) => {
        impl From<QueueState> for SavedQueueState {
            fn from(s: QueueState) -> Self {
                Self { $($field: s.$field),+ }
            }
        }

        impl From<SavedQueueState> for QueueState {
            fn from(s: SavedQueueState) -> Self {
                Self { $($field: s.$field),+ }
            }
        }
    };
}

convert_queue_state!(
    max_size,
    next_avail,
    next_used,
    event_idx_enabled,
    size,
    ready,
    desc_table,
    avail_ring,
    used_ring
);

/// What of an [`MmioTransport`] survives a snapshot or a fork. The device's own state
/// (backend configuration) is saved by the device; the interrupt status is saved here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// `DeviceFeaturesSel`.
    pub features_select: u32,
    /// `DriverFeaturesSel`.
    pub acked_features_select: u32,
    /// The feature bits the driver accepted.
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `Status`.
    pub device_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// Every queue of the device, with the device's progress if it is activated.
    pub queues: Vec<SavedQueueState>,
}

/// A virtio device presented to the guest through the virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    features_select: u32,
    acked_features_select: u32,
    queue_select: u32,
    device_status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("queues", &self.queues)
            .field("features_select", &self.features_select)
            .field("acked_features_select", &self.acked_features_select)
            .field("queue_select", &self.queue_select)
            .field("device_status", &self.device_status)
            .field("config_generation", &self.config_generation)
            .finish_non_exhaustive()
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A panic elsewhere must not take the vCPU thread down with it: the device's state is
    // plain data, use it as it is.
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irq_evt` (the VMM registers
    /// it as an irqfd). Creates one kick eventfd per queue.
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq_evt: EventFd,
    ) -> Result<Self, MmioError> {
        Self::with_kicks(mem, device, irq_evt, None)
    }

    /// Like [`MmioTransport::new`], with the queues' kick eventfds made (and registered
    /// with KVM) ahead when `kicks` has them: exactly one per queue of the device, in
    /// queue order.
    pub fn with_kicks(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq_evt: EventFd,
        kicks: Option<Vec<EventFd>>,
    ) -> Result<Self, MmioError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &max)| {
                Queue::new(max).map_err(|source| MmioError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = match kicks {
            Some(kicks) if kicks.len() != queues.len() => {
                return Err(MmioError::Kicks {
                    given: kicks.len(),
                    queues: queues.len(),
                })
            }
            Some(kicks) => kicks,
            None => (0..queues.len())
                .map(|index| {
                    EventFd::new(EFD_NONBLOCK)
                        .map_err(|source| MmioError::KickEventFd { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(Interrupt::new(irq_evt)),
            queues,
            queue_evts,
            features_select: 0,
            acked_features_select: 0,
            queue_select: 0,
            device_status: 0,
            config_generation: 0,
        })
    }

    /// One kick eventfd per queue; the VMM registers queue `i`'s as a KVM ioeventfd at
    /// [`NOTIFY_REG_OFFSET`] with datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt (its eventfd is the irqfd the VMM registers).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Current value of the `Status` register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    fn status_has(&self, set: u32, clear: u32) -> bool {
        self.device_status & set == set && self.device_status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Builds the active queues and activates the device. Only ready queues are handed
    /// over, in index order.
    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = lock(&self.device).acked_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            queue.set_event_idx(event_idx);
            if !queue.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue {
                    index,
                    reason: "its rings are misplaced or outside guest memory".to_string(),
                });
            }
            let kick = self.queue_evts[index]
                .try_clone()
                .map_err(ActivateError::Signal)?;
            // `Queue` is not `Clone`; its state is all there is to copy at this point.
            let queue = Queue::try_from(queue.state()).map_err(|e| ActivateError::BadQueue {
                index,
                reason: e.to_string(),
            })?;
            active.push(ActiveQueue { queue, kick });
        }
        lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), active)
    }

    /// The driver wrote 0 to `Status`.
    fn reset(&mut self) {
        let mut device = lock(&self.device);
        if device.is_activated() && !device.reset() {
            crate::guest_error!("virtio device cannot be reset; marking it FAILED");
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        device.set_acked_features(0);
        drop(device);
        for queue in &mut self.queues {
            queue.reset();
        }
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
        self.device_status = 0;
        self.interrupt.set_status(0);
        // Drain stale kicks so they do not reach a future activation.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device: the driver cannot set or clear it.
        let old = self.device_status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if new & old != old {
            crate::guest_warn!(
                old,
                new,
                "virtio-mmio: driver cleared status bits without a reset"
            );
            return;
        }
        let added = new & !old;
        if added == 0 {
            return;
        }
        if added == VIRTIO_CONFIG_S_FAILED {
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if old & VIRTIO_CONFIG_S_FAILED != 0 {
            crate::guest_warn!(old, new, "virtio-mmio: status change on a FAILED device");
            return;
        }
        let expected = INIT_SEQUENCE.iter().position(|&bit| old & bit == 0);
        let Some(step) = expected.filter(|&i| INIT_SEQUENCE[i] == added) else {
            crate::guest_warn!(old, new, "virtio-mmio: invalid status transition");
            return;
        };
        match INIT_SEQUENCE[step] {
            VIRTIO_CONFIG_S_FEATURES_OK => {
                let acked = lock(&self.device).acked_features();
                if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                    // Leaving FEATURES_OK clear tells the driver its features are refused.
                    crate::guest_warn!(
                        acked,
                        "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1"
                    );
                    return;
                }
                self.device_status |= VIRTIO_CONFIG_S_FEATURES_OK;
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK;
                if let Err(e) = self.activate() {
                    crate::guest_error!(error = %e, "virtio-mmio: device activation failed");
                    self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    if let Err(e) = self.interrupt.signal_config_change() {
                        crate::guest_error!(error = %e, "virtio-mmio: cannot signal DEVICE_NEEDS_RESET");
                    }
                }
            }
            bit => self.device_status |= bit,
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status,
            // No shared memory regions: their length and base read as all ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!(
                    offset,
                    "virtio-mmio: read of an unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Features may be negotiated between DRIVER and FEATURES_OK, queues configured
        // between FEATURES_OK and DRIVER_OK.
        let features_open = self.status_has(
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        );
        let queues_open = self.status_has(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        );
        match offset {
            REG_DEVICE_FEATURES_SEL => self.features_select = value,
            REG_DRIVER_FEATURES_SEL => self.acked_features_select = value,
            REG_DRIVER_FEATURES if features_open => {
                let shift = match self.acked_features_select {
                    0 => 0,
                    1 => 32,
                    sel => {
                        crate::guest_warn!(
                            sel,
                            "virtio-mmio: driver features for a selector past 1"
                        );
                        return;
                    }
                };
                let mut device = lock(&self.device);
                let avail = device.avail_features();
                let offered = u64::from(value) << shift;
                if offered & !avail != 0 {
                    crate::guest_warn!(
                        unoffered = offered & !avail,
                        "virtio-mmio: driver accepted features the device does not offer"
                    );
                }
                let acked =
                    (device.acked_features() & !(0xffff_ffffu64 << shift)) | (offered & avail);
                device.set_acked_features(acked);
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM if queues_open => {
                if let Some(q) = self.selected_queue() {
                    match u16::try_from(value) {
                        Ok(size) => q.set_size(size),
                        Err(_) => crate::guest_warn!(value, "virtio-mmio: queue size out of range"),
                    }
                }
            }
            REG_QUEUE_READY if queues_open => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW if queues_open => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH if queues_open => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_AVAIL_LOW if queues_open => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_AVAIL_HIGH if queues_open => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW if queues_open => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_USED_HIGH if queues_open => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        crate::guest_error!(queue = value, error = %e, "virtio-mmio: cannot kick the queue");
                    }
                }
                None => {
                    crate::guest_warn!(queue = value, "virtio-mmio: notify of a nonexistent queue")
                }
            },
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_SHM_SEL => {}
            REG_DRIVER_FEATURES | REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH
            | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => crate::guest_warn!(
                offset,
                status = self.device_status,
                "virtio-mmio: register write not allowed in this device status"
            ),
            _ => crate::guest_warn!(
                offset,
                "virtio-mmio: write to an unknown or read-only register"
            ),
        }
    }

    /// Applies `f` to the selected queue unless the selector is out of range. Queue
    /// setters log and ignore invalid values (misaligned addresses, bad sizes).
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        match self.selected_queue() {
            Some(q) => f(q),
            None => debug!(sel = self.queue_select, "virtio-mmio: no such queue"),
        }
    }
}

/// What a transport is built on besides its saved registers.
pub struct TransportArgs {
    /// Guest memory, where the queues live.
    pub mem: GuestMemory,
    /// The (restored, not yet activated) device behind the transport.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The interrupt eventfd (the VMM registers it as an irqfd).
    pub irq_evt: EventFd,
    /// The queues' kick eventfds, when made ahead (see [`MmioTransport::with_kicks`]).
    pub kicks: Option<Vec<EventFd>>,
}

impl Persist<'_> for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = TransportArgs;
    type Error = MmioError;

    /// Rebuilds a transport from `state` for `device` (restored but not activated). If the
    /// saved driver had set DRIVER_OK, the device is activated again with the saved queues.
    /// The saved state is untrusted: anything that does not fit the device is an error.
    fn restore(args: TransportArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let TransportArgs {
            mem,
            device,
            irq_evt,
            kicks,
        } = args;
        let mut transport = Self::with_kicks(mem, device, irq_evt, kicks)?;
        let invalid = |msg: String| Err(MmioError::InvalidState(msg));

        if state.queues.len() != transport.queues.len() {
            return invalid(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                transport.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&transport.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return invalid(format!(
                    "queue {index}: saved maximum size {}, the device offers {}",
                    saved.max_size,
                    current.max_size()
                ));
            }
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|source| MmioError::Queue { index, source })?;
            queues.push(queue);
        }

        let status = state.device_status;
        let driver_bits = status & !(VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET);
        let reachable = (0..=INIT_SEQUENCE.len())
            .any(|n| INIT_SEQUENCE[..n].iter().fold(0, |acc, bit| acc | bit) == driver_bits);
        if status & !ALL_STATUS_BITS != 0 || !reachable {
            return invalid(format!("device status {status:#x} is not reachable"));
        }

        let mut device = lock(&transport.device);
        if device.is_activated() {
            return invalid("the device is already activated".to_string());
        }
        let avail = device.avail_features();
        if state.acked_features & !avail != 0 {
            return invalid(format!(
                "acked features {:#x} are not a subset of the offered {avail:#x}",
                state.acked_features
            ));
        }
        device.set_acked_features(state.acked_features);
        drop(device);

        transport.queues = queues;
        transport.features_select = state.features_select;
        transport.acked_features_select = state.acked_features_select;
        transport.queue_select = state.queue_select;
        transport.device_status = status;
        transport.config_generation = state.config_generation;
        transport.interrupt.set_status(state.interrupt_status);

        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
        {
            transport.activate().map_err(MmioError::Activate)?;
        }
        Ok(transport)
    }

    /// The transport's state, with the queues' progress taken from the device if it is
    /// activated.
    fn save(&self) -> Result<MmioTransportState, MmioError> {
        let device = lock(&self.device);
        let mut queues: Vec<SavedQueueState> =
            self.queues.iter().map(|q| q.state().into()).collect();
        if device.is_activated() {
            let live = device.queue_states();
            let handed: Vec<usize> = (0..self.queues.len())
                .filter(|&i| self.queues[i].ready())
                .collect();
            if live.len() != handed.len() {
                return Err(MmioError::QueueStates {
                    expected: handed.len(),
                    actual: live.len(),
                });
            }
            for (index, state) in handed.into_iter().zip(live) {
                queues[index] = state.into();
            }
        }
        Ok(MmioTransportState {
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: device.acked_features(),
            queue_select: self.queue_select,
            device_status: self.device_status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        })
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_warn!(offset, len = data.len(), "virtio-mmio: bad register read");
            data.fill(0);
            return;
        }
        let value = self.read_reg(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status_has(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                crate::guest_warn!(
                    offset,
                    "virtio-mmio: config write before DRIVER or after FAILED"
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(offset, len = data.len(), "virtio-mmio: bad register write");
            return;
        };
        if !offset.is_multiple_of(4) {
            crate::guest_warn!(offset, "virtio-mmio: misaligned register write");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;
