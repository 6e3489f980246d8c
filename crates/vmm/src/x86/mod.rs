//! x86_64 specifics: vCPU register setup for the Linux 64-bit boot protocol, CPUID,
//! kernel and initrd loading with the e820 map, and the ACPI tables that describe the
//! machine (CPUs, IOAPIC, power-off).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod gdt;
