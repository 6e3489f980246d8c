//! virtio-vsock: guest stream sockets bridged to host Unix sockets, the Firecracker way.
//!
//! # Host side
//!
//! The device listens on the Unix socket `uds`.
//!
//! * **Host to guest.** A host client connects to `uds` and writes `CONNECT <port>\n`
//!   (decimal port, optional `\r` before the `\n`, at most 64 bytes). The device sends the
//!   guest `OP_REQUEST` from `(CID 2, <host_port>)` to `(guest CID, <port>)`, where
//!   `<host_port>` is a port the device picks (from 2^30 up). When the guest answers
//!   `OP_RESPONSE` the device writes `OK <host_port>\n` to the client and from then on the
//!   stream carries the connection's bytes both ways. If the guest refuses (`OP_RST`), or the
//!   line is malformed, the device closes the client without writing anything.
//! * **Guest to host.** A guest socket connecting to CID 2 port `P` makes the device connect
//!   to the Unix socket `<uds>_<P>` (e.g. `/run/vm.vsock_52`); the guest gets
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
//! [`VsockState`] holds the CID, the negotiated features and the next host port.
//! Connections are not saved: on restore (and therefore in every fork child) the device
//! posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue as soon as it is
//! activated, so the guest driver re-reads its CID and resets its connected sockets;
//! listening sockets on both sides survive (the Unix listener is re-created from the
//! config, guest listeners are untouched). A reset socket stays in the guest's table until
//! its program closes it, so a restored device hands out host ports from where the
//! snapshot's left off: a new connection never carries the ports of an old one. A fork
//! child that needs a new CID passes it in the [`VsockConfig`] given to
//! [`Vsock::restore`], or calls [`Vsock::reset_transport`] on a running device.
//!
//! The driver handles the event by re-reading the CID from the configuration space,
//! then resets its connected sockets without a packet: on that read the device drops
//! the connections the guest knew of (their host clients see end of file and can
//! connect again) and hears the new CID alone. Until the guest has handled the reset
//! (re-read its CID, reset its sockets and, last, posted its event buffer again) a host
//! client's connection request is held, not sent: the guest would make a socket for it
//! that the reset then kills, and in a fork child that costs pages of its own (the
//! agent accepts the dead socket and starts a thread for it; the client connects
//! again: an idle child's identity took three or four connections, and holding them cut
//! its copied guest memory by a tenth, `docs/benchmarks.md`). A held request waits for
//! the guest as long as its client does (a client that closes takes it away unsent):
//! a guest that never handles its reset is not reached from the host. Guest packets
//! from the CID the guest had are still heard as its own until the re-read
//! ([`VsockState::guest_cid`] carries that CID into a fork of a child that had not
//! handled its reset yet): a connection the guest makes meanwhile goes on.

mod connection;
mod muxer;
pub mod packet;

use muxer::Muxer;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::connection::{ConnState, Connection};
pub use self::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use self::packet::*;
use super::activation::Activation;
use super::{device_type, VirtioDevice};
use crate::{GuestMemory, Persist};

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

/// The vsock device, as the VM is configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket the device listens on (standing for the guest's ports);
    /// guest-initiated connections to host port `P` go to `<uds>_<P>`.
    pub uds: PathBuf,
}

/// What of a vsock device survives a snapshot: the CID, the negotiated features and where
/// host port numbering had got to. Connections do not (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The CID in the configuration space when the state was taken.
    pub cid: u64,
    /// The CID the guest still sent from, when it had not handled a transport reset
    /// that changed `cid` yet (a fork child forked again at once): its own fork
    /// children hear it from this one until they reset it (state format 7).
    pub guest_cid: Option<u64>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The next host port the device would have handed a host-initiated connection. A
    /// restored device goes on from here, never back to the first port: the guest may
    /// still hold sockets of the snapshot's connections (reset, but open until its
    /// program closes them), and a new connection from one of their host ports would
    /// find such a socket instead of the listener and be refused.
    pub next_local_port: u32,
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
    /// Something listens on the socket path already (another VM's socket).
    #[error("{}: another process listens there (another VM's vsock socket?)", .0.display())]
    InUse(PathBuf),
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
    /// A saved state acknowledges features the device does not offer.
    #[error(transparent)]
    BadFeatures(#[from] super::activation::UnofferedFeatures),
    /// A saved state's next host port is below the range host connections use.
    #[error(
        "saved next host port {0} is below the host-initiated range (from {FIRST_LOCAL_PORT})"
    )]
    BadLocalPort(u32),
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
    activation: Activation,
    /// The listener is registered with the event manager (from the first activation on).
    listener_registered: bool,
    /// A `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` waits for an event-queue buffer.
    pending_reset: bool,
    /// A transport reset was delivered and the guest has not re-read its CID since.
    reset_delivered: bool,
    /// The guest re-read its CID after a delivered reset: it has reset its connected
    /// sockets (silently), so the device drops the connections it had then (by host
    /// stream fd) too. Taken by the config read (a vCPU's), acted on by the event loop.
    cid_reread: std::cell::RefCell<Option<Vec<muxer::ConnKey>>>,
    /// The guest re-read its CID after the last reset; the held connection requests
    /// wait for it to post event buffers again (Linux re-reads the CID first, then
    /// resets its sockets, then refills and kicks the event queue: a request sent at
    /// the re-read could still meet the reset).
    awaiting_refill: bool,
    /// The guest kicked the event queue since the last reset was delivered.
    event_refilled: bool,
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

