//! Tests for virtio-vsock: the test driver's rings in a `GuestMemoryMmap` drive the
//! activated device directly, without a transport or KVM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

use super::muxer::parse_connect;
use super::packet::*;
use super::*;
use crate::virtio::test_driver::{Driver, DriverQueue};
use crate::virtio::VIRTIO_MMIO_INT_VRING;

const RX_BUF_LEN: u32 = (HDR_SIZE + 4096) as u32;
const GUEST_CID: u64 = 3;

/// A guest driver for an activated vsock device.
struct Guest {
    drv: Driver,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
}

impl Guest {
    /// Activates `dev` with three fresh queues.
    fn activate(dev: &mut Vsock) -> Guest {
        let (drv, queues) = Driver::activate(dev);
        let [rx, tx, ev]: [DriverQueue; 3] = queues.try_into().ok().expect("three queues");
        Guest { drv, rx, tx, ev }
    }

    fn post_rx_buffers(&mut self, n: usize) {
        self.drv.post_buffers(&mut self.rx, n, RX_BUF_LEN);
    }

    fn post_event_buffer(&mut self) {
        self.drv.post_buffers(&mut self.ev, 1, EVENT_SIZE as u32);
    }

    /// Queues a packet on tx (header and payload in separate descriptors, as Linux does).
    fn queue_tx(&mut self, hdr: Header, data: &[u8]) {
        let hdr = Header {
            len: data.len() as u32,
            ..hdr
        };
        let haddr = self.drv.alloc(HDR_SIZE as u32);
        self.drv
            .mem
            .write_slice(&hdr.to_bytes(), GuestAddress(haddr))
            .unwrap();
        let mut bufs = vec![(haddr, HDR_SIZE as u32, false)];
        if !data.is_empty() {
            let daddr = self.drv.alloc(data.len() as u32);
            self.drv.mem.write_slice(data, GuestAddress(daddr)).unwrap();
            bufs.push((daddr, data.len() as u32, false));
        }
        self.tx.add_chain(&self.drv.mem, &bufs);
    }

    /// Posts a packet on tx and lets the device run its queues.
    fn send(&mut self, dev: &mut Vsock, hdr: Header, data: &[u8]) {
        self.queue_tx(hdr, data);
        dev.process_queues();
        assert!(
            self.tx.pop_used(&self.drv.mem).is_some(),
            "tx buffer not returned"
        );
    }

    /// The next packet the device put in an rx buffer.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let bytes = self.rx.pop_used(&self.drv.mem)?;
        let hdr = Header::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
        assert_eq!(bytes.len(), HDR_SIZE + hdr.len as usize);
        Some((hdr, bytes[HDR_SIZE..].to_vec()))
    }
}

