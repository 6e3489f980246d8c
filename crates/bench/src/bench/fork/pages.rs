//! Where a fork child's copied guest pages go (`forkvm bench fork --page-types`).
//!
//! The host sees which guest pages a child wrote (its copies: present, anonymous pages
//! of its guest-RAM mappings in `/proc/PID/pagemap`) but not what the guest used them
//! for. The guest kernel knows: `/proc/kpageflags` has one 64-bit flag word per page
//! frame, and a guest frame number is the guest-physical address over 4096 (a mapping's
//! file offset is translated by the VM's RAM ranges, around the MMIO hole). The child's
//! agent is asked for that file once the copies are listed; each copy is then counted
//! under the guest's use of the page (the kernel image's sections from the guest's
//! `/proc/iomem`; else by flags: free, page table, slab, process memory, page cache,
//! reserved at boot, other kernel memory) and whether it holds only zeros.
//!
//! Reading the flags starts a `cat` in the guest, which writes pages of its own; the
//! copies are listed before it runs, so it moves at most a few pages between kinds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

#[allow(unused_imports)]
use super::*;

/// A guest page frame's size.
const PAGE: u64 = 4096;

/// `/proc/kpageflags` bits (Linux `include/uapi/linux/kernel-page-flags.h`, and
/// `KPF_RESERVED` from the kernel-internal ones it also exports).
mod kpf {
    pub const LRU: u32 = 5;
    pub const SLAB: u32 = 7;
    pub const BUDDY: u32 = 10;
    pub const ANON: u32 = 12;
    pub const NOPAGE: u32 = 20;
    pub const PGTABLE: u32 = 26;
    pub const RESERVED: u32 = 32;
}

/// The most a guest's `/proc/kpageflags` may be, bytes: 8 per 4 KiB frame of a
/// guest-physical space of `mem_bytes` of RAM and the MMIO hole.
fn max_flags_bytes(mem_bytes: u64) -> usize {
    ((mem_bytes + (4 << 30)) / PAGE * 8) as usize
}

/// The most of a guest's `/proc/iomem` read (it is a few KiB).
const MAX_IOMEM_BYTES: usize = 64 << 10;

/// The most kernel-image sections taken from a guest's `/proc/iomem` (x86 has four).
const MAX_SECTIONS: usize = 16;

/// How long reading the guest's page flags may take (a `cat` of at most a few MiB).
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the guest used a page frame for, from its flags.
pub fn kind(flags: u64) -> &'static str {
    let has = |bit: u32| flags & (1u64 << bit) != 0;
    if has(kpf::NOPAGE) {
        "no page"
    } else if has(kpf::BUDDY) {
        "free (buddy)"
    } else if has(kpf::PGTABLE) {
        "page table"
    } else if has(kpf::SLAB) {
        "slab"
    } else if has(kpf::ANON) {
        "process memory"
    } else if has(kpf::LRU) {
        "page cache"
    } else if has(kpf::RESERVED) {
        "reserved (memmap, per-cpu, boot allocations)"
    } else {
        "other kernel (stacks, vmalloc, per-cpu lists, buffers)"
    }
}

/// One child's copies by kind: pages, and of those how many hold only zeros; and its
/// VMM process's own dirty memory by mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageTypes {
    /// Kind (see [`kind`]) → (pages, all-zero pages).
    pub kinds: BTreeMap<String, (u64, u64)>,
    /// Copies whose frame the guest's flags did not cover.
    pub unknown: u64,
    /// `Private_Dirty` KiB outside guest RAM by kind of mapping (see [`mapping_kind`]).
    pub process_kib: BTreeMap<String, u64>,
}

/// What a mapping of a VMM process holds, by its `smaps` path; `None` for guest RAM.
pub fn mapping_kind(path: &str) -> Option<&'static str> {
    Some(match path {
        p if p.starts_with(GUEST_RAM_MEMFD) => return None,
        "[heap]" => "heap",
        "[stack]" => "main stack",
        "" => "anonymous (thread stacks, malloc arenas)",
        p if p.starts_with('/') && !p.starts_with("/memfd:") => {
            "files (executable data, libraries)"
        }
        _ => "other",
    })
}

