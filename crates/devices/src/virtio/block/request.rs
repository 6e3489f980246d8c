//! virtio-blk request execution: parses one descriptor chain (header, data, status byte)
//! and runs it synchronously against the image file.
//!
//! The chain is treated as a byte stream, as the spec asks (no assumption about how the
//! driver splits it into descriptors): the first 16 bytes are the device-readable header,
//! the last byte is the device-writable status, everything between is data.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// Size of a virtio-blk sector, whatever the image's real block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_SIZE: u64 = 16;
/// Largest bounce-buffer chunk copied between the image and guest memory at once.
const CHUNK: usize = 128 * 1024;

/// One contiguous piece of the chain's byte stream.
#[derive(Clone, Copy, Debug)]
struct Piece {
    addr: GuestAddress,
    len: usize,
    writable: bool,
}

/// The pieces of the chain covering stream bytes `[start, start + len)`.
fn pieces(descs: &[Descriptor], start: u64, len: u64) -> Vec<Piece> {
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for desc in descs {
        let d_start = pos;
        let d_end = pos + u64::from(desc.len());
        pos = d_end;
        let lo = start.max(d_start);
        let hi = end.min(d_end);
        if lo >= hi {
            continue;
        }
        // `lo - d_start` is within the descriptor, so it fits a u32.
        if let Some(addr) = desc.addr().0.checked_add(lo - d_start) {
            out.push(Piece {
                addr: GuestAddress(addr),
                len: (hi - lo) as usize,
                writable: desc.is_write_only(),
            });
        } else {
            // An address that wraps cannot be in guest memory; make the access fail.
            out.push(Piece {
                addr: GuestAddress(u64::MAX),
                len: (hi - lo) as usize,
                writable: desc.is_write_only(),
            });
        }
    }
    out
}

/// The image a request runs against.
pub(super) struct Disk<'a> {
    pub file: &'a File,
    pub read_only: bool,
    pub capacity_sectors: u64,
    pub id: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// Why a request failed (reported to the guest as a status byte, logged here).
enum Failure {
    /// The request is malformed or out of range.
    IoErr(&'static str),
    /// The host's file operation failed.
    Host(&'static str, std::io::Error),
    /// Unknown request type.
    Unsupported(u32),
}

/// Runs the request in `descs` and writes its status byte. Returns the number of bytes
/// written into the chain (the used length), 0 if the chain has nowhere to put a status.
pub(super) fn execute(
    mem: &GuestMemory,
    disk: &Disk<'_>,
    descs: &[Descriptor],
    buf: &mut Vec<u8>,
) -> u32 {
    let Some(last) = descs.last().filter(|d| d.is_write_only() && d.len() > 0) else {
        crate::guest_warn!("virtio-blk: chain has no device-writable status byte; dropping it");
        return 0;
    };
    let Some(status_addr) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        crate::guest_warn!("virtio-blk: status byte address overflows");
        return 0;
    };
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();

    let mut written: u64 = 0;
    let status = match run(mem, disk, descs, total, buf, &mut written) {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(Failure::IoErr(why)) => {
            crate::guest_warn!(why, "virtio-blk: request failed");
            VIRTIO_BLK_S_IOERR
        }
        Err(Failure::Host(op, e)) => {
            crate::guest_warn!(op, error = %e, "virtio-blk: image I/O failed");
            VIRTIO_BLK_S_IOERR
        }
        Err(Failure::Unsupported(kind)) => {
            crate::guest_warn!(kind, "virtio-blk: unsupported request type");
            VIRTIO_BLK_S_UNSUPP
        }
    };
    if let Err(e) = mem.write_obj(status as u8, GuestAddress(status_addr)) {
        crate::guest_warn!(error = %e, "virtio-blk: status byte outside guest memory");
        return 0;
    }
    // `written` is bounded by the chain length, which virtio-queue keeps under 4 GiB.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

fn run(
    mem: &GuestMemory,
    disk: &Disk<'_>,
    descs: &[Descriptor],
    total: u64,
    buf: &mut Vec<u8>,
    written: &mut u64,
) -> Result<(), Failure> {
    if total < HEADER_SIZE + 1 {
        return Err(Failure::IoErr(
            "chain too short for a header and a status byte",
        ));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    let mut at = 0;
    for piece in pieces(descs, 0, HEADER_SIZE) {
        if piece.writable {
            return Err(Failure::IoErr("header in a device-writable descriptor"));
        }
        mem.read_slice(&mut header[at..at + piece.len], piece.addr)
            .map_err(|_| Failure::IoErr("header outside guest memory"))?;
        at += piece.len;
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let data_len = total - HEADER_SIZE - 1;
    let data = pieces(descs, HEADER_SIZE, data_len);

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_write = kind == VIRTIO_BLK_T_OUT;
            if is_write && disk.read_only {
                return Err(Failure::IoErr("write to a read-only disk"));
            }
            // Reads need device-writable buffers, writes device-readable ones.
            if data.iter().any(|p| p.writable == is_write) {
                return Err(Failure::IoErr("data descriptor with the wrong direction"));
            }
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(Failure::IoErr("data length is not a multiple of 512"));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .filter(|off| {
                    off.checked_add(data_len)
                        .is_some_and(|end| end <= disk.capacity_sectors * SECTOR_SIZE)
                })
                .ok_or(Failure::IoErr("request past the end of the disk"))?;
            transfer(mem, disk.file, &data, offset, is_write, buf, written)
        }
        VIRTIO_BLK_T_FLUSH => disk.file.sync_all().map_err(|e| Failure::Host("fsync", e)),
        VIRTIO_BLK_T_GET_ID => {
            if data.iter().any(|p| !p.writable) {
                return Err(Failure::IoErr("GET_ID buffer is device-readable"));
            }
            let mut id: &[u8] = disk.id;
            for piece in data {
                let n = piece.len.min(id.len());
                if n == 0 {
                    break;
                }
                mem.write_slice(&id[..n], piece.addr)
                    .map_err(|_| Failure::IoErr("GET_ID buffer outside guest memory"))?;
                id = &id[n..];
                *written += n as u64;
            }
            Ok(())
        }
        other => Err(Failure::Unsupported(other)),
    }
}

/// Copies between the image at `offset` and the guest buffers `data`, through `buf`.
fn transfer(
    mem: &GuestMemory,
    file: &File,
    data: &[Piece],
    mut offset: u64,
    is_write: bool,
    buf: &mut Vec<u8>,
    written: &mut u64,
) -> Result<(), Failure> {
    for piece in data {
        let mut done = 0usize;
        while done < piece.len {
            let n = (piece.len - done).min(CHUNK);
            buf.resize(n, 0);
            let addr = piece
                .addr
                .0
                .checked_add(done as u64)
                .map(GuestAddress)
                .ok_or(Failure::IoErr("data buffer address overflows"))?;
            if is_write {
                mem.read_slice(&mut buf[..n], addr)
                    .map_err(|_| Failure::IoErr("data buffer outside guest memory"))?;
                file.write_all_at(&buf[..n], offset)
                    .map_err(|e| Failure::Host("pwrite", e))?;
            } else {
                file.read_exact_at(&mut buf[..n], offset)
                    .map_err(|e| Failure::Host("pread", e))?;
                mem.write_slice(&buf[..n], addr)
                    .map_err(|_| Failure::IoErr("data buffer outside guest memory"))?;
                *written += n as u64;
            }
            offset += n as u64;
            done += n;
        }
    }
    Ok(())
}