/// Removes a socket file left at `path` by a VM process that is gone, so that a new one
/// can be bound there; anything but a socket is left alone (the bind then fails), and so
/// is a socket something still listens on (another VM's).
pub fn remove_stale_socket(path: &Path) -> Result<(), VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

impl Vsock {
    /// Builds the device and starts listening on `config.uds` (a stale socket file
    /// there is replaced). Host clients wait in the listen backlog until the driver is up.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        check_cid(config.cid)?;
        let path = config.uds;
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(VsockError::NonBlocking)?;
        let activation = Activation::new("vsock").map_err(VsockError::EventFd)?;
        tracing::debug!(cid = config.cid, path = %path.display(), "vsock device created");
        Ok(Self {
            muxer: Muxer {
                cid: config.cid,
                previous_cid: None,
                uds_path: path,
                listener,
                conns: HashMap::new(),
                ports: HashMap::new(),
                control: VecDeque::new(),
                held: VecDeque::new(),
                hold_requests: false,
                rx_ready: VecDeque::new(),
                closing: Vec::new(),
                next_local_port: FIRST_LOCAL_PORT,
                scratch: Vec::new(),
                max_conns: muxer::MAX_CONNECTIONS,
            },
            activation,
            listener_registered: false,
            pending_reset: false,
            reset_delivered: false,
            cid_reread: std::cell::RefCell::new(None),
            awaiting_refill: false,
            event_refilled: false,
        })
    }

    /// The CID in the configuration space.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.cid
    }

    /// The Unix socket the device listens on.
    pub fn uds(&self) -> &std::path::Path {
        &self.muxer.uds_path
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
    /// event is delivered now if the device is active, else once it is activated. Until
    /// the guest re-reads its CID it is heard from its old one too, and the connections
    /// it made meanwhile are dropped when it does (it forgets them); host clients'
    /// requests wait until it has handled the reset.
    pub fn reset_transport(&mut self, new_cid: u64) -> Result<(), VsockError> {
        check_cid(new_cid)?;
        tracing::info!(old = self.muxer.cid, new = new_cid, "vsock transport reset");
        // The CID the guest sends from until it handles the reset: the last one it took.
        let sends_from = self.muxer.previous_cid.unwrap_or(self.muxer.cid);
        self.muxer.previous_cid = (new_cid != sends_from).then_some(sends_from);
        self.muxer.cid = new_cid;
        self.muxer.drop_all_connections();
        self.pending_reset = true;
        self.muxer.hold_requests = true;
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
        let reread = self.cid_reread.take();
        if self.process_tx_queue() {
            self.notify(TX_QUEUE);
        }
        if let Some(stale) = reread {
            // The guest took the reset: the connections it knew then are gone in it
            // (what it sent on them before is forwarded above), and it sends from its
            // new CID alone. Their host clients see end of file now rather than waiting
            // on a connection the guest forgot.
            self.reset_delivered = false;
            self.muxer.previous_cid = None;
            if !stale.is_empty() {
                tracing::debug!(
                    connections = stale.len(),
                    "vsock: the guest handled the transport reset; dropping its old connections"
                );
            }
            self.muxer.drop_connections(&stale);
            self.awaiting_refill = true;
        }
        if self.awaiting_refill && self.event_refilled && !self.pending_reset {
            self.awaiting_refill = false;
            self.muxer.release_requests();
        }
        if self.process_rx_queue() {
            self.notify(RX_QUEUE);
        }
        if self.process_event_queue() {
            self.notify(EVENT_QUEUE);
        }
    }

    /// The guest kicked queue `index` (its kick is drained; the queues run after).
    fn kicked(&mut self, index: usize) {
        self.activation.drain_kick(index);
        if index == EVENT_QUEUE {
            self.event_refilled = true;
        }
    }

    fn notify(&mut self, index: usize) {
        if let Some(active) = self.activation.active_mut() {
            active.notify_used(index, "vsock");
        }
    }

    /// Handles every packet the guest posted on the tx queue. Returns whether buffers were
    /// used.
    fn process_tx_queue(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        let mut used = false;
        let mut served = 0;
        while served < super::MAX_CHAINS_PER_EVENT {
            let Some(chain) = active.queues[TX_QUEUE]
                .queue
                .pop_descriptor_chain(&active.mem)
            else {
                break;
            };
            served += 1;
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
                                    crate::guest_warn!(len = hdr.len, "vsock: oversized tx packet");
                                    self.muxer.reply_rst(&hdr);
                                }
                                Err(e) => {
                                    crate::guest_warn!(error = %e, len = hdr.len, "vsock: tx payload shorter than its header says");
                                    self.muxer.reply_rst(&hdr);
                                }
                            }
                        }
                        Err(e) => {
                            crate::guest_warn!(error = %e, "vsock: tx chain without a header")
                        }
                    }
                }
                Err(e) => crate::guest_warn!(error = %e, "vsock: unreadable tx chain"),
            }
            if let Err(e) = active.queues[TX_QUEUE].queue.add_used(&active.mem, head, 0) {
                crate::guest_error!(error = %e, "vsock: cannot return a tx buffer");
            }
            used = true;
        }
        if served == super::MAX_CHAINS_PER_EVENT {
            active.queues[TX_QUEUE].rekick("vsock");
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
                    crate::guest_warn!(
                        len = w.available_bytes(),
                        "vsock: rx buffer too small for a header"
                    );
                    report_used(queue, &active.mem, head, 0);
                    used = true;
                    continue;
                }
                Err(e) => {
                    crate::guest_warn!(error = %e, "vsock: unwritable rx chain");
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
                crate::guest_error!(error = %e, "vsock: cannot write an rx packet to guest memory");
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
                    self.reset_delivered = true;
                    self.event_refilled = false;
                    EVENT_SIZE as u32
                }
                Err(e) => {
                    crate::guest_warn!(error = %e, "vsock: event buffer too small");
                    0
                }
            },
            Err(e) => {
                crate::guest_warn!(error = %e, "vsock: unwritable event chain");
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
        crate::guest_error!(error = %e, "vsock: cannot return a buffer to the guest");
    }
}

