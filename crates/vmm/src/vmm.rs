//! Building and running one VM: memory, KVM VM, devices, vCPU threads and the device
//! event loop. A VM is either booted from a kernel or restored from a snapshot (a fork
//! child); both go through [`Vmm::build`].

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use forkvm_devices::legacy::{AcpiPowerPort, EventFdTrigger, Serial, I8042};
use forkvm_devices::virtio::block::{Block, BlockConfig};
use forkvm_devices::virtio::mmio::MmioTransport;
use forkvm_devices::virtio::net::{format_mac, Net, NetConfig};
use forkvm_devices::virtio::rng::Rng;
use forkvm_devices::virtio::vsock::{Vsock, VsockConfig};
use forkvm_devices::virtio::VirtioDevice;
use forkvm_devices::BusDevice;
use libc::EFD_NONBLOCK;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::control::{
    control_channel, error_chain, ControlError, ControlHandle, ControlInbox, DeviceInfo, Request,
    Response, RunState, VmInfo,
};
use crate::launch::ChildHomes;
use crate::layout::{
    ACPI_POWER_PORT, I8042_PORT, IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::{GuestRam, MemoryError};
use crate::snapshot::{ChildIdentity, VirtioDeviceState, VirtioSnapshot, VmSnapshot};
use crate::vcpu::{
    install_kick_handler, StopSink, VcpuHandle, VcpuRunner, VcpuStateError, VcpuStop,
};
use crate::vm::{Vm, VmError};
use crate::x86::acpi::{write_acpi_tables, AcpiError, MmioDeviceInfo};
use crate::x86::boot::{build_cmdline, load_initrd, load_kernel, write_boot_params, BootError};
use crate::x86::cpu::{
    patch_cpuid, setup_boot_vcpu, setup_cpuid_and_msrs, setup_lapic, write_boot_tables,
    CpuSetupError,
};

/// Offset of the virtio-mmio `QueueNotify` register.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// Most vCPUs a VM may have (APIC IDs fit in 8 bits, 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// Errors while booting, restoring or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The vCPU count is out of range.
    #[error("{0} vCPUs is not possible: use 1 to {MAX_VCPUS}")]
    BadVcpuCount(u8),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The KVM VM could not be created or configured.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A vCPU could not be configured.
    #[error("vCPU {index}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// What failed.
        #[source]
        source: CpuSetupError,
    },
    /// A vCPU's saved state could not be restored.
    #[error("vCPU {index}")]
    VcpuState {
        /// vCPU index.
        index: u8,
        /// What failed.
        #[source]
        source: VcpuStateError,
    },
    /// A device could not be created.
    #[error("cannot create the {what} device")]
    Device {
        /// The device.
        what: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The snapshot does not match what it is restored into.
    #[error("invalid snapshot: {0}")]
    BadSnapshot(String),
    /// Too many devices for the interrupt lines.
    #[error("too many devices: no interrupt line left for the {0} device")]
    NoIrq(String),
    /// A bus registration failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The event loop failed.
    #[error("the device event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

fn device_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> VmmError {
    let what = what.into();
    move |source| VmmError::Device { what, source }
}

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (the VMM does not restart it).
    Reset,
    /// A control request stopped the VM.
    Stopped,
    /// The guest or KVM failed.
    Failed(String),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device, typed, so its state can be saved and its identity changed.
#[derive(Clone)]
pub enum VirtioKind {
    /// virtio-blk.
    Block(Arc<Mutex<Block>>),
    /// virtio-net.
    Net(Arc<Mutex<Net>>),
    /// virtio-vsock.
    Vsock(Arc<Mutex<Vsock>>),
    /// virtio-rng.
    Rng(Arc<Mutex<Rng>>),
}

impl VirtioKind {
    fn name(&self) -> &'static str {
        match self {
            VirtioKind::Block(_) => "block",
            VirtioKind::Net(_) => "net",
            VirtioKind::Vsock(_) => "vsock",
            VirtioKind::Rng(_) => "rng",
        }
    }

    /// The device's saved state.
    pub fn save(&self) -> VirtioDeviceState {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        match self {
            VirtioKind::Block(d) => VirtioDeviceState::Block(lock(d).save()),
            VirtioKind::Net(d) => {
                let d = lock(d);
                VirtioDeviceState::Net(d.save(), d.tap_name().unwrap_or_default().to_owned())
            }
            VirtioKind::Vsock(d) => VirtioDeviceState::Vsock(lock(d).save()),
            VirtioKind::Rng(d) => VirtioDeviceState::Rng(lock(d).save()),
        }
    }
}