/// `Private_Dirty` of an `smaps` text by [`mapping_kind`], guest RAM left out.
pub fn process_split(smaps: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(path) = mem::mapping_header(line) {
            current = mapping_kind(path);
            continue;
        }
        if let (Some(k), Some(rest)) = (current, line.strip_prefix("Private_Dirty:")) {
            *out.entry(k.to_owned()).or_default() += mem::kib(rest);
        }
    }
    out.retain(|_, v| *v > 0);
    out
}

impl PageTypes {
    /// All copies counted.
    pub fn total(&self) -> u64 {
        self.kinds.values().map(|(n, _)| n).sum::<u64>() + self.unknown
    }
}

/// A copied guest page of a process: its guest-physical address and where the process
/// maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopiedPage {
    pub gpa: u64,
    pub host_addr: u64,
}

/// The guest-RAM mappings of a `/proc/PID/maps` text: (start, end, file offset). The
/// base memory file and every overlay place a guest page at the same file offset
/// (see [`guest_addr`]).
pub fn guest_ram_maps(maps: &str) -> Vec<(u64, u64, u64)> {
    maps.lines()
        .filter(|l| mem::mapping_header(l).is_some_and(|p| p.starts_with(GUEST_RAM_MEMFD)))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (a, b) = it.next()?.split_once('-')?;
            let offset = it.nth(1)?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                u64::from_str_radix(offset, 16).ok()?,
            ))
        })
        .collect()
}

/// Whether a `/proc/PID/pagemap` entry is a page the process copied: present and
/// anonymous (bit 61, "file page or shared anonymous", clear).
pub fn is_copy(entry: u64) -> bool {
    entry & (1 << 63) != 0 && entry & (1 << 61) == 0
}

/// The guest-physical address of the memory files' offset `offset` in a VM with
/// `mem_bytes` of RAM (its RAM ranges skip the MMIO hole below 4 GiB).
pub fn guest_addr(offset: u64, mem_bytes: u64) -> Option<u64> {
    forkvm_vmm::memory::ram_ranges(mem_bytes)
        .iter()
        .find(|r| (r.file_offset..r.file_offset + r.len).contains(&offset))
        .map(|r| r.guest_addr + (offset - r.file_offset))
}

/// The guest pages process `pid`, a VM with `mem_bytes` of RAM, copied.
pub fn copies(pid: u32, mem_bytes: u64) -> Result<Vec<CopiedPage>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("cannot open /proc/{pid}/pagemap"))?;
    let mut out = Vec::new();
    for (start, end, offset) in guest_ram_maps(&maps) {
        let pages = ((end - start) / PAGE) as usize;
        let mut raw = vec![0u8; pages * 8];
        pagemap
            .read_exact_at(&mut raw, start / PAGE * 8)
            .with_context(|| format!("cannot read the pagemap of process {pid}"))?;
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if !is_copy(entry) {
                continue;
            }
            let gpa = guest_addr(offset + i as u64 * PAGE, mem_bytes)
                .with_context(|| format!("process {pid} maps its guest RAM past its size"))?;
            out.push(CopiedPage {
                gpa,
                host_addr: start + i as u64 * PAGE,
            });
        }
    }
    Ok(out)
}

/// A writer whose bytes stay readable after it is handed away, up to a limit.
#[derive(Clone)]
struct Collected {
    bytes: Arc<Mutex<Vec<u8>>>,
    limit: usize,
}

