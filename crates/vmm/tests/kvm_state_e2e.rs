//! vCPU and VM state survive a round trip through KVM, as a fork or a template moves
//! them: read from one KVM VM, encoded and decoded as the fork payload is (the
//! untrusted-input path), written into a fresh VM, and read back equal. Runs on a real
//! KVM (here or in the virtual test host).

use forkvm_devices::Persist;
use forkvm_vmm::devices::{VirtioFds, MAX_QUEUES_AHEAD};
use forkvm_vmm::layout::VIRTIO_MMIO_START;
use forkvm_vmm::vcpu::VcpuState;
use forkvm_vmm::vm::{Vm, VmArchState, VmArgs};
use forkvm_vmm::x86::cpu::{patch_cpuid, setup_boot_vcpu, setup_cpuid_and_msrs, setup_lapic};
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// MSRs a guest kernel sets at boot, with values a fresh vCPU does not have.
const GUEST_MSRS: &[(u32, u64)] = &[
    (0x174, 0x10),                        // IA32_SYSENTER_CS
    (0xc000_0081, 0x0023_0010_0000_0000), // STAR
    (0xc000_0082, 0xffff_ffff_8100_0000), // LSTAR
    (0xc000_0084, 0x4_7700),              // SFMASK
    (0xc000_0102, 0x1234_5000),           // KERNEL_GS_BASE
];

/// A VM with one vCPU set up as forkvm sets up a boot vCPU.
fn vm_with_vcpu() -> (Vm, VcpuFd) {
    let vm = Vm::new().expect("a KVM VM");
    let mut cpuid = vm.supported_cpuid().expect("supported CPUID");
    patch_cpuid(&mut cpuid, 0, 1, vm.has_tsc_deadline());
    let vcpu = vm.fd().create_vcpu(0).expect("a vCPU");
    setup_cpuid_and_msrs(&vcpu, &cpuid).expect("CPUID and MSRs");
    setup_lapic(&vcpu).expect("LAPIC");
    (vm, vcpu)
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("state serializes")
}

/// Through the fork payload's encoding: what a child decodes is what the parent saved.
fn via_payload<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    let blob = forkvm_snapshot::encode(v).expect("encode");
    forkvm_snapshot::decode(&blob).expect("decode")
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|e| e.index == index).map(|e| e.data)
}

#[test]
fn vcpu_state_round_trips_into_a_fresh_vm() {
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let (vm, vcpu) = vm_with_vcpu();
        // A vCPU in 64-bit mode mid-program, with guest-kernel MSRs and debug registers.
        setup_boot_vcpu(&vcpu, GuestAddress(0x20_0000)).expect("64-bit mode");
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1111_2222_3333_4444;
        regs.rbx = 0x5555_6666_7777_8888;
        regs.rsp = 0x8_0000;
        regs.rip = 0x20_1234;
        vcpu.set_regs(&regs).unwrap();
        let mut dregs = vcpu.get_debug_regs().unwrap();
        dregs.db = [0x1000, 0x2000, 0x3000, 0x4000];
        vcpu.set_debug_regs(&dregs).unwrap();
        let entries: Vec<kvm_msr_entry> = GUEST_MSRS
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let set = vcpu
            .set_msrs(&Msrs::from_entries(&entries).unwrap())
            .unwrap();
        assert_eq!(set, entries.len(), "KVM took the guest MSRs");

        let candidates = vm.msr_index_list().expect("MSR list");
        let saved = VcpuState::save(&vcpu, &candidates).expect("save");
        for &(index, data) in GUEST_MSRS {
            assert_eq!(msr(&saved, index), Some(data), "MSR {index:#x} saved");
        }
        let decoded = via_payload(&saved);

        let (vm2, vcpu2) = vm_with_vcpu();
        decoded
            .restore(&vcpu2, 0)
            .expect("restore into a fresh vCPU");
        let again = VcpuState::save(&vcpu2, &vm2.msr_index_list().unwrap()).expect("save again");

        assert_eq!(json(&again.regs), json(&saved.regs), "general registers");
        assert_eq!(
            json(&again.sregs),
            json(&saved.sregs),
            "segment and control registers"
        );
        assert_eq!(again.regs.rip, 0x20_1234);
        assert_eq!(json(&again.xcrs), json(&saved.xcrs), "XCRs");
        assert_eq!(json(&again.xsave), json(&saved.xsave), "FPU/SSE/AVX state");
        assert_eq!(again.debugregs.db, saved.debugregs.db, "debug registers");
        assert_eq!(json(&again.mp_state), json(&saved.mp_state), "MP state");
        assert_eq!(json(&again.lapic), json(&saved.lapic), "LAPIC registers");
        assert_eq!(again.tsc_khz, saved.tsc_khz, "TSC rate");
        assert_eq!(
            again.msrs.len(),
            saved.msrs.len(),
            "the same MSRs are saveable"
        );
        for &(index, data) in GUEST_MSRS {
            assert_eq!(msr(&again, index), Some(data), "MSR {index:#x} restored");
        }
    });
}