/// A virtio device attached to the MMIO bus.
#[derive(Clone)]
pub struct AttachedVirtio {
    /// The device.
    pub kind: VirtioKind,
    /// Its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What the API shows.
    pub detail: String,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// Wakes the event loop when a vCPU, the i8042 or the power port asks to stop.
struct StopWatcher {
    evts: Vec<(EventFd, Option<VcpuStop>)>,
    sink: Arc<StopSink>,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, _) in &self.evts {
            ops.add(Events::new(evt, EventSet::IN))
                .expect("a fresh eventfd can be watched");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for (evt, stop) in &self.evts {
            if std::os::fd::AsRawFd::as_raw_fd(evt) == events.fd() {
                let _ = evt.read();
                if let Some(stop) = stop {
                    self.sink.report(stop.clone());
                }
            }
        }
    }
}

/// Wakes the event loop when a control request arrives.
struct ControlWaker(Arc<EventFd>);

impl MutEventSubscriber for ControlWaker {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&*self.0, EventSet::IN))
            .expect("a fresh eventfd can be watched");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Where a VM comes from.
pub(crate) enum Origin<'a> {
    /// Boot the kernel in the configuration.
    Boot,
    /// Restore a snapshot (a fork child): vCPUs start paused.
    Restore {
        snapshot: &'a VmSnapshot,
        identity: &'a ChildIdentity,
    },
}

/// A running (or paused) VM.
pub struct Vmm {
    pub(crate) cfg: VmConfig,
    pub(crate) ram: GuestRam,
    pub(crate) vm: Vm,
    events: EventManager<Subscriber>,
    stop: Arc<StopSink>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) virtio: Vec<AttachedVirtio>,
    control: ControlInbox,
    control_handle: ControlHandle,
    paused: bool,
    stopped_by_request: bool,
    started: Instant,
    pub(crate) fork_seq: u32,
    pub(crate) child_homes: Option<ChildHomes>,
}

struct DeviceSetup<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    events: &'a mut EventManager<Subscriber>,
    mmio: Bus,
    acpi_devices: Vec<MmioDeviceInfo>,
    attached: Vec<AttachedVirtio>,
}

