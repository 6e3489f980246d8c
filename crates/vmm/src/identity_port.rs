//! The identity port: a second 16550 UART (COM2, ports 0x2f8-0x2ff, IRQ 3) over which a
//! fork child's VMM hands its guest agent the child's identity (entropy, clock,
//! hostname, MACs) without a vsock connection.
//!
//! A fork child's guest pays for its first vsock connection with ~700 KiB of copied
//! pages (the slab caches, `struct page`s and thread a socket, an accepted connection
//! and its server thread first touch after the fork: `docs/benchmarks.md`). The agent
//! opens `/dev/ttyS1` when it starts, in the parent, and keeps a thread blocked reading
//! it, so a child's identity costs the guest one UART interrupt path and the agent's
//! work, not a connection.
//!
//! The protocol is the agent's own, one JSON line each way: the agent writes
//! [`ANNOUNCE`] when it starts listening (the VMM records that, and a snapshot carries
//! it, so a child knows its guest listens); the host writes a request line
//! (`Identity` or `Ping`) and the agent answers with a response line. Everything the
//! guest writes is hostile: lines are bounded ([`MAX_LINE`]), answers are kept only
//! while a request waits for one, and every wait has a deadline.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkvm_devices::legacy::{Serial, SerialState};
use serde::{Deserialize, Serialize};

/// The line the guest agent writes when it reads the port.
pub const ANNOUNCE: &[u8] = forkvm_agent_proto::IDENTITY_PORT_ANNOUNCE.as_bytes();

/// The longest line read from the guest; a longer one is dropped whole.
pub const MAX_LINE: usize = 4096;

/// The longest request: it and its two newlines fit the UART's backlog at once.
pub const MAX_REQUEST: usize = forkvm_devices::legacy::MAX_BACKLOG - 2;

/// LSR: data ready.
const LSR_DATA_READY: u8 = 0x01;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR: received data available.
const IIR_RECEIVED_DATA: u8 = 0x04;

/// How many answer lines are kept for a waiting request (a guest that writes more
/// answers than it was asked for loses the oldest).
const MAX_ANSWERS: usize = 4;

/// What of the identity port a snapshot carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityPortState {
    /// The UART's registers and pending input.
    pub serial: SerialState,
    /// Whether the guest's agent announced that it reads the port.
    pub announced: bool,
}

/// Why a request over the identity port got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The guest never said its agent reads the port.
    #[error("the guest's agent does not read the identity port")]
    NotAnnounced,
    /// The guest did not take the request, or did not answer it, in time (with what
    /// its UART's registers then said).
    #[error("the guest did not {0} within {1:?} ({2})")]
    Timeout(&'static str, Duration, String),
    /// The request is longer than the port queues for the guest, or not one line.
    #[error("request of {0} bytes is not one line of at most {MAX_REQUEST} bytes")]
    TooLong(usize),
}

#[derive(Default)]
struct Lines {
    announced: bool,
    /// The line being written, and whether it already ran over [`MAX_LINE`].
    partial: Vec<u8>,
    overlong: bool,
    /// Whether a request waits for its answer; answers outside one are dropped.
    waiting: bool,
    answers: VecDeque<Vec<u8>>,
}