#[test]
fn vm_state_round_trips_and_the_clock_moves_on() {
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let (vm, _vcpu) = vm_with_vcpu();
        // An IOAPIC pin routed as a guest would route it.
        let mut chip = vm.save().expect("save").ioapic;
        assert_eq!(chip.chip_id, KVM_IRQCHIP_IOAPIC);
        // SAFETY: chip_id says this kvm_irqchip holds the IOAPIC member of its union.
        unsafe {
            chip.chip.ioapic.redirtbl[5].bits = 0x0000_0000_0000_00a5;
        }
        vm.fd().set_irqchip(&chip).expect("route a pin");
        let saved = vm.save().expect("save");
        let decoded: VmArchState = via_payload(&saved);

        const AWAY_NS: u64 = 5_000_000_000;
        let vm2 = Vm::restore(
            VmArgs {
                advance_ns: AWAY_NS,
                made: None,
            },
            &decoded,
        )
        .expect("restore");
        let again = vm2.save().expect("save again");
        assert_eq!(
            json(&again.pic_master),
            json(&saved.pic_master),
            "master PIC"
        );
        assert_eq!(json(&again.pic_slave), json(&saved.pic_slave), "slave PIC");
        assert_eq!(json(&again.ioapic), json(&saved.ioapic), "IOAPIC");
        // SAFETY: as above, the IOAPIC member.
        assert_eq!(unsafe { again.ioapic.chip.ioapic.redirtbl[5].bits }, 0xa5);
        assert!(
            again.clock.clock >= saved.clock.clock + AWAY_NS,
            "kvmclock moved on by the time away: {} -> {}",
            saved.clock.clock,
            again.clock.clock
        );
        let pit_modes = |s: &VmArchState| s.pit.channels.map(|c| (c.mode, c.count));
        assert_eq!(pit_modes(&again), pit_modes(&saved), "PIT channels");
    });
}

/// A warm VM process makes a device's eventfds ahead: its kicks are registered as
/// ioeventfds on the device's `QueueNotify` register (one per queue, by datamatch) until
/// they are released; a device with more queues than are ever made ahead gets none.
#[test]
fn device_eventfds_made_ahead_are_registered_until_released() {
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let (vm, _vcpu) = vm_with_vcpu();
        // Device 1's window (the second device in MMIO order).
        let notify = VIRTIO_MMIO_START + 0x1000 + 0x50;
        let fds = VirtioFds::make(&vm, 1, 2).expect("eventfds made ahead");
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        // A kick registered for queues 0 and 1 (the same address and datamatch cannot
        // be registered twice), none for queue 2.
        for q in 0..2 {
            assert!(
                vm.register_mmio_ioevent(&other, notify, q).is_err(),
                "no kick registered for queue {q}"
            );
        }
        vm.register_mmio_ioevent(&other, notify, 2)
            .expect("queue 2 is free");
        vm.unregister_mmio_ioevent(&other, notify, 2).unwrap();
        fds.release(&vm, 1);
        for q in 0..2 {
            vm.register_mmio_ioevent(&other, notify, q)
                .expect("released kicks are unregistered");
        }
        assert!(VirtioFds::make(&vm, 2, MAX_QUEUES_AHEAD + 1).is_err());
        let free = VIRTIO_MMIO_START + 2 * 0x1000 + 0x50;
        vm.register_mmio_ioevent(&other, free, 0)
            .expect("nothing registered for a refused device");
    });
}

