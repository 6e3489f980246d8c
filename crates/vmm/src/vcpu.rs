//! vCPU threads: each runs `KVM_RUN` in a loop, sends port and MMIO exits to the buses,
//! reports why the guest stopped, and obeys pause / resume / save-state commands.
//!
//! A command is sent on the thread's channel and the thread is kicked out of `KVM_RUN`
//! with a signal (re-sent until the thread answers, so a kick that lands just before
//! `KVM_RUN` cannot be lost). While paused the thread blocks on its channel; the vCPU's
//! state is read on the vCPU's own thread, never while it runs.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use forkvm_devices::legacy::{AcpiPowerPort, GuestStop};
use forkvm_devices::Persist;
use vm_memory::GuestAddress;

use crate::bus::Bus;
use crate::layout::ACPI_POWER_PORT;
use crate::vm::{Vm, VmError};
use crate::x86::cpu::{
    patch_cpuid, setup_boot_vcpu, setup_cpuid_and_msrs, setup_lapic, CpuSetupError,
};

/// Names of the exit reasons counted by [`exit_counts`].
const EXIT_NAMES: [&str; 8] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "intr",
    "system_event",
    "other",
];
static EXIT_COUNTS: [std::sync::atomic::AtomicU64; 8] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 8];

fn count_exit(i: usize) {
    EXIT_COUNTS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// vCPU exits of this process by reason, summed over vCPUs.
pub fn exit_counts() -> std::collections::BTreeMap<String, u64> {
    EXIT_NAMES
        .iter()
        .zip(&EXIT_COUNTS)
        .map(|(n, c)| {
            (
                (*n).to_owned(),
                c.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
        .collect()
}

/// Why a vCPU stopped running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// ACPI or KVM system event: power off.
    PowerOff,
    /// Triple fault or reset request.
    Reset,
    /// The guest crashed or KVM failed; the text says how.
    Failed(String),
}

/// Where vCPU threads report a stop: the first report wins and wakes the VMM.
#[derive(Debug)]
pub struct StopSink {
    reason: Mutex<Option<VcpuStop>>,
    evt: EventFd,
}

impl StopSink {
    /// A sink that signals `evt` on the first stop.
    pub fn new(evt: EventFd) -> Self {
        Self {
            reason: Mutex::new(None),
            evt,
        }
    }

    /// Records `stop` unless one was already recorded, and wakes the VMM.
    pub fn report(&self, stop: VcpuStop) {
        let mut r = self.reason.lock().expect("stop sink poisoned");
        if r.is_none() {
            *r = Some(stop);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the VMM: {e}");
        }
    }

    /// The recorded stop, if any.
    pub fn reason(&self) -> Option<VcpuStop> {
        self.reason.lock().expect("stop sink poisoned").clone()
    }
}

/// Everything KVM keeps about one vCPU, as plain data.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (every one KVM lets us read).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// TSC frequency in kHz (to move the TSC on by the time spent saved).
    pub tsc_khz: u32,
}

/// The IA32_TIME_STAMP_COUNTER MSR.
const MSR_IA32_TSC: u32 = 0x10;

/// Errors while reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs.
    #[error("KVM restored only {set} of {wanted} MSRs")]
    PartialMsrs {
        /// MSRs written.
        set: usize,
        /// MSRs in the state.
        wanted: usize,
    },
    /// Building a KVM MSR list failed.
    #[error("cannot build the MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    /// The vCPU thread is gone.
    #[error("vCPU thread {0} does not answer")]
    ThreadGone(u8),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// The MSRs this host's KVM lets us both read and write, found once per process.
static SAVEABLE_MSRS: OnceLock<Vec<u32>> = OnceLock::new();

fn saveable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Result<Vec<u32>, VcpuStateError> {
    if let Some(list) = SAVEABLE_MSRS.get() {
        return Ok(list.clone());
    }
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop that one and retry.
    let mut list: Vec<u32> = candidates.to_vec();
    let mut start = 0;
    while start < list.len() {
        let (_, n) = read_msrs(vcpu, &list[start..])?;
        if start + n == list.len() {
            break;
        }
        list.remove(start + n);
        start += n;
    }
    Ok(SAVEABLE_MSRS.get_or_init(|| list).clone())
}

/// Reads MSRs `indices` of `vcpu`: KVM reads them in order and stops at the first it
/// cannot read; returns them and how many it read.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Msrs, usize), VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::MsrList)?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    Ok((msrs, n))
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn save(vcpu: &VcpuFd, msr_candidates: &[u32]) -> Result<Self, VcpuStateError> {
        let indices = saveable_msrs(vcpu, msr_candidates)?;
        let (msrs, n) = read_msrs(vcpu, &indices)?;
        Ok(Self {
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice()[..n].to_vec(),
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            tsc_khz: vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?,
        })
    }

    /// Writes this state into a fresh vCPU whose CPUID is already set, with the TSC
    /// moved on by `advance_ns` (the time the state spent saved), so guest time agrees
    /// with kvmclock, which the VM restore moves on by the same amount. The order
    /// matters: the LAPIC before the MSRs (the TSC-deadline MSR lives in the LAPIC), the
    /// MSRs before the pending events.
    pub fn restore(&self, vcpu: &VcpuFd, advance_ns: u64) -> Result<(), VcpuStateError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave read from KVM by `save`; KVM reads
        // no more than the struct's size.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        let cycles = (u128::from(advance_ns) * u128::from(self.tsc_khz) / 1_000_000) as u64;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|e| match e.index {
                MSR_IA32_TSC => kvm_msr_entry {
                    data: e.data.wrapping_add(cycles),
                    ..*e
                },
                _ => *e,
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::MsrList)?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(VcpuStateError::PartialMsrs {
                set,
                wanted: self.msrs.len(),
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// What a vCPU thread is told to do.
#[derive(Clone, Copy)]
enum Command {
    Pause,
    Resume,
    Save,
    Exit,
}

/// What a vCPU thread answers.
enum Answer {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, VcpuStateError>>),
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) kick signal handler; KVM_RUN then returns EINTR on a kick.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(vmm_sys_util::errno::Error::new)
}

/// Most exits a paused vCPU handles while completing its last instruction
/// ([`VcpuRunner::complete_pending_exit`]): a `rep` string port instruction makes one
/// per element until KVM's emulator returns to the guest, every 1024 elements; a guest
/// cannot keep the pause waiting longer.
const DRAIN_EXITS: usize = 1024 + 64;

/// What a vCPU thread needs to run.
pub struct VcpuRunner {
    /// vCPU index.
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report a stop.
    pub stop: Arc<StopSink>,
    /// MSRs to try when saving state (KVM's index list).
    pub msr_candidates: Arc<Vec<u32>>,
    /// Start paused (a restored vCPU waits for the VMM's go).
    pub start_paused: bool,
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    commands: Sender<Command>,
    answers: Receiver<Answer>,
}

impl VcpuRunner {
    /// Handles one exit; `Some` ends the guest.
    fn handle(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<VcpuStop> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                count_exit(0);
                pio.read(u64::from(port), data);
            }
            VcpuExit::IoOut(port, data) => {
                count_exit(1);
                pio.write(u64::from(port), data);
                // A guest that wrote S5 (or the reset value) to the power port does not
                // run on: stop its vCPU now. Linux goes on to poll the sleep status
                // register (a port read exit each time) until it sees a wake it never
                // gets, which kept a vCPU spinning through the VM's whole teardown.
                if port == ACPI_POWER_PORT {
                    match data.first().copied().and_then(AcpiPowerPort::decode) {
                        Some(GuestStop::PowerOff) => return Some(VcpuStop::PowerOff),
                        Some(GuestStop::Reset) => return Some(VcpuStop::Reset),
                        None => {}
                    }
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                count_exit(2);
                if !mmio.read(addr, data) {
                    tracing::trace!("unhandled MMIO read at {addr:#x}");
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                count_exit(3);
                if !mmio.write(addr, data) {
                    tracing::trace!("unhandled MMIO write at {addr:#x}");
                }
            }
            VcpuExit::Hlt => count_exit(4),
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => count_exit(5),
            // (Taken in the run loop, which logs where the vCPU was.)
            VcpuExit::Shutdown => return Some(VcpuStop::Reset),
            VcpuExit::SystemEvent(kind, _) => {
                count_exit(6);
                return Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuStop::Failed("guest crashed".into()),
                    other => VcpuStop::Failed(format!("unknown system event {other}")),
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(VcpuStop::Failed(format!(
                    "KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                )))
            }
            VcpuExit::InternalError => return Some(VcpuStop::Failed("KVM internal error".into())),
            other => {
                count_exit(7);
                tracing::debug!("unexpected vCPU exit {other:?}");
            }
        }
        None
    }

    /// Completes the port or MMIO access the vCPU's last exit left open, without
    /// running the guest on, so that what is saved of a paused vCPU is its state after
    /// the instruction: KVM finishes such an instruction (stores what an `in` or an MMIO
    /// read returned, steps past it) only on the next `KVM_RUN`, and keeps that pending
    /// work where `KVM_GET_REGS` and the rest do not show it. Saved before, a fork child
    /// or a template would run the instruction again (a device would see a write
    /// twice) or lose what it read. A `KVM_RUN` with `immediate_exit` set does the
    /// pending work and returns `EINTR` before entering the guest; a string instruction
    /// may need more exits first (KVM's emulator does a `rep outs` one element per exit
    /// and goes back to the guest every 1024), each handled like any other, at most
    /// [`DRAIN_EXITS`] of them. `Some` when one of them ends the guest.
    fn complete_pending_exit(&mut self) -> Option<VcpuStop> {
        self.fd.set_kvm_immediate_exit(1);
        let mut stop = None;
        let mut completed = false;
        for _ in 0..DRAIN_EXITS {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    completed = true;
                    break;
                }
                Err(e) => {
                    stop = Some(VcpuStop::Failed(format!(
                        "KVM_RUN failed while completing the last exit before a pause: {e}"
                    )));
                    break;
                }
                Ok(exit) => {
                    if let Some(s) = Self::handle(exit, &self.pio, &self.mmio) {
                        stop = Some(s);
                        break;
                    }
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        if !completed && stop.is_none() {
            tracing::warn!(
                vcpu = self.index,
                "the vCPU's last instruction made {DRAIN_EXITS} exits and is still not \
                 complete: paused in it, its saved state points at it"
            );
        }
        stop
    }

    /// Where the vCPU stopped, for the log of a crash: its instruction and stack
    /// pointers, control registers and descriptor tables. (After a triple fault KVM on
    /// AMD has already reset the vCPU, so there they are its reset values: rip 0xfff0,
    /// cr0 0x10; on Intel they are where it faulted.)
    fn where_it_stopped(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "at rip {:#x} rsp {:#x} rflags {:#x}, cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
                 efer {:#x}, idt {:#x}+{:#x} gdt {:#x}+{:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit
            ),
            (Err(e), _) | (_, Err(e)) => format!("(its registers cannot be read: {e})"),
        }
    }

    /// Serves commands while paused; returns false when told to exit.
    fn paused_loop(&self, commands: &Receiver<Command>, answers: &Sender<Answer>) -> bool {
        loop {
            match commands.recv() {
                Ok(Command::Resume) => {
                    let _ = answers.send(Answer::Resumed);
                    return true;
                }
                Ok(Command::Pause) => {
                    let _ = answers.send(Answer::Paused);
                }
                Ok(Command::Save) => {
                    let state = VcpuState::save(&self.fd, &self.msr_candidates);
                    let _ = answers.send(Answer::State(Box::new(state)));
                }
                Ok(Command::Exit) | Err(_) => return false,
            }
        }
    }

    /// Runs the vCPU on this thread. `confined`: how confining this thread went when it
    /// was started ahead (a [`ParkedThread`]); `None`: it is confined now.
    fn run_loop(
        mut self,
        commands: Receiver<Command>,
        answers: Sender<Answer>,
        confined: Option<Result<(), String>>,
    ) {
        // Before anything the guest can reach runs on this thread.
        let confined = confined.unwrap_or_else(|| {
            forkvm_jail::confine_thread(forkvm_jail::ThreadKind::Vcpu)
                .map_err(|e| crate::control::error_chain(&e))
        });
        if let Err(e) = confined {
            let why = format!("cannot confine vCPU {}: {e}", self.index);
            tracing::error!("{why}");
            self.stop.report(VcpuStop::Failed(why));
            self.paused_loop(&commands, &answers);
            return;
        }
        if self.start_paused && !self.paused_loop(&commands, &answers) {
            return;
        }
        let stop = 'run: loop {
            // Commands first: a pause request always wins over running the guest.
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Pause => {
                        // A stop met while completing the last exit counts as paused
                        // too: the loop it stops in answers what comes after.
                        let stop = self.complete_pending_exit();
                        let _ = answers.send(Answer::Paused);
                        if let Some(stop) = stop {
                            break 'run stop;
                        }
                        if !self.paused_loop(&commands, &answers) {
                            return;
                        }
                    }
                    Command::Resume => {
                        let _ = answers.send(Answer::Resumed);
                    }
                    Command::Save => {
                        // Only a paused vCPU's state is consistent.
                        let _ = answers.send(Answer::State(Box::new(Err(
                            VcpuStateError::ThreadGone(self.index),
                        ))));
                    }
                    Command::Exit => return,
                }
            }
            match self.fd.run() {
                Ok(VcpuExit::Shutdown) => {
                    // A triple fault: a crash, or a kernel's last-resort way to reboot.
                    tracing::warn!(
                        vcpu = self.index,
                        "the guest triple-faulted (KVM shutdown exit) {}: ending it as a reset",
                        self.where_it_stopped()
                    );
                    break 'run VcpuStop::Reset;
                }
                Ok(exit) => {
                    if let Some(stop) = Self::handle(exit, &self.pio, &self.mmio) {
                        break 'run stop;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => break 'run VcpuStop::Failed(format!("KVM_RUN failed: {e}")),
            }
        };
        tracing::debug!(vcpu = self.index, ?stop, "vCPU stopped");
        self.stop.report(stop);
        // Keep answering (a stopped vCPU counts as paused) until told to exit.
        self.paused_loop(&commands, &answers);
    }

    /// Runs the vCPU on a new thread named `vcpu<N>`, or on `parked`, started ahead.
    pub fn spawn(self, parked: Option<ParkedThread>) -> std::io::Result<VcpuHandle> {
        let (cmd_tx, cmd_rx) = channel();
        let (ans_tx, ans_rx) = channel();
        let index = self.index;
        let thread = match parked {
            Some(p) => p.run(self, cmd_rx, ans_tx)?,
            None => std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || self.run_loop(cmd_rx, ans_tx, None))?,
        };
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            commands: cmd_tx,
            answers: ans_rx,
        })
    }
}

