//! The x86_64 guest physical address map: where boot structures, ACPI tables, devices
//! and RAM live. One place, so boot, ACPI and the device manager agree.

/// GDT used for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) loaded at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table identity-mapping the first GiB.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the guest kernel accepts (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the conventional RAM below 1 MiB that the e820 map reports usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// Where the protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// KVM's identity-map page (needed on Intel, harmless elsewhere), just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// KVM's TSS area (three pages).
pub const KVM_TSS_START: u64 = 0xfeff_d000;

/// Legacy IRQ of the console UART.
pub const SERIAL_IRQ: u32 = 4;
/// Legacy IRQ of the identity port (COM2), see [`crate::identity_port`].
pub const IDENTITY_IRQ: u32 = 3;
/// First IRQ handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IRQ the IOAPIC (24 pins) can deliver.
pub const IRQ_MAX: u32 = 23;

/// COM1 ports.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM2 ports: the identity port.
pub const IDENTITY_PORT: u16 = 0x2f8;
/// i8042 ports 0x60..=0x64.
pub const I8042_PORT: u16 = 0x60;
/// ACPI sleep-control / reset register (one byte).
pub const ACPI_POWER_PORT: u16 = 0x3c0;
