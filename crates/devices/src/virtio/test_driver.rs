//! A guest driver for device unit tests: split virtqueues in guest memory of their own
//! (descriptor table, then the available ring, then the used ring on the next page:
//! never overlapping, whatever the size), handed to a device activated directly (no
//! transport, no KVM). The net and vsock tests drive their devices with it.
//!
//! (virtio-queue's `MockSplitQueue`, used before, lays a 256-entry queue's available
//! ring over its used ring, so a test passing more than 128 chains through one queue
//! ran on a corrupted ring.)

use std::collections::HashMap;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, Interrupt, VirtioDevice};
use crate::GuestMemory;

/// Guest memory of a test driver.
pub(crate) const MEM_SIZE: usize = 16 << 20;
/// Where buffers are allocated from (the queues sit below, 64 KiB apart).
const BUF_BASE: u64 = 0x10_0000;

/// The driver's side of one split virtqueue.
pub(crate) struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    last_used: u16,
    /// Head descriptor index to the buffers of its chain.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl DriverQueue {
    /// A queue of `size` entries at `base` (in zeroed memory); it takes
    /// [`DriverQueue::span`] bytes.
    pub(crate) fn new(mem: &GuestMemory, base: u64, size: u16) -> (Self, Queue) {
        let (desc, avail, used) = Self::layout(base, size);
        let mut queue = Queue::new(size).expect("queue size");
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem), "the test queue's layout is invalid");
        let dq = DriverQueue {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            last_used: 0,
            chains: HashMap::new(),
        };
        (dq, queue)
    }

    /// Where a queue of `size` entries at `base` has its descriptor table, available
    /// ring and used ring.
    fn layout(base: u64, size: u16) -> (u64, u64, u64) {
        let size = u64::from(size);
        let desc = base;
        let avail = desc + 16 * size;
        // flags, idx, the ring, used_event
        let used = (avail + 4 + 2 * size + 2).next_multiple_of(4096);
        (desc, avail, used)
    }

    /// Bytes a queue of `size` entries takes.
    pub(crate) fn span(size: u16) -> u64 {
        let (_, _, used) = Self::layout(0, size);
        used + 4 + 8 * u64::from(size) + 2
    }

    /// Makes a chain of `(addr, len, device_writable)` buffers available.
    pub(crate) fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i == bufs.len() - 1;
            let mut flags = if writable { 2u16 } else { 0 };
            if !last {
                flags |= 1;
            }
            let next = (idx + 1) % self.size;
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let avail_idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(avail_idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        self.chains
            .insert(head, bufs.iter().map(|&(a, l, _)| (a, l)).collect());
        head
    }

    /// The next used element: the bytes the device reported, read back from the chain.
    pub(crate) fn pop_used(&mut self, mem: &GuestMemory) -> Option<Vec<u8>> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if used_idx == self.last_used {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        let bufs = self.chains.remove(&(id as u16)).expect("known chain");
        let mut out = Vec::new();
        let mut left = len as usize;
        for (addr, blen) in bufs {
            let n = left.min(blen as usize);
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend(b);
            left -= n;
        }
        Some(out)
    }
}

/// The guest side of an activated device: its memory, its interrupt, its queues' kicks
/// and an allocator for buffers.
pub(crate) struct Driver {
    pub mem: GuestMemory,
    pub irq: Arc<Interrupt>,
    pub kicks: Vec<EventFd>,
    bump: u64,
}

impl Driver {
    /// Activates `dev` (every feature it offers accepted) with one fresh queue per
    /// queue it has; returns the driver and the driver's side of each queue.
    pub(crate) fn activate(dev: &mut dyn VirtioDevice) -> (Driver, Vec<DriverQueue>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut kicks = Vec::new();
        let mut drivers = Vec::new();
        let mut queues = Vec::new();
        for (i, &size) in dev.queue_max_sizes().to_vec().iter().enumerate() {
            assert!(DriverQueue::span(size) <= 0x1_0000, "queue {i} too large");
            let (dq, queue) = DriverQueue::new(&mem, 0x1_0000 * i as u64, size);
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(kick.try_clone().unwrap());
            drivers.push(dq);
            queues.push(ActiveQueue { queue, kick });
        }
        dev.set_acked_features(dev.avail_features());
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
        assert!(dev.is_activated());
        let driver = Driver {
            mem,
            irq,
            kicks,
            bump: BUF_BASE,
        };
        (driver, drivers)
    }

    /// `len` bytes of guest memory for a buffer.
    pub(crate) fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.bump;
        self.bump += u64::from(len).next_multiple_of(16);
        assert!(self.bump < MEM_SIZE as u64, "test ran out of guest memory");
        addr
    }

    /// Makes `n` device-writable buffers of `len` bytes available on `queue`.
    pub(crate) fn post_buffers(&mut self, queue: &mut DriverQueue, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.alloc(len);
            queue.add_chain(&self.mem, &[(addr, len, true)]);
        }
    }
}