/// What a parked vCPU thread is given to run.
type Work = (VcpuRunner, Receiver<Command>, Sender<Answer>);

/// A vCPU thread started ahead of its vCPU (a warm fork process's, see `crate::warm`):
/// it confined itself as the process's jail says when it started, and waits for a vCPU
/// to run. Dropped unused, it ends.
#[derive(Debug)]
pub struct ParkedThread {
    work: Sender<Work>,
    thread: JoinHandle<()>,
}

impl ParkedThread {
    /// Starts thread `vcpu<index>` and has it confine itself, if the process is jailed.
    pub fn start(index: u8) -> std::io::Result<Self> {
        let (work, waiting) = channel::<Work>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // A process jailed after this (its launch's jail is not the warm-up's)
                // ends its parked threads first (`ParkedThread::end`): confined now or
                // never, as `confine_thread` says.
                let confined = forkvm_jail::confine_thread(forkvm_jail::ThreadKind::Vcpu)
                    .map_err(|e| crate::control::error_chain(&e));
                if let Ok((runner, commands, answers)) = waiting.recv() {
                    runner.run_loop(commands, answers, Some(confined));
                }
            })?;
        Ok(Self { work, thread })
    }

    /// Hands the thread its vCPU.
    fn run(
        self,
        runner: VcpuRunner,
        commands: Receiver<Command>,
        answers: Sender<Answer>,
    ) -> std::io::Result<JoinHandle<()>> {
        self.work
            .send((runner, commands, answers))
            .map_err(|_| std::io::Error::other("the parked vCPU thread ended"))?;
        Ok(self.thread)
    }

    /// Ends the thread and waits until it has.
    pub fn end(self) {
        drop(self.work);
        let _ = self.thread.join();
    }
}

