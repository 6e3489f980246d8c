//! Legacy PC devices on the port-I/O bus: the 16550 serial console, the i8042 controller
//! (the guest's `reboot` path) and the ACPI power port (the guest's `poweroff` path).

mod i8042;
mod power;
mod serial;

pub use i8042::I8042;
pub use power::{AcpiPowerPort, POWER_PORT_RESET_VALUE, POWER_PORT_S5_VALUE};
pub use serial::{Serial, SerialArgs, SerialError, SerialState, MAX_BACKLOG};

use vmm_sys_util::eventfd::EventFd;

/// A `vm_superio::Trigger` backed by an eventfd (an irqfd, or the VMM's exit event).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped eventfd.
    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A one-byte port read at `offset`: `read(register)` fills `data` when the access is a
/// single byte at a byte-sized offset; anything else reads as zeros.
pub(crate) fn byte_read(offset: u64, data: &mut [u8], read: impl FnOnce(u8) -> u8) {
    data.fill(0);
    if let (Ok(off), 1) = (u8::try_from(offset), data.len()) {
        data[0] = read(off);
    }
}

/// A one-byte port write at `offset`: `write(register, value)` runs when the access is a
/// single byte at a byte-sized offset; anything else is ignored.
pub(crate) fn byte_write(offset: u64, data: &[u8], write: impl FnOnce(u8, u8)) {
    if let (Ok(off), &[value]) = (u8::try_from(offset), data) {
        write(off, value);
    }
}

/// Why the guest asked the VMM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestStop {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest rebooted (i8042 reset line or ACPI reset register).
    Reset,
}
