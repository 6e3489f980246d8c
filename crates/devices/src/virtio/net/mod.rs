//! virtio-net over a TAP interface (or any fd that carries one Ethernet frame per
//! read/write, such as a `SOCK_SEQPACKET` socketpair in tests).
//!
//! Two queues (rx, tx). The device offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` and
//! `VIRTIO_NET_F_STATUS` (link always up), and on a TAP the checksum and TCP segmentation
//! offloads both ways (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`, the ECN
//! bits): the guest hands over and takes frames of up to 64 KiB with partial checksums,
//! which the TAP passes through in the header (`TUNSETOFFLOAD` tells it what the guest
//! takes), so a TCP stream costs a queue round trip per 64 KiB instead of per 1500 bytes.
//! Every buffer starts with the 12-byte `virtio_net_hdr_v1`; a tx chain longer than a
//! header and the largest frame ([`MAX_BUFFER`]) is dropped unread.
//!
//! # Backends and the header
//!
//! * A TAP ([`Net::new`]) is opened with `IFF_VNET_HDR` and a header size of 12, so the header
//!   passes through unchanged both ways: tx writes `header + frame` as the guest gave it, rx
//!   hands the guest what the TAP wrote (checksum and GSO fields only for the offloads the
//!   guest accepted).
//! * A plain frame backend ([`Net::with_backend`] with `vnet_hdr: false`) carries bare
//!   Ethernet frames: tx strips the guest's header, rx prepends an all-zero header.
//!
//! # Receive without buffers
//!
//! The device reads a frame only when it can deliver it: if the guest has no rx buffer, the
//! frame just read is kept and the backend is taken out of the event loop until the guest
//! kicks the rx queue, so nothing is dropped and nothing spins. Likewise a frame the backend
//! would not take (`EAGAIN`) is kept and sent when the backend becomes writable.
//!
//! # Forks
//!
//! [`NetState`] holds the MAC and the negotiated features. A fork child gets a new MAC with
//! [`Net::set_mac`] (or the `mac` of the [`NetConfig`] given to [`Net::restore`]): the config
//! space changes and the guest gets a configuration-change interrupt. Linux's virtio_net
//! reads the MAC only at probe, so the guest side must still apply it (the agent sets the
//! address itself, or rebinds the driver so it re-reads the config).

mod tap;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use self::tap::{attach_to_bridge, open_tap, set_tap_offloads, set_tap_persistent};
use super::activation::Activation;
use super::{device_type, VirtioDevice};
use crate::{GuestMemory, Persist};

/// Size of `struct virtio_net_hdr_v1` (the header with `num_buffers`, as VERSION_1 requires).
pub const VNET_HDR_SIZE: usize = 12;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// The offloads a TAP backend offers.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN);

/// What a TAP may hand the guest (`TUN_F_*` for `TUNSETOFFLOAD`), given the features the
/// guest accepted: segments and partial checksums only where it takes them.
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |f: u32| acked & (1 << f) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// Largest frame buffer: a header plus the largest frame a TAP can hand over.
const MAX_BUFFER: usize = VNET_HDR_SIZE + 65550;
/// Bytes of configuration space implemented: `mac` and `status`.
const CONFIG_SIZE: usize = 8;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_KICK: u32 = 1;
const TOKEN_TX_KICK: u32 = 2;
const TOKEN_BACKEND: u32 = 3;

/// A virtio-net card on a TAP device, as the VM is configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The TAP interface to open (created if it does not exist).
    pub tap: String,
    /// The guest's MAC; a random locally administered one when `None`.
    pub mac: Option<[u8; 6]>,
    /// The host bridge the TAP is attached to (and brought up on) when the device is
    /// built: a VM on forkvm's own network. `None` leaves the TAP as it is.
    // No `skip_serializing_if`: launches and templates are bincode, which has no
    // optional fields.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The guest's address on that network, as `address/prefix`, and its gateway: not
    /// used by the device, which carries frames only; forkvm gives them to the guest
    /// through its agent, and a fork child gets an address of its own.
    #[serde(default)]
    pub guest_ip: Option<GuestIp>,
}

/// A guest NIC's address on forkvm's own network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIp {
    /// `address/prefix`, e.g. `10.77.0.2/16`.
    pub address: String,
    /// The default gateway through this NIC.
    pub gateway: String,
}

