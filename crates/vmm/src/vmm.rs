//! Building and running one VM: memory, KVM VM, kernel, ACPI, devices, vCPU threads and
//! the device event loop.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use forkvm_devices::legacy::{AcpiPowerPort, EventFdTrigger, Serial, I8042};
use forkvm_devices::virtio::block::{Block, BlockConfig};
use forkvm_devices::virtio::mmio::MmioTransport;
use forkvm_devices::virtio::net::{Net, NetConfig};
use forkvm_devices::virtio::rng::Rng;
use forkvm_devices::virtio::vsock::{Vsock, VsockConfig};
use forkvm_devices::virtio::VirtioDevice;
use libc::EFD_NONBLOCK;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::layout::{
    ACPI_POWER_PORT, I8042_PORT, IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{StopSink, VcpuRunner, VcpuStop};
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

/// Errors while booting or running a VM.
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
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// What failed.
        #[source]
        source: CpuSetupError,
    },
    /// A device could not be created.
    #[error("cannot create the {what} device: {source}")]
    Device {
        /// The device.
        what: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Too many devices for the interrupt lines.
    #[error("too many devices: no interrupt line left for the {0} device")]
    NoIrq(String),
    /// A bus registration failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
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
    /// The guest or KVM failed.
    Failed(String),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop when a vCPU, the i8042 or the power port asks to stop.
struct StopWatcher {
    evts: Vec<(EventFd, Option<VcpuStop>)>,
    sink: Arc<StopSink>,
    stopped: bool,
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
        self.stopped = self.sink.reason().is_some();
    }
}

/// A booted VM.
pub struct Vmm {
    ram: GuestRam,
    vm: Vm,
    events: EventManager<Subscriber>,
    stop: Arc<StopSink>,
    watcher: Arc<Mutex<StopWatcher>>,
    vcpu_threads: Vec<JoinHandle<()>>,
    exit_flag: Arc<AtomicBool>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    started: Instant,
}

struct DeviceSetup<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    events: &'a mut EventManager<Subscriber>,
    mmio: Bus,
    acpi_devices: Vec<MmioDeviceInfo>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceSetup<'_> {
    fn attach_virtio<D>(&mut self, what: &str, device: D) -> Result<(), VmmError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = self.transports.len() as u64;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        if irq > IRQ_MAX {
            return Err(VmmError::NoIrq(what.into()));
        }
        let base = VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE;
        let device = Arc::new(Mutex::new(device));
        self.events.add_subscriber(device.clone());
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let transport = MmioTransport::new(self.ram.memory().clone(), device, irq_evt)
            .map_err(|e| device_err(what)(Box::new(e)))?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.transports.push(transport);
        self.acpi_devices.push(MmioDeviceInfo {
            base,
            len: VIRTIO_MMIO_SIZE,
            irq,
        });
        Ok(())
    }
}

impl Vmm {
    /// Boots `cfg`: everything up to and including starting the vCPU threads. Guest
    /// console output goes to `console`.
    pub fn boot(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Self, VmmError> {
        let started = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpuCount(cfg.vcpus));
        }
        let ram = GuestRam::new(cfg.mem_mib)?;
        let vm = Vm::new()?;
        vm.register_memory(ram.memory())?;
        let mem = ram.memory();

