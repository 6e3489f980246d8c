//! virtio-vsock: guest stream sockets bridged to host Unix sockets, the Firecracker way.
//!
//! # Host side
//!
//! The device listens on the Unix socket `uds_path`.
//!
//! * **Host to guest.** A host client connects to `uds_path` and writes `CONNECT <port>\n`
//!   (decimal port, optional `\r` before the `\n`, at most 64 bytes). The device sends the
//!   guest `OP_REQUEST` from `(CID 2, <host_port>)` to `(guest CID, <port>)`, where
//!   `<host_port>` is a port the device picks (from 2^30 up). When the guest answers
//!   `OP_RESPONSE` the device writes `OK <host_port>\n` to the client and from then on the
//!   stream carries the connection's bytes both ways. If the guest refuses (`OP_RST`), or the
//!   line is malformed, the device closes the client without writing anything.
//! * **Guest to host.** A guest socket connecting to CID 2 port `P` makes the device connect
//!   to the Unix socket `<uds_path>_<P>` (e.g. `/run/vm.vsock_52`); the guest gets
//!   `OP_RESPONSE` when that works and `OP_RST` when nothing listens there.
//! * **Teardown.** The guest's `OP_RST`, or `OP_SHUTDOWN` with both flags, closes the Unix
//!   stream (after buffered bytes are written); `OP_SHUTDOWN` with `SEND` only half-closes
//!   it. End of file from the host stream becomes `OP_SHUTDOWN(SEND)` to the guest; a host
//!   stream error becomes `OP_RST`.
//!
//! Flow control is the virtio credit scheme: each connection advertises a
//! [`CONN_BUF_ALLOC`]-byte receive buffer; the device never sends the guest more than the
//! guest's `buf_alloc - (rx_cnt - fwd_cnt)`, asks with `OP_CREDIT_REQUEST` when it is
//! stalled, and sends `OP_CREDIT_UPDATE` when asked or once it has forwarded
//! [`connection::CREDIT_UPDATE_THRESHOLD`] bytes the guest has not heard about.
//!
//! # Snapshots and forks
//!
//! [`VsockState`] holds only the CID and the negotiated features. Connections are not saved:
//! on restore (and therefore in every fork child) the device posts
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue as soon as it is activated, so the
//! guest driver re-reads its CID and resets its connected sockets; listening sockets on both
//! sides survive (the Unix listener is re-created from the config, guest listeners are
//! untouched). A fork child that needs a new CID passes it in the [`VsockConfig`] given to
//! [`Vsock::restore`], or calls [`Vsock::reset_transport`] on a running device.

mod connection;
pub mod packet;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::connection::{ConnState, Connection};
pub use self::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use self::packet::*;
use super::activation::Activation;
use super::{device_type, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::GuestMemory;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Index of the receive (device to guest) queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit (guest to device) queue.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;

/// First host port handed to host-initiated connections (as Firecracker does).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 64;
/// Largest payload the device reads from a host stream for one packet.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Largest payload the device accepts from the guest in one packet.
const MAX_TX_PAYLOAD: u32 = 64 * 1024;

// Event-manager data tags.
const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_KICK: u32 = 1;
const TOKEN_TX_KICK: u32 = 2;
const TOKEN_EVENT_KICK: u32 = 3;
const TOKEN_LISTENER: u32 = 4;
const TOKEN_STREAM: u32 = 5;

/// How the VMM configures a vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The Unix socket the device listens on; guest-initiated connections to host port `P`
    /// go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// What of a vsock device survives a snapshot: the CID and the negotiated features.
/// Connections do not (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The CID in the configuration space when the state was taken.
    pub cid: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a vsock device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0, 1 and 2 are reserved, and the CID must fit the 32 bits Linux uses.
    #[error("{0} is not a usable guest CID (it must be at least 3 and below 2^32 - 1)")]
    InvalidCid(u64),
    /// A stale socket file at `uds_path` could not be removed.
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The device could not listen on `uds_path`.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The listener could not be made non-blocking.
    #[error("cannot make the listener non-blocking")]
    NonBlocking(#[source] io::Error),
    /// The activation eventfd could not be created.
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] io::Error),
}

