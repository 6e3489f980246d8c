//! The 16550 UART, built on `vm_superio::Serial`: the guest console at 0x3f8, and the
//! identity port at 0x2f8.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::EventFdTrigger;
use crate::{BusDevice, Persist};

/// Interrupt enable register's offset.
const IER: u8 = 1;
/// IER: received data available interrupt.
const IER_RDA: u8 = 0x01;
/// LCR: divisor latch access.
const LCR_DLAB: u8 = 0x80;

/// The console UART: guest output goes to `out`, host input is queued with
/// [`Serial::enqueue_input`], and the interrupt is raised through an irqfd on IRQ 4.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

/// What of the UART survives a snapshot or fork: its registers and pending input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received from the host and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// A UART in its power-on state.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.inner.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Bytes in the receive FIFO the guest has not read.
    pub fn unread(&self) -> usize {
        self.inner.state().in_buffer.len()
    }

    /// Raises the receive interrupt again while input waits unread and the guest
    /// enabled it. A real 16550 keeps its interrupt output asserted while it holds
    /// data; this model signals an edge per enqueue, and an edge the guest did not take
    /// (its IOAPIC pin masked for a moment, as Linux does when the interrupt arrives on
    /// one CPU while another handles it) would leave the input unread for good: seen
    /// as a FIFO of unread bytes with the interrupt identification saying none pending.
    /// Returns whether it wrote IER to that end (it raises nothing when the
    /// identification says the receive interrupt is pending already).
    pub fn kick_input(&mut self) -> bool {
        let s = self.inner.state();
        // IER is only addressable with the divisor latch off.
        if s.in_buffer.is_empty() || s.line_control & LCR_DLAB != 0 {
            return false;
        }
        if s.interrupt_enable & IER_RDA == 0 {
            return false;
        }
        // Writing IER with the data waiting raises the receive interrupt (when the
        // identification does not already say so) and, when enabled, the transmit one.
        if let Err(e) = self.inner.write(IER, s.interrupt_enable) {
            tracing::debug!("serial kick failed: {e:?}");
            return false;
        }
        true
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        super::byte_read(offset, data, |reg| self.inner.read(reg));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        super::byte_write(offset, data, |reg, value| {
            if let Err(e) = self.inner.write(reg, value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        });
    }
}

/// What a UART is built on besides its registers.
pub struct SerialArgs {
    /// Raises the UART's interrupt.
    pub irq: EventFdTrigger,
    /// Where guest output goes.
    pub out: Box<dyn Write + Send>,
}

/// Why a UART state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved registers are not a state the UART can be in.
    #[error("invalid saved UART state: {0}")]
    BadState(String),
}

impl Persist<'_> for Serial {
    type State = SerialState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    /// A UART with the registers of `state` (snapshot restore, fork child); refuses
    /// registers the UART could not have had..
    fn restore(args: SerialArgs, state: &SerialState) -> Result<Self, SerialError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let inner =
            vm_superio::Serial::from_state(&s, args.irq, vm_superio::serial::NoEvents, args.out)
                .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(Self { inner })
    }

    /// The UART's registers and pending input.
    fn save(&self) -> Result<SerialState, SerialError> {
        let s = self.inner.state();
        Ok(SerialState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn irq() -> EventFdTrigger {
        EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn guest_bytes_reach_the_host_writer() {
        let out = Shared::default();
        let mut s = Serial::new(irq(), Box::new(out.clone()));
        for b in b"boot" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"boot");
    }

    #[test]
    fn state_round_trips_with_pending_input() {
        let mut s = Serial::new(irq(), Box::new(std::io::sink()));
        s.write(3, &[0x80]); // DLAB on
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(7, &[0x5a]); // scratch
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let saved = s.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let args = SerialArgs {
            irq: irq(),
            out: Box::new(std::io::sink()),
        };
        let mut r = Serial::restore(args, &back).unwrap();
        assert_eq!(r.save().unwrap(), saved);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }

    #[test]
    fn oversized_fifo_in_state_is_refused() {
        let state = SerialState {
            in_buffer: vec![0; 4096],
            ..Default::default()
        };
        let args = SerialArgs {
            irq: irq(),
            out: Box::new(std::io::sink()),
        };
        assert!(Serial::restore(args, &state).is_err());
    }

    #[test]
    fn input_the_guest_missed_is_signalled_again() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            Box::new(std::io::sink()),
        );
        // Nothing enabled: no kick.
        assert_eq!(s.enqueue_input(b"abc"), 3);
        assert!(!s.kick_input());
        s.write(1, &[IER_RDA]);
        while evt.read().is_ok() {}
        // The guest read IIR (which clears it) but not the data: the state the
        // identity port was found in.
        let mut iir = [0u8];
        s.read(2, &mut iir);
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 1, 1, "no interrupt pending");
        assert_eq!(s.unread(), 3);
        assert!(s.kick_input());
        assert!(evt.read().is_ok(), "the interrupt was raised again");
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x04, "received data available");
        // Read out: nothing to kick for.
        let mut b = [0u8];
        for _ in 0..3 {
            s.read(0, &mut b);
        }
        assert_eq!(s.unread(), 0);
        assert!(!s.kick_input());
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let mut s = Serial::new(irq(), Box::new(std::io::sink()));
        let mut wide = [0xffu8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        s.write(0, &[1, 2]);
        s.write(u64::MAX, &[1]);
    }
}