impl DeviceSetup<'_> {
    /// Puts `device` on the next MMIO window and IRQ, restoring its transport's saved
    /// registers when given.
    fn attach_virtio<D>(
        &mut self,
        detail: String,
        device: D,
        wrap: fn(Arc<Mutex<D>>) -> VirtioKind,
        transport_state: Option<&forkvm_devices::virtio::mmio::MmioTransportState>,
    ) -> Result<(), VmmError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = self.attached.len() as u64;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        if irq > IRQ_MAX {
            return Err(VmmError::NoIrq(detail));
        }
        let base = VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE;
        let typed = Arc::new(Mutex::new(device));
        self.events.add_subscriber(typed.clone());
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let device: Arc<Mutex<dyn VirtioDevice>> = typed.clone();
        let mem = self.ram.memory().clone();
        let transport = match transport_state {
            None => MmioTransport::new(mem, device, irq_evt),
            Some(state) => MmioTransport::restore(mem, device, irq_evt, state),
        }
        .map_err(|e| device_err(detail.clone())(Box::new(e)))?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.attached.push(AttachedVirtio {
            kind: wrap(typed),
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

    /// Creates the devices `cfg` asks for.
    fn attach_configured(&mut self, cfg: &VmConfig) -> Result<(), VmmError> {
        for disk in &cfg.disks {
            let what = format!(
                "{}{}",
                disk.path.display(),
                if disk.read_only { " (ro)" } else { "" }
            );
            let dev = Block::new(BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
            })
            .map_err(|e| device_err(format!("block {what}"))(Box::new(e)))?;
            self.attach_virtio(what, dev, VirtioKind::Block, None)?;
        }
        for net in &cfg.nets {
            let dev = Net::new(NetConfig {
                tap_name: net.tap.clone(),
                mac: net.mac,
            })
            .map_err(|e| device_err(format!("net (tap {})", net.tap))(Box::new(e)))?;
            let what = format!("tap {} mac {}", net.tap, format_mac(&dev.mac()));
            self.attach_virtio(what, dev, VirtioKind::Net, None)?;
        }
        if let Some(vsock) = &cfg.vsock {
            let what = format!("cid {} uds {}", vsock.cid, vsock.uds.display());
            let dev = Vsock::new(VsockConfig {
                guest_cid: vsock.cid,
                uds_path: vsock.uds.clone(),
            })
            .map_err(|e| device_err(format!("vsock {what}"))(Box::new(e)))?;
            self.attach_virtio(what, dev, VirtioKind::Vsock, None)?;
        }
        if cfg.rng {
            let dev = Rng::new().map_err(|e| device_err("rng")(Box::new(e)))?;
            self.attach_virtio("getrandom".into(), dev, VirtioKind::Rng, None)?;
        }
        Ok(())
    }

    /// Restores the devices of a snapshot, giving the child its own identity.
    fn attach_restored(&mut self, snap: &VmSnapshot, id: &ChildIdentity) -> Result<(), VmmError> {
        let mut nets = 0usize;
        for slot in &snap.virtio {
            let VirtioSnapshot { device, transport } = slot;
            let t = Some(transport);
            match device {
                VirtioDeviceState::Block(s) => {
                    let dev = Block::restore(s).map_err(|e| {
                        device_err(format!("block {}", s.config.path.display()))(Box::new(e))
                    })?;
                    let what = format!(
                        "{}{}",
                        s.config.path.display(),
                        if s.config.read_only { " (ro)" } else { "" }
                    );
                    self.attach_virtio(what, dev, VirtioKind::Block, t)?;
                }
                VirtioDeviceState::Net(s, _parent_tap) => {
                    let tap = id.taps.get(nets).cloned().ok_or_else(|| {
                        VmmError::BadSnapshot(format!("no TAP given for the child's NIC {nets}"))
                    })?;
                    let mac = id.macs.get(nets).copied();
                    nets += 1;
                    let dev = Net::restore(
                        NetConfig {
                            tap_name: tap.clone(),
                            mac,
                        },
                        s,
                    )
                    .map_err(|e| device_err(format!("net (tap {tap})"))(Box::new(e)))?;
                    let what = format!("tap {tap} mac {}", format_mac(&dev.mac()));
                    self.attach_virtio(what, dev, VirtioKind::Net, t)?;
                }
                VirtioDeviceState::Vsock(s) => {
                    let (Some(cid), Some(uds)) = (id.cid, id.vsock_uds.clone()) else {
                        return Err(VmmError::BadSnapshot(
                            "no vsock identity for the child".into(),
                        ));
                    };
                    let dev = Vsock::restore(
                        VsockConfig {
                            guest_cid: cid,
                            uds_path: uds.clone(),
                        },
                        s,
                    )
                    .map_err(|e| device_err(format!("vsock cid {cid}"))(Box::new(e)))?;
                    self.attach_virtio(
                        format!("cid {cid} uds {}", uds.display()),
                        dev,
                        VirtioKind::Vsock,
                        t,
                    )?;
                }
                VirtioDeviceState::Rng(s) => {
                    let dev = Rng::restore(s).map_err(|e| device_err("rng")(Box::new(e)))?;
                    self.attach_virtio("getrandom".into(), dev, VirtioKind::Rng, t)?;
                }
            }
        }
        Ok(())
    }
}

