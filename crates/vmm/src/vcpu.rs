//! vCPU threads: each runs `KVM_RUN` in a loop, sends port and MMIO exits to the buses,
//! and reports why the guest stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;

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
    /// Set to make the thread leave its loop at the next exit.
    pub exit_flag: Arc<AtomicBool>,
}

impl VcpuRunner {
    /// Handles one exit; `Some` ends the loop.
    fn handle(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<VcpuStop> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                pio.read(u64::from(port), data);
            }
            VcpuExit::IoOut(port, data) => {
                pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !mmio.read(addr, data) {
                    tracing::trace!("unhandled MMIO read at {addr:#x}");
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !mmio.write(addr, data) {
                    tracing::trace!("unhandled MMIO write at {addr:#x}");
                }
            }
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::Shutdown => return Some(VcpuStop::Reset),
            VcpuExit::SystemEvent(kind, _) => {
                return Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuStop::Failed("guest crashed".into()),
                    other => VcpuStop::Failed(format!("unknown system event {other}")),
                })
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(VcpuStop::Failed(format!(
                    "KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                )))
            }
            VcpuExit::InternalError => return Some(VcpuStop::Failed("KVM internal error".into())),
            other => tracing::debug!("unexpected vCPU exit {other:?}"),
        }
        None
    }

    /// Runs the vCPU on a new thread named `vcpu<N>`.
    pub fn spawn(mut self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                let stop = loop {
                    if self.exit_flag.load(Ordering::Acquire) {
                        return;
                    }
                    match self.fd.run() {
                        Ok(exit) => {
                            if let Some(stop) = Self::handle(exit, &self.pio, &self.mmio) {
                                break stop;
                            }
                        }
                        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                        Err(e) => break VcpuStop::Failed(format!("KVM_RUN failed: {e}")),
                    }
                };
                tracing::debug!(vcpu = self.index, ?stop, "vCPU stopped");
                self.stop.report(stop);
            })
    }
}