        let kernel = load_kernel(mem, &cfg.kernel)?;
        let initrd = match &cfg.initrd {
            Some(path) => Some(load_initrd(mem, &kernel, path)?),
            None => None,
        };

        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd);
        let vcpu_stop_evt = evt()?;
        let stop = Arc::new(StopSink::new(
            vcpu_stop_evt.try_clone().map_err(VmmError::EventFd)?,
        ));

        // Legacy devices on the port bus.
        let mut pio = Bus::new();
        let serial_irq = evt()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFdTrigger::new(serial_irq),
            console,
        )));
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
        let reset_evt = evt()?;
        let poweroff_evt = evt()?;
        let dup = |e: &EventFd| e.try_clone().map_err(VmmError::EventFd);
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
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(serial))));

        // Virtio devices on the MMIO bus.
        let mut setup = DeviceSetup {
            vm: &vm,
            ram: &ram,
            events: &mut events,
            mmio: Bus::new(),
            acpi_devices: Vec::new(),
            transports: Vec::new(),
        };
        for (i, disk) in cfg.disks.iter().enumerate() {
            let what = format!("block ({})", disk.path.display());
            let dev = Block::new(BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
            })
            .map_err(|e| device_err(&what)(Box::new(e)))?;
            tracing::debug!(index = i, "attaching disk {}", disk.path.display());
            setup.attach_virtio(&what, dev)?;
        }
        for net in &cfg.nets {
            let what = format!("net (tap {})", net.tap);
            let dev = Net::new(NetConfig {
                tap_name: net.tap.clone(),
                mac: net.mac,
            })
            .map_err(|e| device_err(&what)(Box::new(e)))?;
            setup.attach_virtio(&what, dev)?;
        }
        if let Some(vsock) = &cfg.vsock {
            let what = format!("vsock (cid {}, {})", vsock.cid, vsock.uds.display());
            let dev = Vsock::new(VsockConfig {
                guest_cid: vsock.cid,
                uds_path: vsock.uds.clone(),
            })
            .map_err(|e| device_err(&what)(Box::new(e)))?;
            setup.attach_virtio(&what, dev)?;
        }
        if cfg.rng {
            let dev = Rng::new().map_err(|e| device_err("rng")(Box::new(e)))?;
            setup.attach_virtio("rng", dev)?;
        }
        let DeviceSetup {
            mmio,
            acpi_devices,
            transports,
            ..
        } = setup;

        let cmdline = build_cmdline(&cfg.cmdline)?;
        let acpi_end = write_acpi_tables(mem, cfg.vcpus, &acpi_devices)?;
        write_boot_params(mem, &kernel, &cmdline, initrd, acpi_end)?;
        write_boot_tables(mem).map_err(|source| VmmError::Vcpu { index: 0, source })?;

        let watcher = Arc::new(Mutex::new(StopWatcher {
            evts: vec![
                (vcpu_stop_evt, None),
                (reset_evt, Some(VcpuStop::Reset)),
                (poweroff_evt, Some(VcpuStop::PowerOff)),
            ],
            sink: stop.clone(),
            stopped: false,
        }));
        events.add_subscriber(watcher.clone());

        let base_cpuid = vm.supported_cpuid()?;
        let tsc_deadline = vm.has_tsc_deadline();
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let exit_flag = Arc::new(AtomicBool::new(false));
        let mut runners = Vec::with_capacity(cfg.vcpus as usize);
        for index in 0..cfg.vcpus {
            let verr = |source| VmmError::Vcpu { index, source };
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::Kvm {
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            let mut cpuid = base_cpuid.clone();
            patch_cpuid(&mut cpuid, index, cfg.vcpus, tsc_deadline);
            setup_cpuid_and_msrs(&fd, &cpuid).map_err(verr)?;
            setup_lapic(&fd).map_err(verr)?;
            if index == 0 {
                setup_boot_vcpu(&fd, kernel.entry).map_err(verr)?;
            }
            runners.push(VcpuRunner {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                exit_flag: exit_flag.clone(),
            });
        }
        let mut vcpu_threads = Vec::with_capacity(runners.len());
        for r in runners {
            vcpu_threads.push(r.spawn().map_err(VmmError::Thread)?);
        }
        tracing::info!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM started"
        );
        Ok(Self {
            ram,
            vm,
            events,
            stop,
            watcher,
            vcpu_threads,
            exit_flag,
            transports,
            started,
        })
    }

    /// Runs the device event loop until the guest stops.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        loop {
            self.events.run().map_err(VmmError::EventLoop)?;
            if self.watcher.lock().expect("watcher poisoned").stopped {
                break;
            }
        }
        Ok(match self.stop.reason() {
            Some(VcpuStop::PowerOff) => ExitReason::PowerOff,
            Some(VcpuStop::Reset) => ExitReason::Reset,
            Some(VcpuStop::Failed(why)) => ExitReason::Failed(why),
            None => ExitReason::Failed("stopped without a reason".into()),
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// When boot began.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The virtio transports, in MMIO order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Number of vCPU threads.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_threads.len()
    }

    /// Asks the vCPU threads to leave their loops at their next exit.
    pub fn request_exit(&self) {
        self.exit_flag
            .store(true, std::sync::atomic::Ordering::Release);
    }
}
