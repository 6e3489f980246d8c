//! The KVM VM: opening /dev/kvm, the in-kernel irqchip and PIT, guest memory slots, and
//! the irqfd / ioeventfd wiring that lets devices interrupt and be kicked without the
//! vCPU threads.

use forkvm_devices::Persist;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::GuestMemory;

/// Errors while creating or configuring the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm; is KVM available and are you allowed to use it?")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0:?} capability")]
    MissingCap(Cap),
    /// A KVM VM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The VM-wide state KVM keeps: interrupt controllers, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmArchState {
    /// Master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// Slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC redirection table and registers.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock (guest nanoseconds since boot).
    pub clock: kvm_clock_data,
}

/// This process's `/dev/kvm`: opened once, or the one its launcher passed.
static KVM: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Where a VM process's launcher passes its `/dev/kvm` to the VM processes it starts
/// (its fork children, its pool's zygote), after the launch socket: a family of a uid
/// of its own may not open the device itself (`forkvm_jail::uid`).
pub const KVM_FD: i32 = crate::launch::LAUNCH_FD + 1;

/// Takes the `/dev/kvm` its launcher passed on [`KVM_FD`], if that descriptor is the
/// KVM device (a character device 10:232), as this process's: call it at the start of
/// a VM process, before anything else opens a descriptor.
pub fn adopt_passed_kvm() {
    // SAFETY: fstat writes into the zeroed struct it is given.
    let kvm_device = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(KVM_FD, &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFCHR
            && st.st_rdev == libc::makedev(10, 232)
    };
    if kvm_device {
        // SAFETY: F_SETFD on an open descriptor reads no memory; the descriptor was
        // passed to this process for it alone, and is owned from here on.
        let fd = unsafe {
            libc::fcntl(KVM_FD, libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(KVM_FD)
        };
        let _ = KVM.set(fd);
    }
}

/// This process's `/dev/kvm` descriptor, if it opened or adopted one: what it passes on
/// [`KVM_FD`] to the VM processes it starts.
pub fn kvm_fd() -> Option<i32> {
    KVM.get().map(|fd| fd.as_raw_fd())
}

/// A handle on this process's `/dev/kvm` (a copy of its descriptor).
fn kvm() -> Result<Kvm, kvm_ioctls::Error> {
    let fd = match KVM.get() {
        Some(fd) => fd,
        None => {
            let raw = Kvm::open_with_cloexec(true)?;
            // SAFETY: a descriptor just opened, owned by nothing else.
            KVM.get_or_init(|| unsafe { OwnedFd::from_raw_fd(raw) })
        }
    };
    let copy = fd
        .try_clone()
        .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    // SAFETY: a copy of an open /dev/kvm descriptor, owned by the handle from here.
    Ok(unsafe { Kvm::from_raw_fd(copy.into_raw_fd()) })
}

/// A KVM VM with an in-kernel irqchip and PIT.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm (once per process, see [`kvm`]) and creates a VM with its irqchip
    /// and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = kvm().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::SetTssAddr,
            // A pause completes a vCPU's pending port or MMIO exit with it (vcpu.rs).
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Self { kvm, fd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// MSR indices KVM reports for this host (candidates for saving).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Whether the LAPIC timer supports TSC-deadline mode.
    pub fn has_tsc_deadline(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// Hands every region of `mem` to KVM as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`,
            // which the VMM keeps alive as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Injects interrupt `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Undoes [`Vm::register_irqfd`].
    pub fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .unregister_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD (deassign)"))
    }

    /// Undoes [`Vm::register_mmio_ioevent`] (closing `evt` would leave it registered).
    pub fn unregister_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD (deassign)"))
    }

    /// Signals `evt` (without a vCPU exit) when the guest writes `datamatch` at `addr`.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}

/// What a VM is restored with besides its saved state.
pub struct VmArgs {
    /// Nanoseconds the state spent saved: the kvmclock moves on by as much.
    pub advance_ns: u64,
    /// The VM, when it was made ahead (a warm fork child); `None` makes it now.
    pub made: Option<Vm>,
}

impl Persist<'_> for Vm {
    type State = VmArchState;
    type ConstructorArgs = VmArgs;
    type Error = VmError;

    /// Reads the interrupt controllers, PIT and clock.
    fn save(&self) -> Result<VmArchState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmArchState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// A new VM with the saved interrupt-controller and PIT state, and its kvmclock
    /// `args.advance_ns` past the saved value, so guest time moves on by the time the
    /// state spent saved.
    fn restore(args: VmArgs, state: &VmArchState) -> Result<Self, VmError> {
        let vm = match args.made {
            Some(vm) => vm,
            None => Vm::new()?,
        };
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            vm.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        vm.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock.saturating_add(args.advance_ns),
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(vm)
    }
}