/// A packet from guest port `src_port` to host port `dst_port`.
fn from_guest(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn new_device(dir: &tempfile::TempDir) -> Vsock {
    Vsock::new(VsockConfig {
        cid: GUEST_CID,
        uds: dir.path().join("v.sock"),
    })
    .unwrap()
}

/// [`Vsock::restore`] of `state` with CID `cid`, listening on `name` in `dir`.
fn restore_in(
    dir: &tempfile::TempDir,
    name: &str,
    cid: u64,
    state: &VsockState,
) -> Result<Vsock, VsockError> {
    Vsock::restore(
        VsockConfig {
            cid,
            uds: dir.path().join(name),
        },
        state,
    )
}

fn client(dir: &tempfile::TempDir) -> UnixStream {
    let s = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// A host client connects to guest port `port`: returns it and the `OP_REQUEST` the
/// device sent the guest.
fn host_request(
    dev: &mut Vsock,
    g: &mut Guest,
    dir: &tempfile::TempDir,
    port: u32,
) -> (UnixStream, Header) {
    let mut c = client(dir);
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    dev.muxer.accept_clients();
    dev.poll_streams();
    let (req, _) = g.recv().expect("OP_REQUEST");
    assert_eq!(req.op, OP_REQUEST);
    (c, req)
}

/// The host client `c` reads end of file and nothing before it (`what` says why).
fn assert_ended(c: &mut UnixStream, what: &str) {
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{what}: {rest:?}");
}

/// Host client connects to guest port 1234 and the guest accepts; returns the client and
/// the host port the device picked.
fn host_connect(dev: &mut Vsock, g: &mut Guest, dir: &tempfile::TempDir) -> (UnixStream, u32) {
    let (mut c, req) = host_request(dev, g, dir, 1234);
    let mut resp = from_guest(OP_RESPONSE, 1234, req.src_port);
    resp.buf_alloc = 64 * 1024;
    g.send(dev, resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    (c, req.src_port)
}

#[test]
fn config_space_holds_the_cid() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(VsockConfig {
        cid: 0x42,
        uds: dir.path().join("v.sock"),
    })
    .unwrap();
    assert_eq!(dev.device_type(), device_type::VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_ne!(dev.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    let mut cid = [0xffu8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x42);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    dev.write_config(0, &[9]);
    assert_eq!(dev.guest_cid(), 0x42);
    dev.set_guest_cid(77).unwrap();
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 77);
    assert!(matches!(
        dev.set_guest_cid(2),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(Vsock::new(VsockConfig {
        cid: 1,
        uds: dir.path().join("w.sock"),
    })
    .is_err());
}

#[test]
fn host_initiated_connection_carries_bytes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);

    let mut c = client(&dir);
    c.write_all(b"CONNECT 1234\n").unwrap();
    dev.muxer.accept_clients();
    dev.poll_streams();
    let (req, data) = g.recv().expect("OP_REQUEST in an rx buffer");
    assert!(data.is_empty());
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    assert_ne!(g.drv.irq.status() & VIRTIO_MMIO_INT_VRING, 0);

    g.send(&mut dev, from_guest(OP_RESPONSE, 1234, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));

    // Host to guest.
    c.write_all(b"hello guest").unwrap();
    dev.poll_streams();
    let (rw, data) = g.recv().expect("OP_RW");
    assert_eq!(rw.op, OP_RW);
    assert_eq!((rw.src_port, rw.dst_port), (req.src_port, 1234));
    assert_eq!(data, b"hello guest");
    assert!(g.recv().is_none());

    // Guest to host.
    g.send(
        &mut dev,
        from_guest(OP_RW, 1234, req.src_port),
        b"hello host",
    );
    assert_eq!(read_exactly(&mut c, 10), b"hello host");

    // Guest closes: the client sees end of file.
    g.send(&mut dev, from_guest(OP_RST, 1234, req.src_port), &[]);
    assert_ended(&mut c, "end of file");
    assert!(dev.muxer.conns.is_empty());
}

#[test]
fn refused_host_connection_closes_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(2);
    let (mut c, req) = host_request(&mut dev, &mut g, &dir, 9);
    g.send(&mut dev, from_guest(OP_RST, 9, req.src_port), &[]);
    assert_ended(&mut c, "no OK for a refused connection");
}

#[test]
fn malformed_handshake_closes_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(2);
    let mut c = client(&dir);
    c.write_all(b"HELLO 9\n").unwrap();
    dev.muxer.accept_clients();
    dev.poll_streams();
    assert!(g.recv().is_none());
    assert_ended(&mut c, "end of file");
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT x"), None);
}

#[test]
fn host_client_leaving_before_the_guest_answers_resets_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(2);
    let (c, req) = host_request(&mut dev, &mut g, &dir, 7);
    drop(c);
    let fd = *dev.muxer.conns.keys().next().unwrap();
    dev.muxer.on_stream_event(fd, EventSet::HANG_UP);
    dev.process_queues();
    let (rst, _) = g.recv().unwrap();
    assert_eq!(rst.op, OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 7));
}

#[test]
fn guest_connects_to_a_listening_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();

    g.send(&mut dev, from_guest(OP_REQUEST, 5000, 52), &[]);
    let (resp, _) = g.recv().expect("OP_RESPONSE");
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((resp.src_port, resp.dst_port), (52, 5000));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send(&mut dev, from_guest(OP_RW, 5000, 52), b"ping");
    assert_eq!(read_exactly(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    dev.poll_streams();
    let (rw, data) = g.recv().unwrap();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, 52, 5000));
    assert_eq!(rw.fwd_cnt, 4, "fwd_cnt counts bytes forwarded to the host");
    assert_eq!(data, b"pong");

    // The host closes: the guest gets SHUTDOWN(SEND); the guest closes: RST ends it.
    drop(host);
    dev.poll_streams();
    let (shut, _) = g.recv().unwrap();
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let mut bye = from_guest(OP_SHUTDOWN, 5000, 52);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&mut dev, bye, &[]);
    let (rst, _) = g.recv().unwrap();
    assert_eq!(rst.op, OP_RST);
    assert!(dev.muxer.conns.is_empty());
}

