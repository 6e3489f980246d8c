//! The VM process's own resource limits: the open-file limit raised as far as the system
//! allows, up to [`MAX_OPEN_FILES`]. A VM may need many descriptors at once: the
//! virtio-fs server holds one `O_PATH` descriptor per file the guest looked up and has
//! not forgotten (the usual limits, 1024 soft and 4096 hard, stopped `bench fs` at its
//! 4043rd file), and a VM that forks holds one launch socket per child (and a pidfd per
//! warm one) until each child has reported, so a fork of 1000 would have run out at 1024.
//! And a fork child's memory: no transparent huge pages for its own heap
//! ([`no_huge_pages`]), one malloc arena for all its threads ([`one_malloc_arena`]), and
//! the heap's free pages and the main thread's stack below where it runs the VM given
//! back once it runs ([`release_free_heap`], [`release_main_stack_below_here`]).

use std::io;

/// The most open files [`raise_open_files`] asks for (virtiofsd's default: a guest
/// that looks up more files gets `EMFILE`, not the host's last descriptors).
pub const MAX_OPEN_FILES: libc::rlim_t = 1 << 20;

/// Raises this process's open-file limit: the soft limit, and the hard one as far as
/// `/proc/sys/fs/nr_open` and [`MAX_OPEN_FILES`] allow where the process may (else the
/// soft limit to the hard one). Returns the soft limit it is now.
pub fn raise_open_files() -> io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit that lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(lim.rlim_max);
    let wanted = nr_open.min(MAX_OPEN_FILES).max(lim.rlim_max);
    if lim.rlim_cur >= wanted {
        return Ok(lim.rlim_cur);
    }
    let mut last = io::Error::other("no limit tried");
    for max in [wanted, lim.rlim_max] {
        let new = libc::rlimit {
            rlim_cur: max,
            rlim_max: max,
        };
        // SAFETY: setrlimit reads one rlimit that lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(max);
        }
        last = io::Error::last_os_error();
    }
    Err(last)
}

/// Turns transparent huge pages off for this process and the processes it forks
/// (`PR_SET_THP_DISABLE`). A fork child must cost kilobytes: on a host whose THP
/// setting is `always` (Debian's), the first touch of its heap's next 2 MiB, or of a
/// malloc arena that grew that far, takes a whole huge page, and measured children
/// were 2 MiB larger now and then for it. Guest RAM is shared memory, which this does
/// not make smaller (a fork child's copies of guest pages are 4 KiB each anyway).
pub fn no_huge_pages() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Has every thread of this process (and of the processes it forks) allocate from
/// glibc's main arena (`M_ARENA_MAX` = 1). By default each new thread that allocates
/// gets an arena of its own, a mapping whose first pages it writes: a fork child's
/// vCPU, API and identity threads held 64 KiB in four of them, each its own copy. A VM
/// process's threads allocate little and seldom (device emulation works on guest memory
/// and buffers it keeps), so one lock is no contention. Must run before the process
/// starts a thread. A no-op where the C library is not glibc.
pub fn one_malloc_arena() -> io::Result<()> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt with integer arguments only.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
            return Err(io::Error::other("mallopt(M_ARENA_MAX, 1) refused"));
        }
    }
    Ok(())
}

/// Gives the pages of the heap's free chunks back to the kernel (`malloc_trim`, which
/// also `madvise`s free runs inside the heap away, not only its top). A fork child
/// decodes its launch and restores its VM, then frees what that took; the pages it
/// wrote stay its own (a copy of the zygote's, or new) until given back. Call it once
/// the work of a start is done: a page given back and needed again is a fault and a
/// new zeroed page, nothing lost. A no-op where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the allocator's locks itself; no pointer is passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Pages left alone below the caller's frame: what the calls that give the rest back
/// (and a signal handler run on this stack meanwhile) use.
const STACK_SLACK: usize = 4 << 12;

/// Gives back the pages of the main thread's stack more than a few pages below the
/// caller's frame (`MADV_DONTNEED`: read again, they are new zeroed pages). A fork child
/// decodes its VM's state on the main thread, in frames of kilobytes each (a vCPU's
/// saved state is ~6 KiB and the decoder moves it through several of them): 48 KiB of
/// stack it wrote once and never reaches again while it runs the VM, each page its own
/// copy. What lies below a thread's stack pointer is dead by the ABI (x86-64's 128-byte
/// red zone belongs to leaf functions, which this is not): glibc does the same with an
/// exited thread's stack. Returns the bytes given back; 0 on a thread other than the
/// main one (its stack is not `[stack]`).
#[inline(never)]
pub fn release_main_stack_below_here() -> io::Result<usize> {
    // SAFETY: getpid and gettid take no arguments.
    if unsafe { libc::getpid() != libc::gettid() } {
        return Ok(0);
    }
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let Some(low) = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| l.split('-').next())
        .and_then(|a| usize::from_str_radix(a, 16).ok())
    else {
        return Err(io::Error::other("no [stack] mapping in /proc/self/maps"));
    };
    let here = 0u8;
    give_back_below(low, std::hint::black_box(&here) as *const u8 as usize)
}

