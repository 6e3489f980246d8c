//! Tests of the virtio-mmio transport, driven through its registers as a guest would.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::test_utils::*;
use super::*;
use crate::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const RUNNING: u32 = ACK | DRV | FOK | DOK;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// A device-specific feature the test device offers (bit 3) and one in the high word.
const TEST_FEATURES: u64 = VERSION_1 | (1 << 3) | (1 << 40);

/// A device that records what the transport does to it.
struct TestDevice {
    max_sizes: Vec<u16>,
    acked: u64,
    config: Vec<u8>,
    active: Option<Vec<QueueState>>,
    activations: usize,
    resets: usize,
    fail_activate: bool,
    resettable: bool,
    report_queues: bool,
    /// Unused: this device overrides the life cycle to record what the transport does.
    activation: crate::virtio::activation::Activation,
}

impl TestDevice {
    fn new(queues: usize) -> Self {
        Self {
            max_sizes: vec![TEST_QUEUE_SIZE; queues],
            acked: 0,
            config: (0..32).collect(),
            active: None,
            activations: 0,
            resets: 0,
            fail_activate: false,
            resettable: true,
            report_queues: true,
            activation: crate::virtio::activation::Activation::new("test").unwrap(),
        }
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn avail_features(&self) -> u64 {
        TEST_FEATURES
    }
    fn activation(&self) -> &crate::virtio::activation::Activation {
        &self.activation
    }
    fn activation_mut(&mut self) -> &mut crate::virtio::activation::Activation {
        &mut self.activation
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        _interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::QueueCount {
                expected: 99,
                actual: queues.len(),
            });
        }
        self.activations += 1;
        self.active = Some(queues.iter().map(|q| q.queue.state()).collect());
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn queue_states(&self) -> Vec<QueueState> {
        match (&self.active, self.report_queues) {
            (Some(states), true) => states.clone(),
            _ => Vec::new(),
        }
    }
    fn reset(&mut self) -> bool {
        if !self.resettable {
            return false;
        }
        self.resets += 1;
        self.active = None;
        self.acked = 0;
        true
    }
}

