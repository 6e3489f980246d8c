//! The VM process's own resource limits: the open-file limit raised as far as the system
//! allows, up to [`MAX_OPEN_FILES`]. A VM may need many descriptors at once: the
//! virtio-fs server holds one `O_PATH` descriptor per file the guest looked up and has
//! not forgotten (the usual limits, 1024 soft and 4096 hard, stopped `bench fs` at its
//! 4043rd file), and a VM that forks holds one launch socket per child (and a pidfd per
//! warm one) until each child has reported, so a fork of 1000 would have run out at 1024.
//! And a fork child's memory: no transparent huge pages for its own heap
//! ([`no_huge_pages`]).

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
