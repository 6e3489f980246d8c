//! Device model: 16550 serial, i8042, the virtio-mmio transport and the virtio block, net,
//! vsock, rng and fs (shared directory) devices.
//!
//! Every device keeps what must survive a snapshot or a fork in a plain serializable
//! `*State` struct, separate from its behaviour (open files, sockets, eventfds), and
//! saves and restores it through [`Persist`]. The VMM
//! core owns the buses and dispatches guest port and MMIO accesses to the [`BusDevice`]s
//! registered on them; virtio devices run their queues on the VMM's event loop.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod persist;
pub mod virtio;

pub use bus::BusDevice;
pub use persist::Persist;

/// Guest memory as every device sees it: the VMM's memfd-backed regions, no dirty bitmap
/// (fork finds dirty pages through KVM's dirty log, not through vm-memory).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
