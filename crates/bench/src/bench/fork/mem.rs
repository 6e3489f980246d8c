//! Memory of a VMM process: guest RAM mappings from `smaps`, the whole process from
//! `smaps_rollup`. What a child costs is its `Anonymous` memory: `Private_*` also counts
//! pages of the shared guest-memory file that only this process happens to map.

#[allow(unused_imports)]
use super::*;

/// Private memory of a process's guest-RAM mappings, from `/proc/PID/smaps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestRamMem {
    /// `Anonymous` of the guest-RAM mappings, KiB: the guest pages this process copied
    /// (written since the fork), what a child costs in guest RAM.
    pub anon_kib: u64,
    /// Private_Clean + Private_Dirty of the guest-RAM mappings, KiB. More than the
    /// copies: a page of the shared memory file that only this process maps counts
    /// as private too, though it is the same page for every process that maps it later.
    pub private_kib: u64,
    /// Private_Dirty alone, KiB.
    pub private_dirty_kib: u64,
    /// Rss of the guest-RAM mappings (shared pages included), KiB.
    pub rss_kib: u64,
    /// How many guest-RAM mappings were found.
    pub mappings: usize,
}

/// A whole process's memory, from `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rollup {
    /// Rss, KiB.
    pub rss_kib: u64,
    /// Pss (shared pages divided among the processes mapping them), KiB.
    pub pss_kib: u64,
    /// Private_Clean + Private_Dirty (+ Private_Hugetlb), KiB (shared-file pages only
    /// this process maps included, see [`GuestRamMem::private_kib`]).
    pub private_kib: u64,
    /// `Anonymous`, KiB: copied guest pages, heap, stacks, relocated pages of the
    /// executable; also the anonymous pages it shares copy-on-write with the process
    /// it was forked from (its pool's zygote) and that one's other children.
    pub anon_kib: u64,
    /// Private_Dirty, KiB: dirty pages no other process maps.
    pub private_dirty_kib: u64,
}

/// One process's memory at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemSample {
    /// Its guest-RAM mappings.
    pub guest_ram: GuestRamMem,
    /// The whole process.
    pub process: Rollup,
}

impl MemSample {
    /// The VMM process's own memory outside guest RAM, KiB: its dirty pages that no other
    /// process maps (heap, stacks, relocated executable pages written since it was
    /// forked from its pool's zygote; what it still shares with the zygote and its
    /// siblings is not its own).
    pub fn vmm_own_kib(&self) -> u64 {
        self.process
            .private_dirty_kib
            .saturating_sub(self.guest_ram.private_dirty_kib)
    }

    /// All that a fork child costs on its own, KiB: the guest pages it copied and
    /// [`MemSample::vmm_own_kib`].
    pub fn child_own_kib(&self) -> u64 {
        self.guest_ram.anon_kib + self.vmm_own_kib()
    }
}

/// The `N kB` value of a `Key:   N kB` line.
pub(crate) fn kib(rest: &str) -> u64 {
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether an smaps line starts a mapping (`start-end perms offset dev inode [path]`),
/// and if so its path (empty for anonymous memory).
pub(crate) fn mapping_header(line: &str) -> Option<&str> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let (a, b) = range.split_once('-')?;
    if a.is_empty() || b.is_empty() || !a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // perms, offset, dev, inode; then the (padded) path.
    for _ in 0..4 {
        it.next()?;
    }
    Some(it.next().unwrap_or("").trim())
}

/// Sums the guest-RAM mappings (path starting with [`GUEST_RAM_MEMFD`]) of an smaps text.
pub fn parse_smaps(text: &str) -> GuestRamMem {
    let mut m = GuestRamMem::default();
    let mut in_guest = false;
    for line in text.lines() {
        if let Some(path) = mapping_header(line) {
            in_guest = path.starts_with(GUEST_RAM_MEMFD);
            if in_guest {
                m.mappings += 1;
            }
            continue;
        }
        if !in_guest {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Rss" => m.rss_kib += kib(rest),
            "Anonymous" => m.anon_kib += kib(rest),
            "Private_Clean" => m.private_kib += kib(rest),
            "Private_Dirty" => {
                let v = kib(rest);
                m.private_kib += v;
                m.private_dirty_kib += v;
            }
            _ => {}
        }
    }
    m
}

/// Parses `/proc/PID/smaps_rollup`.
pub fn parse_rollup(text: &str) -> Rollup {
    let mut r = Rollup::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Rss" => r.rss_kib += kib(rest),
            "Pss" => r.pss_kib += kib(rest),
            "Anonymous" => r.anon_kib += kib(rest),
            "Private_Dirty" => {
                let v = kib(rest);
                r.private_kib += v;
                r.private_dirty_kib += v;
            }
            "Private_Clean" | "Private_Hugetlb" => r.private_kib += kib(rest),
            _ => {}
        }
    }
    r
}

/// Reads process `pid`'s memory figures.
pub(crate) fn read_mem(pid: u32) -> Result<MemSample> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    Ok(MemSample {
        guest_ram: parse_smaps(&smaps),
        process: parse_rollup(&rollup),
    })
}
