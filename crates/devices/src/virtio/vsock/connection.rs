//! One vsock stream connection between a guest socket and a host Unix stream: its handshake
//! state, credit accounting (virtio spec 1.2, 5.10.6.3) and buffered guest-to-host bytes.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer the device advertises to the guest for each connection (`buf_alloc`): how
/// many guest-to-host bytes it is willing to hold when the host end does not read.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// The device tells the guest about freed receive space (`OP_CREDIT_UPDATE`) once this many
/// bytes were forwarded to the host since the guest last heard of `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug)]
pub enum ConnState {
    /// A host client connected to the device's Unix socket; the device waits for its
    /// `CONNECT <port>\n` line (collected here).
    HostHandshake {
        /// Bytes of the line read so far.
        line: Vec<u8>,
    },
    /// The device sent `OP_REQUEST` to the guest for a host client and waits for
    /// `OP_RESPONSE` (or `OP_RST`).
    LocalInit,
    /// Both ends agreed; data flows.
    Established,
}

/// A connection and everything the device tracks about it.
#[derive(Debug)]
pub struct Connection {
    /// Host end: a client of the device's listener, or the device's client of
    /// `<uds_path>_<port>`.
    pub stream: UnixStream,
    /// Handshake state.
    pub state: ConnState,
    /// The host-side vsock port (`src_port` of packets to the guest).
    pub local_port: u32,
    /// The guest-side vsock port (`dst_port` of packets to the guest).
    pub peer_port: u32,
    /// The guest's receive buffer for this connection.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed from its receive buffer.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes the device has sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes the device has written to the host stream (its consumed receive buffer).
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard of.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest-to-host bytes the host stream has not taken yet.
    pub tx_buf: VecDeque<u8>,
    /// `SHUTDOWN_*` flags the guest sent.
    pub peer_shutdown: u32,
    /// The host stream reached end of file (the guest got `OP_SHUTDOWN` with `SEND`).
    pub host_eof: bool,
    /// The device shut down the write half of the host stream (guest sent `SHUTDOWN_SEND`).
    pub host_write_shut: bool,
    /// The stream is in the device's list of streams with bytes to read.
    pub rx_ready: bool,
    /// An `OP_CREDIT_UPDATE` for this connection waits in the control queue.
    pub credit_update_queued: bool,
    /// An `OP_CREDIT_REQUEST` was sent since the guest last reported its credit.
    pub credit_requested: bool,
    /// What the stream is registered for with the event manager (`None`: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    /// A connection in `state` over `stream`, ports not yet known for host handshakes.
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            rx_ready: false,
            credit_update_queued: false,
            credit_requested: false,
            registered: None,
        }
    }

    /// Records the credit the guest reports in every packet it sends.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        self.credit_requested = false;
    }

    /// Bytes the device may still send to the guest before it must wait for credit.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the device wants to read the host stream, credit aside.
    pub fn wants_read_ignoring_credit(&self) -> bool {
        matches!(self.state, ConnState::Established)
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the device wants to read the host stream now.
    pub fn wants_read(&self) -> bool {
        self.wants_read_ignoring_credit() && self.peer_free() > 0
    }

    /// What the stream should be registered for: `None` when the device waits for nothing
    /// from it (it is then left out of epoll entirely, so a hang-up cannot spin the loop).
    pub fn desired_interest(&self) -> Option<EventSet> {
        match self.state {
            ConnState::HostHandshake { .. } => Some(EventSet::IN),
            // Only hang-ups and errors, which epoll always reports.
            ConnState::LocalInit => Some(EventSet::empty()),
            ConnState::Established => {
                let mut set = EventSet::empty();
                if self.wants_read() && !self.rx_ready {
                    set |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    set |= EventSet::OUT;
                }
                (!set.is_empty()).then_some(set)
            }
        }
    }

    /// Writes as much of `tx_buf` to the host stream as it takes; counts it in `fwd_cnt`.
    pub fn flush_tx(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes guest payload: writes what the host stream accepts now, buffers the rest.
    /// Fails with `InvalidData` when the guest overran the credit it was given.
    pub fn push_tx(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "guest sent more than the advertised buffer",
            ));
        }
        self.tx_buf.extend(data);
        self.flush_tx()
    }

    /// Whether the guest should be told about freed receive space.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// The guest will send no more: once buffered bytes are out, end the host stream's
    /// write half so the host client sees end of file.
    pub fn apply_peer_send_shutdown(&mut self) -> io::Result<()> {
        if self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.tx_buf.is_empty()
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            match self.stream.shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}