/// A packet the device owes the guest that carries no payload.
#[derive(Clone, Copy, Debug)]
struct Control {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

/// The connection multiplexer: every host stream and what is owed to the guest.
#[derive(Debug)]
struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Connections by the raw fd of their host stream.
    conns: HashMap<RawFd, Connection>,
    /// `(local_port, peer_port)` to stream fd, for connections the guest knows about.
    ports: HashMap<(u32, u32), RawFd>,
    /// Control packets for the guest, sent before any payload.
    control: VecDeque<Control>,
    /// Streams with bytes (or end of file) to read, in round-robin order.
    rx_ready: VecDeque<RawFd>,
    /// Closed streams still registered with the event manager; dropped once deregistered.
    closing: Vec<UnixStream>,
    next_local_port: u32,
    scratch: Vec<u8>,
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
    acked_features: u64,
    activation: Activation,
    /// The listener is registered with the event manager (from the first activation on).
    listener_registered: bool,
    /// A `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` waits for an event-queue buffer.
    pending_reset: bool,
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

impl Vsock {
    /// Builds the device and starts listening on `config.uds_path` (a stale socket file
    /// there is replaced). Host clients wait in the listen backlog until the driver is up.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        check_cid(config.guest_cid)?;
        let path = config.uds_path;
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(|source| VsockError::RemoveStale {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        let listener = UnixListener::bind(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(VsockError::NonBlocking)?;
        let activation = Activation::new("vsock").map_err(VsockError::EventFd)?;
        tracing::debug!(cid = config.guest_cid, path = %path.display(), "vsock device created");
        Ok(Self {
            muxer: Muxer {
                cid: config.guest_cid,
                uds_path: path,
                listener,
                conns: HashMap::new(),
                ports: HashMap::new(),
                control: VecDeque::new(),
                rx_ready: VecDeque::new(),
                closing: Vec::new(),
                next_local_port: FIRST_LOCAL_PORT,
                scratch: vec![0; MAX_PKT_PAYLOAD],
            },
            acked_features: 0,
            activation,
            listener_registered: false,
            pending_reset: false,
        })
    }

    /// Rebuilds a device from a snapshot. The CID is `config.guest_cid` (a fork child passes
    /// its new CID there); either way the guest is sent a transport reset once the device is
    /// activated, because the connections it knew are gone.
    pub fn restore(config: VsockConfig, state: &VsockState) -> Result<Self, VsockError> {
        if config.guest_cid != state.cid {
            tracing::info!(
                old = state.cid,
                new = config.guest_cid,
                "vsock restored with a new CID"
            );
        }
        let mut dev = Self::new(config)?;
        dev.acked_features = state.acked_features & dev.avail_features();
        dev.pending_reset = true;
        Ok(dev)
    }

    /// What must be saved of the device.
    pub fn save(&self) -> VsockState {
        VsockState {
            cid: self.muxer.cid,
            acked_features: self.acked_features,
        }
    }

    /// The CID in the configuration space.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.cid
    }

    /// Changes the CID in the configuration space without telling the guest (for a device
    /// whose driver has not read it yet). A running guest needs [`Vsock::reset_transport`].
    pub fn set_guest_cid(&mut self, cid: u64) -> Result<(), VsockError> {
        check_cid(cid)?;
        self.muxer.cid = cid;
        Ok(())
    }

    /// Sets the CID to `new_cid`, drops every connection (their host streams are closed; the
    /// guest resets its own sockets) and posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, on which
    /// the guest driver re-reads the CID. This is how a fork child learns its new CID. The
    /// event is delivered now if the device is active, else once it is activated.
    pub fn reset_transport(&mut self, new_cid: u64) -> Result<(), VsockError> {
        check_cid(new_cid)?;
        tracing::info!(old = self.muxer.cid, new = new_cid, "vsock transport reset");
        self.muxer.cid = new_cid;
        self.muxer.drop_all_connections();
        self.pending_reset = true;
        if self.activation.is_active() {
            if self.process_event_queue() {
                self.notify(EVENT_QUEUE);
            }
            // Let the event loop deregister the closed streams.
            self.activation.wake();
        }
        Ok(())
    }

    /// The eventfd this device registers in `init`; also used to wake the event loop when
    /// registrations must change outside of it.
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.evt()
    }

    /// Runs all three queues and raises the interrupt for those that used buffers.
    fn process_queues(&mut self) {
        if !self.activation.is_active() {
            return;
        }
        if self.process_tx_queue() {
            self.notify(TX_QUEUE);
        }
        if self.process_rx_queue() {
            self.notify(RX_QUEUE);
        }
        if self.process_event_queue() {
            self.notify(EVENT_QUEUE);
        }
    }

