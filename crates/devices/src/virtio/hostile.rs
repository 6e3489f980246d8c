//! Hostile-guest tests (property-based fuzzing on stable Rust): real devices behind the
//! virtio-mmio transport, set up as a driver would, then their guest memory overwritten
//! with arbitrary bytes (every ring index, descriptor and chain garbage) and arbitrary
//! register accesses thrown at them, queue notifies included, with the event loop run
//! after each. Whatever the guest does, the device model must not panic, and every
//! event must end (the loop is run a bounded number of times and must go idle).

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use proptest::prelude::*;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::{Block, BlockConfig};
use super::mmio::test_utils::*;
use super::mmio::MmioTransport;
use super::net::Net;
use super::rng::Rng;
use super::vsock::{Vsock, VsockConfig};
use super::VirtioDevice;
use crate::BusDevice;

/// One guest access to the device's MMIO window.
#[derive(Clone, Debug)]
enum Access {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
}

fn access() -> impl Strategy<Value = Access> {
    let reg = 0u64..0x140;
    prop_oneof![
        (reg.clone(), prop::sample::select(vec![1usize, 2, 4, 8]))
            .prop_map(|(offset, len)| Access::Read { offset, len }),
        (reg, prop::collection::vec(any::<u8>(), 1..=8))
            .prop_map(|(offset, data)| Access::Write { offset, data }),
        // Plausible status values, so that sequences reset and re-activate devices.
        prop::sample::select(vec![0u32, 1, 3, 0xb, 0xf, 0x80]).prop_map(|v| Access::Write {
            offset: 0x70,
            data: v.to_le_bytes().to_vec()
        }),
        // Queue notifies, the doorbell a guest floods.
        (0u32..4).prop_map(|q| Access::Write {
            offset: 0x50,
            data: q.to_le_bytes().to_vec()
        }),
    ]
}

/// Fills `mem` with bytes from `seed` (xorshift: cheap, and the same for a seed).
fn scribble(mem: &crate::GuestMemory, seed: u64, len: usize) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; len];
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    mem.write_slice(&buf, GuestAddress(0)).unwrap();
}

/// Sets `dev` up as a driver would, scribbles over its memory, throws `accesses` at it.
fn torment<D>(dev: D, seed: u64, accesses: &[Access])
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let mem = guest_memory();
    let queues = dev.queue_max_sizes().len();
    let dev = Arc::new(Mutex::new(dev));
    let mut t = MmioTransport::new(
        mem.clone(),
        dev.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let vqs: Vec<_> = (0..queues as u64).map(|i| mock_queue(&mem, i)).collect();
    full_handshake(&mut t, &vqs.iter().collect::<Vec<_>>());
    let mut em = event_manager(dev.clone());
    // Every ring, descriptor and buffer is now garbage (the first 4 MiB), except that
    // each available ring claims a plausible number of new chains (a wild index is
    // refused whole by the queue, so the chains behind it would never be parsed).
    scribble(&mem, seed, 0x40_0000);
    for (i, vq) in vqs.iter().enumerate() {
        let pending = 1 + ((seed >> (4 * i)) % u64::from(TEST_QUEUE_SIZE)) as u16;
        mem.write_obj(pending, vq.avail_addr().unchecked_add(2))
            .unwrap();
        // Heads and links name descriptors of the table, and most descriptors point into
        // guest memory with up to 128 KiB (random ones almost never do, and the chains
        // behind them would never be read): chains of any shape whose buffers exist.
        let size = u64::from(TEST_QUEUE_SIZE);
        for e in 0..size {
            let at = vq.avail_addr().unchecked_add(4 + 2 * e);
            let head: u16 = mem.read_obj(at).unwrap();
            mem.write_obj(head % TEST_QUEUE_SIZE, at).unwrap();
        }
        for d in 0..size {
            let at = vq.desc_table_addr().unchecked_add(16 * d);
            let addr: u64 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(8)).unwrap();
            let next: u16 = mem.read_obj(at.unchecked_add(14)).unwrap();
            if d % 8 != 0 {
                mem.write_obj(addr & 0x3f_ffff, at).unwrap();
                mem.write_obj(len & 0x1_ffff, at.unchecked_add(8)).unwrap();
            }
            mem.write_obj(next % TEST_QUEUE_SIZE, at.unchecked_add(14))
                .unwrap();
        }
    }
    for a in accesses {
        match a {
            Access::Read { offset, len } => {
                let mut data = vec![0u8; *len];
                t.read(*offset, &mut data);
            }
            Access::Write { offset, data } => t.write(*offset, data),
        }
        let mut idle = false;
        for _ in 0..64 {
            if em.run_with_timeout(0).unwrap() == 0 {
                idle = true;
                break;
            }
        }
        assert!(idle, "the device kept the event loop busy after {a:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rng_survives_a_hostile_guest(seed in any::<u64>(), accesses in prop::collection::vec(access(), 1..40)) {
        torment(Rng::new().unwrap(), seed, &accesses);
    }

    #[test]
    fn block_survives_a_hostile_guest(seed in any::<u64>(), accesses in prop::collection::vec(access(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        torment(Block::new(BlockConfig { path: path.clone(), read_only: false }).unwrap(), seed, &accesses);
        // Whatever the guest wrote, the image kept its size.
        prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn net_survives_a_hostile_guest(
        seed in any::<u64>(),
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2048), 0..8),
        accesses in prop::collection::vec(access(), 1..40),
    ) {
        // A datagram backend (one frame per read and write, as a TAP) with frames from
        // the wire waiting for the guest's receive queue.
        let (ours, wire) = std::os::unix::net::UnixDatagram::pair().unwrap();
        wire.set_nonblocking(true).unwrap();
        for f in &frames {
            let _ = wire.send(f);
        }
        let dev = Net::with_backend(std::os::fd::OwnedFd::from(ours), true, Some([2, 0, 0, 0, 0, 1])).unwrap();
        torment(dev, seed, &accesses);
        // Whatever the guest's chains said, nothing larger than a frame went out
        // (virtio-net header + the largest frame).
        let mut buf = vec![0u8; 1 << 17];
        while let Ok(n) = wire.recv(&mut buf) {
            prop_assert!(n <= 12 + 65_550, "a {n}-byte frame went out");
        }
    }

    #[test]
    fn vsock_survives_a_hostile_guest(seed in any::<u64>(), accesses in prop::collection::vec(access(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(VsockConfig { cid: 3, uds: dir.path().join("v.sock") }).unwrap();
        torment(dev, seed, &accesses);
    }
}