#[test]
fn guest_shutdown_half_closes_the_host_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let (mut c, port) = host_connect(&mut dev, &mut g, &dir);
    g.send(&mut dev, from_guest(OP_RW, 1234, port), b"last words");
    let mut shut = from_guest(OP_SHUTDOWN, 1234, port);
    shut.flags = SHUTDOWN_SEND;
    g.send(&mut dev, shut, &[]);
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    // The other direction still works.
    c.write_all(b"reply").unwrap();
    dev.poll_streams();
    let (rw, data) = g.recv().unwrap();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"reply"[..]));
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(2);
    g.send(&mut dev, from_guest(OP_REQUEST, 5001, 53), &[]);
    let (rst, _) = g.recv().expect("OP_RST");
    assert_eq!(rst.op, OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (53, 5001));
    // A packet for an unknown connection is reset too, an RST is not answered.
    g.send(&mut dev, from_guest(OP_RW, 5001, 53), b"x");
    assert_eq!(g.recv().unwrap().0.op, OP_RST);
    g.send(&mut dev, from_guest(OP_RST, 5001, 53), &[]);
    assert!(g.recv().is_none());
}

#[test]
fn packets_with_a_stale_cid_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(2);
    let mut hdr = from_guest(OP_REQUEST, 5001, 53);
    hdr.src_cid = 99;
    g.send(&mut dev, hdr, &[]);
    assert!(g.recv().is_none());
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let (mut c, req) = host_request(&mut dev, &mut g, &dir, 1234);
    let mut resp = from_guest(OP_RESPONSE, 1234, req.src_port);
    resp.buf_alloc = 8;
    g.send(&mut dev, resp, &[]);
    assert!(read_line(&mut c).starts_with("OK "));

    c.write_all(b"0123456789abcdefghij").unwrap();
    dev.poll_streams();
    let (rw, data) = g.recv().unwrap();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"01234567"[..]));
    // Out of credit: the device asks for more instead of reading.
    let (creq, _) = g.recv().unwrap();
    assert_eq!(creq.op, OP_CREDIT_REQUEST);
    dev.poll_streams();
    assert!(g.recv().is_none());

    let mut upd = from_guest(OP_CREDIT_UPDATE, 1234, req.src_port);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    g.send(&mut dev, upd, &[]);
    dev.poll_streams();
    let (rw, data) = g.recv().unwrap();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"89abcdef"[..]));
}

#[test]
fn guest_to_host_gets_credit_updates() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let (mut c, port) = host_connect(&mut dev, &mut g, &dir);

    let chunk = vec![0xabu8; 32 * 1024];
    for _ in 0..2 {
        g.send(&mut dev, from_guest(OP_RW, 1234, port), &chunk);
    }
    assert_eq!(read_exactly(&mut c, 64 * 1024), [0xab; 64 * 1024]);
    let (upd, _) = g.recv().expect("OP_CREDIT_UPDATE");
    assert_eq!(upd.op, OP_CREDIT_UPDATE);
    assert_eq!(upd.fwd_cnt, 64 * 1024);
    assert_eq!(upd.buf_alloc, CONN_BUF_ALLOC);

    // Asked for credit, the device answers.
    g.send(&mut dev, from_guest(OP_CREDIT_REQUEST, 1234, port), &[]);
    let (upd, _) = g.recv().unwrap();
    assert_eq!((upd.op, upd.fwd_cnt), (OP_CREDIT_UPDATE, 64 * 1024));
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let (_c, port) = host_connect(&mut dev, &mut g, &dir);
    // The client never reads: after the socket buffer and CONN_BUF_ALLOC bytes, reset.
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        g.send(&mut dev, from_guest(OP_RW, 1234, port), &chunk);
        if let Some((hdr, _)) = g.recv() {
            if hdr.op == OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset);
}

