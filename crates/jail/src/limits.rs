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

/// Bytes left alone below the frame that gives the stack back: the frames of the calls
/// that do it live there while they run.
const STACK_SLACK: usize = 4 << 12;

/// Gives back the pages of the main thread's stack more than four pages below this
/// function's own frame (`MADV_DONTNEED`: read again, they are new zeroed pages); every
/// frame of its callers lies above. A fork child decodes its VM's state on the main
/// thread, in frames of kilobytes each (a vCPU's saved state is ~6 KiB and the decoder
/// moves it through several of them): 48 KiB of stack it wrote once and never reaches
/// again while it runs the VM, each page its own copy. What lies below a thread's stack
/// pointer is dead by the ABI (x86-64's 128-byte red zone belongs to leaf functions,
/// which this is not): glibc does the same with an exited thread's stack. Returns the
/// bytes given back; 0 on a thread other than the main one (its stack is not `[stack]`).
#[inline(never)]
pub fn release_main_stack_below_here() -> io::Result<usize> {
    // SAFETY: getpid and gettid take no arguments.
    if unsafe { libc::getpid() != libc::gettid() } {
        return Ok(0);
    }
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let Some(stack) = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(mapping_range)
    else {
        return Err(io::Error::other("no [stack] mapping in /proc/self/maps"));
    };
    let here = 0u8;
    give_back_below(stack, std::hint::black_box(&here) as *const u8 as usize)
}

/// The addresses a line of `/proc/PID/maps` (or a mapping's first line in `smaps`)
/// covers; `None` for any other line.
fn mapping_range(line: &str) -> Option<std::ops::Range<usize>> {
    let (a, b) = line.split_whitespace().next()?.split_once('-')?;
    Some(usize::from_str_radix(a, 16).ok()?..usize::from_str_radix(b, 16).ok()?)
}

/// Gives back the whole pages of the stack mapping `stack` that lie more than
/// [`STACK_SLACK`] below `here`, an address in the caller's frame on that stack; nothing
/// if `here` is not in it (a thread on another stack).
fn give_back_below(stack: std::ops::Range<usize>, here: usize) -> io::Result<usize> {
    if !stack.contains(&here) {
        return Ok(0);
    }
    let low = stack.start;
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

    /// `Rss` of the mapping of this process that holds `addr`, KiB.
    fn resident_around(addr: usize) -> u64 {
        resident_of(&[addr])
    }

    /// `Rss` of the mappings of this process that hold any of `addrs`, each counted once,
    /// KiB. (Resident, not `Private_Dirty`: other tests fork, and while a forked process
    /// lives every page is shared with it.)
    fn resident_of(addrs: &[usize]) -> u64 {
        use std::io::Read;
        // Read into a buffer of its own mapping (far above the mmap threshold), never
        // into the heap whose pages are being counted.
        let mut smaps = String::with_capacity(16 << 20);
        std::fs::File::open("/proc/self/smaps")
            .unwrap()
            .read_to_string(&mut smaps)
            .unwrap();
        let (mut inside, mut found, mut kib) = (false, 0, 0);
        for line in smaps.lines() {
            if let Some(range) = mapping_range(line) {
                inside = addrs.iter().any(|x| range.contains(x));
                found += usize::from(inside);
                continue;
            }
            if inside {
                if let Some(k) = line.strip_prefix("Rss:") {
                    kib += k
                        .trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            }
        }
        assert!(found > 0, "no mapping holds {addrs:x?}");
        kib
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn free_heap_pages_are_given_back() {
        // 2 MiB in chunks below the mmap threshold, all written, then all but the last
        // freed: the last keeps the heap's top from shrinking by itself.
        let chunks: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 32 << 10]).collect();
        // An arena's chunks may lie in more than one mapping (a heap of its that filled).
        let at: Vec<usize> = chunks[..63].iter().map(|c| c.as_ptr() as usize).collect();
        let before = resident_of(&at);
        let mut chunks = chunks;
        let last = chunks.pop();
        drop(chunks);
        release_free_heap();
        let after = resident_of(&at);
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
                let stack = maps
                    .lines()
                    .filter_map(mapping_range)
                    .find(|r| r.contains(&here))
                    .unwrap();
                // Not on that stack: nothing.
                assert_eq!(
                    give_back_below(stack.end..stack.end + 4096, here).unwrap(),
                    0
                );
                let before = resident_around(here);
                let given = give_back_below(stack, here).unwrap();
                let after = resident_around(here);
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

    /// Set in the copy of the test binary that
    /// [`one_malloc_arena_keeps_new_threads_in_the_main_heap`] runs.
    const ARENA_CHILD: &str = "FORKVM_TEST_ONE_ARENA_CHILD";

    /// Whether `addr` lies in this process's `[heap]` (glibc's main arena).
    fn in_main_heap(addr: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter(|l| l.ends_with("[heap]"))
            .any(|l| mapping_range(l).unwrap().contains(&addr))
    }

    /// What a new thread's first allocation lands in: the main heap or not.
    fn new_thread_allocates_in_main_heap() -> bool {
        std::thread::spawn(|| {
            let b = std::hint::black_box(vec![7u8; 1000]);
            in_main_heap(b.as_ptr() as usize)
        })
        .join()
        .unwrap()
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn one_malloc_arena_keeps_new_threads_in_the_main_heap() {
        if std::env::var_os(ARENA_CHILD).is_some() {
            // The copy: one test, on the harness's main thread, before any other thread.
            let arg = std::env::var(ARENA_CHILD).unwrap();
            if arg == "one" {
                one_malloc_arena().unwrap();
            }
            let main_heap = new_thread_allocates_in_main_heap();
            assert_eq!(
                main_heap,
                arg == "one",
                "a new thread allocated in the main heap: {main_heap}"
            );
            return;
        }
        // glibc fixes the arena limit when a process makes its second arena: the limit
        // is tested in a fresh copy of this binary, with and without it.
        for arg in ["one", "default"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "limits::tests::one_malloc_arena_keeps_new_threads_in_the_main_heap",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(ARENA_CHILD, arg)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{arg}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
        }
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
