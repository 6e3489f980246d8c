//! Tests of virtio-blk, driven through the transport and an event loop as the VMM runs it,
//! against temporary image files.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::mmio::test_utils::*;
use crate::virtio::mmio::{MmioTransport, TransportArgs};
use crate::GuestMemory;

const SECTORS: u64 = 64;
const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x3_0000;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Status byte value meaning "the device did not write it".
const UNTOUCHED: u8 = 0xee;

/// Byte `i` of sector `s` of the test image.
fn pattern_byte(s: u64, i: usize) -> u8 {
    (s as u8).wrapping_mul(31) ^ (i as u8)
}

fn image() -> NamedTempFile {
    let mut file = NamedTempFile::new().unwrap();
    for s in 0..SECTORS {
        let sector: Vec<u8> = (0..512).map(|i| pattern_byte(s, i)).collect();
        file.write_all(&sector).unwrap();
    }
    file.flush().unwrap();
    file
}

fn file_bytes(file: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    std::fs::read(file.path()).unwrap()[offset as usize..offset as usize + len].to_vec()
}

struct Harness<'m> {
    mem: &'m GuestMemory,
    blk: Arc<Mutex<Block>>,
    transport: MmioTransport,
    em: TestEventManager,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemory, file: &NamedTempFile, read_only: bool) -> Self {
        let blk = Block::new(BlockConfig {
            path: file.path().to_path_buf(),
            read_only,
        })
        .unwrap();
        let blk = Arc::new(Mutex::new(blk));
        let transport = MmioTransport::new(
            mem.clone(),
            blk.clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        let em = event_manager(blk.clone());
        Self {
            mem,
            blk,
            transport,
            em,
        }
    }

    /// Driver handshake on `vq` and the first event-loop turn.
    fn start(&mut self, vq: &MockSplitQueue<'_, GuestMemory>) {
        assert_eq!(full_handshake(&mut self.transport, &[vq]), 0xf);
        run_until_idle(&mut self.em);
    }

    fn write_header(&self, kind: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    }

    /// Submits `bufs` as one chain, kicks, runs the loop. Returns (used len, status byte).
    fn submit(&mut self, vq: &MockSplitQueue<'_, GuestMemory>, bufs: &[Buf]) -> (u32, u8) {
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        let before = used_idx(vq);
        add_chain(vq, 0, bufs);
        write_reg(&mut self.transport, 0x50, 0);
        run_until_idle(&mut self.em);
        assert_eq!(
            used_idx(vq),
            before + 1,
            "the chain must always be returned"
        );
        let (head, len) = used_elem(vq, before as usize);
        assert_eq!(head, 0);
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    /// A request with a header, one data buffer and a status byte.
    fn request(
        &mut self,
        vq: &MockSplitQueue<'_, GuestMemory>,
        kind: u32,
        sector: u64,
        data_len: u32,
        data_writable: bool,
    ) -> (u32, u8) {
        self.write_header(kind, sector);
        self.submit(
            vq,
            &[
                (HDR, 16, false),
                (DATA, data_len, data_writable),
                (STATUS, 1, true),
            ],
        )
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

#[test]
fn reads_a_known_pattern_at_a_sector() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    let (len, status) = h.request(&vq, VIRTIO_BLK_T_IN, 5, 1024, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1024 + 1);
    assert_eq!(h.guest(DATA, 1024), file_bytes(&file, 5 * 512, 1024));
    assert_eq!(h.transport.interrupt().irq_evt().read().unwrap(), 1);
}

#[test]
fn data_and_status_may_share_descriptors() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    // Header split over two descriptors; the status byte is the last byte of the data
    // buffer.
    h.write_header(VIRTIO_BLK_T_IN, 9);
    let second = DATA + 0x4000;
    let sector = h.guest(HDR + 8, 8);
    h.mem
        .write_slice(&sector, GuestAddress(HDR + 0x800))
        .unwrap();
    let (len, _) = h.submit(
        &vq,
        &[
            (HDR, 8, false),
            (HDR + 0x800, 8, false),
            (DATA, 512, true),
            (second, 513, true),
        ],
    );
    assert_eq!(len, 1025);
    assert_eq!(h.guest(second + 512, 1), [VIRTIO_BLK_S_OK as u8]);
    assert_eq!(h.guest(DATA, 512), file_bytes(&file, 9 * 512, 512));
    assert_eq!(h.guest(second, 512), file_bytes(&file, 10 * 512, 512));
}

#[test]
fn writes_land_in_the_file() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    h.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    let (len, status) = h.request(&vq, VIRTIO_BLK_T_OUT, 3, 1024, false);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1);
    assert_eq!(file_bytes(&file, 3 * 512, 1024), vec![0xab; 1024]);
    assert_eq!(
        file_bytes(&file, 5 * 512, 512),
        (0..512).map(|i| pattern_byte(5, i)).collect::<Vec<_>>()
    );

    let (_, status) = h.request(&vq, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn read_only_image_rejects_writes() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, true);
    assert_ne!(
        h.blk.lock().unwrap().avail_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let (len, status) = h.request(&vq, VIRTIO_BLK_T_OUT, 0, 512, false);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(len, 1);
    assert_eq!(
        file_bytes(&file, 0, 512),
        (0..512).map(|i| pattern_byte(0, i)).collect::<Vec<_>>()
    );
    // Reads still work.
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, 1, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn requests_past_the_end_fail() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, SECTORS - 1, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8, "last sector is readable");
    let (len, status) = h.request(&vq, VIRTIO_BLK_T_IN, SECTORS - 1, 1024, true);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR as u8));
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_OUT, SECTORS, 512, false);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, u64::MAX, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "sector * 512 overflows");
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, u64::MAX / 512, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "offset + len overflows");
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), SECTORS * 512);
}