#[test]
fn no_rx_buffers_holds_packets_until_the_guest_posts_some() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    let mut c = client(&dir);
    c.write_all(b"CONNECT 1234\n").unwrap();
    dev.muxer.accept_clients();
    dev.poll_streams();
    assert!(g.recv().is_none());
    g.post_rx_buffers(1);
    dev.process_queues();
    assert_eq!(g.recv().unwrap().0.op, OP_REQUEST);
}

#[test]
fn reset_transport_changes_the_cid_and_tells_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    g.post_event_buffer();
    let (mut c, _) = host_connect(&mut dev, &mut g, &dir);
    g.drv.irq.ack(VIRTIO_MMIO_INT_VRING);

    dev.reset_transport(42).unwrap();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 42);
    let event = g.ev.pop_used(&g.drv.mem).expect("transport reset event");
    assert_eq!(event, EVENT_TRANSPORT_RESET.to_le_bytes());
    assert_ne!(g.drv.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    // Connections are gone: the host client sees end of file.
    assert_ended(&mut c, "end of file");
    assert!(dev.muxer.conns.is_empty());
    // The listener survives: once the guest has handled the reset (its CID read above,
    // its event buffer posted again), new connections use the new CID.
    refill_events(&mut dev, &mut g);
    let (_c2, req) = host_request(&mut dev, &mut g, &dir, 1);
    assert_eq!((req.op, req.dst_cid), (OP_REQUEST, 42));
}

#[test]
fn reset_transport_before_activation_waits_for_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    dev.reset_transport(10).unwrap();
    let mut g = Guest::activate(&mut dev);
    dev.process_queues();
    assert!(g.ev.pop_used(&g.drv.mem).is_none(), "no event buffer yet");
    g.post_event_buffer();
    dev.process_queues();
    assert_eq!(
        g.ev.pop_used(&g.drv.mem).unwrap(),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
}

#[test]
fn state_round_trips_and_restore_resets_the_transport() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    dev.set_acked_features(dev.avail_features());
    let state = dev.save().unwrap();
    assert_eq!(state.cid, GUEST_CID);
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    drop(dev);

    // A fork child: same snapshot, new CID, its own socket.
    let mut child = Vsock::restore(
        VsockConfig {
            cid: 8,
            uds: dir.path().join("child.sock"),
        },
        &back,
    )
    .unwrap();
    assert_eq!(child.acked_features(), state.acked_features);
    assert_eq!(child.guest_cid(), 8);
    let mut g = Guest::activate(&mut child);
    g.post_event_buffer();
    child.process_queues();
    assert_eq!(
        g.ev.pop_used(&g.drv.mem).unwrap(),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    assert_eq!(child.queue_states().len(), 3);
    assert!(child.reset());
    assert!(!child.is_activated());
    assert_eq!(child.acked_features(), 0);

    // A state acknowledging a feature the device never offered is refused, not masked.
    let forged = VsockState {
        acked_features: state.acked_features | 1 << 50,
        ..back
    };
    let e = restore_in(&dir, "forged.sock", 9, &forged).expect_err("refused");
    assert!(matches!(e, VsockError::BadFeatures(_)), "{e}");
}

