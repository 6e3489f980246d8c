//! ACPI tables describing the machine to the guest: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The FADT declares a hardware-reduced platform whose sleep-control and reset registers
//! are the VMM's power port, so a guest `poweroff` (S5, whose SLP_TYP the DSDT's `_S5_`
//! package gives) and an ACPI reboot become port writes the VMM sees. The MADT lists one
//! local APIC per vCPU and the IOAPIC; Linux needs no MP table.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    ACPI_POWER_PORT, ACPI_START, APIC_START, EBDA_START, IDENTITY_IRQ, IDENTITY_PORT, IOAPIC_START,
    SERIAL_IRQ, SERIAL_PORT,
};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FORKVM";
const OEM_REVISION: u32 = 1;
/// FADT flag: hardware-reduced ACPI (no PM1 blocks, no SCI, no legacy PM timer).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flag: the reset register is supported.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// IAPC_BOOT_ARCH: no VGA.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: no CMOS RTC. Without it Linux probes for one (seconds under nested
/// virtualization); guest wall time comes from kvmclock.
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// ACPI reset value the guest writes to the reset register.
pub const RESET_VALUE: u8 = forkvm_devices::legacy::POWER_PORT_RESET_VALUE;
/// Where the tables must end: the start of the EBDA... past 1 MiB is kernel territory.
const ACPI_LIMIT: u64 = 0x10_0000;

/// Errors while writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Writing to guest memory failed.
    #[error("cannot write ACPI table {table}")]
    Write {
        /// The table signature.
        table: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", 276, 6, OEM_ID, *b"FORKFADT", OEM_REVISION);
    // IAPC_BOOT_ARCH leaves bit 1 (8042 present) clear: Linux then skips probing a PS/2
    // controller (the i8042 is there only for the reset line).
    fadt.write_u16(
        109,
        BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
    );
    fadt.write_u32(112, FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP);
    fadt.write(116, GenericAddress::io_port_address::<u8>(ACPI_POWER_PORT));
    fadt.write_u8(128, RESET_VALUE);
    fadt.write_u8(131, 3); // FADT minor version (6.3)
    fadt.write_u64(140, dsdt_addr); // X_DSDT
    fadt.write(244, GenericAddress::io_port_address::<u8>(ACPI_POWER_PORT)); // sleep control
    fadt.write(256, GenericAddress::io_port_address::<u8>(ACPI_POWER_PORT)); // sleep status
    fadt.write_bytes(268, b"FORKVM  "); // hypervisor vendor identity
    fadt
}

/// A virtio-mmio device as the DSDT announces it: its register window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base of the 4 KiB register window.
    pub base: u64,
    /// Size of the register window.
    pub len: u64,
    /// The (edge-triggered, active-high) IOAPIC interrupt.
    pub irq: u32,
}

/// Appends `Device (_SB.VRnn) { _HID "LNRO0005", _UID, _CRS { Memory32Fixed, Interrupt } }`,
/// the ACPI form of a virtio-mmio device that Linux's virtio_mmio driver binds to.
fn virtio_mmio_device(index: usize, dev: &MmioDeviceInfo, sink: &mut dyn acpi_tables::AmlSink) {
    let name = format!("_SB_.VR{index:02X}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid_value = index as u32;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// Appends a 16550 UART (`PNP0501`) at `port` (8 ports) on `irq`: COM1, the console,
/// and COM2, the identity port ([`crate::identity_port`]). A hardware-reduced platform
/// has no legacy PIC, so Linux maps no ISA interrupts by itself: without these entries
/// the UART driver cannot request the IRQs and user space never gets a console.
fn uart(name: &str, uid: u8, port: u16, irq: u32, sink: &mut dyn acpi_tables::AmlSink) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &uid);
    let io = aml::IO::new(port, port, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"FORKDSDT", OEM_REVISION);
    // S5 (soft off) with SLP_TYP 5, matching the power port's decoding.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8]));
    s5.to_aml_bytes(&mut dsdt);
    uart("_SB_.COM1", 0, SERIAL_PORT, SERIAL_IRQ, &mut dsdt);
    uart("_SB_.COM2", 1, IDENTITY_PORT, IDENTITY_IRQ, &mut dsdt);
    for (i, dev) in devices.iter().enumerate() {
        virtio_mmio_device(i, dev, &mut dsdt);
    }
    dsdt.update_checksum();
    dsdt
}

fn madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"FORKMADT",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    madt
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Writes the ACPI tables for `vcpus` CPUs and the virtio-mmio `devices` at
/// [`ACPI_START`]; returns the end address.
pub fn write_acpi_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(ACPI_START + Rsdp::len() as u64);
    // XSDT: 36-byte header + one 8-byte pointer per table (FADT, MADT).
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let dsdt = dsdt(devices);
    let fadt_len = 276;
    let dsdt_addr = align(fadt_addr + fadt_len);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = bytes_of(&madt(vcpus));
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_LIMIT || ACPI_START < EBDA_START {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"FORKXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);

    let write = |table: &'static str, bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { table, source })
    };
    write("RSDP", &bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)), ACPI_START)?;
    write("XSDT", &bytes_of(&xsdt), xsdt_addr)?;
    write("FACP", fadt(dsdt_addr).as_slice(), fadt_addr)?;
    write("DSDT", dsdt.as_slice(), dsdt_addr)?;
    write("APIC", &madt, madt_addr)?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        read(mem, addr, len)
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let dev = MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        };
        let end = write_acpi_tables(&mem, 2, &[dev, dev]).unwrap();
        assert!(end <= ACPI_LIMIT);
        let rsdp = read(&mem, ACPI_START, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let ptrs: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(ptrs.len(), 2);
        let fadt = table(&mem, ptrs[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & FADT_HW_REDUCED_ACPI, 0);
        let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(boot_arch & 0x2, 0, "no 8042 announced");
        assert_ne!(boot_arch & BOOT_ARCH_CMOS_RTC_NOT_PRESENT, 0);
        // Sleep control register: I/O space, the power port.
        assert_eq!(fadt[244], 1);
        let port = u64::from_le_bytes(fadt[248..256].try_into().unwrap());
        assert_eq!(port, u64::from(ACPI_POWER_PORT));
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, dsdt_addr);
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let hids = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hids, 2, "one virtio-mmio device entry per device");
        assert!(dsdt.windows(4).any(|w| w == b"VR01"));
        assert!(
            dsdt.windows(4).any(|w| w == b"COM1"),
            "COM1 declared for IRQ 4"
        );
        assert!(
            dsdt.windows(4).any(|w| w == b"COM2"),
            "COM2 (the identity port) declared for IRQ 3"
        );
        let madt = table(&mem, ptrs[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Two local APIC structures (type 0) and one IOAPIC (type 1).
        let mut off = 44;
        let mut kinds = vec![];
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 1]);
    }
}