/// What the guest wrote, line by line.
#[derive(Default)]
struct Shared {
    lines: Mutex<Lines>,
    answered: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Guest output of the port (written on a vCPU thread, one byte per port write): cut
/// into bounded lines, each an announcement or an answer.
struct GuestLines(Arc<Shared>);

impl Write for GuestLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut l = self.0.lock();
        for &b in buf {
            if b != b'\n' {
                if l.partial.len() < MAX_LINE {
                    l.partial.push(b);
                } else {
                    l.overlong = true;
                }
                continue;
            }
            let line = std::mem::take(&mut l.partial);
            if std::mem::take(&mut l.overlong) {
                continue;
            }
            let line = line.strip_suffix(b"\r").map(<[u8]>::to_vec).unwrap_or(line);
            if line == ANNOUNCE {
                l.announced = true;
            } else if l.waiting {
                if l.answers.len() == MAX_ANSWERS {
                    l.answers.pop_front();
                }
                l.answers.push_back(line);
                self.0.answered.notify_all();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The host side of the identity port: its UART (on the port bus) and what the guest
/// wrote to it.
#[derive(Clone)]
pub struct IdentityPort {
    serial: Arc<Mutex<Serial>>,
    shared: Arc<Shared>,
}

impl IdentityPort {
    /// The port in its power-on state, or as `saved` left it; its interrupt is `irq`.
    pub fn new(
        irq: forkvm_devices::legacy::EventFdTrigger,
        saved: Option<&IdentityPortState>,
    ) -> Result<Self, forkvm_devices::legacy::SerialError> {
        use forkvm_devices::Persist;
        let shared = Arc::new(Shared::default());
        let out: Box<dyn Write + Send> = Box::new(GuestLines(shared.clone()));
        let serial = match saved {
            None => Serial::new(irq, out),
            Some(state) => {
                shared.lock().announced = state.announced;
                // Input the saved VM had not read was a request to it, not to this
                // one: dropped, with the data-ready bit and interrupt it raised.
                let mut serial = state.serial.clone();
                if !serial.in_buffer.is_empty() {
                    serial.in_buffer.clear();
                    serial.line_status &= !LSR_DATA_READY;
                    if serial.interrupt_identification & 0x0f == IIR_RECEIVED_DATA {
                        serial.interrupt_identification = IIR_NONE;
                    }
                }
                Serial::restore(forkvm_devices::legacy::SerialArgs { irq, out }, &serial)?
            }
        };
        Ok(Self {
            serial: Arc::new(Mutex::new(serial)),
            shared,
        })
    }

    /// The UART, for the port bus.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// The port's state for a snapshot.
    pub fn save(&self) -> Result<IdentityPortState, forkvm_devices::legacy::SerialError> {
        use forkvm_devices::Persist;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save()?;
        Ok(IdentityPortState {
            serial,
            announced: self.announced(),
        })
    }

    /// Whether the guest's agent said it reads the port.
    pub fn announced(&self) -> bool {
        self.shared.lock().announced
    }

    /// Sends `request` (one line, without its newline) and returns what `parse` makes of
    /// the first line the guest writes back that it parses, waiting until `deadline`.
    /// One request at a time (the caller's to keep): lines written before it, or half
    /// written, and input of an earlier request the guest has not read are dropped
    /// before it is sent. The request follows a newline, so that whatever the guest's
    /// side still held of an earlier line ends as a line of its own (the agent answers
    /// no line that is not a request).
    pub fn call<T>(
        &self,
        request: &[u8],
        parse: impl Fn(&[u8]) -> Option<T>,
        deadline: Instant,
    ) -> Result<T, PortError> {
        if !self.announced() {
            return Err(PortError::NotAnnounced);
        }
        if request.len() > MAX_REQUEST || request.contains(&b'\n') {
            return Err(PortError::TooLong(request.len()));
        }
        {
            let mut l = self.shared.lock();
            l.answers.clear();
            l.partial.clear();
            l.overlong = false;
            l.waiting = true;
        }
        self.send(request);
        let answer = self.answer(&parse, deadline);
        self.shared.lock().waiting = false;
        answer
    }

    /// Queues `request` between newlines for the guest ([`Serial::queue_input`]: the
    /// guest's driver reads it all on one interrupt), in place of whatever an earlier
    /// request left queued.
    fn send(&self, request: &[u8]) {
        let line = [b'\n']
            .into_iter()
            .chain(request.iter().copied())
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial.drop_backlog();
        let queued = serial.queue_input(&line);
        debug_assert_eq!(queued, line.len(), "a request fits the backlog");
    }

    /// The UART's registers, for a report.
    fn registers(&self) -> String {
        use forkvm_devices::Persist;
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let backlog = serial.backlog();
        match serial.save() {
            Ok(s) => format!(
                "IER {:#04x}, IIR {:#04x}, LCR {:#04x}, LSR {:#04x}, MCR {:#04x}, {} bytes unread, {backlog} queued",
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.in_buffer.len()
            ),
            Err(e) => e.to_string(),
        }
    }

    fn answer<T>(
        &self,
        parse: &dyn Fn(&[u8]) -> Option<T>,
        deadline: Instant,
    ) -> Result<T, PortError> {
        let start = Instant::now();
        let mut watch = Unread::default();
        let mut l = self.shared.lock();
        loop {
            while let Some(line) = l.answers.pop_front() {
                if let Some(answer) = parse(&line) {
                    return Ok(answer);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(l);
                return Err(PortError::Timeout(
                    "answer",
                    start.elapsed(),
                    self.registers(),
                ));
            }
            let (back, waited) = self
                .shared
                .answered
                .wait_timeout(l, left.min(KICK_AFTER))
                .unwrap_or_else(|p| p.into_inner());
            l = back;
            if waited.timed_out() {
                // The request's last bytes may still wait unread.
                drop(l);
                watch.check(&mut self.serial.lock().unwrap_or_else(|p| p.into_inner()));
                l = self.shared.lock();
            }
        }
    }
}

/// How long input may wait unread, the guest reading none of it, before its interrupt
/// is raised again ([`Serial::kick_input`]).
const KICK_AFTER: Duration = Duration::from_millis(100);

/// Watches the receive FIFO for input the guest stopped reading.
#[derive(Default)]
struct Unread {
    /// The unread count last seen, and since when it has not changed.
    since: Option<(usize, Instant)>,
}

impl Unread {
    /// Raises the guest's receive interrupt again when the same input has waited
    /// unread for [`KICK_AFTER`].
    fn check(&mut self, serial: &mut Serial) {
        let unread = serial.unread();
        let now = Instant::now();
        match self.since {
            _ if unread == 0 => self.since = None,
            Some((n, at)) if n == unread => {
                if now.duration_since(at) >= KICK_AFTER {
                    if serial.kick_input() {
                        tracing::debug!(unread, "identity port: signalled the unread input again");
                    }
                    self.since = Some((unread, now));
                }
            }
            _ => self.since = Some((unread, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use forkvm_devices::legacy::EventFdTrigger;
    use forkvm_devices::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn port(saved: Option<&IdentityPortState>) -> IdentityPort {
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        IdentityPort::new(irq, saved).unwrap()
    }

    /// The guest writes `bytes` to the transmit register, one port write each.
    fn guest_writes(p: &IdentityPort, bytes: &[u8]) {
        let mut s = p.serial.lock().unwrap();
        for b in bytes {
            s.write(0, &[*b]);
        }
    }

    /// The guest reads whatever the receive FIFO holds.
    fn guest_reads(p: &IdentityPort) -> Vec<u8> {
        let mut s = p.serial.lock().unwrap();
        let mut out = Vec::new();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn a_request_waits_for_the_announcement() {
        let p = port(None);
        let soon = Instant::now() + Duration::from_millis(10);
        assert!(matches!(
            p.call(b"{}", |l| Some(l.to_vec()), soon),
            Err(PortError::NotAnnounced)
        ));
        guest_writes(&p, b"forkvm-agent identity-port 2\r\n");
        assert!(p.announced());
        assert!(p.save().unwrap().announced);
        assert!(port(Some(&p.save().unwrap())).announced());
    }

    #[test]
    fn a_request_longer_than_the_fifo_reaches_the_guest_and_its_answer_comes_back() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        let guest = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while !got.ends_with(b"\n") {
                    got.extend(guest_reads(&p));
                    std::thread::sleep(Duration::from_micros(100));
                }
                guest_writes(&p, b"{\"op\":\"ok\"}\n");
                got
            })
        };
        let request = vec![b'x'; 300];
        let answer = p
            .call(
                &request,
                |l| Some(l.to_vec()),
                Instant::now() + Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(answer, b"{\"op\":\"ok\"}");
        let got = guest.join().unwrap();
        assert_eq!(got[0], b'\n');
        assert_eq!(&got[1..301], &request[..]);
        assert_eq!(got.len(), 302);
    }

    #[test]
    fn a_silent_guest_times_out_and_unasked_or_overlong_lines_are_dropped() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        // Nobody asked: not kept.
        guest_writes(&p, b"stale answer\n");
        let start = Instant::now();
        let r = p.call(
            b"ping",
            |l| Some(l.to_vec()),
            start + Duration::from_millis(50),
        );
        assert!(
            matches!(r, Err(PortError::Timeout("answer", _, _))),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // A line over the limit is dropped whole, and does not grow the buffer.
        {
            let mut l = p.shared.lock();
            l.waiting = true;
        }
        guest_writes(&p, &vec![b'a'; MAX_LINE * 4]);
        assert!(p.shared.lock().partial.len() <= MAX_LINE);
        guest_writes(&p, b"\nshort\n");
        let l = p.shared.lock();
        assert_eq!(
            l.answers.iter().collect::<Vec<_>>(),
            vec![&b"short".to_vec()]
        );
    }

    #[test]
    fn a_flooding_guest_keeps_only_a_few_answers() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        p.shared.lock().waiting = true;
        for _ in 0..1000 {
            guest_writes(&p, b"answer\n");
        }
        assert_eq!(p.shared.lock().answers.len(), MAX_ANSWERS);
    }

    #[test]
    fn input_the_guest_stopped_reading_is_signalled_again() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let p = IdentityPort::new(EventFdTrigger::new(evt.try_clone().unwrap()), None).unwrap();
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        p.serial.lock().unwrap().write(1, &[0x01]); // IER: received data
                                                    // The guest takes the interrupt and reads IIR, but never the data (it lost
                                                    // the edge that would have made it read).
        let guest = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut iir = [0u8];
                let mut raised = 0;
                let until = Instant::now() + Duration::from_millis(400);
                while Instant::now() < until {
                    if evt.read().is_ok() {
                        raised += 1;
                        if raised == 2 {
                            // Raised again: now it reads, and answers.
                            let got = guest_reads(&p);
                            assert!(got.ends_with(b"\n"), "{got:?}");
                            guest_writes(&p, b"{}\n");
                            return raised;
                        }
                        p.serial.lock().unwrap().read(2, &mut iir);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                raised
            })
        };
        let answer = p.call(
            b"ping",
            |l| Some(l.to_vec()),
            Instant::now() + Duration::from_secs(5),
        );
        assert_eq!(guest.join().unwrap(), 2);
        assert_eq!(answer.unwrap(), b"{}");
    }

    #[test]
    fn lines_not_accepted_and_half_lines_before_the_request_are_not_its_answer() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        // Half a line the guest wrote before the request.
        guest_writes(&p, b"{\"status\":\"o");
        let guest = {
            let p = p.clone();
            std::thread::spawn(move || {
                while !guest_reads(&p).ends_with(b"\n") {
                    std::thread::sleep(Duration::from_micros(100));
                }
                guest_writes(&p, b"k\"}\nnoise\n{\"status\":\"ok\"}\n");
            })
        };
        let answer = p.call(
            b"ping",
            |l| l.starts_with(b"{").then(|| l.to_vec()),
            Instant::now() + Duration::from_secs(10),
        );
        guest.join().unwrap();
        assert_eq!(answer.unwrap(), b"{\"status\":\"ok\"}");
    }

    #[test]
    fn a_restored_port_drops_the_input_its_vm_had_not_read() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        p.serial.lock().unwrap().write(1, &[0x01]);
        assert_eq!(
            p.serial
                .lock()
                .unwrap()
                .enqueue_input(b"{\"op\":\"identity\""),
            16
        );
        let saved = p.save().unwrap();
        assert_eq!(saved.serial.in_buffer.len(), 16);
        let child = port(Some(&saved));
        assert!(child.announced());
        let s = child.save().unwrap().serial;
        assert!(s.in_buffer.is_empty());
        assert_eq!(s.line_status & LSR_DATA_READY, 0);
        assert_eq!(s.interrupt_identification & 0x0f, IIR_NONE);
        assert!(guest_reads(&child).is_empty());
    }

    #[test]
    fn requests_with_a_newline_or_over_a_line_are_refused() {
        let p = port(None);
        guest_writes(&p, ANNOUNCE);
        guest_writes(&p, b"\n");
        let later = Instant::now() + Duration::from_secs(1);
        assert!(matches!(
            p.call(b"a\nb", |l| Some(l.to_vec()), later),
            Err(PortError::TooLong(_))
        ));
        assert!(matches!(
            p.call(&vec![b'a'; MAX_LINE], |l| Some(l.to_vec()), later),
            Err(PortError::TooLong(_))
        ));
    }
}