/// A port device that records the bytes written to it and holds the writing vCPU in
/// its first write until the test lets it go.
struct Gate {
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    entered: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
}

impl forkvm_devices::bus::BusDevice for Gate {
    fn read(&mut self, _: u64, _: &mut [u8]) {}

    fn write(&mut self, _: u64, data: &[u8]) {
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.extend_from_slice(data);
            seen.len() == 1
        };
        if first {
            let _ = self.entered.send(());
            let _ = self.go.recv_timeout(std::time::Duration::from_secs(30));
        }
    }
}

/// A vCPU paused right after a port write exit is saved past that instruction: KVM
/// completes a port or MMIO instruction only on the next `KVM_RUN`, and a state read
/// before still points at it, so a fork child or a template restored from it would
/// run the write again. The pause completes it first, without running the guest on.
#[test]
fn a_vcpu_paused_after_a_port_exit_is_saved_past_the_instruction() {
    use forkvm_vmm::bus::Bus;
    use forkvm_vmm::vcpu::{StopSink, VcpuHandle, VcpuRunner};
    use std::sync::{Arc, Mutex};
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let vm = Vm::new().expect("a KVM VM");
        let ram = forkvm_vmm::memory::GuestRam::new(16).expect("guest memory");
        // Real mode at 0x1000: mov al, 1; out 0x80, al; mov al, 2; out 0x80, al; jmp $.
        let code = [0xb0, 0x01, 0xe6, 0x80, 0xb0, 0x02, 0xe6, 0x80, 0xeb, 0xfe];
        vm_memory::Bytes::write_slice(ram.memory(), &code, GuestAddress(0x1000))
            .expect("the code in guest memory");
        vm.register_memory(ram.memory()).expect("memory slots");
        let vcpu = vm.fd().create_vcpu(0).expect("a vCPU");
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();

        let seen = Arc::new(Mutex::new(Vec::new()));
        let (entered, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go) = std::sync::mpsc::channel();
        let gate = Gate {
            seen: seen.clone(),
            entered,
            go,
        };
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(gate)), 0x80, 1).unwrap();
        forkvm_vmm::vcpu::install_kick_handler().unwrap();
        let handle = VcpuRunner {
            index: 0,
            fd: vcpu,
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            stop: Arc::new(StopSink::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            // (The MSRs a save reads are worked out once per process: the real list.)
            msr_candidates: forkvm_vmm::vcpu::HostCpu::query(&vm)
                .expect("the host's CPU")
                .msr_candidates,
            start_paused: false,
        }
        .spawn(None)
        .expect("the vCPU thread");
        // The vCPU is in the device's first write, out of KVM_RUN with the `out`
        // pending; the pause is asked for before the write returns.
        entered_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the guest's first write");
        // The device lets the vCPU go once the pause is about to be sent, and then some.
        let (asking, asking_rx) = std::sync::mpsc::channel::<()>();
        let release = std::thread::spawn(move || {
            let _ = asking_rx.recv();
            std::thread::sleep(std::time::Duration::from_millis(500));
            let _ = go_tx.send(());
        });
        asking.send(()).unwrap();
        VcpuHandle::pause_all(std::slice::from_ref(&handle)).expect("paused");
        release.join().unwrap();
        let state = handle.save().expect("the paused vCPU's state");
        assert_eq!(
            state.regs.rip, 0x1004,
            "saved at {:#x}: the `out` at 0x1002 was not completed",
            state.regs.rip
        );
        // Completed, not run again, and nothing after it ran.
        assert_eq!(*seen.lock().unwrap(), [1]);
        // The vCPU's thread ends before the VM and its memory go.
        drop(handle);
        drop(vm);
        drop(ram);
    });
}