/// A fork child's guest may still hold the sockets of the parent's connections (reset but
/// not yet closed by their program); a new host connection from one of their host ports
/// would reach such a socket and be refused, so the child's ports go on from the parent's.
#[test]
fn a_restored_device_never_reuses_the_snapshots_host_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let (_c1, first) = host_connect(&mut dev, &mut g, &dir);
    let (_c2, second) = host_connect(&mut dev, &mut g, &dir);
    assert_eq!((first, second), (FIRST_LOCAL_PORT, FIRST_LOCAL_PORT + 1));
    let state = dev.save().unwrap();
    assert_eq!(state.next_local_port, second + 1);
    drop(dev);

    let mut child = restore_in(&dir, "v.sock", 8, &state).unwrap();
    let mut cg = Guest::activate(&mut child);
    cg.post_rx_buffers(8);
    handle_reset(&mut child, &mut cg);
    let (_c, req) = host_request(&mut child, &mut cg, &dir, 1234);
    assert_eq!((req.op, req.src_port), (OP_REQUEST, second + 1));

    // A state whose next port lies below the host range is refused.
    let forged = VsockState {
        next_local_port: FIRST_LOCAL_PORT - 1,
        ..state
    };
    let e = restore_in(&dir, "forged.sock", 9, &forged).expect_err("refused");
    assert!(matches!(e, VsockError::BadLocalPort(_)), "{e}");
    let forged = VsockState {
        next_local_port: u32::MAX,
        ..forged
    };
    let e = restore_in(&dir, "forged.sock", 9, &forged).expect_err("refused");
    assert!(matches!(e, VsockError::BadLocalPort(_)), "{e}");
    // The last port is followed by the first: VMADDR_PORT_ANY is never handed out.
    let mut last = restore_in(
        &dir,
        "last.sock",
        9,
        &VsockState {
            next_local_port: u32::MAX - 1,
            ..state
        },
    )
    .unwrap();
    assert_eq!(last.muxer.alloc_local_port(), u32::MAX - 1);
    assert_eq!(last.muxer.alloc_local_port(), FIRST_LOCAL_PORT);
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    new_device(&dir);
    std::fs::write(dir.path().join("file"), b"not a socket").unwrap();
    let err = Vsock::new(VsockConfig {
        cid: 3,
        uds: dir.path().join("file"),
    })
    .unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }));
}

/// The whole life cycle through a real `EventManager`: activation event, listener, stream
/// and queue kick registrations.
#[test]
fn event_manager_drives_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let mut em = EventManager::<Vsock>::new().unwrap();
    let id = em.add_subscriber(dev);
    let run = |em: &mut EventManager<Vsock>| {
        // Run until idle.
        while em.run_with_timeout(50).unwrap() > 0 {}
    };
    run(&mut em);

    let mut c = client(&dir);
    c.write_all(b"CONNECT 1234\n").unwrap();
    run(&mut em);
    let (req, _) = g.recv().expect("OP_REQUEST through the event loop");
    assert_eq!(req.op, OP_REQUEST);

    g.queue_tx(from_guest(OP_RESPONSE, 1234, req.src_port), &[]);
    g.drv.kicks[TX_QUEUE].write(1).unwrap();
    run(&mut em);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));

    c.write_all(b"through epoll").unwrap();
    run(&mut em);
    let (rw, data) = g.recv().unwrap();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"through epoll"[..]));

    // The host hangs up: SHUTDOWN reaches the guest, its RST closes the connection and the
    // stream is deregistered without the loop spinning.
    drop(c);
    run(&mut em);
    assert_eq!(g.recv().unwrap().0.op, OP_SHUTDOWN);
    g.queue_tx(from_guest(OP_RST, 1234, req.src_port), &[]);
    g.drv.kicks[TX_QUEUE].write(1).unwrap();
    run(&mut em);
    let dev = em.subscriber_mut(id).unwrap();
    assert!(dev.muxer.conns.is_empty());
    assert!(dev.muxer.closing.is_empty());

    // A transport reset from outside the loop (the fork path).
    g.post_event_buffer();
    dev.reset_transport(11).unwrap();
    run(&mut em);
    assert!(g.ev.pop_used(&g.drv.mem).is_some());
}

#[test]
fn a_flood_of_packets_to_nowhere_queues_a_bounded_number_of_resets() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    // No rx buffers: nothing the device owes the guest can leave.
    for i in 0..2000u32 {
        g.send(&mut dev, from_guest(OP_RW, 10_000 + i, 60), b"x");
    }
    assert_eq!(dev.muxer.control.len(), super::muxer::MAX_CONTROL);
    let mut resets = 0;
    for _ in 0..8 {
        g.post_rx_buffers(64);
        dev.process_queues();
        while let Some((h, _)) = g.recv() {
            assert_eq!(h.op, OP_RST);
            resets += 1;
        }
    }
    assert_eq!(resets, super::muxer::MAX_CONTROL);
}