impl Collected {
    fn new(limit: usize) -> Self {
        Collected {
            bytes: Arc::default(),
            limit,
        }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Write for Collected {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut v = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(format!(
                "the guest wrote more than the {} bytes expected",
                self.limit
            )));
        }
        v.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The output of `args` run by the agent behind `uds` in its guest: at most `limit`
/// bytes, within [`GUEST_CALL_TIMEOUT`] of silence.
fn guest_output(uds: &Path, args: &[&str], limit: usize) -> Result<Vec<u8>> {
    use forkvm_agent_proto::client;
    let conn = client::connect_vsock(uds, forkvm_agent_proto::AGENT_PORT, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the agent behind {}", uds.display()))?;
    // A clone of the connection sets its timeout once `exec` has cleared it.
    let same = conn
        .try_clone()
        .context("cannot clone the agent connection")?;
    let spec = forkvm_agent_proto::ProcessSpec {
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        ..forkvm_agent_proto::ProcessSpec::new(args.iter().copied())
    };
    let session = client::exec(conn, &spec).with_context(|| format!("cannot run {args:?}"))?;
    same.set_read_timeout(Some(GUEST_CALL_TIMEOUT))
        .context("cannot set a timeout on the agent connection")?;
    let out = Collected::new(limit);
    let err = Collected::new(64 << 10);
    let code = session
        .pump(None, Box::new(out.clone()), Box::new(err.clone()))
        .with_context(|| format!("running {args:?} in the guest"))?;
    if code != 0 {
        let err = err.take();
        let tail = &err[err.len().saturating_sub(1024)..];
        bail!(
            "{args:?} in the guest exited {code}: {}",
            String::from_utf8_lossy(tail).trim()
        );
    }
    Ok(out.take())
}

/// The guest's `/proc/kpageflags` (a VM with `mem_bytes` of RAM), read by its agent
/// behind `uds`.
pub fn guest_flags(uds: &Path, mem_bytes: u64) -> Result<Vec<u64>> {
    Ok(guest_output(
        uds,
        &["cat", "/proc/kpageflags"],
        max_flags_bytes(mem_bytes),
    )?
    .chunks_exact(8)
    .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
    .collect())
}

/// The kernel image's sections in a guest's `/proc/iomem` ("Kernel code", "Kernel
/// data", ...): (start, end inclusive, name); at most [`MAX_SECTIONS`].
pub fn kernel_sections(iomem: &str) -> Vec<(u64, u64, String)> {
    iomem
        .lines()
        .filter_map(|l| {
            let (range, name) = l.trim().split_once(" : ")?;
            if !name.starts_with("Kernel ") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                name.to_lowercase(),
            ))
        })
        .take(MAX_SECTIONS)
        .collect()
}

/// Counts `copies` by the guest's use of each page (`flags`, indexed by frame number);
/// `contents` reads a copy's bytes where the process maps it (for the all-zero count).
/// A copy inside a section of the kernel image (`sections`, from
/// [`kernel_sections`]) counts under that section, whatever its flags.
pub fn classify(
    copies: &[CopiedPage],
    flags: &[u64],
    sections: &[(u64, u64, String)],
    mut contents: impl FnMut(u64, &mut [u8]) -> bool,
) -> PageTypes {
    let mut t = PageTypes::default();
    let mut page = vec![0u8; PAGE as usize];
    for c in copies {
        let Some(&f) = flags.get((c.gpa / PAGE) as usize) else {
            t.unknown += 1;
            continue;
        };
        let zero = contents(c.host_addr, &mut page) && page.iter().all(|&b| b == 0);
        let name = match sections.iter().find(|(a, b, _)| (*a..=*b).contains(&c.gpa)) {
            Some((_, _, section)) => section.clone(),
            None => kind(f).to_owned(),
        };
        let e = t.kinds.entry(name).or_default();
        e.0 += 1;
        e.1 += u64::from(zero);
    }
    t
}

/// Where child `pid`'s copies (listed first) go, by the flags its agent behind `uds`
/// reads from its guest (a VM with `mem_bytes` of RAM).
pub fn page_types(pid: u32, uds: &Path, mem_bytes: u64) -> Result<PageTypes> {
    let copies = copies(pid, mem_bytes)?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let flags = guest_flags(uds, mem_bytes)?;
    let iomem = guest_output(uds, &["cat", "/proc/iomem"], MAX_IOMEM_BYTES)?;
    let sections = kernel_sections(&String::from_utf8_lossy(&iomem));
    if sections.is_empty() || sections.iter().all(|(a, b, _)| *a == 0 && *b == 0) {
        bail!("the guest's /proc/iomem shows no kernel-image addresses (read without privilege?)");
    }
    // The contents only decide the all-zero count: without them (no right to read the
    // process's memory) every copy counts as not zero, and the log says so.
    let mem = File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| tracing::warn!("/proc/{pid}/mem: {e}: no all-zero counts"))
        .ok();
    let mut t = classify(&copies, &flags, &sections, |addr, buf| {
        mem.as_ref()
            .is_some_and(|m| m.read_exact_at(buf, addr).is_ok())
    });
    t.process_kib = process_split(&smaps);
    Ok(t)
}

