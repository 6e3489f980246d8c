//! Guest RAM: one memfd holds all of it, mapped into the VMM and handed to KVM.
//!
//! The memfd is what fork shares. Until the first fork the VM maps it `MAP_SHARED` and
//! owns it. At a fork the memfd is *frozen*: the parent remaps it `MAP_PRIVATE` in place
//! (same addresses, so KVM's memory slots and the devices' views stay valid) and seals
//! it against writes; parent and children then share it copy-on-write through the
//! kernel, and each pays only for the pages it writes.
//!
//! A VM that has run privately since its last freeze (a forked parent, or a child)
//! forks again by adding a layer: its private pages (found in /proc/self/pagemap) are
//! written into a new sparse memfd, an *overlay*, which is sealed and which the VM
//! remaps over those pages. A child maps the base and then each overlay's extents, in
//! order, all `MAP_PRIVATE`. Nothing is copied but the pages written since the last
//! fork.
//!
//! Above 3 GiB, RAM is split around the 32-bit MMIO hole; both parts live in the one
//! memfd at consecutive offsets.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory as the devices see it (the device model's alias).
pub use forkvm_devices::GuestMemory;

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
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// ftruncate of the memfd failed.
    #[error("cannot size the guest memory memfd to {bytes} bytes")]
    Truncate {
        /// Size asked for.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap of the memfd failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form a valid guest memory.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// Remapping, sealing or scanning guest memory failed.
    #[error("cannot {what} guest memory")]
    Os {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A memory layout received from elsewhere does not fit the memory files.
    #[error("invalid memory layout: {0}")]
    BadLayout(String),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |source| MemoryError::Os { what, source }
}

const PAGE: u64 = 4096;

/// A run of pages, by offset in the memory files (the same offsets in every layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// Byte offset of the first page.
    pub offset: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// A layer above the base: a sparse memfd holding the pages a VM wrote between two
/// forks, at their offsets.
#[derive(Debug)]
pub struct Overlay {
    /// The sealed memfd.
    pub file: File,
    /// Which pages it holds.
    pub extents: Vec<Extent>,
}

/// How a VM's memory is built from its files: the ranges and, per overlay, its extents.
/// The files themselves travel separately (base first, then overlays in order).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryLayout {
    /// Guest RAM ranges.
    pub ranges: Vec<RamRange>,
    /// Extents of each overlay, bottom to top.
    pub overlays: Vec<Vec<Extent>>,
}

