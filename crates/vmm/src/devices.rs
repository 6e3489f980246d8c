//! The device registry: which virtio devices a VM has, and the one path that attaches
//! them, at boot from the configuration and at restore from the configuration and their
//! saved state.
//!
//! Every device comes in through [`Persist`]: a boot calls the device's constructor, a
//! restore calls [`Persist::restore`] with the same configuration and the saved
//! [`DeviceState`]. The configuration decides which devices exist and what host
//! resources they use (a fork child's configuration carries its own CID, socket, TAPs
//! and MACs); the saved state only says how far the guest had got with them, and must
//! list the same devices in the same order.

use std::error::Error;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use forkvm_devices::virtio::block::{Block, BlockConfig, BlockState};
use forkvm_devices::virtio::fs::{Fs, FsConfig, FsState};
use forkvm_devices::virtio::mmio::{MmioTransport, MmioTransportState, TransportArgs};
use forkvm_devices::virtio::net::{format_mac, Net, NetConfig, NetState};
use forkvm_devices::virtio::rng::{Rng, RngState};
use forkvm_devices::virtio::vsock::{Vsock, VsockConfig, VsockState};
use forkvm_devices::virtio::VirtioDevice;
use forkvm_devices::Persist;
use libc::EFD_NONBLOCK;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::layout::{IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestRam;
use crate::vm::Vm;
use crate::vmm::{Subscriber, VmmError};
use crate::x86::acpi::MmioDeviceInfo;

/// Offset of the virtio-mmio `QueueNotify` register.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// The saved state of one virtio device, by kind: the one list of the kinds a VM can
/// have. (Each kind's [`Registered`] impl names its variant.)
#[derive(Debug, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-rng.
    Rng(RngState),
    /// virtio-fs (its host descriptors travel beside it: see [`forkvm_devices::virtio::fs`]).
    Fs(FsState),
}

impl DeviceState {
    /// The kind, as the API names it.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => Block::KIND,
            DeviceState::Net(_) => Net::KIND,
            DeviceState::Vsock(_) => Vsock::KIND,
            DeviceState::Rng(_) => Rng::KIND,
            DeviceState::Fs(_) => Fs::KIND,
        }
    }
}

/// A virtio device and its transport registers.
#[derive(Debug, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// The device.
    pub device: DeviceState,
    /// Its virtio-mmio transport.
    pub transport: MmioTransportState,
}

/// A virtio device kind the registry can attach, save and restore. The bounds make a
/// device that cannot save (no [`Persist`]) or has no [`DeviceState`] variant fail to
/// compile as soon as it is attached.
pub(crate) trait Registered:
    Persist<'static, Error = Self::Failure> + VirtioDevice + MutEventSubscriber + Send + 'static
{
    /// The kind, as the API names it.
    const KIND: &'static str;
    /// The error type of construction, save and restore.
    type Failure: Error + Send + Sync + 'static;

    /// A new device from the configuration (a boot).
    fn create(config: Self::ConstructorArgs) -> Result<Self, Self::Failure>;
    /// The saved state as a [`DeviceState`].
    fn wrap(state: Self::State) -> DeviceState;
    /// This kind's state in `saved`, if `saved` is of this kind.
    fn unwrap(saved: &DeviceState) -> Option<&Self::State>;
    /// What the API shows about the device.
    fn detail(&self) -> String;
}

impl Registered for Block {
    const KIND: &'static str = "block";
    type Failure = forkvm_devices::virtio::block::BlockError;

    fn create(config: BlockConfig) -> Result<Self, Self::Failure> {
        Block::new(config)
    }
    fn wrap(state: BlockState) -> DeviceState {
        DeviceState::Block(state)
    }
    fn unwrap(saved: &DeviceState) -> Option<&BlockState> {
        match saved {
            DeviceState::Block(s) => Some(s),
            _ => None,
        }
    }
    fn detail(&self) -> String {
        let c = self.config();
        format!(
            "{}{}",
            c.path.display(),
            if c.read_only { " (ro)" } else { "" }
        )
    }
}

impl Registered for Net {
    const KIND: &'static str = "net";
    type Failure = forkvm_devices::virtio::net::NetError;