impl Persist<'_> for Vsock {
    type State = VsockState;
    /// The device as the VM is configured now: a fork child passes its new CID and
    /// socket here.
    type ConstructorArgs = VsockConfig;
    type Error = VsockError;

    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            cid: self.muxer.cid,
            guest_cid: self.muxer.previous_cid,
            acked_features: self.activation.acked_features(),
            next_local_port: self.muxer.next_local_port,
        })
    }

    /// Rebuilds a device from a snapshot. Either way the guest is sent a transport
    /// reset once the device is activated, because the connections it knew are gone;
    /// host ports go on from the snapshot's (see [`VsockState::next_local_port`]).
    fn restore(config: VsockConfig, state: &VsockState) -> Result<Self, VsockError> {
        if state.next_local_port < FIRST_LOCAL_PORT || state.next_local_port == u32::MAX {
            return Err(VsockError::BadLocalPort(state.next_local_port));
        }
        if config.cid != state.cid {
            tracing::info!(
                old = state.cid,
                new = config.cid,
                "vsock restored with a new CID"
            );
        }
        let mut dev = Self::new(config)?;
        // The guest sends from the CID it last took until it handles this restore's
        // reset.
        let sends_from = state.guest_cid.unwrap_or(state.cid);
        check_cid(sends_from)?;
        if dev.muxer.cid != sends_from {
            dev.muxer.previous_cid = Some(sends_from);
        }
        let avail = dev.avail_features();
        dev.activation
            .restore_acked_features(state.acked_features, avail)?;
        dev.muxer.next_local_port = state.next_local_port;
        dev.pending_reset = true;
        dev.muxer.hold_requests = true;
        Ok(dev)
    }
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.muxer.cid.to_le_bytes(), offset, data);
        // The driver re-reads the CID when it handles a transport reset, then resets its
        // connected sockets without a word to the device.
        if self.reset_delivered {
            let mut reread = self.cid_reread.borrow_mut();
            if reread.is_none() {
                *reread = Some(self.muxer.known_to_guest());
                self.activation.wake();
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            offset,
            len = data.len(),
            "vsock: guest wrote the read-only config space"
        );
    }

    super::activation_field!();

    fn reset_device(&mut self) {
        // The driver starts over and re-reads the CID; it needs no reset event.
        self.pending_reset = false;
        self.reset_delivered = false;
        self.cid_reread.take();
        self.awaiting_refill = false;
        self.event_refilled = false;
        self.muxer.previous_cid = None;
        self.muxer.drop_all_connections();
        self.muxer.release_requests();
        self.muxer.rx_ready.clear();
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
                self.kicked((token - TOKEN_RX_KICK) as usize);
            }
            TOKEN_LISTENER => self.muxer.accept_clients(),
            TOKEN_STREAM => self.muxer.on_stream_event(events.fd(), events.event_set()),
            other => tracing::warn!(token = other, "vsock: unexpected event"),
        }
        self.process_queues();
        self.sync_registrations(ops);
    }
}
