//! The vsock connection multiplexer: every host stream of the device, the guest's
//! connections to them, and the control packets and payload owed to the guest.

#[allow(unused_imports)]
use super::*;

/// Most connections one device holds at once, host- and guest-initiated, handshakes
/// included (each holds a host descriptor and up to 256 KiB of buffers): a guest that
/// opens more gets RST, a host client past it is closed at once.
pub(super) const MAX_CONNECTIONS: usize = 1023;
/// Most control packets queued for the guest. Resets for packets to no connection are
/// not queued past it: a guest flooding ports that nobody listens on costs bounded
/// memory (every other control packet belongs to a connection, which are bounded).
pub(super) const MAX_CONTROL: usize = 256;

/// A packet the device owes the guest that carries no payload.
#[derive(Clone, Copy, Debug)]
pub(super) struct Control {
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    pub(super) op: u16,
    pub(super) flags: u32,
}

/// A connection as the guest knows it: its host stream's fd and its ports (host, guest).
pub(super) type ConnKey = (RawFd, u32, u32);

/// The connection multiplexer: every host stream and what is owed to the guest.
#[derive(Debug)]
pub(super) struct Muxer {
    pub(super) cid: u64,
    /// The CID the guest still sends from until it handles a transport reset that
    /// changed it (a fork child's guest sends from its parent's CID at first): its
    /// packets count as the guest's own, so a connection the guest makes meanwhile goes
    /// on (the host's requests wait for the reset to be handled: [`Muxer::held`]).
    pub(super) previous_cid: Option<u64>,
    pub(super) uds_path: PathBuf,
    pub(super) listener: UnixListener,
    /// Connections by the raw fd of their host stream.
    pub(super) conns: HashMap<RawFd, Connection>,
    /// `(local_port, peer_port)` to stream fd, for connections the guest knows about.
    pub(super) ports: HashMap<(u32, u32), RawFd>,
    /// Control packets for the guest, sent before any payload.
    pub(super) control: VecDeque<Control>,
    /// Host clients' connection requests held back while the guest has not handled a
    /// transport reset ([`Muxer::hold_requests`]): sent once it has.
    pub(super) held: VecDeque<Control>,
    /// The guest has been (or is to be) sent a transport reset it has not handled yet:
    /// a request sent now would make a socket the reset then kills (a fork child's
    /// agent would accept it, start a thread for it and find it dead, and the host
    /// client would connect again), each costing the child pages of its own.
    pub(super) hold_requests: bool,
    /// Streams with bytes (or end of file) to read, in round-robin order.
    pub(super) rx_ready: VecDeque<RawFd>,
    /// Closed streams still registered with the event manager; dropped once deregistered.
    pub(super) closing: Vec<UnixStream>,
    pub(super) next_local_port: u32,
    /// Payload read from a host stream on its way into an rx buffer. It grows to the
    /// largest read so far (at most [`MAX_PKT_PAYLOAD`]; the guest's rx buffers are
    /// 4 KiB in Linux), not made whole ahead: 64 KiB zeroed at every restore were 16
    /// pages of each fork child's own.
    pub(super) scratch: Vec<u8>,
    /// [`MAX_CONNECTIONS`] (lower in tests).
    pub(super) max_conns: usize,
}

impl Muxer {
    pub(super) fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    pub(super) fn queue_control(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        self.control.push_back(Control {
            local_port,
            peer_port,
            op,
            flags,
        });
    }

