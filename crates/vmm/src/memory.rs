//! Guest RAM: one memfd holds all of it, mapped into the VMM and handed to KVM.
//!
//! The memfd is what fork shares: a child maps the same file `MAP_PRIVATE` and the kernel
//! does copy-on-write. Above 3 GiB, RAM is split around the 32-bit MMIO hole; both parts
//! live in the one memfd at consecutive offsets.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory as the devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The smallest guest this VMM boots, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
/// The largest guest this VMM boots, in MiB (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is out of range.
    #[error("guest memory of {mib} MiB is not possible: it must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    BadSize {
        /// Requested MiB.
        mib: u64,
    },
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// ftruncate of the memfd failed.
    #[error("cannot size the guest memory memfd to {bytes} bytes: {source}")]
    Truncate {
        /// Size asked for.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap of the memfd failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form a valid guest memory.
    #[error("invalid guest memory layout: {0}")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous piece of guest RAM: where it sits in the guest and in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the first byte in the memfd.
    pub file_offset: u64,
}

/// Splits `bytes` of RAM around the MMIO hole.
pub fn ram_ranges(bytes: u64) -> Vec<RamRange> {
    if bytes <= MMIO_HOLE_START {
        return vec![RamRange {
            guest_addr: 0,
            len: bytes,
            file_offset: 0,
        }];
    }
    vec![
        RamRange {
            guest_addr: 0,
            len: MMIO_HOLE_START,
            file_offset: 0,
        },
        RamRange {
            guest_addr: MMIO_HOLE_END,
            len: bytes - MMIO_HOLE_START,
            file_offset: MMIO_HOLE_START,
        },
    ]
}

/// Guest RAM backed by one memfd.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    ranges: Vec<RamRange>,
    memory: GuestMemory,
}

impl GuestRam {
    /// Creates a memfd of `mib` MiB and maps it shared into the VMM.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
            return Err(MemoryError::BadSize { mib });
        }
        let bytes = mib << 20;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"forkvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(bytes)
            .map_err(|source| MemoryError::Truncate { bytes, source })?;
        let ranges = ram_ranges(bytes);
        let memory = map_ranges(&memfd, &ranges, libc::MAP_SHARED | libc::MAP_NORESERVE)?;
        Ok(Self {
            memfd,
            ranges,
            memory,
        })
    }

    /// The guest memory mapping.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The RAM ranges (guest address, length, memfd offset).
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The memfd holding all guest RAM.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// Maps each range of `file` with the given mmap flags.
pub fn map_ranges(
    file: &File,
    ranges: &[RamRange],
    flags: i32,
) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for r in ranges {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(clone, r.file_offset)),
            r.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(MemoryError::Mmap)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .expect("a RAM range ends below the top of the guest address space");
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn small_guests_are_one_range() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                guest_addr: 0,
                len: 256 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }

    #[test]
    fn writes_land_in_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(16).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        ram.memfd().read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
        assert_eq!(ram.size(), 16 << 20);
    }

    #[test]
    fn impossible_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(0),
            Err(MemoryError::BadSize { mib: 0 })
        ));
        assert!(matches!(
            GuestRam::new(u64::MAX >> 20),
            Err(MemoryError::BadSize { .. })
        ));
    }
}