#[test]
fn get_id_and_unsupported_requests() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);

    let (len, status) = h.request(&vq, VIRTIO_BLK_T_GET_ID, 0, 20, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 21);
    let name = file.path().file_name().unwrap().as_encoded_bytes();
    let n = name.len().min(20);
    assert_eq!(&h.guest(DATA, n)[..], &name[..n]);

    let (len, status) = h.request(&vq, VIRTIO_BLK_T_DISCARD, 0, 16, false);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_UNSUPP as u8));
    let (_, status) = h.request(&vq, 0xdead, 0, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn malformed_chains_are_handled() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);
    let status_ioerr = (1, VIRTIO_BLK_S_IOERR as u8);

    // Header too short.
    h.write_header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.submit(&vq, &[(HDR, 8, false), (STATUS, 1, true)]),
        status_ioerr
    );
    // No status byte: nothing can be reported, the chain is returned empty.
    assert_eq!(
        h.submit(&vq, &[(HDR, 16, false), (DATA, 512, false)]),
        (0, UNTOUCHED)
    );
    assert_eq!(
        h.submit(&vq, &[(HDR, 16, false), (STATUS, 0, true)]),
        (0, UNTOUCHED)
    );
    // Read into a device-readable buffer.
    assert_eq!(h.request(&vq, VIRTIO_BLK_T_IN, 0, 512, false), status_ioerr);
    // Write from a device-writable buffer.
    assert_eq!(h.request(&vq, VIRTIO_BLK_T_OUT, 0, 512, true), status_ioerr);
    // Header in a device-writable buffer.
    assert_eq!(
        h.submit(&vq, &[(HDR, 16, true), (STATUS, 1, true)]),
        status_ioerr
    );
    // Data not a whole number of sectors.
    assert_eq!(h.request(&vq, VIRTIO_BLK_T_IN, 0, 100, true), status_ioerr);
    // Header and data outside guest memory.
    assert_eq!(
        h.submit(&vq, &[(0x1_0000_0000, 16, false), (STATUS, 1, true)]),
        status_ioerr
    );
    h.write_header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.submit(
            &vq,
            &[
                (HDR, 16, false),
                (0x1_0000_0000, 512, true),
                (STATUS, 1, true)
            ]
        ),
        status_ioerr
    );
    // Status byte outside guest memory.
    assert_eq!(
        h.submit(&vq, &[(HDR, 16, false), (0x1_0000_0000, 1, true)]),
        (0, UNTOUCHED)
    );
    // The device still works.
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, 2, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.guest(DATA, 512), file_bytes(&file, 2 * 512, 512));
}