/// What of a net device survives a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC in the configuration space.
    pub mac: [u8; 6],
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a net device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name is empty, too long for `IFNAMSIZ` or contains NUL.
    #[error("{0:?} is not a valid interface name")]
    InvalidTapName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed.
    #[error("cannot attach to TAP interface {name}")]
    SetIff {
        /// The interface name.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the TAP's virtio-net header size")]
    VnetHdrSize(#[source] io::Error),
    /// The backend fd could not be made non-blocking.
    #[error("cannot make the backend non-blocking")]
    NonBlocking(#[source] io::Error),
    /// The activation eventfd could not be created.
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] io::Error),
    /// No random MAC could be made.
    #[error("cannot generate a random MAC")]
    RandomMac(#[source] io::Error),
    /// The TAP could not be attached to its bridge.
    #[error("cannot put the TAP on its bridge")]
    Bridge(#[source] io::Error),
}

/// A random unicast, locally administered MAC (`x2:..`, `x6:..`, `xA:..` or `xE:..`): the
/// multicast bit (bit 0 of the first byte) cleared, the local bit (bit 1) set.
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    File::open("/dev/urandom")?.read_exact(&mut mac)?;
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    backend: File,
    /// Backend frames carry the 12-byte header (TAP with `IFF_VNET_HDR`).
    vnet_hdr: bool,
    /// The TAP's name; a TAP backend offers the offloads.
    tap_name: Option<String>,
    mac: [u8; 6],
    activation: Activation,
    /// What the backend is registered for (`None`: not registered).
    backend_registered: Option<EventSet>,
    /// The backend reported end of file (a socketpair peer went away).
    backend_eof: bool,
    /// The backend is a datagram socket: a read of 0 bytes is an empty datagram, not the
    /// end (a datagram socket has none).
    datagram: bool,
    /// Receive buffer: header + frame.
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` that waits for an rx buffer.
    rx_pending: Option<usize>,
    /// A frame (as the backend takes it) that waits for the backend to be writable.
    tx_pending: Option<Vec<u8>>,
}

impl Net {
    /// Opens the TAP `config.tap` (see [`open_tap`]) and builds the device on it.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let (file, name) = open_tap(&config.tap)?;
        if let Some(bridge) = &config.bridge {
            attach_to_bridge(&name, bridge).map_err(NetError::Bridge)?;
        }
        let mut net = Self::with_backend(file.into(), true, config.mac)?;
        net.tap_name = Some(name);
        Ok(net)
    }

    /// Builds the device on an already open backend that carries one frame per read and
    /// write (TAP, `SOCK_SEQPACKET`/`SOCK_DGRAM` socket). `vnet_hdr` says whether its frames
    /// start with the 12-byte virtio-net header. The fd is made non-blocking.
    pub fn with_backend(
        backend: OwnedFd,
        vnet_hdr: bool,
        mac: Option<[u8; 6]>,
    ) -> Result<Self, NetError> {
        let mac = match mac {
            Some(mac) => mac,
            None => random_mac().map_err(NetError::RandomMac)?,
        };
        set_nonblocking(&backend).map_err(NetError::NonBlocking)?;
        let datagram = is_datagram_socket(&backend);
        let activation = Activation::new("net").map_err(NetError::EventFd)?;
        tracing::debug!(mac = %format_mac(&mac), vnet_hdr, "net device created");
        Ok(Self {
            backend: backend.into(),
            vnet_hdr,
            tap_name: None,
            mac,
            activation,
            backend_registered: None,
            backend_eof: false,
            datagram,
            rx_buf: vec![0; MAX_BUFFER],
            rx_pending: None,
            tx_pending: None,
        })
    }

    /// Rebuilds a device on an open backend from a snapshot (see [`Net::with_backend`]).
    pub fn restore_with_backend(
        backend: OwnedFd,
        vnet_hdr: bool,
        state: &NetState,
    ) -> Result<Self, NetError> {
        let mut net = Self::with_backend(backend, vnet_hdr, Some(state.mac))?;
        net.activation
            .set_acked_features(state.acked_features & net.avail_features());
        Ok(net)
    }

    /// The MAC in the configuration space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP interface's name, for a TAP backend.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    /// Changes the MAC in the configuration space and, on a running device, raises a
    /// configuration-change interrupt (see the module documentation for what the guest does).
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        tracing::info!(old = %format_mac(&self.mac), new = %format_mac(&mac), "net MAC changed");
        self.mac = mac;
        if let Some(active) = self.activation.active() {
            if let Err(e) = active.interrupt.signal_config_change() {
                crate::guest_error!(error = %e, "net: cannot signal a config change");
            }
        }
    }

    /// The eventfd this device registers in `init`.
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.evt()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    fn process_queues(&mut self) {
        if !self.activation.is_active() {
            return;
        }
        if self.process_tx() {
            self.notify(TX_QUEUE);
        }
        if self.process_rx() {
            self.notify(RX_QUEUE);
        }
    }

    fn notify(&mut self, index: usize) {
        if let Some(active) = self.activation.active_mut() {
            active.notify_used(index, "net");
        }
    }

    /// Sends the guest's frames to the backend. Returns whether tx buffers were used.
    fn process_tx(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        if let Some(frame) = self.tx_pending.take() {
            match write_frame(&self.backend, &frame) {
                WriteOutcome::Blocked => {
                    self.tx_pending = Some(frame);
                    return false;
                }
                WriteOutcome::Done => {}
            }
        }
        let queue = &mut active.queues[TX_QUEUE].queue;
        let mut used = false;
        let mut served = 0;
        while served < super::MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            let mut frame = Vec::new();
            let read = chain
                .reader(&active.mem)
                .map_err(io::Error::other)
                .and_then(|mut r| {
                    // Guest-given lengths: nothing longer than a frame is read.
                    if r.available_bytes() > MAX_BUFFER {
                        return Err(io::Error::other(format!(
                            "a {}-byte chain is longer than any frame",
                            r.available_bytes()
                        )));
                    }
                    r.read_to_end(&mut frame)
                });
            report_used(queue, &active.mem, head, 0);
            used = true;
            if let Err(e) = read {
                crate::guest_warn!(error = %e, "net: unreadable tx chain");
                continue;
            }
            if frame.len() < VNET_HDR_SIZE {
                crate::guest_warn!(len = frame.len(), "net: tx buffer shorter than its header");
                continue;
            }
            if !self.vnet_hdr {
                frame.drain(..VNET_HDR_SIZE);
            }
            if let WriteOutcome::Blocked = write_frame(&self.backend, &frame) {
                // Keep it; the backend's writability resumes tx.
                self.tx_pending = Some(frame);
                return used;
            }
        }
        if served == super::MAX_CHAINS_PER_EVENT {
            active.queues[TX_QUEUE].rekick("net");
        }
        used
    }

    /// Moves frames from the backend into rx buffers while both are available. Returns
    /// whether rx buffers were used.
    fn process_rx(&mut self) -> bool {
        let Some(active) = self.activation.active_mut() else {
            return false;
        };
        let queue = &mut active.queues[RX_QUEUE].queue;
        let mut used = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match read_frame(
                    &mut self.backend,
                    &mut self.rx_buf,
                    self.vnet_hdr,
                    self.datagram,
                ) {
                    ReadOutcome::Frame(len) => len,
                    ReadOutcome::Empty => break,
                    ReadOutcome::Eof => {
                        tracing::warn!("net: backend closed; receive stops");
                        self.backend_eof = true;
                        break;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                // No buffer: hold the frame and stop reading until the guest posts some.
                self.rx_pending = Some(len);
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            let written = match chain.writer(&active.mem) {
                Ok(mut w) if w.available_bytes() >= len => {
                    w.write_all(&self.rx_buf[..len]).map(|()| len as u32)
                }
                Ok(w) => Err(io::Error::other(format!(
                    "{len}-byte frame does not fit a {}-byte rx buffer",
                    w.available_bytes()
                ))),
                Err(e) => Err(io::Error::other(e)),
            };
            let len = written.unwrap_or_else(|e| {
                crate::guest_warn!(error = %e, "net: dropping a received frame");
                0
            });
            report_used(queue, &active.mem, head, len);
            used = true;
        }
        used
    }

    fn desired_backend_interest(&self) -> Option<EventSet> {
        let mut set = EventSet::empty();
        if self.rx_pending.is_none() && !self.backend_eof {
            set |= EventSet::IN;
        }
        if self.tx_pending.is_some() {
            set |= EventSet::OUT;
        }
        (!set.is_empty()).then_some(set)
    }

    fn sync_registrations(&mut self, ops: &mut EventOps) {
        if !self.activation.sync(ops, TOKEN_RX_KICK) {
            if self.backend_registered.take().is_some() {
                if let Err(e) = ops.remove(Events::empty(&self.backend)) {
                    tracing::warn!(error = %e, "net: cannot deregister the backend");
                }
            }
            return;
        }
        let desired = self.desired_backend_interest();
        if desired == self.backend_registered {
            return;
        }
        let backend = &self.backend;
        let result = match (self.backend_registered, desired) {
            (None, Some(set)) => ops.add(Events::with_data(backend, TOKEN_BACKEND, set)),
            (Some(_), Some(set)) => ops.modify(Events::with_data(backend, TOKEN_BACKEND, set)),
            (Some(_), None) => ops.remove(Events::empty(backend)),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => self.backend_registered = desired,
            Err(e) => {
                tracing::error!(error = %e, "net: cannot update the backend's registration")
            }
        }
    }
}

enum ReadOutcome {
    Frame(usize),
    Empty,
    Eof,
}

/// Whether `fd` is a datagram socket (`SO_TYPE` is `SOCK_DGRAM`).
fn is_datagram_socket(fd: &OwnedFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, which lives across the
    // call; a descriptor that is not a socket fails with ENOTSOCK.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && kind == libc::SOCK_DGRAM
}

/// Reads one frame into `buf` as header + frame (a zero header in front when the backend
/// carries none).
fn read_frame(backend: &mut File, buf: &mut [u8], vnet_hdr: bool, datagram: bool) -> ReadOutcome {
    let offset = if vnet_hdr { 0 } else { VNET_HDR_SIZE };
    loop {
        match backend.read(&mut buf[offset..]) {
            // An empty datagram carries no frame: skipped.
            Ok(0) if datagram => {}
            Ok(0) => return ReadOutcome::Eof,
            Ok(n) => {
                buf[..offset].fill(0);
                return ReadOutcome::Frame(offset + n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Empty,
            Err(e) => {
                tracing::warn!(error = %e, "net: backend read failed");
                return ReadOutcome::Empty;
            }
        }
    }
}

enum WriteOutcome {
    /// Written, or dropped after an error that retrying would not fix.
    Done,
    /// The backend would block: keep the frame.
    Blocked,
}

fn write_frame(mut backend: &File, frame: &[u8]) -> WriteOutcome {
    loop {
        match backend.write(frame) {
            Ok(n) if n == frame.len() => return WriteOutcome::Done,
            Ok(n) => {
                crate::guest_warn!(
                    len = frame.len(),
                    written = n,
                    "net: frame truncated by the backend"
                );
                return WriteOutcome::Done;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteOutcome::Blocked,
            Err(e) => {
                crate::guest_warn!(error = %e, len = frame.len(), "net: dropping a transmitted frame");
                return WriteOutcome::Done;
            }
        }
    }
}

fn report_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        crate::guest_error!(error = %e, "net: cannot return a buffer to the guest");
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // std has no safe fcntl; a UnixDatagram view would be wrong for a TAP, so go through
    // the fd flags with libc.
    // SAFETY: F_GETFL on an fd we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own with an integer argument; no pointers involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Parses a NIC's MAC address `aa:bb:cc:dd:ee:ff` (unicast); the error says what is
/// wrong with it.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "{s:?} is not a MAC address (expected six hex bytes separated by ':')"
        ));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a MAC address (two hex digits per byte)"
            ));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s:?} is a multicast address; a NIC needs a unicast MAC"
        ));
    }
    if mac == [0; 6] {
        return Err(format!(
            "{s:?} is the all-zeros address; a NIC needs another"
        ));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Persist<'_> for Net {
    type State = NetState;
    /// The card as the VM is configured now; its `mac`, when given, replaces the saved
    /// MAC (a fork child's new address).
    type ConstructorArgs = NetConfig;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            acked_features: self.activation.acked_features(),
        })
    }

    /// Rebuilds a TAP-backed device from a snapshot.
    fn restore(config: NetConfig, state: &NetState) -> Result<Self, NetError> {
        let mac = config.mac.unwrap_or(state.mac);
        // A restored NIC (a fork child's) joins its bridge only once its guest has taken
        // the child's own MAC and address (see forkvm-vmm's `bridged`).
        let mut net = Self::new(NetConfig {
            mac: Some(mac),
            bridge: None,
            ..config
        })?;
        net.activation
            .set_acked_features(state.acked_features & net.avail_features());
        Ok(net)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let base = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
        if self.tap_name.is_some() && self.vnet_hdr {
            base | OFFLOAD_FEATURES
        } else {
            base
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: std::sync::Arc<super::Interrupt>,
        queues: Vec<super::ActiveQueue>,
    ) -> Result<(), super::ActivateError> {
        let expected = self.queue_max_sizes().len();
        self.activation.activate(mem, interrupt, queues, expected)?;
        if self.tap_name.is_some() {
            let flags = tap_offloads(self.activation.acked_features());
            if let Err(e) = set_tap_offloads(&self.backend, flags) {
                // The TAP then hands over plain frames, which the guest takes too.
                tracing::warn!(error = %e, flags, "net: cannot set the TAP's offloads");
            }
        }
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // With VERSION_1 the MAC is read-only for the driver (a guest changes its address
        // locally without telling the device).
        tracing::debug!(
            offset,
            len = data.len(),
            "net: ignoring a config space write"
        );
    }

    super::activation_field!();

    fn reset_device(&mut self) {
        // A frame read for the old queues is stale for the new driver.
        self.rx_pending = None;
        self.tx_pending = None;
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.register(ops, TOKEN_ACTIVATE);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => self.activation.drain_evt(),
            token @ (TOKEN_RX_KICK | TOKEN_TX_KICK) => {
                self.activation.drain_kick((token - TOKEN_RX_KICK) as usize);
            }
            // Readable or writable: processing the queues below tries both directions.
            TOKEN_BACKEND => {}
            other => tracing::warn!(token = other, "net: unexpected event"),
        }
        self.process_queues();
        self.sync_registrations(ops);
    }
}
