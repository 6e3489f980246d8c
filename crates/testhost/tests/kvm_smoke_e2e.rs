//! Owns the KVM smoke test: through `on_kvm_host`, run a real-mode guest that
//! writes "FK" to the serial port and halts, on a hardware-accelerated KVM.

use kvm_ioctls::{Kvm, VcpuExit};

#[test]
fn real_mode_guest_writes_fk_and_halts() {
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");

        const MEM_SIZE: usize = 0x4000;
        const GUEST_ADDR: u64 = 0x1000;
        // mov dx, 0x3f8; mov al, 'F'; out dx, al; mov al, 'K'; out dx, al; hlt
        let code: &[u8] = &[0xba, 0xf8, 0x03, 0xb0, b'F', 0xee, 0xb0, b'K', 0xee, 0xf4];

        // SAFETY: anonymous private mapping with no address hint; the result is
        // checked against MAP_FAILED before use.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
        let host_addr = mem as u64;

        // SAFETY: `mem` is a fresh MEM_SIZE-byte writable mapping and the code
        // is far smaller than it; the regions cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len());
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: GUEST_ADDR,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the mapping stays valid until after the VM and vCPU are
        // dropped (it is unmapped at the end of this closure).
        unsafe { vm.set_user_memory_region(region) }.expect("set_user_memory_region");

        let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
        let mut sregs = vcpu.get_sregs().expect("get_sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("set_sregs");
        let mut regs = vcpu.get_regs().expect("get_regs");
        regs.rip = GUEST_ADDR;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("set_regs");

        let mut serial = Vec::new();
        let mut exits = 0;
        loop {
            exits += 1;
            assert!(exits < 100, "too many exits; serial so far {serial:?}");
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => {
                    assert_eq!(port, 0x3f8, "unexpected port");
                    serial.extend_from_slice(data);
                }
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(serial, b"FK");
        println!(
            "kvm_smoke_e2e: guest wrote {:?} and halted",
            String::from_utf8_lossy(&serial)
        );

        drop(vcpu);
        drop(vm);
        // SAFETY: `mem` came from the mmap above with MEM_SIZE and nothing
        // references it any more (VM and vCPU are dropped).
        unsafe {
            libc::munmap(mem, MEM_SIZE);
        }
    });
}
