//! Tests of virtio-rng, driven through the transport and an event loop as the VMM runs it.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::mmio::test_utils::*;
use crate::virtio::mmio::{MmioTransport, MmioTransportState, TransportArgs};
use crate::virtio::VIRTIO_MMIO_INT_VRING;
use crate::virtio::{ActivateError, ActiveQueue, Interrupt};
use crate::GuestMemory;

const RUNNING: u32 = 0xf;

struct Setup {
    mem: GuestMemory,
    rng: Arc<Mutex<Rng>>,
    transport: MmioTransport,
    em: TestEventManager,
}

fn setup() -> Setup {
    let mem = guest_memory();
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let transport = MmioTransport::new(
        mem.clone(),
        rng.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let em = event_manager(rng.clone());
    Setup {
        mem,
        rng,
        transport,
        em,
    }
}

fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn looks_random(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b != bytes[0])
}

#[test]
fn fills_writable_buffers_and_signals() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    add_chain(&vq, 0, &[(DATA_BASE, 256, true)]);
    assert_eq!(full_handshake(&mut s.transport, &[&vq]), RUNNING);
    assert!(s.rng.lock().unwrap().is_activated());

    // activate_evt: the kick fd is registered and the pending buffer served.
    run_until_idle(&mut s.em);
    assert_eq!(used_idx(&vq), 1);
    assert_eq!(used_elem(&vq, 0), (0, 256));
    assert!(looks_random(&read_guest(&s.mem, DATA_BASE, 256)));
    assert_eq!(s.transport.interrupt().irq_evt().read().unwrap(), 1);
    assert_eq!(read_reg(&mut s.transport, 0x60), VIRTIO_MMIO_INT_VRING);

    // A readable descriptor is skipped, writable ones across the chain are filled.
    let before = read_guest(&s.mem, DATA_BASE + 0x1000, 16);
    add_chain(
        &vq,
        1,
        &[
            (DATA_BASE + 0x1000, 16, false),
            (DATA_BASE + 0x2000, 100, true),
            (DATA_BASE + 0x3000, 28, true),
        ],
    );
    write_reg(&mut s.transport, 0x50, 0);
    run_until_idle(&mut s.em);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used_elem(&vq, 1), (1, 128));
    assert_eq!(read_guest(&s.mem, DATA_BASE + 0x1000, 16), before);
    assert!(looks_random(&read_guest(&s.mem, DATA_BASE + 0x2000, 100)));
    assert!(looks_random(&read_guest(&s.mem, DATA_BASE + 0x3000, 28)));
}

#[test]
fn large_requests_are_capped() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    add_chain(&vq, 0, &[(DATA_BASE, 0x2_0000, true)]);
    full_handshake(&mut s.transport, &[&vq]);
    run_until_idle(&mut s.em);
    assert_eq!(used_elem(&vq, 0), (0, MAX_BYTES_PER_REQUEST));
}

#[test]
fn buffer_outside_guest_memory_is_returned_empty() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    add_chain(&vq, 0, &[(0x1_0000_0000, 64, true)]);
    add_chain(&vq, 1, &[(DATA_BASE, 8, true)]);
    full_handshake(&mut s.transport, &[&vq]);
    run_until_idle(&mut s.em);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used_elem(&vq, 0), (0, 0));
    assert_eq!(used_elem(&vq, 1), (1, 8));
}

#[test]
fn activation_needs_exactly_one_queue() {
    let mut rng = Rng::new().unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let err = rng
        .activate(guest_memory(), interrupt, Vec::new())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            actual: 0
        }
    ));
    assert!(!rng.is_activated());
}

#[test]
fn reset_then_reactivate() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    full_handshake(&mut s.transport, &[&vq]);
    run_until_idle(&mut s.em);

    write_reg(&mut s.transport, 0x70, 0);
    assert!(!s.rng.lock().unwrap().is_activated());
    // The event loop deregisters the old kick.
    run_until_idle(&mut s.em);
    assert!(!s.rng.lock().unwrap().activation.has_retired_kicks());

    let vq = mock_queue(&s.mem, 0);
    assert_eq!(full_handshake(&mut s.transport, &[&vq]), RUNNING);
    run_until_idle(&mut s.em);
    add_chain(&vq, 0, &[(DATA_BASE, 32, true)]);
    write_reg(&mut s.transport, 0x50, 0);
    run_until_idle(&mut s.em);
    assert_eq!(used_elem(&vq, 0), (0, 32));
}