    fn notify(&mut self, index: usize) {
        let Some(active) = self.activation.active_mut() else {
            return;
        };
        let queue = &mut active.queues[index].queue;
        let needed = queue.needs_notification(&active.mem).unwrap_or_else(|e| {
            tracing::warn!(queue = index, error = %e, "vsock: cannot check notification suppression");
            true
        });
        if needed {
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::error!(error = %e, "vsock: cannot signal the guest");
            }
        }
    }

    /// Handles every packet the guest posted on the tx queue. Returns whether buffers were
    /// used.
    fn process_tx_queue(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = active.queues[TX_QUEUE]
            .queue
            .pop_descriptor_chain(&active.mem)
        {
            let head = chain.head_index();
            match chain.reader(&active.mem) {
                Ok(mut reader) => {
                    let mut hdr = [0u8; HDR_SIZE];
                    match reader.read_exact(&mut hdr) {
                        Ok(()) => {
                            let hdr = Header::from_bytes(&hdr);
                            let len = hdr.len.min(MAX_TX_PAYLOAD) as usize;
                            let mut data = vec![0u8; len];
                            match reader.read_exact(&mut data) {
                                Ok(()) if hdr.len <= MAX_TX_PAYLOAD => {
                                    self.muxer.handle_guest_packet(&hdr, &data)
                                }
                                Ok(()) => {
                                    tracing::warn!(len = hdr.len, "vsock: oversized tx packet");
                                    self.muxer.reply_rst(&hdr);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, len = hdr.len, "vsock: tx payload shorter than its header says");
                                    self.muxer.reply_rst(&hdr);
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "vsock: tx chain without a header"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "vsock: unreadable tx chain"),
            }
            if let Err(e) = active.queues[TX_QUEUE].queue.add_used(&active.mem, head, 0) {
                tracing::error!(error = %e, "vsock: cannot return a tx buffer");
            }
            used = true;
        }
        used
    }

    /// Fills rx buffers with control packets, then with payload from host streams, while
    /// both buffers and something to send remain. Returns whether buffers were used.
    fn process_rx_queue(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_rx_work() {
            let queue = &mut active.queues[RX_QUEUE].queue;
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&active.mem) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                Ok(w) => {
                    tracing::warn!(
                        len = w.available_bytes(),
                        "vsock: rx buffer too small for a header"
                    );
                    report_used(queue, &active.mem, head, 0);
                    used = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: unwritable rx chain");
                    report_used(queue, &active.mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = writer.available_bytes() - HDR_SIZE;
            let Some((hdr, len)) = self.muxer.next_rx_packet(room) else {
                // Nothing after all (e.g. the ready streams would block): give it back.
                queue.go_to_previous_position();
                break;
            };
            tracing::trace!(
                op = op_name(hdr.op),
                src = hdr.src_port,
                dst = hdr.dst_port,
                len,
                "vsock: to guest"
            );
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&self.muxer.scratch[..len]));
            if let Err(e) = written {
                tracing::error!(error = %e, "vsock: cannot write an rx packet to guest memory");
            }
            report_used(queue, &active.mem, head, (HDR_SIZE + len) as u32);
            used = true;
        }
        used
    }

    /// Delivers a pending transport reset event. Returns whether a buffer was used.
    fn process_event_queue(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        if !self.pending_reset {
            return false;
        }
        let queue = &mut active.queues[EVENT_QUEUE].queue;
        let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
            tracing::debug!("vsock: transport reset waits for an event buffer");
            return false;
        };
        let head = chain.head_index();
        let len = match chain.writer(&active.mem) {
            Ok(mut w) => match w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => {
                    self.pending_reset = false;
                    EVENT_SIZE as u32
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: event buffer too small");
                    0
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "vsock: unwritable event chain");
                0
            }
        };
        report_used(queue, &active.mem, head, len);
        true
    }

