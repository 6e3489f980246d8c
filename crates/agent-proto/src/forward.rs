//! [`Request::Forward`]: a TCP connection to a port on the guest's loopback, carried
//! over one agent connection. Both ends copy bytes with [`splice`]: the host's relay
//! (a pod's port-forward, `forkvm_net::loopback`) between its client and the agent
//! connection, the agent between that connection and the guest's socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::client::{call_within, connect_vsock};
use crate::{Request, Response, AGENT_PORT};

/// Most forwarded connections an agent carries at once (more are answered with an
/// error).
pub const MAX_FORWARDS: usize = 64;
/// How long the agent waits for the guest's port to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A bounded number of connections carried at once: each [`Slot`] taken counts until it
/// is dropped.
#[derive(Clone, Debug)]
pub struct Slots {
    taken: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// One of [`Slots`]' places, given back when dropped.
#[derive(Debug)]
pub struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Slots {
    /// At most `max` slots at once.
    pub fn new(max: usize) -> Self {
        Slots {
            taken: Default::default(),
            max,
        }
    }

    /// A slot, unless all `max` are taken.
    pub fn take(&self) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.taken.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Once one direction of a [`splice`] has ended, how long the other may go on before
/// both are closed: a peer that never closes cannot hold the connection for ever.
pub const HALF_CLOSED_LIMIT: Duration = Duration::from_secs(60);

/// A stream copied both ways at once: a second handle to it, and its halves closed on
/// their own.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// Another handle to the same stream.
    fn try_clone(&self) -> io::Result<Self>;
    /// Closes the write half (the peer reads end of file).
    fn shutdown_write(&self);
    /// Closes both halves (a read blocked on it returns).
    fn shutdown_both(&self);
}

impl Duplex for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reach end of file, closing
/// each destination's write half when its source ends (a client's half-close reaches
/// the server), each direction on a thread of its own. Once one direction has ended,
/// the other has [`HALF_CLOSED_LIMIT`] to end before both streams are closed.
pub fn splice<A: Duplex, B: Duplex>(a: A, b: B) -> io::Result<()> {
    splice_within(a, b, HALF_CLOSED_LIMIT)
}

fn splice_within<A: Duplex, B: Duplex>(a: A, b: B, limit: Duration) -> io::Result<()> {
    let (done, ended) = std::sync::mpsc::channel();
    let forth = one_way(a.try_clone()?, b.try_clone()?, done.clone())?;
    let back = match one_way(b.try_clone()?, a.try_clone()?, done) {
        Ok(back) => back,
        Err(e) => {
            a.shutdown_both();
            b.shutdown_both();
            let _ = forth.join();
            return Err(e);
        }
    };
    // The first direction to end, then the other within the limit.
    let _ = ended.recv();
    if ended.recv_timeout(limit).is_err() {
        a.shutdown_both();
        b.shutdown_both();
    }
    let _ = forth.join();
    let _ = back.join();
    Ok(())
}

/// Copies `from` to `to` on a thread, closes `to`'s write half at the end and says so
/// on `done`.
fn one_way<R: Duplex, W: Duplex>(
    mut from: R,
    mut to: W,
    done: std::sync::mpsc::Sender<()>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("splice".into())
        .spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            to.shutdown_write();
            let _ = done.send(());
        })
}

/// Opens a forwarded connection to TCP `port` on the loopback of the guest whose vsock
/// Unix socket is `uds`: the agent connected to the port and answered, and the stream
/// now carries the connection's bytes. `timeout` bounds the handshake and the answer
/// (the agent's own connect waits at most [`CONNECT_TIMEOUT`]).
pub fn connect(uds: &Path, port: u16, timeout: Duration) -> io::Result<UnixStream> {
    let mut conn = connect_vsock(uds, AGENT_PORT, timeout)?;
    let refused = |why: String| io::Error::new(io::ErrorKind::ConnectionRefused, why);
    match call_within(&mut conn, &Request::Forward { port }, timeout) {
        Ok(Response::Ok) => Ok(conn),
        Ok(Response::Error { message }) => Err(refused(format!("guest port {port}: {message}"))),
        Ok(other) => Err(refused(format!(
            "guest port {port}: unexpected answer {other:?}"
        ))),
        Err(e) => Err(refused(format!("guest port {port}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn slots_are_bounded_and_given_back_when_dropped() {
        let slots = Slots::new(2);
        let (a, b) = (slots.take().unwrap(), slots.take().unwrap());
        assert!(slots.take().is_none());
        drop(a);
        let c = slots.take().expect("a's place");
        assert!(slots.clone().take().is_none(), "clones share the count");
        drop((b, c));
        assert!(slots.take().is_some());
    }

    #[test]
    fn splice_carries_both_ways_and_passes_a_half_close_on() {
        // A server that reads to end of file, then answers with what it read,
        // uppercased: it answers only once the client's half-close came through.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let served = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got.to_ascii_uppercase()).unwrap();
        });
        let (mut client, relay_end) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || {
            splice(relay_end, TcpStream::connect(addr).unwrap()).unwrap();
        });
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"HELLO");
        served.join().unwrap();
        relay.join().unwrap();
    }

    #[test]
    fn a_peer_that_never_closes_is_cut_after_the_limit() {
        // The client closes its side; the server's end never closes nor writes.
        let (mut client, relay_a) = UnixStream::pair().unwrap();
        let (relay_b, _silent_server) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || {
            splice_within(relay_a, relay_b, Duration::from_millis(200)).unwrap();
        });
        client.shutdown(Shutdown::Write).unwrap();
        let start = std::time::Instant::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        relay.join().unwrap();
        assert!(rest.is_empty());
        assert!(
            start.elapsed() >= Duration::from_millis(200)
                && start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
}
