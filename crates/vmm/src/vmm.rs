//! Building and running one VM: memory, KVM VM, devices, vCPU threads and the device
//! event loop. A VM is either booted from a kernel or restored from a snapshot (a fork
//! child); both go through [`Vmm::build`].

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use forkvm_devices::legacy::{AcpiPowerPort, EventFdTrigger, Serial, SerialArgs, I8042};
use forkvm_devices::{BusDevice, Persist};
use libc::EFD_NONBLOCK;
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::control::{
    control_channel, error_chain, ControlError, ControlHandle, ControlInbox, DeviceInfo, Request,
    Response, RunState, VmInfo,
};
use crate::devices::{AttachedVirtio, DeviceSetup};
use crate::fork::PendingFork;
use crate::identity_port::IdentityPort;
use crate::launch::ChildHomes;
use crate::layout::{
    ACPI_POWER_PORT, I8042_PORT, IDENTITY_IRQ, IDENTITY_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::memory::{GuestRam, MemoryError};
use crate::pool::ChildPool;
use crate::snapshot::VmSnapshot;
use crate::steps::Steps;
use crate::vcpu::{
    install_kick_handler, HostCpu, StopSink, VcpuArgs, VcpuError, VcpuHandle, VcpuStop,
};
use crate::vm::{Vm, VmArgs, VmError};
use crate::warm::Prepared;
use crate::x86::acpi::{write_acpi_tables, AcpiError};
use crate::x86::boot::{build_cmdline, load_initrd, load_kernel, write_boot_params, BootError};
use crate::x86::cpu::write_boot_tables;

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
        source: VcpuError,
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
    /// Eventfds asked ahead for a device beyond what any VM has.
    #[error("cannot make eventfds ahead for device {index} with {queues} queues (at most {} devices of {} queues)", crate::devices::MAX_VIRTIO_DEVICES, crate::devices::MAX_QUEUES_AHEAD)]
    Ahead {
        /// The device's index in MMIO order.
        index: usize,
        /// Its queues.
        queues: u16,
    },
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

/// What the device event loop runs.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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

/// How a VM's vCPUs start.
enum Start<'a> {
    /// From power-on, vCPU 0 at the kernel's entry point.
    Boot(GuestAddress),
    /// From their saved state.
    Restore(&'a VmSnapshot),
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
    pub(crate) identity_port: IdentityPort,
    pub(crate) virtio: Vec<AttachedVirtio>,
    control: ControlInbox,
    control_handle: ControlHandle,
    paused: bool,
    stopped_by_request: bool,
    started: Instant,
    pub(crate) fork_seq: u32,
    pub(crate) child_homes: Option<ChildHomes>,
    pub(crate) pool: Option<ChildPool>,
    /// Threads finishing forks ([`Vmm::start_fork`]), joined before [`Vmm::run`] returns.
    forks_finishing: Vec<std::thread::JoinHandle<()>>,
}

/// How the event loop served a control request.
enum Served {
    /// The answer.
    Now(Result<Response, ControlError>),
    /// A fork whose parent runs again, to be finished off the loop.
    Later(Box<PendingFork>),
}

impl Vmm {
    /// Boots `cfg`: everything up to and including starting the vCPU threads. Guest
    /// console output goes to `console`.
    pub fn boot(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Self, VmmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpuCount(cfg.vcpus));
        }
        let mut steps = Steps::new(Instant::now());
        let ram = GuestRam::new(cfg.mem_mib)?;
        steps.mark("memory");
        let vmm = Self::build(cfg, ram, console, None, None, &mut steps)?;
        tracing::info!("VM built after {steps}");
        Ok(vmm)
    }

    /// Creates the VM around `ram` and starts its vCPU threads: a boot of `cfg`, or a
    /// restore of `saved` (with `cfg`, the child's own configuration), whose vCPUs start
    /// paused. A restore uses the KVM VM and vCPUs of `prepared` when it has as many
    /// vCPUs (a warm fork child, see [`crate::pool`]). Each step's time goes to `steps`.
    pub(crate) fn build(
        cfg: &VmConfig,
        ram: GuestRam,
        console: Box<dyn Write + Send>,
        saved: Option<&VmSnapshot>,
        prepared: Option<Prepared>,
        steps: &mut Steps,
    ) -> Result<Self, VmmError> {
        let started = Instant::now();
        if let Some(snapshot) = saved {
            if snapshot.vcpus.len() != usize::from(cfg.vcpus) {
                return Err(VmmError::BadSnapshot(format!(
                    "{} vCPU states for {} vCPUs",
                    snapshot.vcpus.len(),
                    cfg.vcpus
                )));
            }
        }
        let advance_ns = saved.map_or(0, VmSnapshot::elapsed_ns);
        let prepared = prepared.filter(|p| saved.is_some() && p.fits(cfg.vcpus));
        let warm = prepared.is_some();
        // A warm process's memory is in its VM's slots already, and it is `ram` when
        // the restore took it (see `ChildPayload::restore`).
        let slots_made = prepared.as_ref().is_some_and(|p| p.slots_made());
        let (made, host, made_vcpus, parked, serial_ahead, devices_ahead) = match prepared {
            Some(p) => (
                Some(p.vm),
                Some(p.host),
                p.vcpus,
                p.threads,
                p.serial_irqs,
                p.devices,
            ),
            None => (None, None, Vec::new(), Vec::new(), None, Vec::new()),
        };
        let (serial_ahead, identity_irq_ahead) = match serial_ahead {
            Some((com1, com2)) => (Some(com1), Some(com2)),
            None => (None, None),
        };
        let vm = match saved {
            None => Vm::new()?,
            Some(snapshot) => Vm::restore(VmArgs { advance_ns, made }, &snapshot.arch)?,
        };
        let host = match host {
            Some(h) => h,
            None => HostCpu::query(&vm)?,
        };
        steps.mark("KVM VM");
        if !slots_made {
            vm.register_memory(ram.memory())?;
            steps.mark("memory slots");
        }
        let mem = ram.memory();

        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd);
        let dup = |e: &EventFd| e.try_clone().map_err(VmmError::EventFd);
        let vcpu_stop_evt = evt()?;
        let stop = Arc::new(StopSink::new(dup(&vcpu_stop_evt)?));

        // Legacy devices on the port bus.
        let mut pio = Bus::new();
        let serial_irq = match serial_ahead {
            Some(made) => made,
            None => {
                let e = evt()?;
                vm.register_irqfd(&e, SERIAL_IRQ)?;
                e
            }
        };
        let serial_args = SerialArgs {
            irq: EventFdTrigger::new(serial_irq),
            out: console,
        };
        let serial = match saved {
            None => Serial::new(serial_args.irq, serial_args.out),
            Some(snapshot) => Serial::restore(serial_args, &snapshot.serial)
                .map_err(|e| VmmError::BadSnapshot(format!("serial: {e}")))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let serial_bus: Arc<Mutex<dyn BusDevice>> = serial.clone();
        pio.insert(serial_bus, u64::from(SERIAL_PORT), 8)?;
        let identity_irq = match identity_irq_ahead {
            Some(made) => made,
            None => {
                let e = evt()?;
                vm.register_irqfd(&e, IDENTITY_IRQ)?;
                e
            }
        };
        let identity_port = IdentityPort::new(
            EventFdTrigger::new(identity_irq),
            saved.map(|snapshot| &snapshot.identity_port),
        )
        .map_err(|e| VmmError::BadSnapshot(format!("identity port: {e}")))?;
        pio.insert(identity_port.serial(), u64::from(IDENTITY_PORT), 8)?;
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
        if saved.is_none() && cfg.console_input {
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

        steps.mark("legacy devices");
        // Virtio devices on the MMIO bus.
        let mut setup = DeviceSetup::new(
            &vm,
            &ram,
            &mut events,
            saved.map(|snapshot| snapshot.virtio.as_slice()),
            devices_ahead,
        );
        setup.attach_all(cfg)?;
        let DeviceSetup {
            mmio,
            acpi_devices,
            attached,
            ..
        } = setup;
        steps.mark("virtio devices");

        // Guest memory contents: a fresh boot writes the kernel and boot structures; a
        // restored VM already has them in its memory.
        let start = match saved {
            None => {
                let kernel = load_kernel(mem, &cfg.kernel)?;
                let initrd = match &cfg.initrd {
                    Some(path) => Some(load_initrd(mem, &kernel, path)?),
                    None => None,
                };
                let cmdline = build_cmdline(&cfg.cmdline)?;
                let acpi_end = write_acpi_tables(mem, cfg.vcpus, &acpi_devices)?;
                write_boot_params(mem, &kernel, &cmdline, initrd, acpi_end)?;
                write_boot_tables(mem).map_err(|source| VmmError::Vcpu {
                    index: 0,
                    source: source.into(),
                })?;
                steps.mark("kernel");
                Start::Boot(kernel.entry)
            }
            Some(snapshot) => Start::Restore(snapshot),
        };

        install_kick_handler().map_err(|e| VmmError::Thread(e.into()))?;
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        // Made ahead in index order; handed out in the same order.
        let mut made_vcpus = made_vcpus.into_iter();
        let mut parked = parked.into_iter();
        for index in 0..cfg.vcpus {
            let args = VcpuArgs {
                vm: &vm,
                index,
                count: cfg.vcpus,
                host: &host,
                made: made_vcpus.next(),
                parked: parked.next(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                advance_ns,
            };
            let vcpu = match start {
                Start::Boot(entry) => VcpuHandle::boot(args, entry),
                Start::Restore(snapshot) => {
                    VcpuHandle::restore(args, &snapshot.vcpus[usize::from(index)])
                }
            };
            vcpus.push(vcpu.map_err(|source| VmmError::Vcpu { index, source })?);
        }
        steps.mark("vCPUs");
        // A restored device's interrupt the saved interrupt controllers may not hold
        // (KVM injects irqfd interrupts asynchronously) is raised again, now that the
        // controllers and vCPUs are restored: the guest would otherwise wait for it.
        if saved.is_some() {
            for a in &attached {
                let interrupt = a
                    .transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .interrupt();
                interrupt.resignal_pending().map_err(|e| VmmError::Device {
                    what: format!("{} (its pending interrupt)", a.detail),
                    source: Box::new(e),
                })?;
            }
        }
        if saved.is_some() {
            steps.mark("interrupts");
        }
        tracing::debug!(warm, "VM built");
        Ok(Self {
            cfg: cfg.clone(),
            ram,
            vm,
            events,
            stop,
            vcpus,
            serial,
            identity_port,
            virtio: attached,
            control,
            control_handle,
            paused: saved.is_some(),
            stopped_by_request: false,
            started,
            fork_seq: 0,
            child_homes: None,
            pool: None,
            forks_finishing: Vec::new(),
        })
    }

    /// Runs the device event loop, serving control requests, until the guest stops.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let reason = self.serve();
        // A fork still finishing answers its caller before the process ends.
        for f in self.forks_finishing.drain(..) {
            let _ = f.join();
        }
        reason
    }

    fn serve(&mut self) -> Result<ExitReason, VmmError> {
        loop {
            self.events.run().map_err(VmmError::EventLoop)?;
            while let Ok((req, deadline, reply)) = self.control.rx.try_recv() {
                // Its caller has given up and answered for it: not carried out late,
                // behind the caller's back.
                if std::time::Instant::now() > deadline {
                    tracing::warn!(?req, "a control request expired before it was served");
                    continue;
                }
                let stop_now = matches!(req, Request::Stop);
                match self.handle_request(req) {
                    Served::Now(answer) => {
                        let _ = reply.send(answer);
                    }
                    Served::Later(fork) => self.finish_fork_later(fork, reply),
                }
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

    /// Finishes `fork` on a thread of its own and answers `reply` from there: the event
    /// loop goes back to the devices and to other requests while the children start.
    fn finish_fork_later(
        &mut self,
        fork: Box<PendingFork>,
        reply: std::sync::mpsc::Sender<Result<Response, ControlError>>,
    ) {
        self.forks_finishing.retain(|t| !t.is_finished());
        // Handed back if the thread cannot start, to be finished here.
        let job = Arc::new(Mutex::new(Some((fork, reply))));
        let theirs = job.clone();
        let spawned = std::thread::Builder::new()
            .name("fork-finish".into())
            .spawn(move || {
                let taken = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some((fork, reply)) = taken {
                    let _ = reply.send(fork.finish().map(Response::Forked));
                }
            });
        match spawned {
            Ok(t) => self.forks_finishing.push(t),
            Err(e) => {
                tracing::warn!("cannot start a thread to finish the fork, finishing it here: {e}");
                let taken = job.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some((fork, reply)) = taken {
                    let _ = reply.send(fork.finish().map(Response::Forked));
                }
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

    /// The identity port (COM2): how a fork child's identity reaches its guest agent.
    pub fn identity_port(&self) -> IdentityPort {
        self.identity_port.clone()
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

    /// Fills this VM's pool of warm fork children ([`crate::pool`]), as large as its
    /// configuration says (none when that is 0); a pool that exists is refilled. A booted
    /// VM does this once it runs; a fork child only when it first forks itself, so that a
    /// hundred children do not start a hundred pools.
    pub fn fill_fork_pool(&mut self) {
        match &self.pool {
            Some(pool) => pool.refill(),
            None => self.start_fork_pool(true),
        }
    }

    /// Starts this VM's pool of warm fork children if it has none and its configuration
    /// asks for one: filling it now, or once refilled.
    pub(crate) fn start_fork_pool(&mut self, fill_now: bool) {
        if self.pool.is_some() || self.cfg.fork_pool == 0 {
            return;
        }
        // Its children write where it does (their sockets lie beside its).
        let places = self
            .child_homes
            .as_ref()
            .map(|h| crate::launch::places(&h.root, Some(&self.cfg)))
            .unwrap_or_default();
        // Held until it has the memory to map ahead.
        let started = ChildPool::for_children(
            self.cfg.fork_pool,
            self.cfg.vcpus,
            self.cfg.mem_mib,
            crate::devices::shape_of(&self.virtio),
            self.child_homes.clone(),
            places,
            false,
        );
        match started {
            Ok(pool) => {
                self.pool = Some(pool);
                self.give_pool_memory();
                if fill_now {
                    self.fill_fork_pool();
                }
            }
            Err(e) => tracing::warn!("cannot start the fork pool: {e}"),
        }
    }

    /// Has the warm processes the pool starts from now on map this VM's memory as it
    /// is now (after a fork: as its children map it) while they wait.
    pub(crate) fn give_pool_memory(&self) {
        if let Some(pool) = &self.pool {
            let (files, layout) = self.ram.layers();
            if let Err(e) = pool.set_memory(&files, layout) {
                tracing::warn!("cannot give the fork pool the memory to map ahead: {e}");
            }
        }
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses every vCPU (idempotent).
    pub fn pause(&mut self) -> Result<(), ControlError> {
        VcpuHandle::pause_all(&self.vcpus).map_err(|e| ControlError::Failed(error_chain(&e)))?;
        self.paused = true;
        Ok(())
    }

    /// Tells every vCPU of a VM restored paused to run, without waiting for their
    /// answers: a fork child reports running now, and [`Vmm::confirm_resumed`] after.
    /// (On a host with one CPU, the first vCPU woken takes the CPU for its time slice
    /// either way: measured, the report came no sooner.)
    pub fn release_vcpus(&mut self) -> Result<(), ControlError> {
        VcpuHandle::release_all(&self.vcpus).map_err(|e| ControlError::Failed(error_chain(&e)))
    }

    /// Waits until every vCPU [`Vmm::release_vcpus`] told to run has answered.
    pub fn confirm_resumed(&mut self) -> Result<(), ControlError> {
        VcpuHandle::confirm_resumed(&self.vcpus)
            .map_err(|e| ControlError::Failed(error_chain(&e)))?;
        self.paused = false;
        Ok(())
    }

    /// Resumes every vCPU (idempotent).
    pub fn resume(&mut self) -> Result<(), ControlError> {
        VcpuHandle::resume_all(&self.vcpus).map_err(|e| ControlError::Failed(error_chain(&e)))?;
        self.paused = false;
        Ok(())
    }

    /// Serves one control request on the event-loop thread: answered now, or (a fork,
    /// once its parent runs again) later.
    fn handle_request(&mut self, req: Request) -> Served {
        Served::Now(match req {
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
            Request::Fork(req) => match self.start_fork(&req) {
                Ok(fork) => return Served::Later(Box::new(fork)),
                Err(e) => Err(e),
            },
            Request::SaveTemplate(dir) => self.save_template(&dir).map(Response::TemplateSaved),
        })
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
                    kind: d
                        .device
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .kind()
                        .into(),
                    detail: d.detail.clone(),
                    mmio_base: d.base,
                    irq: d.irq,
                })
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            exits: crate::vcpu::exit_counts(),
            rss_bytes,
            private_bytes,
            landlock: forkvm_jail::landlock::bound().cloned(),
            fork_pool: self.pool.as_ref().map(ChildPool::pids).unwrap_or_default(),
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
        let arch = self.vm.save().map_err(|e| fail("VM state", &e))?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save()
            .map_err(|e| fail("serial", &e))?;
        let identity_port = self
            .identity_port
            .save()
            .map_err(|e| fail("identity port", &e))?;
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for d in &self.virtio {
            virtio.push(
                d.save()
                    .map_err(|e| fail(&format!("device {}", d.detail), &*e))?,
            );
        }
        Ok(VmSnapshot {
            config: self.cfg.clone(),
            vcpus,
            arch,
            serial,
            identity_port,
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
