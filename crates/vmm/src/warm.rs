//! What a warm VM process makes while it waits to become a fork child: a [`Prepared`]
//! VM of the shape its [`Warmup`] gives, with the forking VM's memory mapped as it was
//! when the warm-up was sent, and its home, staged (the parent's side, the pool that
//! keeps such processes, is [`crate::pool`]).

use std::fs::File;
use std::path::PathBuf;

use forkvm_registry::VmHome;
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{make_ahead, VirtioFds};
use crate::launch::ChildHomes;
use crate::layout::{IDENTITY_IRQ, SERIAL_IRQ};
use crate::memory::{GuestRam, MemoryLayout};
use crate::vcpu::{create_vcpu, HostCpu, ParkedThread, VcpuError};
use crate::vm::{Vm, VmError};

/// What a warm VM process prepares while it waits: a VM of this shape, and the home it
/// will be registered in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warmup {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The home to stage; `None`: the process registers when it is launched.
    #[serde(default)]
    pub stage: Option<Staging>,
    /// The jail a staged process enters while it waits (its cgroup named by the staged
    /// ID), off the fork's way; `None`: it enters the launch's.
    #[serde(default)]
    pub jail: Option<forkvm_jail::JailSpec>,
    /// Where a process that enters a jail of its own while it waits may go: what the
    /// forking VM writes (see `launch::places`; its children bind their vsock sockets
    /// beside its) and what its children read (a template's disks). A process whose jail
    /// is inherited lives in its parent's root and is bound by its parent's rules instead.
    #[serde(default)]
    pub places: forkvm_jail::Places,
    /// The forking VM's memory as it is when the warm-up is sent: the files (base,
    /// then overlays) come with the warm-up, to be mapped and given to the VM's memory
    /// slots ahead. A fork's own files are laid over it at the launch
    /// ([`GuestRam::relayer`]): as a VM forks again and again its base stays the same
    /// file and its overlays mostly do, so the launch maps only what is new.
    #[serde(default)]
    pub memory: Option<MemoryLayout>,
    /// The forking VM's virtio devices, in MMIO order, by their number of queues: each
    /// one's interrupt and kick eventfds are made and registered with KVM ahead (and
    /// the serial port's interrupt with them). `None`: made at the restore.
    #[serde(default)]
    pub devices: Option<Vec<u16>>,
}

/// A warm process's home, made while it waits ([`VmHome::stage`]): VM `id`, a child of
/// `homes.parent` under `homes.root`, not listed until the launch publishes it (one
/// rename instead of a registration on the fork's way to running).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    /// Where the children of the forking VM register.
    pub homes: ChildHomes,
    /// The ID the child will have.
    pub id: String,
    /// Guest memory of the VM the child is forked from, in MiB (shown by `ps`).
    pub mem_mib: u64,
}

impl Warmup {
    /// The same warm-up with a fresh ID for the home, for the next process of a pool.
    pub(crate) fn renewed(&self) -> Self {
        let mut w = self.clone();
        if let Some(s) = &mut w.stage {
            s.id = forkvm_registry::new_id();
        }
        w
    }
}

impl Staging {
    /// Stages the home, recording this process and a VM of `vcpus` vCPUs.
    pub(crate) fn stage(&self, vcpus: u8) -> Result<VmHome, forkvm_registry::Error> {
        VmHome::stage(
            &self.homes.root,
            &self.id,
            self.homes.parent.as_deref(),
            crate::launch::this_process_runs(vcpus, self.mem_mib),
        )
    }

    /// Where the staged home is (for the pool to remove after killing its process).
    pub(crate) fn dir(&self) -> PathBuf {
        forkvm_registry::staged_dir(&self.homes.root, &self.id)
    }
}

/// A VM made ahead of its use: the KVM VM with irqchip and PIT, and its vCPUs created
/// with CPUID and MSRs set; and the forking VM's memory, if the warm-up sent it, mapped
/// and in the VM's memory slots, untouched. No guest has run in it yet.
pub struct Prepared {
    pub(crate) vm: Vm,
    pub(crate) host: HostCpu,
    pub(crate) vcpus: Vec<VcpuFd>,
    /// The memory, in `vm`'s slots (dropped after `vm`); taken by the restore.
    pub(crate) memory: Option<GuestRam>,
    /// Whether `vm`'s memory slots were made (for `memory`).
    slots: bool,
    /// The vCPUs' threads, started and confined ahead ([`Prepared::park_threads`]).
    pub(crate) threads: Vec<ParkedThread>,
    /// The UARTs' interrupts (the console's and the identity port's), each registered
    /// as an irqfd on its line.
    pub(crate) serial_irqs: Option<(EventFd, EventFd)>,
    /// Each virtio device's eventfds, registered (see [`Warmup::devices`]).
    pub(crate) devices: Vec<Option<VirtioFds>>,
}

