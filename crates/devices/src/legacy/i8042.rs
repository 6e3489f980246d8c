//! The i8042 keyboard controller at 0x60..0x64: only what Linux needs, above all the CPU
//! reset command (0xfe on port 0x64) that `reboot` (with `reboot=k`) sends.

use super::EventFdTrigger;
use crate::BusDevice;

/// The i8042 controller; a reset command triggers the VMM's reset event.
pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest resets the CPU.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        super::byte_read(offset, data, |reg| self.inner.read(reg));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        super::byte_write(offset, data, |reg, value| {
            if let Err(e) = self.inner.write(reg, value) {
                tracing::warn!("i8042 reset trigger failed: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn reset_command_triggers_the_reset_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        assert!(evt.read().is_err(), "no reset before the command");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