pub(crate) fn create_memfd(name: &std::ffi::CStr) -> Result<File, MemoryError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Seals a memfd so that nobody can write, grow or shrink it any more.
pub(crate) fn seal(file: &File) -> Result<(), MemoryError> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own; the kernel checks the fd and the seals.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(MemoryError::Os {
            what: "seal",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Maps `len` bytes of `file` at `offset` over the existing mapping at `addr`,
/// `MAP_PRIVATE`.
///
/// # Safety
/// `[addr, addr + len)` must be a mapping this process owns whose contents nobody
/// relies on keeping (they are replaced by the file's).
unsafe fn map_fixed_private(
    addr: *mut u8,
    len: u64,
    file: &File,
    offset: u64,
) -> Result<(), MemoryError> {
    // SAFETY: the caller guarantees the range is ours to replace; MAP_FIXED replaces it
    // atomically with a private mapping of the file.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Os {
            what: "remap",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Pages of `[addr, addr + len)` that are private to this process (written since the
/// mapping was made): present and anonymous, or swapped out. From /proc/self/pagemap.
pub fn private_pages(addr: u64, len: u64) -> Result<Vec<u64>, MemoryError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let mut f = File::open("/proc/self/pagemap").map_err(os("scan"))?;
    f.seek(SeekFrom::Start(addr / PAGE * 8))
        .map_err(os("scan"))?;
    let pages = len / PAGE;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0u64;
    while done < pages {
        let n = ((pages - done) as usize).min(4096);
        f.read_exact(&mut buf[..n * 8]).map_err(os("scan"))?;
        for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0 {
                out.push(done + i as u64);
            }
        }
        done += n as u64;
    }
    Ok(out)
}

/// Coalesces sorted page indices into byte extents starting at `base_offset`.
pub fn pages_to_extents(pages: &[u64], base_offset: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &p in pages {
        let offset = base_offset + p * PAGE;
        match out.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += PAGE,
            _ => out.push(Extent { offset, len: PAGE }),
        }
    }
    out
}

/// Most overlays a VM's memory stacks before a fork merges them into one.
pub const MAX_OVERLAYS: usize = 4;
/// The guest memory a VM of `ram` bytes may hold at once, as its cgroup's budget: its
/// RAM, the overlays of dirtied pages its fork children map, and the one a merge makes
/// while the old ones are still mapped. (Overlay pages are charged to the VM that
/// copied them, as long as any child maps them.)
pub fn guest_memory_budget(ram: u64) -> u64 {
    ram.saturating_mul(MAX_OVERLAYS as u64 + 2)
}

/// Most extents a VM's overlays hold together (each is one mapping in every child),
/// and the most one merged overlay is cut into.
pub const MAX_EXTENTS: usize = 1024;

/// Clean pages a new overlay copies along to join two runs of written pages into one
/// extent. Each extent costs the forking VM a write and a mapping inside its pause, and
/// every child a mapping before it runs (~150 µs each under nested emulation); a page
/// copied along costs a 4 KiB copy in the pause and nothing in the children (it is
/// mapped from the overlay like its neighbours). An idle guest's writes after a fork
/// are scattered in small clusters, so most of its gaps are this short.
pub const JOIN_GAP_PAGES: u64 = 8;

/// Sorts `extents` and joins those that overlap, touch or lie at most `gap` bytes apart
/// into runs, never across a RAM range (a run must map into one range). While more than
/// `max` runs remain, runs with a wider gap between them are joined too, the gap
/// doubling until at most `max` are left: the pages in a gap are copied along, with the
/// contents the guest sees now, so the result is as correct as the exact runs, only
/// larger.
pub fn merge_extents(
    mut extents: Vec<Extent>,
    ranges: &[RamRange],
    gap: u64,
    max: usize,
) -> Vec<Extent> {
    let range_of = |offset: u64| {
        ranges
            .iter()
            .position(|r| offset >= r.file_offset && offset - r.file_offset < r.len)
    };
    extents.sort_by_key(|e| e.offset);
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut gap = gap;
    loop {
        let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
        for e in &extents {
            match out.last_mut() {
                Some(last)
                    if range_of(last.offset) == range_of(e.offset)
                        && e.offset <= last.offset + last.len + gap =>
                {
                    let end = (last.offset + last.len).max(e.offset + e.len);
                    last.len = end - last.offset;
                }
                _ => out.push(*e),
            }
        }
        // At a gap the size of all memory, every range is one run.
        if out.len() <= max || gap >= total {
            return out;
        }
        gap = if gap == 0 { PAGE } else { gap * 2 };
    }
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

/// Guest RAM backed by one memfd (plus overlays once it has forked from a fork).
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    overlays: Vec<Overlay>,
    /// Whether the memfd is frozen and mapped privately.
    frozen: bool,
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
        let memfd = create_memfd(c"forkvm-guest-ram")?;
        memfd
            .set_len(bytes)
            .map_err(|source| MemoryError::Truncate { bytes, source })?;
        let ranges = ram_ranges(bytes);
        let memory = map_ranges(&memfd, &ranges, libc::MAP_SHARED | libc::MAP_NORESERVE)?;
        Ok(Self {
            memfd,
            overlays: Vec::new(),
            frozen: false,
            ranges,
            memory,
        })
    }

    /// Maps a forked VM's memory from its files (base, then overlays in `layout`
    /// order), all copy-on-write.
    pub fn from_layers(
        base: File,
        overlays: Vec<File>,
        layout: &MemoryLayout,
    ) -> Result<Self, MemoryError> {
        check_layout(&base, overlays.len(), layout)?;
        let memory = map_ranges(
            &base,
            &layout.ranges,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )?;
        let mut ram = Self {
            memfd: base,
            overlays: Vec::new(),
            frozen: true,
            ranges: layout.ranges.clone(),
            memory,
        };
        // SAFETY: `memory` was just mapped and nothing has read it yet.
        unsafe { ram.map_overlays(overlays, &layout.overlays, 0) }?;
        Ok(ram)
    }

    /// Lays a forked VM's memory files (base, then overlays in `layout` order) over
    /// this memory, mapped ahead from the files of an earlier fork of the same VM (a
    /// warm process's, see [`crate::warm`]), at the same addresses: whatever KVM
    /// memory slots point there stay valid. Overlays already mapped in the same order
    /// (the same files, with the same extents) stay; above the first that differs,
    /// everything is mapped again. Returns the overlay extents it mapped (not counting
    /// the base mapped again).
    ///
    /// Until now nothing may have read the memory (no vCPU ran, no device touched it):
    /// a page read before holds what the files held then. After an error the memory is
    /// partly laid: not to be used.
    pub fn relayer(
        &mut self,
        base: File,
        overlays: Vec<File>,
        layout: &MemoryLayout,
    ) -> Result<usize, MemoryError> {
        check_layout(&base, overlays.len(), layout)?;
        if layout.ranges != self.ranges {
            return Err(MemoryError::BadLayout(format!(
                "ranges {:?}, but the memory was mapped ahead for {:?}",
                layout.ranges, self.ranges
            )));
        }
        let same_base = same_file(&base, &self.memfd)?;
        let mut kept = 0;
        if same_base {
            for (i, mapped) in self.overlays.iter().enumerate() {
                match (overlays.get(i), layout.overlays.get(i)) {
                    (Some(f), Some(extents))
                        if *extents == mapped.extents && same_file(f, &mapped.file)? =>
                    {
                        kept += 1
                    }
                    _ => break,
                }
            }
        }
        if !same_base || kept < self.overlays.len() {
            // Overlays mapped ahead that this fork does not have: the base again
            // everywhere, then every overlay.
            for (region, r) in self.memory.iter().zip(&self.ranges) {
                // SAFETY: the region is this memory's own mapping of exactly this range,
                // and nothing has read it (the caller's promise).
                unsafe { map_fixed_private(region.as_ptr(), r.len, &base, r.file_offset) }?;
            }
            kept = 0;
        }
        self.memfd = base;
        self.overlays.truncate(kept);
        let new = overlays.into_iter().skip(kept).collect();
        // SAFETY: nothing has read the memory (the caller's promise).
        unsafe { self.map_overlays(new, &layout.overlays[kept..], kept) }?;
        Ok(layout.overlays[kept..].iter().map(Vec::len).sum())
    }

    /// Maps each of `files` over its `extents`, stacked above this memory's first
    /// `below` overlays, and keeps them.
    ///
    /// # Safety
    /// Nothing may rely on the memory's contents under the extents: they are replaced.
    unsafe fn map_overlays(
        &mut self,
        files: Vec<File>,
        extents: &[Vec<Extent>],
        below: usize,
    ) -> Result<(), MemoryError> {
        debug_assert_eq!(self.overlays.len(), below);
        for (file, extents) in files.into_iter().zip(extents) {
            for e in extents {
                let (addr, len) = host_range(&self.memory, &self.ranges, *e)?;
                // SAFETY: `addr..addr+len` lies inside this memory's mapping
                // (host_range checked), whose contents there the caller gives up;
                // the overlay's pages replace the ones below.
                unsafe { map_fixed_private(addr, len, &file, e.offset) }?;
            }
            self.overlays.push(Overlay {
                file,
                extents: extents.clone(),
            });
        }
        Ok(())
    }

    /// The files this memory is mapped from (base first) and its layout: what a warm
    /// fork process maps ahead ([`crate::pool`]). Before the first fork the base is the
    /// memory file the guest writes (a warm process's private mapping of it reads what
    /// the file holds when it first touches a page, after the fork froze it).
    pub fn layers(&self) -> (Vec<&File>, MemoryLayout) {
        let mut files = vec![&self.memfd];
        files.extend(self.overlays.iter().map(|o| &o.file));
        let layout = MemoryLayout {
            ranges: self.ranges.clone(),
            overlays: self.overlays.iter().map(|o| o.extents.clone()).collect(),
        };
        (files, layout)
    }

    /// Prepares the memory for a fork and returns what children map: the files (base
    /// first) and the layout. The VM's vCPUs and devices must be paused.
    ///
    /// First fork: the memfd is remapped privately in place and sealed (no copy). Later
    /// forks: the pages written since the last one become a new sealed overlay, which
    /// this VM also remaps over them, so the next fork again finds only new writes.
    pub fn freeze_for_fork(&mut self) -> Result<(Vec<&File>, MemoryLayout), MemoryError> {
        if !self.frozen {
            for (region, r) in self.memory.iter().zip(&self.ranges) {
                // SAFETY: the region is our own MAP_SHARED mapping of exactly this range of
                // the memfd; remapping the same file range privately keeps its contents.
                unsafe { map_fixed_private(region.as_ptr(), r.len, &self.memfd, r.file_offset) }?;
            }
            seal(&self.memfd)?;
            self.frozen = true;
        } else {
            self.add_overlay()?;
        }
        Ok(self.layers())
    }

    /// Captures the pages written since the last freeze into a new overlay (runs of them
    /// at most [`JOIN_GAP_PAGES`] apart as one extent, the clean pages between copied
    /// along); or, when
    /// that would stack more than [`MAX_OVERLAYS`] overlays or [`MAX_EXTENTS`] extents,
    /// merges every overlay and the new pages into one (see [`merge_extents`]).
    ///
    /// Without the merge, a VM that forks again and again stacks an overlay per fork,
    /// and every child maps every extent of every overlay: with an idle guest (about
    /// 250 extents per fork, measured) the eighth child of one VM spent 34 ms mapping
    /// 1756 extents, and after a few hundred forks children would exceed the kernel's
    /// limit on mappings per process (`vm.max_map_count`, 65530 by default).
    fn add_overlay(&mut self) -> Result<(), MemoryError> {
        let mut extents = Vec::new();
        for (region, r) in self.memory.iter().zip(&self.ranges) {
            let pages = private_pages(region.as_ptr() as u64, r.len)?;
            extents.extend(pages_to_extents(&pages, r.file_offset));
        }
        if extents.is_empty() {
            return Ok(());
        }
        let stacked: usize = self.overlays.iter().map(|o| o.extents.len()).sum();
        let merge = self.overlays.len() >= MAX_OVERLAYS || stacked + extents.len() > MAX_EXTENTS;
        if merge {
            for o in &self.overlays {
                extents.extend_from_slice(&o.extents);
            }
        }
        let extents = merge_extents(extents, &self.ranges, JOIN_GAP_PAGES * PAGE, MAX_EXTENTS);
        if merge {
            tracing::debug!(
                overlays = self.overlays.len(),
                extents = extents.len(),
                "merging the memory overlays into one"
            );
        }
        let file = create_memfd(c"forkvm-guest-ram-overlay")?;
        file.set_len(self.size())
            .map_err(|source| MemoryError::Truncate {
                bytes: self.size(),
                source,
            })?;
        for e in &extents {
            let (addr, len) = host_range(&self.memory, &self.ranges, *e)?;
            // SAFETY: `addr..addr+len` is inside our guest mapping (host_range checked);
            // the vCPUs and devices are paused, so nothing writes it while we read.
            let bytes = unsafe { std::slice::from_raw_parts(addr, len as usize) };
            file.write_all_at(bytes, e.offset).map_err(os("copy"))?;
        }
        seal(&file)?;
        for e in &extents {
            let (addr, len) = host_range(&self.memory, &self.ranges, *e)?;
            // SAFETY: the overlay now holds exactly these pages' contents, so mapping it
            // over them changes nothing the guest can see and frees the private copies.
            unsafe { map_fixed_private(addr, len, &file, e.offset) }?;
        }
        if merge {
            // The merged overlay holds every page the old ones held, as this VM sees it
            // now; children forked earlier keep their own references to the old ones.
            self.overlays.clear();
        }
        self.overlays.push(Overlay { file, extents });
        Ok(())
    }

    /// Whether the memory is frozen (shared copy-on-write with forks).
    pub fn is_frozen(&self) -> bool {
        self.frozen
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

/// Checks that `layout` fits the memory file `base` and `overlays` overlay files.
fn check_layout(base: &File, overlays: usize, layout: &MemoryLayout) -> Result<(), MemoryError> {
    if overlays != layout.overlays.len() {
        return Err(MemoryError::BadLayout(format!(
            "{overlays} overlay files for {} overlays",
            layout.overlays.len()
        )));
    }
    // What a forking VM sends stays within these (it merges its overlays); more
    // would only cost this process mappings, one per extent.
    let extents: usize = layout.overlays.iter().map(Vec::len).sum();
    if layout.overlays.len() > MAX_OVERLAYS || extents > MAX_EXTENTS {
        return Err(MemoryError::BadLayout(format!(
            "{} overlays with {extents} extents; at most {MAX_OVERLAYS} with {MAX_EXTENTS}",
            layout.overlays.len()
        )));
    }
    let total: u64 = layout.ranges.iter().map(|r| r.len).sum();
    let size = base.metadata().map_err(os("inspect"))?.len();
    if layout.ranges.is_empty() || total > size || layout.ranges != ram_ranges(total) {
        return Err(MemoryError::BadLayout(format!(
            "ranges {:?} do not fit a {size}-byte memory file",
            layout.ranges
        )));
    }
    Ok(())
}

/// Whether `a` and `b` are the same file (device and inode).
fn same_file(a: &File, b: &File) -> Result<bool, MemoryError> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        a.metadata().map_err(os("inspect"))?,
        b.metadata().map_err(os("inspect"))?,
    );
    Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// The host address and length of extent `e` (offsets in the memory files).
fn host_range(
    mem: &GuestMemory,
    ranges: &[RamRange],
    e: Extent,
) -> Result<(*mut u8, u64), MemoryError> {
    for (region, r) in mem.iter().zip(ranges) {
        if e.offset >= r.file_offset
            && e.offset
                .checked_add(e.len)
                .is_some_and(|end| end <= r.file_offset + r.len)
            && e.offset.is_multiple_of(PAGE)
            && e.len.is_multiple_of(PAGE)
        {
            // SAFETY: the offset is inside this region's mapping (checked above).
            let addr = unsafe { region.as_ptr().add((e.offset - r.file_offset) as usize) };
            return Ok((addr, e.len));
        }
    }
    Err(MemoryError::BadLayout(format!(
        "extent {:#x}+{:#x} is not page-aligned inside guest RAM",
        e.offset, e.len
    )))
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
    fn fork_layers_give_children_a_private_copy_on_write_view() {
        let mut parent = GuestRam::new(16).unwrap();
        let mem = parent.memory().clone();
        mem.write_obj(0x1111u32, GuestAddress(0x2000)).unwrap();
        let layout = {
            let (files, layout) = parent.freeze_for_fork().unwrap();
            assert_eq!(files.len(), 1);
            layout
        };
        // The parent keeps its view, and its later writes stay private.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1111);
        mem.write_obj(0x2222u32, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x3333u32, GuestAddress(0x5000)).unwrap();
        let child =
            GuestRam::from_layers(parent.memfd().try_clone().unwrap(), vec![], &layout).unwrap();
        assert_eq!(
            child
                .memory()
                .read_obj::<u32>(GuestAddress(0x2000))
                .unwrap(),
            0x1111
        );
        assert_eq!(
            child
                .memory()
                .read_obj::<u32>(GuestAddress(0x5000))
                .unwrap(),
            0
        );
        child
            .memory()
            .write_obj(0x4444u32, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x2222);
        // The frozen base is sealed: nobody can write it any more.
        assert!(parent.memfd().write_all_at(b"x", 0).is_err());

        // A nested fork captures only what the parent wrote since: one overlay.
        let (files, layout2) = parent.freeze_for_fork().unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(layout2.overlays.len(), 1);
        let captured: u64 = layout2.overlays[0].iter().map(|e| e.len).sum();
        assert!(
            (2 * PAGE..(16 << 20) / 4).contains(&captured),
            "{captured} bytes captured"
        );
        let base = files[0].try_clone().unwrap();
        let over = files[1].try_clone().unwrap();
        let grandchild = GuestRam::from_layers(base, vec![over], &layout2).unwrap();
        assert_eq!(
            grandchild
                .memory()
                .read_obj::<u32>(GuestAddress(0x2000))
                .unwrap(),
            0x2222
        );
        assert_eq!(
            grandchild
                .memory()
                .read_obj::<u32>(GuestAddress(0x5000))
                .unwrap(),
            0x3333
        );
        // The parent still reads its own values after remapping its pages to the overlay.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0x3333);
        // And a third fork with no writes in between adds no overlay.
        let (files, _) = parent.freeze_for_fork().unwrap();
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn extents_coalesce_runs_of_pages() {
        let e = pages_to_extents(&[0, 1, 2, 5, 7, 8], 0x1000_0000);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0x1000_0000,
                    len: 3 * PAGE
                },
                Extent {
                    offset: 0x1000_0000 + 5 * PAGE,
                    len: PAGE
                },
                Extent {
                    offset: 0x1000_0000 + 7 * PAGE,
                    len: 2 * PAGE
                },
            ]
        );
    }

    #[test]
    fn merged_extents_join_within_a_range_and_fit_the_limit() {
        let ranges = ram_ranges(4 << 30);
        let split = ranges[1].file_offset;
        let ext = |offset: u64, pages: u64| Extent {
            offset,
            len: pages * PAGE,
        };
        // Overlapping and touching runs join; runs on both sides of the range boundary
        // (touching in the file) do not.
        let merged = merge_extents(
            vec![
                ext(split, 1),
                ext(10 * PAGE, 2),
                ext(0, 2),
                ext(PAGE, 3),
                ext(split - PAGE, 1),
            ],
            &ranges,
            0,
            100,
        );
        assert_eq!(
            merged,
            vec![
                ext(0, 4),
                ext(10 * PAGE, 2),
                ext(split - PAGE, 1),
                ext(split, 1)
            ]
        );
        // Every other page of the first 64 MiB: 8192 runs, cut down to at most 100 by
        // joining across gaps; every page stays covered.
        let sparse: Vec<Extent> = (0..8192).map(|i| ext(2 * i * PAGE, 1)).collect();
        let merged = merge_extents(sparse.clone(), &ranges, 0, 100);
        assert!(merged.len() <= 100, "{} runs", merged.len());
        for e in &sparse {
            assert!(
                merged
                    .iter()
                    .any(|m| m.offset <= e.offset && e.offset + e.len <= m.offset + m.len),
                "{e:?} is not covered"
            );
        }
        // A limit below the number of ranges still ends, with one run per range.
        let both = vec![ext(0, 1), ext(split + PAGE, 1)];
        assert_eq!(merge_extents(both, &ranges, 0, 1).len(), 2);
        // Runs at most `gap` apart join whatever their number; wider ones stay apart,
        // and no gap joins across the range boundary.
        let merged = merge_extents(
            vec![
                ext(0, 1),
                ext(3 * PAGE, 1),
                ext(20 * PAGE, 2),
                ext(split - PAGE, 1),
                ext(split, 1),
            ],
            &ranges,
            2 * PAGE,
            100,
        );
        assert_eq!(
            merged,
            vec![
                ext(0, 4),
                ext(20 * PAGE, 2),
                ext(split - PAGE, 1),
                ext(split, 1)
            ]
        );
    }

    #[test]
    fn a_vm_that_forks_again_and_again_keeps_its_layers_bounded() {
        let mut parent = GuestRam::new(64).unwrap();
        let mem = parent.memory().clone();
        parent.freeze_for_fork().unwrap();
        // Each round writes scattered pages (many extents) and one marker, then forks.
        let rounds = MAX_OVERLAYS as u64 + 3;
        let mut most = 0;
        for round in 0..rounds {
            for i in 0..300u64 {
                let addr = (round * 600 + 2 * i) * PAGE;
                mem.write_obj(round * 1000 + i, GuestAddress(addr)).unwrap();
            }
            let (files, layout) = parent.freeze_for_fork().unwrap();
            assert!(layout.overlays.len() <= MAX_OVERLAYS);
            let extents: usize = layout.overlays.iter().map(Vec::len).sum();
            assert!(extents <= MAX_EXTENTS, "{extents} extents");
            most = most.max(layout.overlays.len());
            // A child of this fork sees every value written in every round.
            let files: Vec<File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
            let mut files = files.into_iter();
            let base = files.next().unwrap();
            let child = GuestRam::from_layers(base, files.collect(), &layout).unwrap();
            for r in 0..=round {
                for i in [0u64, 1, 150, 299] {
                    let addr = (r * 600 + 2 * i) * PAGE;
                    assert_eq!(
                        child.memory().read_obj::<u64>(GuestAddress(addr)).unwrap(),
                        r * 1000 + i,
                        "round {round}: page of round {r}, write {i}"
                    );
                    // Pages in between were never written.
                    assert_eq!(
                        child
                            .memory()
                            .read_obj::<u64>(GuestAddress(addr + PAGE))
                            .unwrap(),
                        0
                    );
                }
            }
        }
        assert!(most >= 2, "the overlays never stacked");
        // The parent still reads what it wrote.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress((600 + 2) * PAGE)).unwrap(),
            1001
        );

        // A layout with more than the limits is refused, not mapped.
        let too_many = MemoryLayout {
            ranges: parent.ranges().to_vec(),
            overlays: vec![vec![]; MAX_OVERLAYS + 1],
        };
        let e = GuestRam::from_layers(parent.memfd().try_clone().unwrap(), vec![], &too_many)
            .unwrap_err();
        assert!(matches!(e, MemoryError::BadLayout(_)), "{e}");
    }

    /// A warm process's copy of `ram`'s memory as it is now (see `crate::warm`).
    fn mapped_ahead(ram: &GuestRam) -> GuestRam {
        let (files, layout) = ram.layers();
        let mut files = files.into_iter().map(|f| f.try_clone().unwrap());
        let base = files.next().unwrap();
        GuestRam::from_layers(base, files.collect(), &layout).unwrap()
    }

    #[test]
    fn memory_mapped_ahead_takes_each_forks_files_and_maps_only_what_is_new() {
        let mut parent = GuestRam::new(64).unwrap();
        let mem = parent.memory().clone();
        mem.write_obj(7u64, GuestAddress(0)).unwrap();
        // Mapped before the first fork, from the memory file the guest still writes.
        let mut before_first = mapped_ahead(&parent);
        mem.write_obj(8u64, GuestAddress(PAGE)).unwrap();
        let (files, layout) = parent.freeze_for_fork().unwrap();
        let files: Vec<File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
        let mut files = files.into_iter();
        let mapped = before_first
            .relayer(files.next().unwrap(), files.collect(), &layout)
            .unwrap();
        assert_eq!(mapped, 0, "nothing new to map");
        let read =
            |ram: &GuestRam, addr: u64| ram.memory().read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!((read(&before_first, 0), read(&before_first, PAGE)), (7, 8));

        // A VM that forks again and again: a warm copy made after each fork, used at
        // the next (its overlays a prefix of that fork's), and one made after the
        // second fork, used after the overlays were merged (its overlays stale).
        let mut stale = None;
        let mut kept_some = false;
        let rounds = MAX_OVERLAYS as u64 + 3;
        for round in 0..rounds {
            let mut ahead = mapped_ahead(&parent);
            if round == 2 {
                assert!(!ahead.overlays.is_empty());
                stale = Some(mapped_ahead(&parent));
            }
            for i in 0..300u64 {
                let addr = (8 + round * 600 + 2 * i) * PAGE;
                mem.write_obj(round * 1000 + i, GuestAddress(addr)).unwrap();
            }
            let (files, layout) = parent.freeze_for_fork().unwrap();
            let files: Vec<File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
            let total: usize = layout.overlays.iter().map(Vec::len).sum();
            let newest = layout.overlays.last().map_or(0, Vec::len);
            let last = round + 1 == rounds;
            let mut copies = vec![("made at the fork before", &mut ahead)];
            if last {
                copies.push(("made before a merge", stale.as_mut().unwrap()));
            }
            for (what, ahead) in copies {
                let mut f = files.iter().map(|f| f.try_clone().unwrap());
                let mapped = ahead
                    .relayer(f.next().unwrap(), f.collect(), &layout)
                    .unwrap();
                assert!(
                    mapped == newest || mapped == total,
                    "round {round}, {what}: mapped {mapped} of {total} extents"
                );
                kept_some |= mapped < total;
                if what == "made before a merge" {
                    assert_eq!(mapped, total, "its stale overlays were kept");
                }
                // It reads what a child mapping the fork's files from scratch reads.
                assert_eq!(read(ahead, 0), 7);
                for r in 0..=round {
                    for i in [0u64, 1, 299] {
                        let addr = (8 + r * 600 + 2 * i) * PAGE;
                        assert_eq!(read(ahead, addr), r * 1000 + i, "round {round}, {what}");
                        assert_eq!(read(ahead, addr + PAGE), 0);
                    }
                }
            }
        }
        assert!(kept_some, "no warm copy kept the overlays it had mapped");

        // The memory of another VM (another base) replaces all of it.
        let other = GuestRam::new(64).unwrap();
        other.memory().write_obj(9u64, GuestAddress(0)).unwrap();
        let mut ahead = mapped_ahead(&parent);
        let (_, layout) = other.layers();
        ahead
            .relayer(other.memfd().try_clone().unwrap(), vec![], &layout)
            .unwrap();
        assert_eq!(read(&ahead, 0), 9);
        assert_eq!(read(&ahead, (8 + 2) * PAGE), 0);
        // Other ranges cannot be laid over it.
        let small = GuestRam::new(16).unwrap();
        let (_, layout) = small.layers();
        let e = ahead
            .relayer(small.memfd().try_clone().unwrap(), vec![], &layout)
            .unwrap_err();
        assert!(matches!(e, MemoryError::BadLayout(_)), "{e}");
    }

    #[test]
    fn layouts_that_do_not_fit_their_files_are_refused() {
        let ram = GuestRam::new(16).unwrap();
        let bad = MemoryLayout {
            ranges: ram_ranges(32 << 20),
            overlays: vec![],
        };
        let e = GuestRam::from_layers(ram.memfd().try_clone().unwrap(), vec![], &bad).unwrap_err();
        assert!(matches!(e, MemoryError::BadLayout(_)), "{e}");
        let bad = MemoryLayout {
            ranges: ram_ranges(16 << 20),
            overlays: vec![vec![Extent {
                offset: 1,
                len: PAGE,
            }]],
        };
        let f = ram.memfd().try_clone().unwrap();
        let e = GuestRam::from_layers(f, vec![ram.memfd().try_clone().unwrap()], &bad).unwrap_err();
        assert!(matches!(e, MemoryError::BadLayout(_)), "{e}");
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