    fn create(config: NetConfig) -> Result<Self, Self::Failure> {
        Net::new(config)
    }
    fn wrap(state: NetState) -> DeviceState {
        DeviceState::Net(state)
    }
    fn unwrap(saved: &DeviceState) -> Option<&NetState> {
        match saved {
            DeviceState::Net(s) => Some(s),
            _ => None,
        }
    }
    fn detail(&self) -> String {
        format!(
            "tap {} mac {}",
            self.tap_name().unwrap_or("-"),
            format_mac(&self.mac())
        )
    }
}

impl Registered for Vsock {
    const KIND: &'static str = "vsock";
    type Failure = forkvm_devices::virtio::vsock::VsockError;

    fn create(config: VsockConfig) -> Result<Self, Self::Failure> {
        Vsock::new(config)
    }
    fn wrap(state: VsockState) -> DeviceState {
        DeviceState::Vsock(state)
    }
    fn unwrap(saved: &DeviceState) -> Option<&VsockState> {
        match saved {
            DeviceState::Vsock(s) => Some(s),
            _ => None,
        }
    }
    fn detail(&self) -> String {
        format!("cid {} uds {}", self.guest_cid(), self.uds().display())
    }
}

impl Registered for Rng {
    const KIND: &'static str = "rng";
    type Failure = forkvm_devices::virtio::rng::RngError;

    fn create((): ()) -> Result<Self, Self::Failure> {
        Rng::new()
    }
    fn wrap(state: RngState) -> DeviceState {
        DeviceState::Rng(state)
    }
    fn unwrap(saved: &DeviceState) -> Option<&RngState> {
        match saved {
            DeviceState::Rng(s) => Some(s),
            _ => None,
        }
    }
    fn detail(&self) -> String {
        "getrandom".into()
    }
}

impl Registered for Fs {
    const KIND: &'static str = "fs";
    type Failure = forkvm_devices::virtio::fs::FsError;

    fn create(config: FsConfig) -> Result<Self, Self::Failure> {
        Fs::new(config)
    }
    fn wrap(state: FsState) -> DeviceState {
        DeviceState::Fs(state)
    }
    fn unwrap(saved: &DeviceState) -> Option<&FsState> {
        match saved {
            DeviceState::Fs(s) => Some(s),
            _ => None,
        }
    }
    fn detail(&self) -> String {
        let c = self.config();
        format!(
            "{} as {:?}{}",
            c.host_path.display(),
            c.tag,
            if c.read_only { " (ro)" } else { "" }
        )
    }
}

/// What the registry keeps of an attached device: its kind and a way to save it.
pub trait SavedDevice: Send {
    /// The kind, as the API names it.
    fn kind(&self) -> &'static str;
    /// The device's state, once it has served what its guest queued
    /// ([`VirtioDevice::finish_queued`]).
    fn save_state(&mut self) -> Result<DeviceState, Box<dyn Error + Send + Sync>>;
}

impl<D: Registered> SavedDevice for D {
    fn kind(&self) -> &'static str {
        D::KIND
    }
    fn save_state(&mut self) -> Result<DeviceState, Box<dyn Error + Send + Sync>> {
        self.finish_queued();
        Ok(D::wrap(self.save()?))
    }
}

