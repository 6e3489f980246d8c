//! The ACPI power port: the FADT names it as both the hardware-reduced sleep control
//! register and the reset register, so the guest's `poweroff` (S5) and ACPI reboot end
//! up here as one-byte writes.

use super::{EventFdTrigger, GuestStop};
use crate::BusDevice;
use vm_superio::Trigger;

/// Value the guest writes to enter S5: SLP_EN (bit 5) | SLP_TYP 5 (bits 2..4). The DSDT's
/// `_S5_` package says SLP_TYP is 5.
pub const POWER_PORT_S5_VALUE: u8 = (1 << 5) | (5 << 2);
/// Value the guest writes to the reset register (the FADT's RESET_VALUE).
pub const POWER_PORT_RESET_VALUE: u8 = 1;

/// Port device that reports power-off and reset requests to the VMM.
pub struct AcpiPowerPort {
    poweroff: EventFdTrigger,
    reset: EventFdTrigger,
}

impl AcpiPowerPort {
    /// A port that signals `poweroff` on S5 and `reset` on the reset value.
    pub fn new(poweroff: EventFdTrigger, reset: EventFdTrigger) -> Self {
        Self { poweroff, reset }
    }

    /// What a write of `value` asks for, if anything.
    pub fn decode(value: u8) -> Option<GuestStop> {
        match value {
            POWER_PORT_S5_VALUE => Some(GuestStop::PowerOff),
            POWER_PORT_RESET_VALUE => Some(GuestStop::Reset),
            _ => None,
        }
    }
}

impl BusDevice for AcpiPowerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The sleep status register: WAK_STS never set; the guest does not resume from S5.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let result = match Self::decode(value) {
            Some(GuestStop::PowerOff) => self.poweroff.trigger(),
            Some(GuestStop::Reset) => self.reset.trigger(),
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!("power port trigger failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn s5_and_reset_writes_signal_their_events() {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rst = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = AcpiPowerPort::new(
            EventFdTrigger::new(off.try_clone().unwrap()),
            EventFdTrigger::new(rst.try_clone().unwrap()),
        );
        port.write(0, &[0x14]); // SLP_TYP 5 without SLP_EN: nothing
        assert!(off.read().is_err());
        port.write(0, &[POWER_PORT_S5_VALUE]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(rst.read().is_err());
        port.write(0, &[POWER_PORT_RESET_VALUE]);
        assert_eq!(rst.read().unwrap(), 1);
    }
}
