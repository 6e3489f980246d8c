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
}

impl<'a> DeviceSetup<'a> {
    /// A setup for a boot (`saved` is `None`) or a restore of the devices `saved`.
    pub fn new(
        vm: &'a Vm,
        ram: &'a GuestRam,
        events: &'a mut EventManager<Subscriber>,
        saved: Option<&'a [VirtioSnapshot]>,
    ) -> Self {
        Self {
            vm,
            ram,
            events,
            mmio: Bus::new(),
            acpi_devices: Vec::new(),
            attached: Vec::new(),
            saved: saved.map(|s| s.iter()),
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
        let irq = VIRTIO_IRQ_BASE + index as u32;
        if irq > IRQ_MAX {
            return Err(VmmError::NoIrq(detail));
        }
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let typed = Arc::new(Mutex::new(device));
        self.events.add_subscriber(typed.clone());
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let mem = self.ram.memory().clone();
        let transport = match transport_state {
            None => MmioTransport::new(mem, typed.clone(), irq_evt),
            Some(state) => MmioTransport::restore(
                TransportArgs {
                    mem,
                    device: typed.clone(),
                    irq_evt,
                },
                state,
            ),
        }
        .map_err(|e| VmmError::Device {
            what: format!("{} transport {index} ({detail})", D::KIND),
            source: Box::new(e),
        })?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
        }
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