/// The table of the first child of each fork: copies by kind (pages / all zero).
pub fn table(rounds: &[ForkRound]) -> Option<String> {
    let rows: Vec<(&ForkRound, &PageTypes)> = rounds
        .iter()
        .filter_map(|r| Some((r, r.children.first()?.page_types.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let kinds: std::collections::BTreeSet<&String> =
        rows.iter().flat_map(|(_, t)| t.kinds.keys()).collect();
    let mut cells = vec![std::iter::once("fork".to_owned())
        .chain(std::iter::once("copied".to_owned()))
        .chain(kinds.iter().map(|k| k.to_string()))
        .chain(std::iter::once("unknown".to_owned()))
        .collect::<Vec<_>>()];
    let label = |r: &ForkRound| {
        format!(
            "{} x{}, pool {}, #{}",
            if r.jailed { "jail" } else { "no jail" },
            r.count,
            r.pool,
            r.round
        )
    };
    for (r, t) in &rows {
        let mut row = vec![label(r), format!("{} KiB", t.total() * PAGE / 1024)];
        for k in &kinds {
            let (n, z) = t.kinds.get(*k).copied().unwrap_or_default();
            row.push(format!("{n} ({z} zero)"));
        }
        row.push(t.unknown.to_string());
        cells.push(row);
    }
    let mappings: std::collections::BTreeSet<&String> = rows
        .iter()
        .flat_map(|(_, t)| t.process_kib.keys())
        .collect();
    let mut process = vec![std::iter::once("fork".to_owned())
        .chain(mappings.iter().map(|k| k.to_string()))
        .collect::<Vec<_>>()];
    for (r, t) in &rows {
        process.push(
            std::iter::once(label(r))
                .chain(
                    mappings
                        .iter()
                        .map(|k| format!("{} KiB", t.process_kib.get(*k).copied().unwrap_or(0))),
                )
                .collect(),
        );
    }
    Some(format!(
        "\nfirst child's copied guest pages by the guest's use of them (pages, of which \
         all zero; /proc/kpageflags of the child's guest):\n{}\n\
         its VMM process's own dirty memory outside guest RAM by mapping \
         (Private_Dirty, /proc/PID/smaps):\n{}",
        aligned(&cells),
        aligned(&process)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_mappings_give_their_file_offsets() {
        let maps = "\
55d0-55e0 r-xp 00000000 08:01 12 /usr/bin/forkvm-vmm
7f0000000000-7f0010000000 r--p 00000000 00:01 5678                       /memfd:forkvm-guest-ram (deleted)
7f0000200000-7f0000203000 r--p 00200000 00:01 5679                       /memfd:forkvm-guest-ram-overlay (deleted)
7f0020000000-7f0020100000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            guest_ram_maps(maps),
            vec![
                (0x7f00_0000_0000, 0x7f00_1000_0000, 0),
                (0x7f00_0020_0000, 0x7f00_0020_3000, 0x20_0000),
            ]
        );
    }

    #[test]
    fn the_kernel_image_sections_come_from_iomem() {
        let iomem = "\
00000000-00000fff : Reserved
00100000-0fffffff : System RAM
  01000000-01c01fff : Kernel code
  01e00000-0228cfff : Kernel rodata
  02400000-0263b4bf : Kernel data
  02a3f000-02bfffff : Kernel bss
d0000000-d0000fff : LNRO0005:00
";
        assert_eq!(
            kernel_sections(iomem),
            vec![
                (0x0100_0000, 0x01c0_1fff, "kernel code".to_owned()),
                (0x01e0_0000, 0x0228_cfff, "kernel rodata".to_owned()),
                (0x0240_0000, 0x0263_b4bf, "kernel data".to_owned()),
                (0x02a3_f000, 0x02bf_ffff, "kernel bss".to_owned()),
            ]
        );
    }

    #[test]
    fn the_process_own_memory_is_split_by_mapping_without_guest_ram() {
        let smaps = "\
55d0-55e0 rw-p 00000000 08:01 12                 /usr/bin/forkvm-vmm
Private_Dirty:        8 kB
55e0-55f0 rw-p 00000000 00:00 0                  [heap]
Private_Dirty:      120 kB
7f00-7f10 rw-p 00000000 00:01 5678               /memfd:forkvm-guest-ram (deleted)
Private_Dirty:     1500 kB
7f20-7f30 rw-p 00000000 00:00 0 
Private_Dirty:       40 kB
7f40-7f50 rw-p 00000000 00:00 0 
Private_Dirty:        4 kB
7ff0-7ff1 rw-p 00000000 00:00 0                  [stack]
Private_Dirty:       12 kB
7ff2-7ff3 r--p 00000000 00:00 0                  [vvar]
Private_Dirty:        0 kB
";
        let split = process_split(smaps);
        assert_eq!(split["heap"], 120);
        assert_eq!(split["main stack"], 12);
        assert_eq!(split["anonymous (thread stacks, malloc arenas)"], 44);
        assert_eq!(split["files (executable data, libraries)"], 8);
        assert_eq!(split.len(), 4, "{split:?}");
    }

    #[test]
    fn file_offsets_above_the_mmio_hole_are_guest_addresses_above_4_gib() {
        let mib = |n: u64| n << 20;
        assert_eq!(guest_addr(0x0234_5000, mib(256)), Some(0x0234_5000));
        assert_eq!(guest_addr(mib(256), mib(256)), None, "past the RAM");
        // 4 GiB of RAM: 3 GiB below the hole, the last 1 GiB from 4 GiB up.
        assert_eq!(guest_addr(0xBFFF_F000, mib(4096)), Some(0xBFFF_F000));
        assert_eq!(guest_addr(0xC000_0000, mib(4096)), Some(0x1_0000_0000));
        assert_eq!(guest_addr(0xC000_1000, mib(4096)), Some(0x1_0000_1000));
    }

    #[test]
    fn only_present_private_pages_are_copies() {
        assert!(is_copy(1 << 63 | 0x1234));
        assert!(!is_copy(1 << 63 | 1 << 61), "a page of the shared file");
        assert!(!is_copy(0), "not present");
        assert!(!is_copy(1 << 62), "swapped, not present");
    }

    #[test]
    fn page_flags_name_the_guest_use() {
        assert_eq!(kind(1 << kpf::BUDDY), "free (buddy)");
        assert_eq!(kind(1 << kpf::SLAB | 1 << kpf::LRU), "slab");
        assert_eq!(kind(1 << kpf::PGTABLE), "page table");
        assert_eq!(kind(1 << kpf::ANON | 1 << kpf::LRU), "process memory");
        assert_eq!(kind(1 << kpf::LRU), "page cache");
        assert_eq!(
            kind(1 << kpf::RESERVED),
            "reserved (memmap, per-cpu, boot allocations)"
        );
        assert_eq!(
            kind(0),
            "other kernel (stacks, vmalloc, per-cpu lists, buffers)"
        );
        assert_eq!(kind(1 << kpf::NOPAGE | 1 << kpf::BUDDY), "no page");
    }

    #[test]
    fn copies_are_counted_by_kind_and_zero_contents() {
        let copies = [0u64, 1, 2, 9]
            .map(|pfn| CopiedPage {
                gpa: pfn * PAGE,
                host_addr: 0x1000_0000 + pfn * PAGE,
            })
            .to_vec();
        // Frames 0 and 1 slab, 2 free; frame 9 is past the flags the guest gave.
        let flags = [1 << kpf::SLAB, 1 << kpf::SLAB, 1 << kpf::BUDDY];
        let t = classify(&copies, &flags, &[], |addr, buf| {
            buf.fill(u8::from(addr == 0x1000_1000));
            true
        });
        assert_eq!(t.kinds["slab"], (2, 1));
        assert_eq!(t.kinds["free (buddy)"], (1, 1));
        assert_eq!(t.unknown, 1);
        assert_eq!(t.total(), 4);
        // A page that cannot be read is not counted as zero.
        let t = classify(&copies[..1], &flags, &[], |_, _| false);
        assert_eq!(t.kinds["slab"], (1, 0));
        // A copy in the kernel image counts under its section.
        let sections = [(0x1000, 0x1fff, "kernel data".to_owned())];
        let t = classify(&copies, &flags, &sections, |_, buf| {
            buf.fill(1);
            true
        });
        assert_eq!(t.kinds["kernel data"], (1, 0));
        assert_eq!(t.kinds["slab"], (1, 0));
    }
}