/// Why a VM could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error("vCPU {index}")]
    Vcpu {
        /// Which vCPU.
        index: u8,
        /// What failed.
        #[source]
        source: VcpuError,
    },
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory.is_some())
            .field("threads", &self.threads.len())
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Makes a VM shaped as `warmup` says, over the memory `files` (base first) when
    /// it sends the memory's layout.
    pub fn new(warmup: &Warmup, mut files: Vec<File>) -> Result<Self, PrepareError> {
        let vm = Vm::new()?;
        let host = HostCpu::query(&vm)?;
        let vcpus = (0..warmup.vcpus)
            .map(|index| {
                create_vcpu(&vm, index, warmup.vcpus, &host)
                    .map_err(|source| PrepareError::Vcpu { index, source })
            })
            .collect::<Result<_, _>>()?;
        // Memory that cannot be mapped is mapped at the restore; slots that cannot be
        // made leave a VM that cannot be used (an error).
        let memory = match &warmup.memory {
            Some(layout) if !files.is_empty() => {
                let base = files.remove(0);
                match GuestRam::from_layers(base, files, layout) {
                    Ok(ram) => {
                        vm.register_memory(ram.memory())?;
                        Some(ram)
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot map the forking VM's memory ahead: {}",
                            crate::control::error_chain(&e)
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        // The devices' eventfds: each KVM_IOEVENTFD waits out the VM's SRCU readers,
        // milliseconds when many processes share the CPUs.
        let (serial_irqs, devices) = match &warmup.devices {
            Some(shape) => {
                let irq = |line| {
                    EventFd::new(libc::EFD_NONBLOCK)
                        .ok()
                        .filter(|e| vm.register_irqfd(e, line).is_ok())
                };
                let serial = irq(SERIAL_IRQ).zip(irq(IDENTITY_IRQ));
                (serial, make_ahead(&vm, shape))
            }
            None => (None, Vec::new()),
        };
        Ok(Self {
            vm,
            host,
            vcpus,
            slots: memory.is_some(),
            memory,
            threads: Vec::new(),
            serial_irqs,
            devices,
        })
    }

    /// Starts a thread per vCPU, each confined as the process's jail (entered already)
    /// says, waiting for its vCPU. Not on the thread that prepared the VM: threads
    /// inherit its lowest CPU priority. A thread that cannot start is started at the
    /// restore instead.
    pub(crate) fn park_threads(&mut self) {
        let n = self.vcpus.len() as u8;
        for index in 0..n {
            match ParkedThread::start(index) {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    tracing::warn!("cannot start a vCPU thread ahead: {e}");
                    break;
                }
            }
        }
    }

    /// Ends the threads started ahead (before the process enters a jail other than
    /// the one they were confined in: it must have one thread then).
    pub(crate) fn end_threads(&mut self) {
        for t in self.threads.drain(..) {
            t.end();
        }
    }

    /// Whether its VM's memory slots are made for the memory it mapped ahead and the
    /// restore took that memory ([`GuestRam::relayer`]): the VM restored in it uses it.
    /// (Slots made for memory not taken: `false`, and making them again fails.)
    pub(crate) fn slots_made(&self) -> bool {
        self.slots && self.memory.is_none()
    }

    /// Whether a VM of `vcpus` vCPUs restored from a fork can be built in it.
    pub(crate) fn fits(&self, vcpus: u8) -> bool {
        self.vcpus.len() == usize::from(vcpus)
    }
}

/// Sets the calling thread's scheduling policy (`SCHED_OTHER`, `SCHED_BATCH` or
/// `SCHED_IDLE`, none of which needs a privilege: they share the static priority 0).
fn set_own_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A prepared warm process waits for its launch as a batch thread (`SCHED_BATCH`): the
/// scheduler never lets a woken batch thread preempt the thread that woke it. A parent
/// that forks ten children sends ten launches while its vCPUs are paused; a warm process
/// woken at the normal policy took the parent's CPU for its restore before the parent
/// sent the next launch, so on a host with fewer CPUs than children the parent's pause
/// grew with every child. Now the sending goes on, and the children restore once the
/// parent waits. The vCPU threads started ahead keep the normal policy (a thread's
/// policy is its own).
pub(crate) fn wait_for_launch_as_batch() {
    if let Err(e) = set_own_policy(libc::SCHED_BATCH) {
        tracing::debug!("a warm process waits at the normal policy: {e}");
    }
}

/// Back to the normal policy once the launch is read ([`wait_for_launch_as_batch`]):
/// the restore and the VM's event loop compete for the CPU as any VM does.
pub(crate) fn launched_at_normal_policy() {
    if let Err(e) = set_own_policy(libc::SCHED_OTHER) {
        tracing::warn!("the VM's event loop stays a batch thread: {e}");
    }
}

/// Prepares a VM as `warmup` says on a thread of the lowest CPU priority
/// (`SCHED_IDLE`): a pool refills right after a fork, while the new children are still
/// starting their guests, and on a busy host that work must not take CPU from them.
/// The priority is the thread's alone; the vCPUs run on threads of their own later.
pub(crate) fn prepare_in_background(
    warmup: &Warmup,
    files: Vec<File>,
) -> Result<Prepared, PrepareError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = set_own_policy(libc::SCHED_IDLE) {
                tracing::debug!("cannot lower the warm-up's priority: {e}");
            }
            Prepared::new(warmup, files)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_policy() -> libc::c_int {
        // SAFETY: sched_getscheduler of the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_warm_process_waits_as_a_batch_thread_and_runs_its_vm_at_the_normal_policy() {
        std::thread::spawn(|| {
            // Whatever policy the tests run at, the VM runs at the normal one.
            launched_at_normal_policy();
            assert_eq!(own_policy(), libc::SCHED_OTHER);
            wait_for_launch_as_batch();
            assert_eq!(own_policy(), libc::SCHED_BATCH);
            // A thread started now would inherit it: the vCPU threads are started before.
            let started = std::thread::spawn(own_policy).join().unwrap();
            assert_eq!(started, libc::SCHED_BATCH);
            launched_at_normal_policy();
            assert_eq!(own_policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