    /// Brings the event manager's watch list in line with the device: kick fds and the
    /// listener after activation, each stream's interest, closed streams out.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let active = self.activation.sync(ops, TOKEN_RX_KICK);
        if active && !self.listener_registered {
            let listener = &self.muxer.listener;
            match ops.add(Events::with_data(listener, TOKEN_LISTENER, EventSet::IN)) {
                Ok(()) => self.listener_registered = true,
                Err(e) => tracing::error!(error = %e, "vsock: cannot register the listener"),
            }
        }
        for stream in self.muxer.closing.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&stream)) {
                tracing::warn!(error = %e, "vsock: cannot deregister a closed stream");
            }
        }
        for conn in self.muxer.conns.values_mut() {
            let desired = conn.desired_interest();
            if desired == conn.registered {
                continue;
            }
            let result = match (conn.registered, desired) {
                (None, Some(set)) => ops.add(Events::with_data(&conn.stream, TOKEN_STREAM, set)),
                (Some(_), Some(set)) => {
                    ops.modify(Events::with_data(&conn.stream, TOKEN_STREAM, set))
                }
                (Some(_), None) => ops.remove(Events::empty(&conn.stream)),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = desired,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: cannot update a stream's registration")
                }
            }
        }
    }

    /// Test hook standing in for epoll: reports every stream the device waits on as ready.
    #[cfg(test)]
    fn poll_streams(&mut self) {
        let ready: Vec<(RawFd, EventSet)> = self
            .muxer
            .conns
            .iter()
            .filter_map(|(fd, c)| c.desired_interest().map(|set| (*fd, set)))
            .collect();
        for (fd, set) in ready {
            self.muxer.on_stream_event(fd, set);
        }
        self.process_queues();
    }
}

fn report_used(queue: &mut virtio_queue::Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        tracing::error!(error = %e, "vsock: cannot return a buffer to the guest");
    }
}

impl Muxer {
    fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    fn queue_control(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        self.control.push_back(Control {
            local_port,
            peer_port,
            op,
            flags,
        });
    }