#[test]
fn reset_and_reactivate_before_the_event_loop_runs() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    full_handshake(&mut s.transport, &[&vq]);
    run_until_idle(&mut s.em);
    write_reg(&mut s.transport, 0x70, 0);
    let vq = mock_queue(&s.mem, 0);
    full_handshake(&mut s.transport, &[&vq]);
    add_chain(&vq, 0, &[(DATA_BASE, 32, true)]);
    write_reg(&mut s.transport, 0x50, 0);
    run_until_idle(&mut s.em);
    assert_eq!(used_idx(&vq), 1);
}

#[test]
fn state_round_trip() {
    let mut rng = Rng::new().unwrap();
    rng.set_acked_features(u64::MAX);
    let state = rng.save().unwrap();
    assert_eq!(state.acked_features, 1 << VIRTIO_F_VERSION_1);
    let json = serde_json::to_string(&state).unwrap();
    let loaded: RngState = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, state);
    assert_eq!(Rng::restore((), &loaded).unwrap().save().unwrap(), state);

    let bad = RngState { acked_features: 1 };
    assert!(matches!(
        Rng::restore((), &bad),
        Err(RngError::BadFeatures(_))
    ));
}

/// Snapshot a running device and bring it up in a "forked" VMM on the same memory: the
/// new instance continues the used ring where the old one stopped.
#[test]
fn snapshot_and_restore_a_running_device() {
    let mut s = setup();
    let vq = mock_queue(&s.mem, 0);
    add_chain(&vq, 0, &[(DATA_BASE, 16, true)]);
    full_handshake(&mut s.transport, &[&vq]);
    run_until_idle(&mut s.em);
    assert_eq!(used_idx(&vq), 1);

    let transport_json = serde_json::to_string(&s.transport.save().unwrap()).unwrap();
    let rng_json = serde_json::to_string(&s.rng.lock().unwrap().save().unwrap()).unwrap();

    let transport_state: MmioTransportState = serde_json::from_str(&transport_json).unwrap();
    let rng_state: RngState = serde_json::from_str(&rng_json).unwrap();
    let rng = Arc::new(Mutex::new(Rng::restore((), &rng_state).unwrap()));
    let mut transport = MmioTransport::restore(
        TransportArgs {
            mem: s.mem.clone(),
            device: rng.clone(),
            irq_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            kicks: None,
        },
        &transport_state,
    )
    .unwrap();
    let mut em = event_manager(rng.clone());
    run_until_idle(&mut em);
    assert_eq!(used_idx(&vq), 1, "nothing replayed");

    add_chain(&vq, 1, &[(DATA_BASE + 0x1000, 24, true)]);
    write_reg(&mut transport, 0x50, 0);
    run_until_idle(&mut em);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used_elem(&vq, 1), (1, 24));
}

#[test]
fn second_activation_without_reset_replaces_the_kick() {
    let mem = guest_memory();
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let mut em = event_manager(rng.clone());
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let vq = mock_queue(&mem, 0);
    let activate = |kick: &EventFd| {
        let queue = vq.create_queue().unwrap();
        let queues = vec![ActiveQueue {
            queue,
            kick: kick.try_clone().unwrap(),
        }];
        rng.lock()
            .unwrap()
            .activate(mem.clone(), interrupt.clone(), queues)
            .unwrap();
    };
    let first = EventFd::new(EFD_NONBLOCK).unwrap();
    activate(&first);
    run_until_idle(&mut em);
    let second = EventFd::new(EFD_NONBLOCK).unwrap();
    activate(&second);
    run_until_idle(&mut em);

    add_chain(&vq, 0, &[(DATA_BASE, 8, true)]);
    second.write(1).unwrap();
    run_until_idle(&mut em);
    assert_eq!(used_idx(&vq), 1);
    assert_eq!(interrupt.irq_evt().read().unwrap(), 1);
    // The first kick is no longer watched.
    first.write(1).unwrap();
    run_until_idle(&mut em);
    assert_eq!(first.read().unwrap(), 1);
}