#[test]
fn features_and_config_space() {
    let file = image();
    let blk = Block::new(BlockConfig {
        path: file.path().to_path_buf(),
        read_only: false,
    })
    .unwrap();
    let features = blk.avail_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(blk.device_type(), device_type::BLOCK);
    assert_eq!(blk.capacity(), SECTORS);

    let mut capacity = [0u8; 8];
    blk.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    let mut seg_max = [0u8; 4];
    blk.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    let mut tail = [0xffu8; 4];
    blk.read_config(14, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    blk.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn missing_image_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-disk.img");
    let err = Block::new(BlockConfig {
        path: path.clone(),
        read_only: true,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains("no-such-disk.img"), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    let err = Block::new(BlockConfig {
        path: dir.path().to_path_buf(),
        read_only: true,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::IsDirectory { .. }), "{err}");
}

#[test]
fn state_round_trip() {
    let file = image();
    let mut blk = Block::new(BlockConfig {
        path: file.path().to_path_buf(),
        read_only: true,
    })
    .unwrap();
    blk.set_acked_features(u64::MAX);
    let state = blk.save().unwrap();
    assert_eq!(state.acked_features, blk.avail_features());
    assert_eq!(state.capacity, SECTORS);
    let json = serde_json::to_string(&state).unwrap();
    let loaded: BlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, state);
    let config = blk.config().clone();
    let restored = Block::restore(config.clone(), &loaded).unwrap();
    assert_eq!(restored.save().unwrap(), state);
    assert_eq!(restored.config(), &config);

    let mut bad = state.clone();
    bad.acked_features |= 1 << 3;
    assert!(matches!(
        Block::restore(config.clone(), &bad),
        Err(BlockError::BadFeatures(_))
    ));

    let mut bad = state.clone();
    bad.capacity += 1;
    assert!(matches!(
        Block::restore(config.clone(), &bad),
        Err(BlockError::CapacityChanged { .. })
    ));
}

#[test]
fn reset_drops_the_queue() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);
    assert_eq!(h.blk.lock().unwrap().queue_states().len(), 1);
    write_reg(&mut h.transport, 0x70, 0);
    run_until_idle(&mut h.em);
    let blk = h.blk.lock().unwrap();
    assert!(!blk.is_activated());
    assert!(blk.queue_states().is_empty());
    assert_eq!(blk.acked_features(), 0);
}

/// Snapshot a running disk and bring it up again on the same guest memory (a fork): the
/// restored device continues the ring and sees the same image.
#[test]
fn snapshot_and_restore_a_running_disk() {
    let file = image();
    let mem = guest_memory();
    let mut h = Harness::new(&mem, &file, false);
    let vq = mock_queue(&mem, 0);
    h.start(&vq);
    let (_, status) = h.request(&vq, VIRTIO_BLK_T_IN, 1, 512, true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);

    let transport_json = serde_json::to_string(&h.transport.save().unwrap()).unwrap();
    let blk_json = serde_json::to_string(&h.blk.lock().unwrap().save().unwrap()).unwrap();
    let config = h.blk.lock().unwrap().config().clone();
    drop(h);

    let blk_state: BlockState = serde_json::from_str(&blk_json).unwrap();
    let blk = Arc::new(Mutex::new(Block::restore(config, &blk_state).unwrap()));
    let mut h = Harness {
        mem: &mem,
        blk: blk.clone(),
        transport: MmioTransport::restore(
            TransportArgs {
                mem: mem.clone(),
                device: blk.clone(),
                irq_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
                kicks: None,
            },
            &serde_json::from_str(&transport_json).unwrap(),
        )
        .unwrap(),
        em: event_manager(blk),
    };
    run_until_idle(&mut h.em);
    assert_eq!(used_idx(&vq), 1, "nothing replayed");

    let (len, status) = h.request(&vq, VIRTIO_BLK_T_IN, 7, 512, true);
    assert_eq!((len, status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(h.guest(DATA, 512), file_bytes(&file, 7 * 512, 512));
}