/// How long to wait for a vCPU's answer before kicking it again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// How long a vCPU may take to answer at all.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::debug!(vcpu = self.index, "kick failed: {e}");
            }
        }
    }

    fn ask(&self, cmd: Command, kick: bool) -> Result<Answer, VcpuStateError> {
        self.send(cmd)?;
        self.answer(kick)
    }

    /// Sends `cmd` to the vCPU thread (the first half of an ask).
    fn send(&self, cmd: Command) -> Result<(), VcpuStateError> {
        // An answer that came after an earlier ask gave up belongs to that ask; left in
        // the channel it would answer this one, and every later one would be off by one.
        while self.answers.try_recv().is_ok() {}
        self.commands
            .send(cmd)
            .map_err(|_| VcpuStateError::ThreadGone(self.index))
    }

    /// Waits for the answer to what [`VcpuHandle::send`] sent, kicking the vCPU out of
    /// `KVM_RUN` meanwhile if `kick`.
    fn answer(&self, kick: bool) -> Result<Answer, VcpuStateError> {
        let gone = || VcpuStateError::ThreadGone(self.index);
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            if kick {
                self.kick();
            }
            match self.answers.recv_timeout(KICK_INTERVAL) {
                Ok(a) => return Ok(a),
                Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
                Err(_) => return Err(gone()),
            }
        }
    }

    /// Stops every vCPU at its next exit and waits until all are out of `KVM_RUN`: all
    /// are told first, then the answers are collected, so the wait is the slowest
    /// vCPU's, not the sum.
    pub fn pause_all(vcpus: &[VcpuHandle]) -> Result<(), VcpuStateError> {
        Self::all(vcpus, Command::Pause, true, |a| matches!(a, Answer::Paused))
    }

    /// Lets every paused vCPU run again (told all at once, like [`Self::pause_all`]).
    pub fn resume_all(vcpus: &[VcpuHandle]) -> Result<(), VcpuStateError> {
        Self::release_all(vcpus)?;
        Self::confirm_resumed(vcpus)
    }

    /// Tells every paused vCPU to run, without waiting for their answers
    /// ([`Self::confirm_resumed`] does): each thread is alive and will run its vCPU
    /// once it reads the command.
    pub fn release_all(vcpus: &[VcpuHandle]) -> Result<(), VcpuStateError> {
        Self::tell_all(vcpus, Command::Resume, false)
    }

    /// Waits for every vCPU's answer to [`Self::release_all`].
    pub fn confirm_resumed(vcpus: &[VcpuHandle]) -> Result<(), VcpuStateError> {
        Self::answered_all(vcpus, false, |a| matches!(a, Answer::Resumed))
    }

    fn all(
        vcpus: &[VcpuHandle],
        cmd: Command,
        kick: bool,
        expected: impl Fn(&Answer) -> bool,
    ) -> Result<(), VcpuStateError> {
        Self::tell_all(vcpus, cmd, kick)?;
        Self::answered_all(vcpus, kick, expected)
    }

    /// Sends `cmd` to every vCPU (kicking each out of `KVM_RUN` if `kick`).
    fn tell_all(vcpus: &[VcpuHandle], cmd: Command, kick: bool) -> Result<(), VcpuStateError> {
        for v in vcpus {
            v.send(cmd)?;
            if kick {
                v.kick();
            }
        }
        Ok(())
    }

    /// Waits for every vCPU's answer to what [`Self::tell_all`] sent; one not
    /// `expected` counts as its thread gone.
    fn answered_all(
        vcpus: &[VcpuHandle],
        kick: bool,
        expected: impl Fn(&Answer) -> bool,
    ) -> Result<(), VcpuStateError> {
        for v in vcpus {
            if !expected(&v.answer(kick)?) {
                return Err(VcpuStateError::ThreadGone(v.index));
            }
        }
        Ok(())
    }
}