impl Vmm {
    /// Boots `cfg`: everything up to and including starting the vCPU threads. Guest
    /// console output goes to `console`.
    pub fn boot(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Self, VmmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpuCount(cfg.vcpus));
        }
        let ram = GuestRam::new(cfg.mem_mib)?;
        Self::build(cfg, ram, console, Origin::Boot)
    }

    /// Creates the VM around `ram` and starts its vCPU threads (paused when restoring).
    pub(crate) fn build(
        cfg: &VmConfig,
        ram: GuestRam,
        console: Box<dyn Write + Send>,
        origin: Origin<'_>,
    ) -> Result<Self, VmmError> {
        let started = Instant::now();
        let vm = Vm::new()?;
        vm.register_memory(ram.memory())?;
        let mem = ram.memory();

        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd);
        let dup = |e: &EventFd| e.try_clone().map_err(VmmError::EventFd);
        let vcpu_stop_evt = evt()?;
        let stop = Arc::new(StopSink::new(dup(&vcpu_stop_evt)?));

        // Legacy devices on the port bus.
        let mut pio = Bus::new();
        let serial_irq = evt()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
        let serial = match &origin {
            Origin::Boot => Serial::new(EventFdTrigger::new(serial_irq), console),
            Origin::Restore { snapshot, .. } => {
                Serial::restore(&snapshot.serial, EventFdTrigger::new(serial_irq), console)
                    .map_err(|e| VmmError::BadSnapshot(format!("serial: {e:?}")))?
            }
        };
        let serial = Arc::new(Mutex::new(serial));
        let serial_bus: Arc<Mutex<dyn BusDevice>> = serial.clone();
        pio.insert(serial_bus, u64::from(SERIAL_PORT), 8)?;
        let reset_evt = evt()?;
        let poweroff_evt = evt()?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(dup(
                &reset_evt,
            )?)))),
            u64::from(I8042_PORT),
            5,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerPort::new(
                EventFdTrigger::new(dup(&poweroff_evt)?),
                EventFdTrigger::new(dup(&reset_evt)?),
            ))),
            u64::from(ACPI_POWER_PORT),
            1,
        )?;
        if matches!(origin, Origin::Boot) && cfg.console_input {
            events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(serial.clone()))));
        }
        let (control_handle, control) = control_channel().map_err(VmmError::EventFd)?;
        events.add_subscriber(Arc::new(Mutex::new(ControlWaker(control.wake.clone()))));
        events.add_subscriber(Arc::new(Mutex::new(StopWatcher {
            evts: vec![
                (vcpu_stop_evt, None),
                (reset_evt, Some(VcpuStop::Reset)),
                (poweroff_evt, Some(VcpuStop::PowerOff)),
            ],
            sink: stop.clone(),
        })));

        // Virtio devices on the MMIO bus.
        let mut setup = DeviceSetup {
            vm: &vm,
            ram: &ram,
            events: &mut events,
            mmio: Bus::new(),
            acpi_devices: Vec::new(),
            attached: Vec::new(),
        };
        match &origin {
            Origin::Boot => setup.attach_configured(cfg)?,
            Origin::Restore { snapshot, identity } => setup.attach_restored(snapshot, identity)?,
        }
        let DeviceSetup {
            mmio,
            acpi_devices,
            attached,
            ..
        } = setup;

        // Guest memory contents: a fresh boot writes the kernel and boot structures; a
        // restored VM already has them in its memory.
        let entry = match &origin {
            Origin::Boot => {
                let kernel = load_kernel(mem, &cfg.kernel)?;
                let initrd = match &cfg.initrd {
                    Some(path) => Some(load_initrd(mem, &kernel, path)?),
                    None => None,
                };
                let cmdline = build_cmdline(&cfg.cmdline)?;
                let acpi_end = write_acpi_tables(mem, cfg.vcpus, &acpi_devices)?;
                write_boot_params(mem, &kernel, &cmdline, initrd, acpi_end)?;
                write_boot_tables(mem).map_err(|source| VmmError::Vcpu { index: 0, source })?;
                Some(kernel.entry)
            }
            Origin::Restore { snapshot, .. } => {
                if snapshot.vcpus.len() != usize::from(cfg.vcpus) {
                    return Err(VmmError::BadSnapshot(format!(
                        "{} vCPU states for {} vCPUs",
                        snapshot.vcpus.len(),
                        cfg.vcpus
                    )));
                }
                vm.restore_arch(&snapshot.arch, snapshot.elapsed_ns())?;
                None
            }
        };

        let base_cpuid = vm.supported_cpuid()?;
        let tsc_deadline = vm.has_tsc_deadline();
        let msr_candidates = Arc::new(vm.msr_index_list()?);
        install_kick_handler().map_err(|e| VmmError::Thread(e.into()))?;
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for index in 0..cfg.vcpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::Kvm {
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            let mut cpuid = base_cpuid.clone();
            patch_cpuid(&mut cpuid, index, cfg.vcpus, tsc_deadline);
            let verr = |source| VmmError::Vcpu { index, source };
            setup_cpuid_and_msrs(&fd, &cpuid).map_err(verr)?;
            match (&origin, entry) {
                (Origin::Boot, Some(entry)) => {
                    setup_lapic(&fd).map_err(verr)?;
                    if index == 0 {
                        setup_boot_vcpu(&fd, entry).map_err(verr)?;
                    }
                }
                (Origin::Restore { snapshot, .. }, _) => {
                    snapshot.vcpus[usize::from(index)]
                        .restore(&fd, snapshot.elapsed_ns())
                        .map_err(|source| VmmError::VcpuState { index, source })?;
                }
                (Origin::Boot, None) => unreachable!("a boot always has an entry point"),
            }
            let runner = VcpuRunner {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                msr_candidates: msr_candidates.clone(),
                start_paused: matches!(origin, Origin::Restore { .. }),
            };
            vcpus.push(runner.spawn().map_err(VmmError::Thread)?);
        }
        tracing::info!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM built"
        );
        Ok(Self {
            cfg: cfg.clone(),
            ram,
            vm,
            events,
            stop,
            vcpus,
            serial,
            virtio: attached,
            control,
            control_handle,
            paused: matches!(origin, Origin::Restore { .. }),
            stopped_by_request: false,
            started,
            fork_seq: 0,
            child_homes: None,
        })
    }

    /// Runs the device event loop, serving control requests, until the guest stops.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        loop {
            self.events.run().map_err(VmmError::EventLoop)?;
            while let Ok((req, reply)) = self.control.rx.try_recv() {
                let stop_now = matches!(req, Request::Stop);
                let _ = reply.send(self.handle_request(req));
                if stop_now {
                    self.stopped_by_request = true;
                }
            }
            if self.stopped_by_request {
                return Ok(ExitReason::Stopped);
            }
            if let Some(reason) = self.stop.reason() {
                return Ok(match reason {
                    VcpuStop::PowerOff => ExitReason::PowerOff,
                    VcpuStop::Reset => ExitReason::Reset,
                    VcpuStop::Failed(why) => ExitReason::Failed(why),
                });
            }
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// When the VM was created (booted or restored).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The virtio devices, in MMIO order.
    pub fn virtio_devices(&self) -> &[AttachedVirtio] {
        &self.virtio
    }

    /// A handle other threads use to control this VMM while [`Vmm::run`] runs.
    pub fn control_handle(&self) -> ControlHandle {
        self.control_handle.clone()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Where the VMs this VM forks register (see [`crate::fork`]); a VM that has none
    /// refuses to fork.
    pub fn set_child_homes(&mut self, homes: ChildHomes) {
        self.child_homes = Some(homes);
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses every vCPU (idempotent).
    pub fn pause(&mut self) -> Result<(), ControlError> {
        for v in &self.vcpus {
            v.pause()
                .map_err(|e| ControlError::Failed(error_chain(&e)))?;
        }
        self.paused = true;
        Ok(())
    }

    /// Resumes every vCPU (idempotent).
    pub fn resume(&mut self) -> Result<(), ControlError> {
        for v in &self.vcpus {
            v.resume()
                .map_err(|e| ControlError::Failed(error_chain(&e)))?;
        }
        self.paused = false;
        Ok(())
    }

    /// Serves one control request on the event-loop thread.
    fn handle_request(&mut self, req: Request) -> Result<Response, ControlError> {
        match req {
            Request::Info => Ok(Response::Info(self.info())),
            Request::Pause if self.paused => {
                Err(ControlError::Conflict("the VM is already paused".into()))
            }
            Request::Pause => self.pause().map(|()| Response::Done),
            Request::Resume if !self.paused => {
                Err(ControlError::Conflict("the VM is not paused".into()))
            }
            Request::Resume => self.resume().map(|()| Response::Done),
            Request::Stop => Ok(Response::Done),
            Request::Fork(req) => self.fork(&req).map(Response::Forked),
            Request::SaveTemplate(dir) => self.save_template(&dir).map(Response::TemplateSaved),
        }
    }

    /// State, devices and counters, as the API reports them.
    pub fn info(&self) -> VmInfo {
        let (rss_bytes, private_bytes) = process_memory();
        VmInfo {
            state: if self.paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            vcpus: self.cfg.vcpus,
            mem_mib: self.cfg.mem_mib,
            devices: self
                .virtio
                .iter()
                .map(|d| DeviceInfo {
                    kind: d.kind.name().into(),
                    detail: d.detail.clone(),
                    mmio_base: d.base,
                    irq: d.irq,
                })
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            exits: crate::vcpu::exit_counts(),
            rss_bytes,
            private_bytes,
        }
    }
}

impl Vmm {
    /// Captures the complete state of this VM, which must be paused.
    pub fn capture(&self) -> Result<VmSnapshot, ControlError> {
        if !self.is_paused() {
            return Err(ControlError::Conflict("capture needs a paused VM".into()));
        }
        let fail = |what: &str, e: &dyn std::error::Error| {
            ControlError::Failed(format!("{what}: {}", error_chain(e)))
        };
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(
                v.save()
                    .map_err(|e| fail(&format!("vCPU {}", v.index()), &e))?,
            );
        }
        let arch = self.vm.save_arch().map_err(|e| fail("VM state", &e))?;
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for d in &self.virtio {
            let transport = d
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save()
                .map_err(|e| fail(&format!("device {}", d.detail), &e))?;
            virtio.push(VirtioSnapshot {
                device: d.kind.save(),
                transport,
            });
        }
        Ok(VmSnapshot {
            config: self.cfg.clone(),
            vcpus,
            arch,
            serial,
            virtio,
            captured_realtime_ns: crate::snapshot::realtime_ns(),
        })
    }
}

/// (RSS, private) bytes of this process, from /proc/self/smaps_rollup.
pub fn process_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    parse_smaps_rollup(&text)
}

/// (Rss, Private_Clean + Private_Dirty) in bytes from smaps_rollup text.
pub fn parse_smaps_rollup(text: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (
        field("Rss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_fields_are_summed_in_bytes() {
        let text = "00400000-7fff [rollup]\nRss:                1200 kB\nPss:  900 kB\nPrivate_Clean:  100 kB\nPrivate_Dirty:   24 kB\n";
        assert_eq!(parse_smaps_rollup(text), (1200 * 1024, 124 * 1024));
        assert_eq!(parse_smaps_rollup(""), (0, 0));
    }
}