/// Gives back the whole pages of the stack mapping starting at `low` that lie more than
/// [`STACK_SLACK`] below `here`, an address in the caller's frame on that stack.
fn give_back_below(low: usize, here: usize) -> io::Result<usize> {
    let end = here.saturating_sub(STACK_SLACK) & !0xfff;
    if end <= low {
        return Ok(0);
    }
    let len = end - low;
    // SAFETY: [low, end) is the part of this thread's stack mapping below its live
    // frames (and the slack): no Rust object lives there, so nothing reads the zeroed
    // pages that replace it; the range lies within the one mapping `low` starts.
    if unsafe { libc::madvise(low as *mut libc::c_void, len, libc::MADV_DONTNEED) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_huge_pages_sets_the_process_flag() {
        // SAFETY: prctl with integer arguments only.
        let get = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        no_huge_pages().unwrap();
        assert_eq!(get(), 1);
    }

    /// `Private_Dirty` of the mapping of this process that holds `addr`, KiB.
    fn private_dirty_around(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(kib) = line.strip_prefix("Private_Dirty:") {
                    return kib.trim().trim_end_matches(" kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn free_heap_pages_are_given_back() {
        // 2 MiB in chunks below the mmap threshold, all written, then all but the last
        // freed: the last keeps the heap's top from shrinking by itself.
        let chunks: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 32 << 10]).collect();
        let at = chunks[32].as_ptr() as usize;
        let before = private_dirty_around(at);
        let mut chunks = chunks;
        let last = chunks.pop();
        drop(chunks);
        release_free_heap();
        let after = private_dirty_around(at);
        assert!(before >= 2000, "the chunks were written: {before} KiB");
        assert!(
            after + 1024 <= before,
            "{before} KiB before, {after} KiB after"
        );
        drop(last);
    }

    /// Writes `kib` KiB of this thread's stack, in frames of 4 KiB.
    #[inline(never)]
    fn write_stack(kib: usize) -> u8 {
        let frame = std::hint::black_box([kib as u8; 4096]);
        if kib <= 4 {
            return frame[7];
        }
        frame[9].wrapping_add(write_stack(kib - 4))
    }

    #[test]
    fn the_stack_below_the_caller_is_given_back() {
        // A thread of its own, with a stack of a known size: the test's own is in use.
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(|| {
                write_stack(512);
                let here = 0u8;
                let here = std::hint::black_box(&here) as *const u8 as usize;
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                let low = maps
                    .lines()
                    .filter_map(|l| l.split_whitespace().next()?.split_once('-'))
                    .map(|(a, b)| {
                        (
                            usize::from_str_radix(a, 16).unwrap(),
                            usize::from_str_radix(b, 16).unwrap(),
                        )
                    })
                    .find(|(a, b)| (*a..*b).contains(&here))
                    .unwrap()
                    .0;
                let before = private_dirty_around(here);
                let given = give_back_below(low, here).unwrap();
                let after = private_dirty_around(here);
                assert!(given >= 480 << 10, "{given} bytes given back");
                assert!(before >= 512, "the frames were written: {before} KiB");
                assert!(
                    after + 480 <= before,
                    "{before} KiB before, {after} KiB after"
                );
                // The stack still works where it was given back.
                assert_eq!(write_stack(512), write_stack(512));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn only_the_main_thread_gives_its_stack_back() {
        // The test harness runs tests on threads of their own.
        assert_eq!(release_main_stack_below_here().unwrap(), 0);
    }

    #[test]
    fn one_malloc_arena_is_accepted() {
        one_malloc_arena().unwrap();
    }

    #[test]
    fn the_soft_limit_reaches_at_least_the_hard_one() {
        let now = raise_open_files().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit that lives across the call.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, now);
        assert_eq!(lim.rlim_cur, lim.rlim_max, "soft raised to hard");
        // A second call changes nothing.
        assert_eq!(raise_open_files().unwrap(), now);
    }
}