/// What KVM says of the host CPU, read once per VM: the CPUID it supports, whether it
/// offers the TSC-deadline timer, and the MSRs a vCPU's state may hold.
pub struct HostCpu {
    /// Supported CPUID.
    pub cpuid: CpuId,
    /// TSC-deadline timer available.
    pub tsc_deadline: bool,
    /// MSRs to try when saving a vCPU.
    pub msr_candidates: Arc<Vec<u32>>,
}

impl HostCpu {
    /// Asks `vm`'s KVM.
    pub fn query(vm: &Vm) -> Result<Self, VmError> {
        Ok(Self {
            cpuid: vm.supported_cpuid()?,
            tsc_deadline: vm.has_tsc_deadline(),
            msr_candidates: Arc::new(vm.msr_index_list()?),
        })
    }
}

/// What a vCPU is created with, at boot and at restore.
pub struct VcpuArgs<'a> {
    /// The VM it belongs to.
    pub vm: &'a Vm,
    /// Its index (and APIC ID).
    pub index: u8,
    /// How many vCPUs the VM has.
    pub count: u8,
    /// What KVM offers on this host (CPUID, TSC deadline, MSRs).
    pub host: &'a HostCpu,
    /// The vCPU, when it was made ahead by [`create_vcpu`] (a warm fork child); `None`
    /// makes it now.
    pub made: Option<VcpuFd>,
    /// The thread to run it on, when it was started ahead (a warm fork child); `None`
    /// starts one.
    pub parked: Option<ParkedThread>,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report a stop.
    pub stop: Arc<StopSink>,
    /// Nanoseconds a restored state spent saved: its TSC moves on by as much.
    pub advance_ns: u64,
}

