//! Loading the guest: a bzImage (Linux 64-bit boot protocol) or an ELF vmlinux, the
//! initramfs, the command line, and the zero page with its e820 map.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::{
    ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_END,
    MMIO_HOLE_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_ACPI: u32 = 3;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the guest kernel, initrd and boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The kernel path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an ELF vmlinux.
    #[error(
        "{path} is not a bootable x86_64 Linux kernel (neither bzImage: {bzimage}; nor ELF: {elf})"
    )]
    BadKernel {
        /// The kernel path.
        path: PathBuf,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
    },
    /// The kernel's ELF segments reach past the end of guest memory.
    #[error("kernel {path} needs {needs_mib} MiB of guest memory, the VM has {has_mib} MiB; give the guest more memory")]
    KernelTooLarge {
        /// The kernel path.
        path: PathBuf,
        /// MiB up to the end of its highest segment.
        needs_mib: u64,
        /// MiB of guest memory.
        has_mib: u64,
    },
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The initrd path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give the guest more memory")]
    InitrdTooBig {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it may end at.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy the initrd into guest memory")]
    CopyInitrd(#[source] vm_memory::GuestMemoryError),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing the zero page failed.
    #[error("cannot write the boot parameters")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Too many e820 entries.
    #[error("the e820 map is full")]
    E820Full,
}

/// Where the guest starts, as found by loading it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: GuestAddress,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Loads `path` into guest memory, as a bzImage or else as an ELF vmlinux.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.to_owned(),
            source,
        })
    };
    let bzimage = match BzImage::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: GuestAddress(r.kernel_end),
                setup_header: r.setup_header,
            })
        }
        Err(e) => e,
    };
    match Elf::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load,
            end: GuestAddress(r.kernel_end),
            setup_header: None,
        }),
        Err(elf) => {
            // An ELF that did not load because the memory is too small says so.
            let has = mem.last_addr().raw_value() + 1;
            match open().ok().and_then(|mut f| elf_load_end(&mut f)) {
                Some(end) if end > has => Err(BootError::KernelTooLarge {
                    path: path.to_owned(),
                    needs_mib: end.div_ceil(1 << 20),
                    has_mib: has >> 20,
                }),
                _ => Err(BootError::BadKernel {
                    path: path.to_owned(),
                    bzimage,
                    elf,
                }),
            }
        }
    }
}

/// The end (physical, exclusive) of the highest loadable segment of a 64-bit ELF, or
/// `None` when `f` is not one. Reads at most 64 program headers.
fn elf_load_end(f: &mut (impl std::io::Read + std::io::Seek)) -> Option<u64> {
    use std::io::SeekFrom;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).ok()?;
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let phoff = u64_at(&eh, 0x20);
    let phentsize = usize::from(u16_at(&eh, 0x36));
    let phnum = u16_at(&eh, 0x38).min(64);
    if phentsize < 56 {
        return None;
    }
    f.seek(SeekFrom::Start(phoff)).ok()?;
    let mut ph = vec![0u8; phentsize];
    let mut end = 0u64;
    for _ in 0..phnum {
        f.read_exact(&mut ph).ok()?;
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == PT_LOAD {
            end = end.max(u64_at(&ph, 0x18).saturating_add(u64_at(&ph, 0x28)));
        }
    }
    Some(end)
}

/// Highest address (exclusive) of RAM below the MMIO hole.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1
}

/// Copies the initrd to the top of low RAM; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(GuestAddress, u64), BootError> {
    let err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .unwrap_or(MMIO_HOLE_START)
        .min(low_ram_end(mem));
    let start = max.checked_sub(size).map(|s| s & !(PAGE_SIZE - 1));
    let Some(start) = start.filter(|s| *s >= kernel.end.raw_value()) else {
        return Err(BootError::InitrdTooBig {
            path: path.to_owned(),
            size,
            limit: max,
        });
    };
    let mut slice = mem
        .get_slice(GuestAddress(start), size as usize)
        .map_err(BootError::CopyInitrd)?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::CopyInitrd(e.into()))?;
    Ok((GuestAddress(start), size))
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64, kind: u32) -> Result<(), BootError> {
    let i = params.e820_entries as usize;
    let entry = params.e820_table.get_mut(i).ok_or(BootError::E820Full)?;
    entry.addr = addr;
    entry.size = size;
    entry.r#type = kind;
    params.e820_entries += 1;
    Ok(())
}