    /// Answers a guest packet that has no connection with `OP_RST` (never an RST to an RST).
    pub(super) fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST && self.control.len() < MAX_CONTROL {
            self.queue_control(hdr.dst_port, hdr.src_port, OP_RST, 0);
        }
    }

    /// Accepts every host client waiting in the listen backlog.
    pub(super) fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= self.max_conns {
                        tracing::debug!("vsock: connection limit reached; closing a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        crate::guest_warn!(error = %e, "vsock: dropping a host client");
                        continue;
                    }
                    let state = ConnState::HostHandshake { line: Vec::new() };
                    self.conns
                        .insert(stream.as_raw_fd(), Connection::new(stream, state, 0, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::guest_warn!(error = %e, "vsock: accept failed");
                    break;
                }
            }
        }
    }

    /// Removes a connection and closes its host stream, telling the guest with `OP_RST`
    /// when `rst` (the guest knows the connection; not one whose request is held).
    pub(super) fn close(&mut self, fd: RawFd, rst: bool) {
        let Some(conn) = self.conns.remove(&fd) else {
            return;
        };
        if !matches!(conn.state, ConnState::HostHandshake { .. }) {
            self.ports.remove(&(conn.local_port, conn.peer_port));
            let before = self.held.len();
            self.held
                .retain(|p| (p.local_port, p.peer_port) != (conn.local_port, conn.peer_port));
            if rst && self.held.len() == before {
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

    pub(super) fn drop_all_connections(&mut self) {
        let fds: Vec<RawFd> = self.conns.keys().copied().collect();
        for fd in fds {
            self.close(fd, false);
        }
        self.control.clear();
        self.held.clear();
    }

    /// Sends the held connection requests (the guest handled its transport reset, or
    /// its driver started over) and holds no more.
    pub(super) fn release_requests(&mut self) {
        self.hold_requests = false;
        if !self.held.is_empty() {
            tracing::debug!(
                requests = self.held.len(),
                "vsock: sending the connection requests held during the transport reset"
            );
        }
        self.control.extend(self.held.drain(..));
    }

    /// The connections the guest has heard of, by host stream and ports: those it
    /// forgets when it handles a transport reset. Not a host client still sending its
    /// `CONNECT` line, nor one whose request to the guest is still queued or held.
    pub(super) fn known_to_guest(&self) -> Vec<ConnKey> {
        let queued_request = |c: &Connection| {
            self.control.iter().chain(&self.held).any(|p| {
                p.op == OP_REQUEST && p.local_port == c.local_port && p.peer_port == c.peer_port
            })
        };
        self.conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::HostHandshake { .. } => false,
                ConnState::LocalInit => !queued_request(c),
                ConnState::Established => true,
            })
            .map(|(&fd, c)| (fd, c.local_port, c.peer_port))
            .collect()
    }

    /// Closes the host streams of the connections `which` that are still open (the
    /// same stream with the same ports), without a word to the guest (it has forgotten
    /// them).
    pub(super) fn drop_connections(&mut self, which: &[ConnKey]) {
        for &(fd, local_port, peer_port) in which {
            let same = self
                .conns
                .get(&fd)
                .is_some_and(|c| c.local_port == local_port && c.peer_port == peer_port);
            if same {
                self.close(fd, false);
            }
        }
    }

    /// A registered host stream is ready (`set` as epoll reported it).
    pub(super) fn on_stream_event(&mut self, fd: RawFd, set: EventSet) {
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
    pub(super) fn read_connect_line(&mut self, fd: RawFd) {
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
            crate::guest_warn!(line = %String::from_utf8_lossy(line), "vsock: bad host handshake");
            return self.close(fd, false);
        };
        let local_port = self.alloc_local_port();
        let conn = self.conns.get_mut(&fd).expect("connection checked above");
        conn.state = ConnState::LocalInit;
        conn.local_port = local_port;
        conn.peer_port = peer_port;
        self.ports.insert((local_port, peer_port), fd);
        tracing::debug!(
            local_port,
            peer_port,
            held = self.hold_requests,
            "vsock: host connects to the guest"
        );
        if self.hold_requests {
            self.held.push_back(Control {
                local_port,
                peer_port,
                op: OP_REQUEST,
                flags: 0,
            });
        } else {
            self.queue_control(local_port, peer_port, OP_REQUEST, 0);
        }
    }

    pub(super) fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            // `u32::MAX` is VMADDR_PORT_ANY, never a connection's port.
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .filter(|&p| p != u32::MAX)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.keys().any(|&(local, _)| local == port) {
                return port;
            }
        }
    }

    /// After bytes went to the host stream: owe the guest a credit update if enough were
    /// freed, and finish a shutdown the guest asked for once its bytes are out.
    pub(super) fn after_forward(&mut self, fd: RawFd) {
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
    pub(super) fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        tracing::trace!(
            op = op_name(hdr.op),
            src = hdr.src_port,
            dst = hdr.dst_port,
            len = hdr.len,
            "vsock: from guest"
        );
        let from_guest = hdr.src_cid == self.cid || Some(hdr.src_cid) == self.previous_cid;
        if hdr.dst_cid != HOST_CID || !from_guest {
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

    pub(super) fn established_packet(&mut self, fd: RawFd, hdr: &Header, data: &[u8]) {
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
    pub(super) fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(&fd) = self.ports.get(&key) {
            tracing::debug!("vsock: REQUEST for an existing connection; resetting it");
            return self.close(fd, true);
        }
        if self.conns.len() >= self.max_conns {
            tracing::debug!("vsock: connection limit reached; refusing the guest's");
            return self.reply_rst(hdr);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        // Never blocks the event loop: a listener whose backlog is full refuses.
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "vsock: guest connect refused");
                return self.reply_rst(hdr);
            }
        };
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
    pub(super) fn next_rx_packet(&mut self, room: usize) -> Option<(Header, usize)> {
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
            let want = room.min(free).min(MAX_PKT_PAYLOAD);
            if self.scratch.len() < want {
                self.scratch.resize(want, 0);
            }
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
pub(super) fn header(cid: u64, local_port: u32, peer_port: u32, op: u16) -> Header {
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

/// Connects a non-blocking Unix stream socket to `path`; where a blocking connect
/// would wait (the listener's backlog is full) it fails with `EAGAIN` instead.
pub(super) fn connect_nonblocking(path: &std::ffi::OsStr) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain old data, valid all zeros.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable socket path (too long or with a NUL)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len`
    // (its family, the path and its NUL) is within it.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (an optional trailing `\r` allowed).
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}