/// Why a vCPU could not be built or saved.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM would not create the vCPU.
    #[error("cannot create the vCPU")]
    Create(#[source] kvm_ioctls::Error),
    /// Its CPUID, MSRs, LAPIC or boot registers could not be set.
    #[error(transparent)]
    Setup(#[from] CpuSetupError),
    /// Its state could not be read or written.
    #[error(transparent)]
    State(#[from] VcpuStateError),
    /// Its thread could not be started.
    #[error("cannot start the vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Creates vCPU `index` of a VM of `count` vCPUs, with its CPUID (patched for its
/// index) and MSRs set: all a vCPU needs before it gets a state.
pub fn create_vcpu(vm: &Vm, index: u8, count: u8, host: &HostCpu) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .fd()
        .create_vcpu(u64::from(index))
        .map_err(VcpuError::Create)?;
    let mut cpuid = host.cpuid.clone();
    patch_cpuid(&mut cpuid, index, count, host.tsc_deadline);
    setup_cpuid_and_msrs(&fd, &cpuid)?;
    Ok(fd)
}

impl VcpuArgs<'_> {
    /// The vCPU made ahead, or a new one.
    fn create(&mut self) -> Result<VcpuFd, VcpuError> {
        match self.made.take() {
            Some(fd) => Ok(fd),
            None => create_vcpu(self.vm, self.index, self.count, self.host),
        }
    }

    /// Starts the thread that runs `fd`.
    fn spawn(self, fd: VcpuFd, start_paused: bool) -> Result<VcpuHandle, VcpuError> {
        VcpuRunner {
            index: self.index,
            fd,
            pio: self.pio,
            mmio: self.mmio,
            stop: self.stop,
            msr_candidates: self.host.msr_candidates.clone(),
            start_paused,
        }
        .spawn(self.parked)
        .map_err(VcpuError::Thread)
    }
}

impl VcpuHandle {
    /// Creates a vCPU in its power-on state (vCPU 0 at the kernel's `entry`) and runs
    /// it.
    pub fn boot(mut args: VcpuArgs<'_>, entry: GuestAddress) -> Result<Self, VcpuError> {
        let fd = args.create()?;
        setup_lapic(&fd)?;
        if args.index == 0 {
            setup_boot_vcpu(&fd, entry)?;
        }
        args.spawn(fd, false)
    }
}

impl<'a> Persist<'a> for VcpuHandle {
    type State = VcpuState;
    type ConstructorArgs = VcpuArgs<'a>;
    type Error = VcpuError;

    /// Reads the state of a paused vCPU (on its own thread).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        match self.ask(Command::Save, false)? {
            Answer::State(s) => Ok((*s)?),
            _ => Err(VcpuStateError::ThreadGone(self.index).into()),
        }
    }

    /// Creates the vCPU with the saved state (its clocks moved on by
    /// `args.advance_ns`) and starts its thread paused, for the VMM to resume.
    fn restore(mut args: VcpuArgs<'a>, state: &VcpuState) -> Result<Self, VcpuError> {
        let fd = args.create()?;
        state.restore(&fd, args.advance_ns)?;
        args.spawn(fd, true)
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Exit);
        self.kick();
        // A vCPU blocked in KVM_RUN leaves at the kick; don't wait forever for one that
        // does not (the process is exiting anyway).
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of this process's threads.
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect()
    }

    /// S5 or the reset value written to the power port stops the vCPU that wrote it
    /// (besides the device's own signal); other values and other ports do not.
    #[test]
    fn a_power_port_stop_ends_the_writing_vcpu() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let out =
            |port: u16, value: u8| VcpuRunner::handle(VcpuExit::IoOut(port, &[value]), &pio, &mmio);
        use forkvm_devices::legacy::{POWER_PORT_RESET_VALUE, POWER_PORT_S5_VALUE};
        assert_eq!(
            out(ACPI_POWER_PORT, POWER_PORT_S5_VALUE),
            Some(VcpuStop::PowerOff)
        );
        assert_eq!(
            out(ACPI_POWER_PORT, POWER_PORT_RESET_VALUE),
            Some(VcpuStop::Reset)
        );
        assert_eq!(out(ACPI_POWER_PORT, 0x14), None);
        assert_eq!(out(ACPI_POWER_PORT + 1, POWER_PORT_S5_VALUE), None);
        let mut status = [0xffu8];
        assert_eq!(
            VcpuRunner::handle(VcpuExit::IoIn(ACPI_POWER_PORT, &mut status), &pio, &mmio),
            None
        );
    }

    #[test]
    fn a_parked_thread_waits_for_its_vcpu_and_ends_unused() {
        let named = |n: &str| thread_names().iter().filter(|t| *t == n).count();
        let before = named("vcpu7");
        let parked = ParkedThread::start(7).unwrap();
        // It waits: still there a while later.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(named("vcpu7"), before + 1, "{:?}", thread_names());
        parked.end();
        assert_eq!(named("vcpu7"), before, "an unused parked thread stayed");
    }
}