fn transport_for(mem: &GuestMemory, dev: &Arc<Mutex<TestDevice>>) -> MmioTransport {
    MmioTransport::new(
        mem.clone(),
        dev.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap()
}

fn setup(queues: usize) -> (GuestMemory, Arc<Mutex<TestDevice>>, MmioTransport) {
    let mem = guest_memory();
    let dev = Arc::new(Mutex::new(TestDevice::new(queues)));
    let t = transport_for(&mem, &dev);
    (mem, dev, t)
}

#[test]
fn identification_registers() {
    let (_mem, _dev, mut t) = setup(2);
    assert_eq!(read_reg(&mut t, 0x00), 0x7472_6976);
    assert_eq!(&(read_reg(&mut t, 0x00)).to_le_bytes(), b"virt");
    assert_eq!(read_reg(&mut t, 0x04), 2);
    assert_eq!(read_reg(&mut t, 0x08), 42);
    assert_eq!(read_reg(&mut t, 0x0c), VENDOR_ID);
    assert_eq!(read_device_features(&mut t), TEST_FEATURES);
    write_reg(&mut t, 0x14, 7);
    assert_eq!(read_reg(&mut t, 0x10), 0, "feature words past 1 are empty");
    write_reg(&mut t, 0x30, 1);
    assert_eq!(read_reg(&mut t, 0x34), u32::from(TEST_QUEUE_SIZE));
    write_reg(&mut t, 0x30, 2);
    assert_eq!(read_reg(&mut t, 0x34), 0, "no queue 2: QueueNumMax 0");
    assert_eq!(read_reg(&mut t, 0xb0), u32::MAX, "no shared memory regions");
    assert_eq!(read_reg(&mut t, 0xfc), 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(t.queue_evts().len(), 2);
}

#[test]
fn handshake_activates_the_device() {
    let (mem, dev, mut t) = setup(2);
    let vq0 = mock_queue(&mem, 0);
    let vq1 = mock_queue(&mem, 1);

    // The driver also claims a feature the device does not offer: it is dropped.
    let status = negotiate(&mut t, TEST_FEATURES | (1 << 5));
    assert_eq!(status, ACK | DRV | FOK);
    assert_eq!(dev.lock().unwrap().acked, TEST_FEATURES);

    setup_queue(&mut t, 0, &vq0);
    setup_queue(&mut t, 1, &vq1);
    write_reg(&mut t, 0x30, 1);
    assert_eq!(read_reg(&mut t, 0x44), 1);
    assert!(!dev.lock().unwrap().is_activated());

    assert_eq!(driver_ok(&mut t), RUNNING);
    let dev = dev.lock().unwrap();
    assert_eq!(dev.activations, 1);
    let queues = dev.active.as_ref().unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[0].desc_table, vq0.desc_table_addr().0);
    assert_eq!(queues[0].avail_ring, vq0.avail_addr().0);
    assert_eq!(queues[1].used_ring, vq1.used_addr().0);
    assert_eq!(queues[1].size, TEST_QUEUE_SIZE);
    assert!(queues.iter().all(|q| q.ready));
}

#[test]
fn features_refused_without_version_1() {
    let (_mem, dev, mut t) = setup(1);
    let status = negotiate(&mut t, 1 << 3);
    assert_eq!(status, ACK | DRV, "FEATURES_OK must not stick");
    // DRIVER_OK cannot follow.
    write_reg(&mut t, 0x70, ACK | DRV | DOK);
    assert_eq!(read_reg(&mut t, 0x70), ACK | DRV);
    assert!(!dev.lock().unwrap().is_activated());
}

#[test]
fn out_of_order_status_writes_are_ignored() {
    let (mem, dev, mut t) = setup(1);
    write_reg(&mut t, 0x70, DRV);
    assert_eq!(read_reg(&mut t, 0x70), 0, "DRIVER before ACKNOWLEDGE");
    write_reg(&mut t, 0x70, ACK | DRV);
    assert_eq!(read_reg(&mut t, 0x70), 0, "two steps at once");
    write_reg(&mut t, 0x70, ACK);
    write_reg(&mut t, 0x70, ACK | FOK);
    assert_eq!(read_reg(&mut t, 0x70), ACK, "FEATURES_OK before DRIVER");
    write_reg(&mut t, 0x70, ACK | DRV);
    write_reg(&mut t, 0x70, ACK | DRV | DOK);
    assert_eq!(
        read_reg(&mut t, 0x70),
        ACK | DRV,
        "DRIVER_OK before FEATURES_OK"
    );
    write_reg(&mut t, 0x70, DRV);
    assert_eq!(
        read_reg(&mut t, 0x70),
        ACK | DRV,
        "clearing bits without reset"
    );
    write_reg(&mut t, 0x70, ACK | DRV | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(
        read_reg(&mut t, 0x70),
        ACK | DRV,
        "DEVICE_NEEDS_RESET is the device's"
    );

    // The driver may give up at any point.
    write_reg(&mut t, 0x70, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(read_reg(&mut t, 0x70), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
    // After FAILED only a reset helps.
    let vq = mock_queue(&mem, 0);
    write_reg(&mut t, 0x70, ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(read_reg(&mut t, 0x70), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
    write_reg(&mut t, 0x70, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    assert!(dev.lock().unwrap().is_activated());
}

#[test]
fn queue_and_feature_writes_respect_the_status() {
    let (mem, dev, mut t) = setup(1);
    let vq = mock_queue(&mem, 0);

    // Before DRIVER: features cannot be written.
    write_reg(&mut t, 0x20, VERSION_1 as u32);
    assert_eq!(dev.lock().unwrap().acked, 0);
    // Before FEATURES_OK: queues cannot be configured.
    write_reg(&mut t, 0x70, ACK);
    write_reg(&mut t, 0x70, ACK | DRV);
    setup_queue(&mut t, 0, &vq);
    assert_eq!(read_reg(&mut t, 0x44), 0);

    negotiate(&mut t, TEST_FEATURES);
    // After FEATURES_OK: features are frozen.
    write_reg(&mut t, 0x24, 0);
    write_reg(&mut t, 0x20, 0);
    assert_eq!(dev.lock().unwrap().acked, TEST_FEATURES);
    setup_queue(&mut t, 0, &vq);
    assert_eq!(driver_ok(&mut t), RUNNING);

    // After DRIVER_OK: queues are frozen.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x44, 0);
    write_reg(&mut t, 0x38, 2);
    assert_eq!(read_reg(&mut t, 0x44), 1);
    assert_eq!(t.save().unwrap().queues[0].size, TEST_QUEUE_SIZE);
}

#[test]
fn reset_returns_to_the_initial_state() {
    let (mem, dev, mut t) = setup(1);
    let vq = mock_queue(&mem, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    t.interrupt().signal_used_queue().unwrap();
    write_reg(&mut t, 0x50, 0);

    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(read_reg(&mut t, 0x60), 0, "interrupt status cleared");
    assert_eq!(read_reg(&mut t, 0x44), 0, "queue no longer ready");
    assert!(t.queue_evts()[0].read().is_err(), "stale kick drained");
    {
        let dev = dev.lock().unwrap();
        assert_eq!(dev.resets, 1);
        assert!(!dev.is_activated());
        assert_eq!(dev.acked, 0);
    }
    let state = t.save().unwrap();
    let pristine = SavedQueueState::from(Queue::new(TEST_QUEUE_SIZE).unwrap().state());
    assert_eq!(state.queues[0], pristine);

    // The driver can bring it up again.
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    assert_eq!(dev.lock().unwrap().activations, 2);
}

#[test]
fn reset_of_a_device_that_cannot_reset_leaves_it_failed() {
    let (mem, dev, mut t) = setup(1);
    dev.lock().unwrap().resettable = false;
    let vq = mock_queue(&mem, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), RUNNING | VIRTIO_CONFIG_S_FAILED);
    assert!(dev.lock().unwrap().is_activated());
}

#[test]
fn failed_activation_sets_device_needs_reset() {
    let (mem, dev, mut t) = setup(1);
    dev.lock().unwrap().fail_activate = true;
    let vq = mock_queue(&mem, 0);
    let status = full_handshake(&mut t, &[&vq]);
    assert_eq!(status, RUNNING | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(read_reg(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(t.interrupt().irq_evt().read().unwrap(), 1);
    assert!(!dev.lock().unwrap().is_activated());

    // Reset clears it; a working activation follows.
    dev.lock().unwrap().fail_activate = false;
    write_reg(&mut t, 0x70, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
}

#[test]
fn unusable_queue_sets_device_needs_reset() {
    let (mem, dev, mut t) = setup(1);
    let vq = mock_queue(&mem, 0);
    negotiate(&mut t, TEST_FEATURES);
    setup_queue(&mut t, 0, &vq);
    // Move the used ring past the end of guest memory.
    write_reg(&mut t, 0xa4, 1);
    assert_eq!(driver_ok(&mut t), RUNNING | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert!(!dev.lock().unwrap().is_activated());
}

#[test]
fn misaligned_or_oversized_queue_values_are_ignored() {
    let (mem, _dev, mut t) = setup(1);
    let vq = mock_queue(&mem, 0);
    negotiate(&mut t, TEST_FEATURES);
    setup_queue(&mut t, 0, &vq);
    write_reg(&mut t, 0x80, 0x1001); // descriptor table must be 16-byte aligned
    write_reg(&mut t, 0x38, 1 << 20); // does not fit a u16
    write_reg(&mut t, 0x38, 3); // not a power of two
    write_reg(&mut t, 0x38, 64); // above QueueNumMax
    let q = t.save().unwrap().queues[0];
    assert_eq!(q.desc_table, vq.desc_table_addr().0);
    assert_eq!(q.size, TEST_QUEUE_SIZE);
    // Out-of-range queue selectors are harmless.
    write_reg(&mut t, 0x30, 9);
    setup_queue(&mut t, 9, &vq);
    assert_eq!(read_reg(&mut t, 0x44), 0);
}

#[test]
fn queue_notify_kicks_the_eventfd() {
    let (_mem, _dev, mut t) = setup(2);
    write_reg(&mut t, 0x50, 1);
    write_reg(&mut t, 0x50, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 2);
    assert!(t.queue_evts()[0].read().is_err(), "queue 0 not kicked");
    write_reg(&mut t, 0x50, 7); // no such queue
}

/// Kick eventfds made ahead (registered with KVM by a warm VM process) are the ones a
/// notify signals, in a new transport and in a restored one; another number than the
/// device's queues is refused.
#[test]
fn kicks_made_ahead_are_the_queues_eventfds() {
    let mem = guest_memory();
    let ahead = |n: usize| -> (Vec<EventFd>, Vec<EventFd>) {
        let kicks: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kept = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
        (kicks, kept)
    };
    let dev = Arc::new(Mutex::new(TestDevice::new(2)));
    let (kicks, kept) = ahead(2);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::with_kicks(mem.clone(), dev, irq, Some(kicks)).unwrap();
    write_reg(&mut t, 0x50, 1);
    assert_eq!(kept[1].read().unwrap(), 1);
    assert!(kept[0].read().is_err(), "queue 0 not kicked");

    let saved = t.save().unwrap();
    let (kicks, kept) = ahead(2);
    let args = |kicks| TransportArgs {
        mem: mem.clone(),
        device: Arc::new(Mutex::new(TestDevice::new(2))),
        irq_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        kicks: Some(kicks),
    };
    let mut restored = MmioTransport::restore(args(kicks), &saved).unwrap();
    write_reg(&mut restored, 0x50, 0);
    assert_eq!(kept[0].read().unwrap(), 1);

    let (kicks, _) = ahead(3);
    assert!(matches!(
        MmioTransport::restore(args(kicks), &saved),
        Err(MmioError::Kicks {
            given: 3,
            queues: 2
        })
    ));
}

#[test]
fn interrupt_status_and_ack() {
    let (_mem, _dev, mut t) = setup(1);
    let interrupt = t.interrupt();
    interrupt.signal_used_queue().unwrap();
    interrupt.signal_config_change().unwrap();
    assert_eq!(interrupt.irq_evt().read().unwrap(), 2);
    assert_eq!(
        read_reg(&mut t, 0x60),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    write_reg(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(read_reg(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn config_space_is_delegated_to_the_device() {
    let (_mem, dev, mut t) = setup(1);
    let mut byte = [0u8; 1];
    t.read(0x105, &mut byte);
    assert_eq!(byte, [5]);
    assert_eq!(read_reg(&mut t, 0x104), u32::from_le_bytes([4, 5, 6, 7]));
    let mut wide = [0u8; 8];
    t.read(0x100 + 28, &mut wide);
    assert_eq!(wide, [28, 29, 30, 31, 0, 0, 0, 0]);

    // Config writes need DRIVER.
    t.write(0x100, &[0xaa]);
    assert_eq!(dev.lock().unwrap().config[0], 0);
    write_reg(&mut t, 0x70, ACK);
    write_reg(&mut t, 0x70, ACK | DRV);
    t.write(0x100, &[0xaa, 0xbb]);
    assert_eq!(dev.lock().unwrap().config[..2], [0xaa, 0xbb]);
}

#[test]
fn bad_accesses_do_not_panic() {
    let (mem, dev, mut t) = setup(1);
    for offset in [0x00, 0x02, 0x10, 0x13, 0x50, 0x70, 0xfc, 0xfe, 0x200] {
        // Every width but 4 is wrong for a register; the config space takes any width.
        for len in [0usize, 1, 2, 3, 8] {
            let mut data = vec![0xffu8; len];
            t.read(offset, &mut data);
            if offset < 0x100 {
                assert!(
                    data.iter().all(|&b| b == 0),
                    "bad read at {offset:#x}/{len}"
                );
            }
            t.write(offset, &data);
        }
    }
    for offset in [0x18, 0x28, 0x3c, 0x40, 0x48, 0xc0, 0xf0, u64::MAX - 3] {
        read_reg(&mut t, offset);
        write_reg(&mut t, offset, 0xdead_beef);
    }
    // Read-only registers ignore writes.
    write_reg(&mut t, 0x00, 0);
    write_reg(&mut t, 0x60, 0xff);
    assert_eq!(read_reg(&mut t, 0x00), MMIO_MAGIC_VALUE);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    // The transport still works.
    let vq = mock_queue(&mem, 0);
    write_reg(&mut t, 0x70, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    assert!(dev.lock().unwrap().is_activated());
}

#[test]
fn state_round_trips_through_serde() {
    let (mem, dev, mut t) = setup(2);
    let vq0 = mock_queue(&mem, 0);
    let vq1 = mock_queue(&mem, 1);
    negotiate(&mut t, TEST_FEATURES);
    setup_queue(&mut t, 0, &vq0);
    setup_queue(&mut t, 1, &vq1);
    assert_eq!(driver_ok(&mut t), RUNNING);
    // The device made progress on queue 1; the guest left an interrupt unacknowledged.
    dev.lock().unwrap().active.as_mut().unwrap()[1].next_avail = 5;
    dev.lock().unwrap().active.as_mut().unwrap()[1].next_used = 4;
    t.interrupt().signal_used_queue().unwrap();
    write_reg(&mut t, 0x30, 1);
    write_reg(&mut t, 0x14, 1);

    let state = t.save().unwrap();
    assert_eq!(state.device_status, RUNNING);
    assert_eq!(state.acked_features, TEST_FEATURES);
    assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
    assert_eq!(state.queues[1].next_avail, 5);
    assert_eq!(state.queue_select, 1);
    assert_eq!(state.features_select, 1);

    let json = serde_json::to_string(&state).unwrap();
    let loaded: MmioTransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, state);

    let dev2 = Arc::new(Mutex::new(TestDevice::new(2)));
    let mut t2 = MmioTransport::restore(
        TransportArgs {
            mem: mem.clone(),
            device: dev2.clone(),
            irq_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            kicks: None,
        },
        &loaded,
    )
    .unwrap();
    // The pending interrupt is raised again on request (by the VMM, once the
    // interrupt controllers and vCPUs are restored).
    t2.interrupt().resignal_pending().unwrap();
    assert_eq!(t2.interrupt().irq_evt().read().unwrap(), 1);
    {
        let d = dev2.lock().unwrap();
        assert_eq!(d.activations, 1, "restore re-activates a running device");
        assert_eq!(d.acked, TEST_FEATURES);
        let queues = d.active.as_ref().unwrap();
        assert_eq!(queues[1].next_avail, 5);
        assert_eq!(queues[1].next_used, 4);
    }
    assert_eq!(t2.save().unwrap(), state);
    assert_eq!(read_reg(&mut t2, 0x70), RUNNING);
    assert_eq!(read_reg(&mut t2, 0x60), VIRTIO_MMIO_INT_VRING);
    assert_eq!(read_reg(&mut t2, 0x10), (TEST_FEATURES >> 32) as u32);

    // A transport saved mid-negotiation restores without activating.
    let (_, _, mut t3) = setup(2);
    negotiate(&mut t3, TEST_FEATURES);
    let mid = t3.save().unwrap();
    let dev4 = Arc::new(Mutex::new(TestDevice::new(2)));
    let t4 = MmioTransport::restore(
        TransportArgs {
            mem,
            device: dev4.clone(),
            irq_evt: EventFd::new(0).unwrap(),
            kicks: None,
        },
        &mid,
    )
    .unwrap();
    assert_eq!(t4.device_status(), ACK | DRV | FOK);
    assert!(!dev4.lock().unwrap().is_activated());
    assert_eq!(mid.interrupt_status, 0);
}

#[test]
fn restore_rejects_invalid_states() {
    let (mem, _dev, mut t) = setup(1);
    let vq = mock_queue(&mem, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    let good = t.save().unwrap();

    let try_restore = |state: &MmioTransportState| {
        let dev = Arc::new(Mutex::new(TestDevice::new(1)));
        MmioTransport::restore(
            TransportArgs {
                mem: mem.clone(),
                device: dev,
                irq_evt: EventFd::new(0).unwrap(),
                kicks: None,
            },
            state,
        )
    };
    assert!(try_restore(&good).is_ok());

    let mut bad = good.clone();
    bad.queues.push(bad.queues[0]);
    assert!(matches!(try_restore(&bad), Err(MmioError::InvalidState(_))));

    let mut bad = good.clone();
    bad.queues[0].desc_table += 8; // misaligned
    assert!(matches!(
        try_restore(&bad),
        Err(MmioError::Queue { index: 0, .. })
    ));

    let mut bad = good.clone();
    bad.queues[0].size = 3; // not a power of two
    assert!(matches!(try_restore(&bad), Err(MmioError::Queue { .. })));

    let mut bad = good.clone();
    bad.queues[0].max_size = 32; // not what the device offers
    assert!(matches!(try_restore(&bad), Err(MmioError::InvalidState(_))));

    let mut bad = good.clone();
    bad.device_status = ACK | DOK; // unreachable
    assert!(matches!(try_restore(&bad), Err(MmioError::InvalidState(_))));

    let mut bad = good.clone();
    bad.device_status = 0x100;
    assert!(matches!(try_restore(&bad), Err(MmioError::InvalidState(_))));

    let mut bad = good.clone();
    bad.acked_features |= 1 << 50; // never offered
    assert!(matches!(try_restore(&bad), Err(MmioError::InvalidState(_))));

    let mut bad = good.clone();
    bad.queues[0].used_ring = 0x1_0000_0000; // outside guest memory
    assert!(matches!(try_restore(&bad), Err(MmioError::Activate(_))));

    let json = serde_json::to_string(&good)
        .unwrap()
        .replace("\"ready\":true", "\"ready\":7");
    assert!(serde_json::from_str::<MmioTransportState>(&json).is_err());
}

#[test]
fn save_fails_if_an_active_device_hides_its_queues() {
    let (mem, dev, mut t) = setup(1);
    dev.lock().unwrap().report_queues = false;
    let vq = mock_queue(&mem, 0);
    assert_eq!(full_handshake(&mut t, &[&vq]), RUNNING);
    assert!(matches!(
        t.save(),
        Err(MmioError::QueueStates {
            expected: 1,
            actual: 0
        })
    ));
}