/// A virtio device attached to the MMIO bus.
#[derive(Clone)]
pub struct AttachedVirtio {
    /// The device.
    pub device: Arc<Mutex<dyn SavedDevice>>,
    /// Its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What the API shows.
    pub detail: String,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

impl AttachedVirtio {
    /// The device and its transport's saved state.
    pub fn save(&self) -> Result<VirtioSnapshot, Box<dyn Error + Send + Sync>> {
        let device = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state()?;
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save()?;
        Ok(VirtioSnapshot { device, transport })
    }
}

/// The most virtio devices a VM has: one per interrupt line from [`VIRTIO_IRQ_BASE`].
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;

/// The most queues a device's kicks are made ahead for (virtio-net with one queue pair
/// has 2, vsock 3, virtio-fs 2).
pub const MAX_QUEUES_AHEAD: u16 = 16;

/// Device `index`'s MMIO window base and interrupt line.
fn window(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

/// The eventfds of one virtio device, made and registered with KVM ahead of the
/// device (by a warm VM process, off a fork's way: each KVM_IOEVENTFD waits for the
/// VM's SRCU readers): its interrupt as an irqfd on its line, and a kick per queue as
/// an ioeventfd on its `QueueNotify` register with the queue's index as datamatch.
#[derive(Debug)]
pub struct VirtioFds {
    irq_evt: EventFd,
    kicks: Vec<EventFd>,
}

impl VirtioFds {
    /// Makes and registers the eventfds of device `index` (in MMIO order) with `queues`
    /// queues; on an error, nothing stays registered.
    pub fn make(vm: &Vm, index: usize, queues: u16) -> Result<Self, VmmError> {
        if index >= MAX_VIRTIO_DEVICES || queues > MAX_QUEUES_AHEAD {
            return Err(VmmError::Ahead { index, queues });
        }
        Self::register(vm, index, usize::from(queues))
    }

    /// Makes and registers them for an attached device (of `queues` queues, at `index`,
    /// whose line the attach checked): what [`VirtioFds::make`] does ahead.
    fn register(vm: &Vm, index: usize, queues: usize) -> Result<Self, VmmError> {
        let (base, irq) = window(index);
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let mut fds = Self {
            irq_evt,
            kicks: Vec::with_capacity(queues),
        };
        for q in 0..queues {
            let made = EventFd::new(EFD_NONBLOCK)
                .map_err(VmmError::EventFd)
                .and_then(|kick| {
                    vm.register_mmio_ioevent(&kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
                    Ok(kick)
                });
            match made {
                Ok(kick) => fds.kicks.push(kick),
                Err(e) => {
                    fds.release(vm, index);
                    return Err(e);
                }
            }
        }
        Ok(fds)
    }

    /// Unregisters them from `vm` (device `index`'s), for a device that does not use them.
    pub fn release(self, vm: &Vm, index: usize) {
        let (base, irq) = window(index);
        for (q, kick) in self.kicks.iter().enumerate() {
            if let Err(e) =
                vm.unregister_mmio_ioevent(kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)
            {
                tracing::warn!("cannot unregister a kick made ahead: {e}");
            }
        }
        if let Err(e) = vm.unregister_irqfd(&self.irq_evt, irq) {
            tracing::warn!("cannot unregister an interrupt made ahead: {e}");
        }
    }
}

/// Makes the eventfds of devices with `shape`'s queue counts (in MMIO order); a device
/// whose fds cannot be made gets none (its attach makes them).
pub(crate) fn make_ahead(vm: &Vm, shape: &[u16]) -> Vec<Option<VirtioFds>> {
    shape
        .iter()
        .take(MAX_VIRTIO_DEVICES)
        .enumerate()
        .map(|(index, &queues)| {
            VirtioFds::make(vm, index, queues)
                .inspect_err(|e| tracing::debug!("device {index}'s eventfds not made ahead: {e}"))
                .ok()
        })
        .collect()
}

/// The queue counts of `devices` (in MMIO order): what a warm process makes their
/// eventfds ahead by ([`crate::warm::Warmup::devices`]).
pub(crate) fn shape_of(devices: &[AttachedVirtio]) -> Vec<u16> {
    devices
        .iter()
        .map(|d| {
            let t = d.transport.lock().unwrap_or_else(|p| p.into_inner());
            u16::try_from(t.queue_evts().len()).unwrap_or(u16::MAX)
        })
        .collect()
}

/// The queue counts of the saved devices `devices` (a template's).
pub(crate) fn saved_shape(devices: &[VirtioSnapshot]) -> Vec<u16> {
    devices
        .iter()
        .map(|d| u16::try_from(d.transport.queues.len()).unwrap_or(u16::MAX))
        .collect()
}

/// The virtio devices of a VM being built, and what the rest of the build needs of
/// them: the MMIO bus and the ACPI device list.
pub(crate) struct DeviceSetup<'a> {
    pub vm: &'a Vm,
    pub ram: &'a GuestRam,
    pub events: &'a mut EventManager<Subscriber>,
    pub mmio: Bus,
    pub acpi_devices: Vec<MmioDeviceInfo>,
    pub attached: Vec<AttachedVirtio>,
    /// The saved devices still to restore; `None` for a boot.
    saved: Option<std::slice::Iter<'a, VirtioSnapshot>>,
    /// Each device's eventfds made ahead, by index ([`make_ahead`]).
    ahead: Vec<Option<VirtioFds>>,
}

impl<'a> DeviceSetup<'a> {
    /// A setup for a boot (`saved` is `None`) or a restore of the devices `saved`.
    pub fn new(
        vm: &'a Vm,
        ram: &'a GuestRam,
        events: &'a mut EventManager<Subscriber>,
        saved: Option<&'a [VirtioSnapshot]>,
        ahead: Vec<Option<VirtioFds>>,
    ) -> Self {
        Self {
            vm,
            ram,
            events,
            mmio: Bus::new(),
            acpi_devices: Vec::new(),
            attached: Vec::new(),
            saved: saved.map(|s| s.iter()),
            ahead,
        }
    }

    /// Attaches every virtio device `cfg` asks for, in MMIO order: disks, NICs, vsock,
    /// rng, shares. A restore takes each one's state from the saved list, which must hold
    /// exactly these devices in this order.
    pub fn attach_all(&mut self, cfg: &VmConfig) -> Result<(), VmmError> {
        for disk in &cfg.disks {
            self.attach::<Block>(disk.clone())?;
        }
        for net in &cfg.nets {
            self.attach::<Net>(net.clone())?;
        }
        if let Some(vsock) = &cfg.vsock {
            self.attach::<Vsock>(vsock.clone())?;
        }
        if cfg.rng {
            self.attach::<Rng>(())?;
        }
        for share in &cfg.shares {
            self.attach::<Fs>(share.clone())?;
        }
        if let Some(extra) = self.saved.as_mut().and_then(|s| s.next()) {
            return Err(VmmError::BadSnapshot(format!(
                "the snapshot has a {} device the configuration does not",
                extra.device.kind()
            )));
        }
        // Made ahead for devices this VM does not have: their windows stay empty.
        let vm = self.vm;
        for (index, fds) in self.ahead.drain(..).enumerate() {
            if let Some(fds) = fds {
                fds.release(vm, index);
            }
        }
        Ok(())
    }

    /// Builds (or restores) one device of kind `D` from `config` and puts it on the
    /// next MMIO window and IRQ.
    fn attach<D: Registered>(&mut self, config: D::ConstructorArgs) -> Result<(), VmmError> {
        let index = self.attached.len();
        let failed = |source: D::Failure| VmmError::Device {
            what: format!("{} device {index}", D::KIND),
            source: Box::new(source),
        };
        let (device, transport_state) = match self.saved.as_mut() {
            None => (D::create(config).map_err(failed)?, None),
            Some(saved) => {
                let slot = saved.next().ok_or_else(|| {
                    VmmError::BadSnapshot(format!(
                        "the configuration has a {} device (number {index}) the snapshot does not",
                        D::KIND
                    ))
                })?;
                let state = D::unwrap(&slot.device).ok_or_else(|| {
                    VmmError::BadSnapshot(format!(
                        "device {index} is a {} in the snapshot and a {} in the configuration",
                        slot.device.kind(),
                        D::KIND
                    ))
                })?;
                let device = D::restore(config, state).map_err(failed)?;
                (device, Some(&slot.transport))
            }
        };
        let detail = device.detail();
        let (base, irq) = window(index);
        if irq > IRQ_MAX {
            return Err(VmmError::NoIrq(detail));
        }
        // The eventfds made ahead for this device, if they fit its queues (else they are
        // unregistered and made here, the same way).
        let queues = device.queue_max_sizes().len();
        let ahead = match self.ahead.get_mut(index).and_then(Option::take) {
            Some(fds) if fds.kicks.len() == queues => Some(fds),
            Some(fds) => {
                fds.release(self.vm, index);
                None
            }
            None => None,
        };
        let typed = Arc::new(Mutex::new(device));
        self.events.add_subscriber(typed.clone());
        let made_ahead = ahead.is_some();
        tracing::debug!(index, made_ahead, "virtio device attached");
        let fds = match ahead {
            Some(fds) => fds,
            None => VirtioFds::register(self.vm, index, queues)?,
        };
        let mem = self.ram.memory().clone();
        let transport = match transport_state {
            None => MmioTransport::with_kicks(mem, typed.clone(), fds.irq_evt, Some(fds.kicks)),
            Some(state) => MmioTransport::restore(
                TransportArgs {
                    mem,
                    device: typed.clone(),
                    irq_evt: fds.irq_evt,
                    kicks: Some(fds.kicks),
                },
                state,
            ),
        }
        .map_err(|e| VmmError::Device {
            what: format!("{} transport {index} ({detail})", D::KIND),
            source: Box::new(e),
        })?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.attached.push(AttachedVirtio {
            device: typed,
            transport,
            detail,
            base,
            irq,
        });
        self.acpi_devices.push(MmioDeviceInfo {
            base,
            len: VIRTIO_MMIO_SIZE,
            irq,
        });
        Ok(())
    }
}
