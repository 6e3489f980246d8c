//! Test helpers: a mock driver for the virtio-mmio transport, descriptor-chain builders
//! and an event loop for the devices.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::MmioTransport;
use crate::{BusDevice, GuestMemory};

/// Where the test queues live (the first one; each next one 0x1000 further).
pub const QUEUE_BASE: u64 = 0x1_0000;
/// Where test data buffers live.
pub const DATA_BASE: u64 = 0x10_0000;
/// Size of the test queues.
pub const TEST_QUEUE_SIZE: u16 = 16;

/// 4 MiB of guest memory at 0.
pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// A mock driver-side queue number `index` in `mem`.
pub fn mock_queue(mem: &GuestMemory, index: u64) -> MockSplitQueue<'_, GuestMemory> {
    MockSplitQueue::create(
        mem,
        GuestAddress(QUEUE_BASE + index * 0x1000),
        TEST_QUEUE_SIZE,
    )
}

/// 32-bit register read.
pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// 32-bit register write.
pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// The device's 64-bit feature word, read through the selector.
pub fn read_device_features(t: &mut MmioTransport) -> u64 {
    write_reg(t, 0x14, 0);
    let low = read_reg(t, 0x10);
    write_reg(t, 0x14, 1);
    let high = read_reg(t, 0x10);
    (u64::from(high) << 32) | u64::from(low)
}

/// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK. Returns the status read back.
pub fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    write_reg(t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write_reg(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, features as u32);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, (features >> 32) as u32);
    write_reg(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    read_reg(t, 0x70)
}

/// Programs queue `index` with the rings of `vq` and marks it ready.
pub fn setup_queue(t: &mut MmioTransport, index: u32, vq: &MockSplitQueue<'_, GuestMemory>) {
    let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    write_reg(t, 0x30, index);
    write_reg(t, 0x38, u32::from(TEST_QUEUE_SIZE));
    let (lo, hi) = split(vq.desc_table_addr());
    write_reg(t, 0x80, lo);
    write_reg(t, 0x84, hi);
    let (lo, hi) = split(vq.avail_addr());
    write_reg(t, 0x90, lo);
    write_reg(t, 0x94, hi);
    let (lo, hi) = split(vq.used_addr());
    write_reg(t, 0xa0, lo);
    write_reg(t, 0xa4, hi);
    write_reg(t, 0x44, 1);
}

/// Sets DRIVER_OK on top of the current status; returns the status read back.
pub fn driver_ok(t: &mut MmioTransport) -> u32 {
    let status = read_reg(t, 0x70);
    write_reg(t, 0x70, status | VIRTIO_CONFIG_S_DRIVER_OK);
    read_reg(t, 0x70)
}

/// The whole handshake for a device with `queues`: negotiate the device's features, set
/// up every queue, DRIVER_OK. Returns the final status.
pub fn full_handshake(t: &mut MmioTransport, queues: &[&MockSplitQueue<'_, GuestMemory>]) -> u32 {
    let features = read_device_features(t);
    negotiate(t, features);
    for (i, vq) in queues.iter().enumerate() {
        setup_queue(t, i as u32, vq);
    }
    driver_ok(t)
}

/// One buffer of a chain: guest address, length, device-writable.
pub type Buf = (u64, u32, bool);

/// Writes `bufs` as one chain at descriptor-table slot `first` and makes it available.
pub fn add_chain(vq: &MockSplitQueue<'_, GuestMemory>, first: u16, bufs: &[Buf]) {
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let last = i + 1 == bufs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&descs, first).unwrap();
}

/// Used ring entry `i`: (descriptor head, length).
pub fn used_elem(vq: &MockSplitQueue<'_, GuestMemory>, i: usize) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(i).unwrap().load();
    (elem.id(), elem.len())
}

/// Number of entries the device put in the used ring.
pub fn used_idx(vq: &MockSplitQueue<'_, GuestMemory>) -> u16 {
    vq.used().idx().load()
}

/// The event loop a device runs on.
pub type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// An event manager with `subscriber` added (its `init` has run).
pub fn event_manager(subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>) -> TestEventManager {
    let mut em = TestEventManager::new().unwrap();
    em.add_subscriber(subscriber);
    em
}

/// Runs the event loop until no event is pending.
pub fn run_until_idle(em: &mut TestEventManager) {
    for _ in 0..16 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("event loop did not go idle");
}