/// Builds the kernel command line, checking Linux's size limit.
pub fn build_cmdline(args: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let (kernel_args, init_args) = match args.split_once(" -- ") {
        Some((k, i)) => (k, Some(i)),
        None => (args, None),
    };
    cmdline
        .insert_str(kernel_args)
        .map_err(BootError::Cmdline)?;
    if let Some(init) = init_args {
        cmdline.insert_init_args(init).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line and the zero page (setup header, initrd, RSDP, e820 map).
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    acpi_end: u64,
) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(BootError::Cmdline)?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = ACPI_START;

    add_e820(&mut params, 0, EBDA_START, E820_RAM)?;
    add_e820(&mut params, ACPI_START, acpi_end - ACPI_START, E820_ACPI)?;
    let end = mem.last_addr().raw_value() + 1;
    if end <= MMIO_HOLE_START {
        add_e820(&mut params, HIMEM_START, end - HIMEM_START, E820_RAM)?;
    } else {
        add_e820(
            &mut params,
            HIMEM_START,
            MMIO_HOLE_START - HIMEM_START,
            E820_RAM,
        )?;
        add_e820(&mut params, MMIO_HOLE_END, end - MMIO_HOLE_END, E820_RAM)?;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn elf_load_end_is_the_highest_loadable_segment() {
        // ELF header + three program headers: LOAD, NOTE (ignored), LOAD.
        let mut f = vec![0u8; 64 + 3 * 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, i: usize, typ: u32, paddr: u64, memsz: u64| {
            let o = 64 + i * 56;
            f[o..o + 4].copy_from_slice(&typ.to_le_bytes());
            f[o + 0x18..o + 0x20].copy_from_slice(&paddr.to_le_bytes());
            f[o + 0x28..o + 0x30].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut f, 0, 1, 0x100_0000, 0x200_0000);
        ph(&mut f, 1, 4, 0x900_0000, 0x10);
        ph(&mut f, 2, 1, 0x300_0000, 0x80_0000);
        assert_eq!(
            elf_load_end(&mut std::io::Cursor::new(&f)),
            Some(0x380_0000)
        );
        assert_eq!(
            elf_load_end(&mut std::io::Cursor::new(b"MZ not an elf")),
            None
        );
        f.truncate(100);
        assert_eq!(elf_load_end(&mut std::io::Cursor::new(&f)), None);
    }

    fn mem(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    #[test]
    fn garbage_kernel_is_refused_with_its_path() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 8192]).unwrap();
        let e = load_kernel(&mem(32), f.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BootError::BadKernel { .. }), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let e = load_kernel(&mem(32), Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
    }

    fn fake_kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            end: GuestAddress(end),
            setup_header: None,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_ram_page_aligned() {
        let m = mem(32);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"initrd-bytes").unwrap();
        let (addr, size) = load_initrd(&m, &fake_kernel(0x20_0000), f.path()).unwrap();
        assert_eq!(size, 12);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + size <= 32 << 20);
        let mut back = [0u8; 12];
        m.read_slice(&mut back, addr).unwrap();
        assert_eq!(&back, b"initrd-bytes");
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let m = mem(16);
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(15 << 20).unwrap();
        let e = load_initrd(&m, &fake_kernel(0x40_0000), f.path()).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
    }

    #[test]
    fn cmdline_splits_init_args() {
        let c = build_cmdline("console=ttyS0 quiet -- /bin/sh -c true").unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(s, "console=ttyS0 quiet -- /bin/sh -c true");
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1)).is_err());
    }

    #[test]
    fn zero_page_has_e820_and_cmdline() {
        let m = mem(64);
        let c = build_cmdline("console=ttyS0").unwrap();
        write_boot_params(&m, &fake_kernel(0x20_0000), &c, None, ACPI_START + 0x1000).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        let (addr, size) = (last.addr, last.size);
        assert_eq!(addr + size, 64 << 20);
        let hdr = p.hdr;
        let (ptr, flag) = (hdr.cmd_line_ptr, hdr.boot_flag);
        assert_eq!(ptr, CMDLINE_START as u32);
        assert_eq!(flag, KERNEL_BOOT_FLAG_MAGIC);
    }
}