#[test]
fn connections_past_the_limit_are_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    dev.muxer.max_conns = 2;
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(8);
    let _listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
    let mut ops = Vec::new();
    for src in [5000, 5001, 5002] {
        g.send(&mut dev, from_guest(OP_REQUEST, src, 52), &[]);
        ops.push(g.recv().expect("an answer").0.op);
    }
    assert_eq!(ops, [OP_RESPONSE, OP_RESPONSE, OP_RST]);
    assert_eq!(dev.muxer.conns.len(), 2);
    // A host client past the limit is closed at once.
    let mut c = client(&dir);
    dev.muxer.accept_clients();
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "closed, not kept waiting");
    assert_eq!(dev.muxer.conns.len(), 2);
}

#[test]
fn a_guest_connect_to_a_full_listener_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    g.post_rx_buffers(4);
    let path = dir.path().join("v.sock_53");
    let _listener = UnixListener::bind(&path).unwrap();
    // Fill its backlog: nobody accepts.
    let mut queued = Vec::new();
    loop {
        match super::muxer::connect_nonblocking(path.as_os_str()) {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    let t0 = std::time::Instant::now();
    g.send(&mut dev, from_guest(OP_REQUEST, 5003, 53), &[]);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the event loop blocked"
    );
    assert_eq!(g.recv().expect("an answer").0.op, OP_RST);
}

#[test]
fn a_guest_posting_without_pause_is_served_a_budget_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = new_device(&dir);
    let mut g = Guest::activate(&mut dev);
    let budget = crate::virtio::MAX_CHAINS_PER_EVENT;
    for i in 0..(budget + 36) as u32 {
        g.queue_tx(from_guest(OP_RST, 20_000 + i, 61), &[]);
    }
    dev.process_queues();
    let mut returned = 0;
    while g.tx.pop_used(&g.drv.mem).is_some() {
        returned += 1;
    }
    assert_eq!(returned, budget, "one event serves one budget");
    // The device kicked itself for the rest: the loop comes back after other events.
    assert_eq!(g.drv.kicks[TX_QUEUE].read().unwrap(), 1);
    dev.process_queues();
    while g.tx.pop_used(&g.drv.mem).is_some() {
        returned += 1;
    }
    assert_eq!(returned, budget + 36);
}

/// A fork child of a device with CID [`GUEST_CID`]: restored with CID 8 on `v.sock` in
/// `dir`, its driver activated (no buffers posted).
fn activated_child(dir: &tempfile::TempDir) -> (Vsock, Guest) {
    let mut dev = new_device(dir);
    dev.set_acked_features(dev.avail_features());
    let state = dev.save().unwrap();
    drop(dev);
    let mut child = restore_in(dir, "v.sock", 8, &state).unwrap();
    let g = Guest::activate(&mut child);
    (child, g)
}