    /// Answers a guest packet that has no connection with `OP_RST` (never an RST to an RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST {
            self.queue_control(hdr.dst_port, hdr.src_port, OP_RST, 0);
        }
    }

    /// Accepts every host client waiting in the listen backlog.
    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "vsock: dropping a host client");
                        continue;
                    }
                    let state = ConnState::HostHandshake { line: Vec::new() };
                    self.conns
                        .insert(stream.as_raw_fd(), Connection::new(stream, state, 0, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    break;
                }
            }
        }
    }

    /// Removes a connection and closes its host stream, telling the guest with `OP_RST`
    /// when `rst` (the guest knows the connection).
    fn close(&mut self, fd: RawFd, rst: bool) {
        let Some(conn) = self.conns.remove(&fd) else {
            return;
        };
        if !matches!(conn.state, ConnState::HostHandshake { .. }) {
            self.ports.remove(&(conn.local_port, conn.peer_port));
            if rst {
                self.queue_control(conn.local_port, conn.peer_port, OP_RST, 0);
            }
        }
        self.rx_ready.retain(|&r| r != fd);
        tracing::debug!(
            local = conn.local_port,
            peer = conn.peer_port,
            rst,
            "vsock: connection closed"
        );
        if conn.registered.is_some() {
            self.closing.push(conn.stream);
        }
    }

    fn drop_all_connections(&mut self) {
        let fds: Vec<RawFd> = self.conns.keys().copied().collect();
        for fd in fds {
            self.close(fd, false);
        }
        self.control.clear();
    }

    /// A registered host stream is ready (`set` as epoll reported it).
    fn on_stream_event(&mut self, fd: RawFd, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        match conn.state {
            ConnState::HostHandshake { .. } => self.read_connect_line(fd),
            ConnState::LocalInit => {
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    tracing::debug!("vsock: host client left before the guest answered");
                    self.close(fd, true);
                }
            }
            ConnState::Established => {
                if set.contains(EventSet::OUT) {
                    if let Err(e) = conn.flush_tx() {
                        tracing::debug!(error = %e, "vsock: host stream write failed");
                        self.close(fd, true);
                        return;
                    }
                    self.after_forward(fd);
                }
                let Some(conn) = self.conns.get_mut(&fd) else {
                    return;
                };
                let readable = set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
                if readable && conn.wants_read_ignoring_credit() && !conn.rx_ready {
                    conn.rx_ready = true;
                    self.rx_ready.push_back(fd);
                }
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` byte by byte (so no payload is consumed) and
    /// sends the guest the request once the line is complete.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let ConnState::HostHandshake { line } = &mut conn.state else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match conn.stream.read(&mut byte) {
                Ok(0) => {
                    tracing::debug!("vsock: host client left during the handshake");
                    return self.close(fd, false);
                }
                Ok(_) if byte[0] == b'\n' => break parse_connect(line),
                Ok(_) if line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host client read failed");
                    return self.close(fd, false);
                }
            }
        };
        let Some(peer_port) = port else {
            tracing::warn!(line = %String::from_utf8_lossy(line), "vsock: bad host handshake");
            return self.close(fd, false);
        };
        let local_port = self.alloc_local_port();
        let conn = self.conns.get_mut(&fd).expect("connection checked above");
        conn.state = ConnState::LocalInit;
        conn.local_port = local_port;
        conn.peer_port = peer_port;
        self.ports.insert((local_port, peer_port), fd);
        tracing::debug!(local_port, peer_port, "vsock: host connects to the guest");
        self.queue_control(local_port, peer_port, OP_REQUEST, 0);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.keys().any(|&(local, _)| local == port) {
                return port;
            }
        }
    }

    /// After bytes went to the host stream: owe the guest a credit update if enough were
    /// freed, and finish a shutdown the guest asked for once its bytes are out.
    fn after_forward(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        if conn.needs_credit_update() && !conn.credit_update_queued {
            conn.credit_update_queued = true;
            let (l, p) = (conn.local_port, conn.peer_port);
            self.queue_control(l, p, OP_CREDIT_UPDATE, 0);
        }
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        if !conn.tx_buf.is_empty() {
            return;
        }
        if conn.peer_shutdown == SHUTDOWN_BOTH {
            return self.close(fd, true);
        }
        if let Err(e) = conn.apply_peer_send_shutdown() {
            tracing::debug!(error = %e, "vsock: cannot half-close a host stream");
            self.close(fd, true);
        }
    }

    /// One packet from the guest.
    fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        tracing::trace!(
            op = op_name(hdr.op),
            src = hdr.src_port,
            dst = hdr.dst_port,
            len = hdr.len,
            "vsock: from guest"
        );
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cid {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: dropping a packet with foreign CIDs"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            return self.reply_rst(hdr);
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            return self.guest_connect(hdr);
        }
        let Some(&fd) = self.ports.get(&key) else {
            return self.reply_rst(hdr);
        };
        let conn = self.conns.get_mut(&fd).expect("ports and conns agree");
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, &conn.state) {
            (OP_RST, _) => self.close(fd, false),
            (OP_RESPONSE, ConnState::LocalInit) => {
                conn.state = ConnState::Established;
                let ok = format!("OK {}\n", conn.local_port);
                match conn.stream.write_all(ok.as_bytes()) {
                    Ok(()) => tracing::debug!(port = conn.local_port, "vsock: guest accepted"),
                    Err(e) => {
                        tracing::debug!(error = %e, "vsock: cannot answer the host client");
                        self.close(fd, true);
                    }
                }
            }
            (_, ConnState::Established) => self.established_packet(fd, hdr, data),
            _ => {
                tracing::debug!(op = op_name(hdr.op), "vsock: unexpected packet; resetting");
                self.close(fd, true);
            }
        }
    }

    fn established_packet(&mut self, fd: RawFd, hdr: &Header, data: &[u8]) {
        let conn = self.conns.get_mut(&fd).expect("caller checked");
        match hdr.op {
            OP_RW => {
                if let Err(e) = conn.push_tx(data) {
                    tracing::debug!(error = %e, "vsock: cannot forward guest bytes");
                    return self.close(fd, true);
                }
                self.after_forward(fd);
            }
            OP_SHUTDOWN => {
                conn.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.after_forward(fd);
            }
            OP_CREDIT_REQUEST => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    let (l, p) = (conn.local_port, conn.peer_port);
                    self.queue_control(l, p, OP_CREDIT_UPDATE, 0);
                }
            }
            // The credit it carries was recorded already.
            OP_CREDIT_UPDATE => {}
            OP_RESPONSE => {
                tracing::debug!("vsock: RESPONSE on an established connection; resetting");
                self.close(fd, true);
            }
            op => {
                tracing::debug!(op, "vsock: unknown operation; resetting");
                self.close(fd, true);
            }
        }
    }

    /// The guest connects to host port `dst_port`: connect to `<uds_path>_<dst_port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(&fd) = self.ports.get(&key) {
            tracing::debug!("vsock: REQUEST for an existing connection; resetting it");
            return self.close(fd, true);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "vsock: guest connect refused");
                return self.reply_rst(hdr);
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!(error = %e, "vsock: cannot make a host stream non-blocking");
            return self.reply_rst(hdr);
        }
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, ConnState::Established, hdr.dst_port, hdr.src_port);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        self.conns.insert(fd, conn);
        self.ports.insert(key, fd);
        tracing::debug!(path = ?path, guest_port = hdr.src_port, "vsock: guest connected to the host");
        self.queue_control(hdr.dst_port, hdr.src_port, OP_RESPONSE, 0);
    }

    /// The next packet for the guest with at most `room` payload bytes (payload left in
    /// `scratch`), or `None` when there is nothing to send now.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some(c) = self.control.pop_front() {
            let mut hdr = header(self.cid, c.local_port, c.peer_port, c.op);
            hdr.flags = c.flags;
            if let Some(conn) = self
                .ports
                .get(&(c.local_port, c.peer_port))
                .and_then(|fd| self.conns.get_mut(fd))
            {
                hdr.fwd_cnt = conn.fwd_cnt.0;
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                if c.op == OP_CREDIT_UPDATE {
                    conn.credit_update_queued = false;
                }
            }
            return Some((hdr, 0));
        }
        if room == 0 {
            return None;
        }
        while let Some(fd) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&fd) else {
                continue;
            };
            conn.rx_ready = false;
            if !conn.wants_read_ignoring_credit() {
                continue;
            }
            let free = conn.peer_free() as usize;
            if free == 0 {
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    let (l, p) = (conn.local_port, conn.peer_port);
                    self.queue_control(l, p, OP_CREDIT_REQUEST, 0);
                    return self.next_rx_packet(room);
                }
                continue;
            }
            let want = room.min(free).min(self.scratch.len());
            match conn.stream.read(&mut self.scratch[..want]) {
                Ok(0) => {
                    conn.host_eof = true;
                    let (l, p) = (conn.local_port, conn.peer_port);
                    let both_done =
                        conn.peer_shutdown & SHUTDOWN_SEND != 0 && conn.tx_buf.is_empty();
                    self.queue_control(l, p, OP_SHUTDOWN, SHUTDOWN_SEND);
                    if both_done {
                        // Neither side will send again: this ends the connection.
                        self.close(fd, true);
                    }
                    return self.next_rx_packet(room);
                }
                Ok(n) => {
                    let mut hdr = header(self.cid, conn.local_port, conn.peer_port, OP_RW);
                    hdr.len = n as u32;
                    hdr.fwd_cnt = conn.fwd_cnt.0;
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    conn.rx_cnt += Wrapping(n as u32);
                    // Keep reading it, after the other ready streams.
                    conn.rx_ready = true;
                    self.rx_ready.push_back(fd);
                    return Some((hdr, n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    conn.rx_ready = true;
                    self.rx_ready.push_back(fd);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream read failed");
                    self.close(fd, true);
                    return self.next_rx_packet(room);
                }
            }
        }
        None
    }
}

