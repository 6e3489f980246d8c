//! VMM core: the KVM virtual machine, its vCPUs, memfd-backed guest memory, kernel
//! loading and the run loop.
//!
//! [`Vmm::boot`] turns a [`VmConfig`] into a running guest: it creates the memfd-backed
//! RAM, the KVM VM with its in-kernel irqchip and PIT, loads the kernel and initrd,
//! writes the ACPI tables, attaches the devices (serial, i8042, power port, virtio-mmio
//! block / net / vsock / rng) and starts one thread per vCPU. [`Vmm::run`] drives the
//! device event loop until the guest powers off or reboots.

pub mod bridged;
pub mod bus;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
pub mod fork;
pub mod identity_port;
pub mod launch;
pub mod layout;
pub mod memory;
pub mod pool;
pub mod reap;
pub mod snapshot;
pub mod steps;
pub mod template;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod warm;
pub mod x86;
pub mod zygote;

pub use config::{BlockConfig, FsConfig, NetConfig, VmConfig, VsockConfig};
pub use vmm::{ExitReason, Vmm, VmmError};