/// The guest of `child` is sent its transport reset and handles it (re-reads its CID).
fn handle_reset(child: &mut Vsock, g: &mut Guest) {
    g.post_event_buffer();
    child.process_queues();
    assert_eq!(
        g.ev.pop_used(&g.drv.mem).expect("the reset event"),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    child.read_config(0, &mut [0u8; 8]);
    child.process_queues();
    refill_events(child, g);
}

/// The guest of `child` posts its event buffer again and kicks the event queue, as
/// Linux does once it has handled a reset.
fn refill_events(child: &mut Vsock, g: &mut Guest) {
    g.post_event_buffer();
    child.kicked(EVENT_QUEUE);
    child.process_queues();
}

/// A guest connection from port 5000 to the host's port 52 (listening on `v.sock_52` in
/// `dir`), sent from `cid` and accepted; returns the host side.
fn guest_connect_from(
    dev: &mut Vsock,
    g: &mut Guest,
    dir: &tempfile::TempDir,
    cid: u64,
) -> UnixStream {
    let listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
    let mut req = from_guest(OP_REQUEST, 5000, 52);
    req.src_cid = cid;
    g.send(dev, req, &[]);
    let (resp, _) = g.recv().expect("OP_RESPONSE");
    assert_eq!((resp.op, resp.dst_port), (OP_RESPONSE, 5000));
    let (host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host
}

/// A fork child (see [`activated_child`]) with `rx` rx buffers posted, whose transport
/// reset event has been delivered and not yet handled by its guest.
fn child_sent_its_reset(dir: &tempfile::TempDir, rx: usize) -> (Vsock, Guest) {
    let (mut child, mut g) = activated_child(dir);
    g.post_rx_buffers(rx);
    g.post_event_buffer();
    child.process_queues();
    assert!(g.ev.pop_used(&g.drv.mem).is_some(), "the reset event");
    (child, g)
}

/// Until a fork child's guest handles its transport reset (re-reads its CID), a host
/// client's connection request is held, not sent: the guest would make a socket the
/// reset then kills. A client that leaves meanwhile takes its request away unsent. The
/// guest is heard from its parent's CID meanwhile, so a connection it makes goes on until
/// the re-read, when the guest has forgotten it and the device drops it too; once the
/// guest has posted its event buffer again the held requests go out to the new CID,
/// and only the new CID counts.
#[test]
fn a_child_holds_host_connections_until_its_guest_handles_the_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut g) = child_sent_its_reset(&dir, 8);

    // Two host clients connect: neither request reaches the guest yet.
    let mut c = client(&dir);
    c.write_all(b"CONNECT 1234\n").unwrap();
    let mut gone = client(&dir);
    gone.write_all(b"CONNECT 1235\n").unwrap();
    child.muxer.accept_clients();
    child.poll_streams();
    assert_eq!(child.muxer.conns.len(), 2);
    assert!(
        g.recv().is_none(),
        "no request before the guest handled the reset"
    );
    // One leaves: nothing about it ever reaches the guest, not even an RST.
    drop(gone);
    let (&gone_fd, _) = (child.muxer.conns.iter())
        .find(|(_, c)| c.peer_port == 1235)
        .expect("the second client");
    child.muxer.on_stream_event(gone_fd, EventSet::HANG_UP);
    child.process_queues();
    assert!(g.recv().is_none(), "nothing sent for a client that left");
    assert_eq!(child.muxer.held.len(), 1);

    // The guest, not yet reset, connects from its parent's CID (GUEST_CID): heard.
    let mut host = guest_connect_from(&mut child, &mut g, &dir, GUEST_CID);
    g.send(&mut child, from_guest(OP_RW, 5000, 52), b"early");
    assert_eq!(read_exactly(&mut host, 5), b"early");

    // The guest handles the reset: it re-reads its CID (its connection is gone), resets
    // its sockets and then posts its event buffer again: only then does the held
    // request go out.
    let mut cid = [0u8; 8];
    child.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 8);
    child.process_queues();
    assert_ended(
        &mut host,
        "the guest's connection from before the reset ends",
    );
    assert!(
        g.recv().is_none(),
        "nothing while the guest still resets its sockets"
    );
    refill_events(&mut child, &mut g);
    let (req, _) = g.recv().expect("the held OP_REQUEST");
    assert_eq!((req.op, req.dst_cid, req.dst_port), (OP_REQUEST, 8, 1234));
    assert!(
        g.recv().is_none(),
        "one request, for the client that stayed"
    );

    // From now on the parent's CID is a stranger's: an answer from it is not heard.
    g.send(&mut child, from_guest(OP_RESPONSE, 1234, req.src_port), &[]);
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(c.read(&mut b).is_err(), "no OK for the parent's CID");
    let mut resp = from_guest(OP_RESPONSE, 1234, req.src_port);
    resp.src_cid = 8;
    g.send(&mut child, resp, &[]);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));

    // A later read of the config is just a read; new clients are not held.
    child.read_config(0, &mut cid);
    child.process_queues();
    assert_eq!(child.muxer.conns.len(), 1);
    let (_c2, req) = host_request(&mut child, &mut g, &dir, 1234);
    assert_eq!(req.dst_cid, 8);
}