/// A header from the host end of a connection to the guest's end, credit fields for
/// `CONN_BUF_ALLOC` and no `fwd_cnt` yet.
fn header(cid: u64, local_port: u32, peer_port: u32, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: local_port,
        dst_port: peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// Parses `CONNECT <port>` (an optional trailing `\r` allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.muxer.cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "vsock: guest wrote the read-only config space"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.activation
            .activate(mem, interrupt, queues, QUEUE_SIZES.len())
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.activation.queue_states()
    }

    fn reset(&mut self) -> bool {
        // Also wakes the event loop, which deregisters the closed streams.
        self.activation.deactivate();
        self.acked_features = 0;
        // The driver starts over and re-reads the CID; it needs no reset event.
        self.pending_reset = false;
        self.muxer.drop_all_connections();
        self.muxer.rx_ready.clear();
        true
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.register(ops, TOKEN_ACTIVATE);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => self.activation.drain_evt(),
            token @ (TOKEN_RX_KICK | TOKEN_TX_KICK | TOKEN_EVENT_KICK) => {
                self.activation.drain_kick((token - TOKEN_RX_KICK) as usize);
            }
            TOKEN_LISTENER => self.muxer.accept_clients(),
            TOKEN_STREAM => self.muxer.on_stream_event(events.fd(), events.event_set()),
            other => tracing::warn!(token = other, "vsock: unexpected event"),
        }
        self.process_queues();
        self.sync_registrations(ops);
    }
}
