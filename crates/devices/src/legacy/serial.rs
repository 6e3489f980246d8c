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
    /// Input queued beyond the FIFO ([`Serial::queue_input`]), at most [`MAX_BACKLOG`]
    /// bytes. Not saved: it is the host's until it reaches the FIFO.
    backlog: std::collections::VecDeque<u8>,
}

/// Receive FIFO size of the 16550 model (vm-superio's).
const FIFO_SIZE: usize = 64;
/// Most bytes [`Serial::queue_input`] holds beyond the FIFO.
pub const MAX_BACKLOG: usize = 4096;

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
            backlog: Default::default(),
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

    /// Queues `bytes` for the guest: what fits goes into the FIFO now, the rest each
    /// time the guest has read the FIFO empty, so a guest that reads while data is
    /// ready (Linux's 8250 driver, up to 256 bytes an interrupt) reads it all on one
    /// interrupt instead of one per 64 bytes. Returns how many bytes it took: all,
    /// unless the backlog would pass [`MAX_BACKLOG`].
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(MAX_BACKLOG - self.backlog.len());
        self.backlog.extend(&bytes[..n]);
        self.refill();
        n
    }

    /// Drops the input queued beyond the FIFO.
    pub fn drop_backlog(&mut self) {
        self.backlog.clear();
    }

    /// Bytes queued beyond the FIFO.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Moves what fits of the backlog into the FIFO.
    fn refill(&mut self) {
        let room = self.inner.fifo_capacity().min(self.backlog.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.backlog.drain(..room).collect();
        let taken = self.enqueue_input(&chunk);
        // In loopback mode the UART takes no input: it waits for later.
        for b in chunk[taken..].iter().rev() {
            self.backlog.push_front(*b);
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
        let before = self.inner.fifo_capacity();
        super::byte_read(offset, data, |reg| self.inner.read(reg));
        // The guest read the FIFO empty: the backlog's next bytes are ready for its
        // next look at the line status.
        let after = self.inner.fifo_capacity();
        if after > before && after == FIFO_SIZE && !self.backlog.is_empty() {
            self.refill();
        }
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
        Ok(Self {
            inner,
            backlog: Default::default(),
        })
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
    fn queued_input_is_read_in_one_go_while_data_is_ready() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            Box::new(std::io::sink()),
        );
        s.write(1, &[IER_RDA]);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(s.queue_input(&input), 200);
        assert_eq!(s.unread(), 64);
        assert_eq!(s.backlog(), 136);
        // The 8250 driver's receive loop: read while the line status says data ready.
        let mut got = Vec::new();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(s.backlog(), 0);
        // The backlog is bounded.
        assert_eq!(s.queue_input(&vec![0; MAX_BACKLOG * 2]), MAX_BACKLOG);
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