/// What the CID re-read drops is what the guest knew of: not a host client still
/// giving its `CONNECT` line, nor one whose request has not reached the guest; a read
/// before the event was delivered (the driver's probe) drops nothing; and a child forked
/// again before its guest handled the reset hears that guest from the CID it still uses.
#[test]
fn the_cid_reread_drops_only_what_the_guest_knew_and_a_nested_fork_keeps_its_cid() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut g) = activated_child(&dir);
    // A read before the event is delivered (no event buffer yet) is the probe's: it
    // drops nothing, and host requests stay held.
    let mut cid = [0u8; 8];
    g.post_rx_buffers(1);
    let mut known = guest_connect_from(&mut child, &mut g, &dir, GUEST_CID);
    child.read_config(0, &mut cid);
    child.process_queues();
    assert_eq!(child.muxer.conns.len(), 1, "the probe's read drops nothing");
    assert!(child.muxer.hold_requests);

    // A nested fork now: the guest still sends from its parent's CID.
    let nested = child.save().unwrap();
    assert_eq!((nested.cid, nested.guest_cid), (8, Some(GUEST_CID)));
    let json = serde_json::to_string(&nested).unwrap();
    assert_eq!(serde_json::from_str::<VsockState>(&json).unwrap(), nested);
    let grandchild = restore_in(&dir, "g.sock", 9, &nested).unwrap();
    assert_eq!(grandchild.muxer.previous_cid, Some(GUEST_CID));
    let forged = VsockState {
        guest_cid: Some(1),
        ..nested.clone()
    };
    assert!(matches!(
        restore_in(&dir, "f.sock", 9, &forged),
        Err(VsockError::InvalidCid(1))
    ));
    drop(grandchild);

    // The event is delivered; then a client still in its handshake, and one whose
    // request is held, as the guest re-reads its CID.
    g.post_event_buffer();
    child.process_queues();
    assert!(g.ev.pop_used(&g.drv.mem).is_some());
    let mut half = client(&dir);
    half.write_all(b"CONN").unwrap();
    let mut waiting = client(&dir);
    waiting
        .write_all(
            b"CONNECT 1234
",
        )
        .unwrap();
    child.muxer.accept_clients();
    child.poll_streams();
    assert_eq!(child.muxer.conns.len(), 3);
    child.read_config(0, &mut cid);
    child.process_queues();
    assert_ended(&mut known, "the known connection ends");
    assert_eq!(child.muxer.conns.len(), 2, "the other two stay");
    refill_events(&mut child, &mut g);
    half.write_all(
        b"ECT 1234
",
    )
    .unwrap();
    child.poll_streams();
    g.post_rx_buffers(2);
    child.process_queues();
    for c in [&mut waiting, &mut half] {
        let (req, _) = g.recv().expect("its OP_REQUEST");
        let mut resp = from_guest(OP_RESPONSE, 1234, req.src_port);
        resp.src_cid = 8;
        g.send(&mut child, resp, &[]);
        assert!(read_line(c).starts_with("OK "));
    }

    // A device reset forgets all of it.
    child.reset_transport(10).unwrap();
    assert_eq!(
        child.muxer.previous_cid,
        Some(8),
        "the CID the guest took last"
    );
    child.reset_device();
    assert_eq!(child.muxer.previous_cid, None);
}

/// A second reset asked for while the first's event waits for a buffer: the guest's
/// re-read after the first does not release the held requests, its refill neither;
/// they go out once the second reset is delivered and handled.
#[test]
fn requests_stay_held_while_another_reset_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut g) = child_sent_its_reset(&dir, 4);
    // No event buffer now: the second reset waits.
    child.reset_transport(9).unwrap();
    let mut c = client(&dir);
    c.write_all(b"CONNECT 1234\n").unwrap();
    child.muxer.accept_clients();
    child.poll_streams();
    // The guest handles the first reset and refills: the second is delivered at once.
    child.read_config(0, &mut [0u8; 8]);
    child.process_queues();
    refill_events(&mut child, &mut g);
    assert!(
        g.recv().is_none(),
        "held while the second reset is unhandled"
    );
    assert_eq!(
        g.ev.pop_used(&g.drv.mem).expect("the second reset"),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    child.read_config(0, &mut [0u8; 8]);
    child.process_queues();
    assert!(g.recv().is_none(), "held until the guest refills");
    refill_events(&mut child, &mut g);
    let (req, _) = g.recv().expect("the held OP_REQUEST");
    assert_eq!((req.op, req.dst_cid), (OP_REQUEST, 9));
}
