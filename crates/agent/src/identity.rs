//! [`crate::Request::Identity`] inside the guest: what makes a fork child distinct from
//! its parent (fresh kernel entropy, hostname, NIC MACs).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why an identity could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Less randomness than a CRNG reseed needs.
    #[error("seed of {0} bytes is too short (need 32)")]
    ShortSeed(usize),
    /// Not `aa:bb:cc:dd:ee:ff`.
    #[error("{0:?} is not a MAC")]
    BadMac(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call and its object.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn os(what: impl Into<String>) -> IdentityError {
    IdentityError::Os {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// `/dev/urandom`, opened once ([`random_device`]) before the VM is forked.
static URANDOM: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// `/dev/urandom` for writing, opened on the first call and held from then on. The
/// agent calls it when it starts, for the reseed of a fork child to come: a fork child
/// that opens it (a path walk, a `struct file`) and closes it again (its release
/// deferred through RCU) writes kernel pages it shares with its parent, each copied for
/// it alone. If that first call failed, [`reseed`] tries again.
pub fn random_device() -> io::Result<&'static std::fs::File> {
    if let Some(f) = URANDOM.get() {
        return Ok(f);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // Two threads may open it at once: one file is kept, the other closed.
    Ok(URANDOM.get_or_init(|| f))
}

/// Adds `seed` to the kernel's input pool, credited as entropy, and reseeds the CRNG.
pub fn reseed(seed: &[u8]) -> Result<(), IdentityError> {
    if seed.len() < 32 {
        return Err(IdentityError::ShortSeed(seed.len()));
    }
    let f = random_device().map_err(|source| IdentityError::Os {
        what: "/dev/urandom".into(),
        source,
    })?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    let fd = f.as_raw_fd();
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its header;
    // `info` holds exactly that.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(os("RNDADDENTROPY"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } < 0 {
        return Err(os("RNDRESEEDCRNG"));
    }
    Ok(())
}

/// Sets the kernel's hostname.
pub fn set_hostname(name: &str) -> Result<(), IdentityError> {
    // SAFETY: sethostname reads `len` bytes from the pointer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        return Err(os(format!("sethostname {name:?}")));
    }
    Ok(())
}

/// The kernel's current hostname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], IdentityError> {
    let bad = || IdentityError::BadMac(s.to_owned());
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            if p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
                u8::from_str_radix(p, 16).map_err(|_| bad())
            } else {
                Err(bad())
            }
        })
        .collect::<Result<_, _>>()?;
    parts.try_into().map_err(|_| bad())
}

/// A datagram socket for interface ioctls.
fn ioctl_socket() -> Result<OwnedFd, IdentityError> {
    // SAFETY: creating a socket has no memory-safety preconditions.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(os("socket"));
    }
    // SAFETY: `s` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn ifreq(ifname: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    ifr
}

fn get_flags(
    s: &OwnedFd,
    ifr: &mut libc::ifreq,
    ifname: &str,
) -> Result<libc::c_short, IdentityError> {
    // SAFETY: SIOCGIFFLAGS fills ifr_ifru.ifru_flags of a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut *ifr) } < 0 {
        return Err(os(format!("{ifname}: SIOCGIFFLAGS")));
    }
    // SAFETY: the union member SIOCGIFFLAGS just set.
    Ok(unsafe { ifr.ifr_ifru.ifru_flags })
}

fn set_flags(
    s: &OwnedFd,
    ifr: &mut libc::ifreq,
    ifname: &str,
    flags: libc::c_short,
) -> Result<(), IdentityError> {
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: SIOCSIFFLAGS reads the flags of a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &*ifr) } < 0 {
        return Err(os(format!("{ifname}: SIOCSIFFLAGS")));
    }
    Ok(())
}

/// Brings `ifname` up (used for `lo` at boot).
pub fn link_up(ifname: &str) -> Result<(), IdentityError> {
    let s = ioctl_socket()?;
    let mut ifr = ifreq(ifname);
    let flags = get_flags(&s, &mut ifr, ifname)?;
    set_flags(&s, &mut ifr, ifname, flags | libc::IFF_UP as libc::c_short)
}

/// Sets the MAC of `ifname` (down, set, up: virtio-net without a control queue only
/// takes a new address while down). A NIC that has that MAC already is left alone: an
/// identity sent again (its answer was slow) must not take down, and so strip of its
/// routes, a NIC configured since.
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> Result<(), IdentityError> {
    let s = ioctl_socket()?;
    let mut ifr = ifreq(ifname);
    // SAFETY: SIOCGIFHWADDR writes the hardware address into a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut ifr) } == 0 {
        // SAFETY: the hardware-address member, which SIOCGIFHWADDR filled.
        let now = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        if now.iter().zip(mac).all(|(&a, b)| a as u8 == b) {
            return Ok(());
        }
    }
    let mut ifr = ifreq(ifname);
    let flags = get_flags(&s, &mut ifr, ifname)?;
    let up = flags & libc::IFF_UP as libc::c_short != 0;
    if up {
        set_flags(
            &s,
            &mut ifr,
            ifname,
            flags & !(libc::IFF_UP as libc::c_short),
        )?;
    }
    // SAFETY: writing the hardware-address member of the union.
    unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads the hardware address of a valid ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR as _, &ifr) } < 0 {
        return Err(os(format!("{ifname}: SIOCSIFHWADDR")));
    }
    if up {
        set_flags(&s, &mut ifr, ifname, flags)?;
    }
    Ok(())
}

/// Applies a whole identity: entropy first (so nothing after it shares the parent's
/// random state), then the wall clock (when the host sent its time), hostname, and the
/// MACs of eth0, eth1, ... in order.
pub fn apply(
    hostname: &str,
    seed: &[u8],
    macs: &[String],
    host_time_ns: Option<u64>,
) -> Result<(), IdentityError> {
    reseed(seed)?;
    if let Some(sent) = host_time_ns {
        // Best effort: a clock that cannot be set does not keep the child from its
        // hostname and MACs.
        if let Err(e) = correct_clock(hostname, sent) {
            eprintln!("forkvm-agent: cannot set the wall clock: {e}");
        }
    }
    set_hostname(hostname)?;
    // A NIC that was down (unplugged) stays down with its new MAC.
    let _links = crate::network::links_lock();
    for (i, m) in macs.iter().enumerate() {
        set_mac(&format!("eth{i}"), parse_mac(m)?)?;
    }
    Ok(())
}

/// How far behind the host's time at sending a fork child's clock may read before it
/// is set: a clock moved on correctly reads at least that time (the request took some
/// time to arrive), give or take the clocks' granularity.
pub const CLOCK_BEHIND_SLACK_NS: u64 = 100_000_000;

/// How far ahead of the host's time at sending a fork child's clock may read: the
/// request's way into the guest (a connection accepted and read by a thread of a guest
/// just restored, seconds on a loaded host) is not known; beyond this the clock is wrong.
pub const CLOCK_AHEAD_SLACK_NS: u64 = 10_000_000_000;

/// The wall-clock time (nanoseconds since the epoch) to set a fork child's clock to,
/// when it reads `guest_ns` and the host's read `sent_ns` as it sent the identity; `None`
/// when the guest's clock is right. The guest's clock is moved on by the VMM's restore
/// (kvmclock), so this only catches what that missed: a template whose guest booted
/// with a wrong clock, a host clock stepped since the save.
pub fn clock_correction(guest_ns: u64, sent_ns: u64) -> Option<u64> {
    let behind = guest_ns.saturating_add(CLOCK_BEHIND_SLACK_NS) < sent_ns;
    let ahead = guest_ns > sent_ns.saturating_add(CLOCK_AHEAD_SLACK_NS);
    (behind || ahead).then_some(sent_ns)
}

/// The identity (by its hostname) whose host time was looked at last, and that time: a
/// retry of the same identity the host gave up on may still be read after a later one,
/// and must not set the clock back. Another identity (a fork of this child, a later
/// child of its template) compares afresh: its parent's times are not its own.
static LATEST: std::sync::Mutex<Option<(String, u64)>> = std::sync::Mutex::new(None);

/// Sets the wall clock to `sent` (the host's time as it sent identity `hostname`)
/// where [`clock_correction`] says it is wrong, unless a later attempt of the same
/// identity was looked at already.
fn correct_clock(hostname: &str, sent: u64) -> Result<(), IdentityError> {
    // Held across the check and the set: two attempts read at once set in order.
    let mut latest = LATEST.lock().unwrap_or_else(|p| p.into_inner());
    if superseded(latest.as_ref(), hostname, sent) {
        return Ok(());
    }
    *latest = Some((hostname.to_owned(), sent));
    // A clock before 1970 reads as 0: far behind.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64);
    if let Some(to) = clock_correction(now, sent) {
        set_wall_clock_ns(to)?;
        eprintln!(
            "forkvm-agent: the wall clock was {} ms off the host's: set",
            (i128::from(now) - i128::from(sent)) / 1_000_000
        );
    }
    Ok(())
}

/// Whether the host time `sent` of identity `hostname` is older than (or the same as)
/// one of that identity looked at already (`latest`).
fn superseded(latest: Option<&(String, u64)>, hostname: &str, sent: u64) -> bool {
    matches!(latest, Some((h, t)) if h == hostname && *t >= sent)
}

fn set_wall_clock_ns(ns: u64) -> Result<(), IdentityError> {
    // `as _`: the field's own type (64-bit on glibc and on musl >= 1.2; naming
    // `libc::time_t` is deprecated on musl targets).
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as _,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec the kernel only reads.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(os("clock_settime(CLOCK_REALTIME)"));
    }
    Ok(())
}

/// `/etc/hosts` with `127.0.0.1 localhost` present and `hostname` on forkvm's own line
/// (tagged `# forkvm`, replaced on the next call).
pub fn hosts_with(existing: &str, hostname: Option<&str>) -> String {
    let mut out = String::new();
    let mut has_localhost = false;
    for line in existing.lines() {
        if line.trim_end().ends_with("# forkvm") {
            continue;
        }
        let mut words = line.split('#').next().unwrap_or("").split_whitespace();
        if words.next() == Some("127.0.0.1") && words.any(|w| w == "localhost") {
            has_localhost = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !has_localhost {
        out.insert_str(0, "127.0.0.1\tlocalhost\n");
    }
    if let Some(h) = hostname {
        out.push_str(&format!("127.0.1.1\t{h}\t# forkvm\n"));
    }
    out
}

/// Whether `root` is a filesystem the host serves (virtio-fs, a FUSE filesystem): a
/// container root shared from the host's directory.
pub fn is_host_served(root: &Path) -> bool {
    const FUSE_SUPER_MAGIC: u32 = 0x6573_5546;
    rustix::fs::statfs(root).is_ok_and(|st| st.f_type as u32 == FUSE_SUPER_MAGIC)
}

/// Whether the agent writes the hostname into `root`'s `/etc` (at boot and when a fork
/// child takes its identity): a container root of the VM's own. A root the host
/// serves is the engine's directory: its files are the engine's to write, as on a runc
/// host (the engine binds its own `/etc/hosts`).
pub fn root_takes_hostname_files(root: &Path) -> bool {
    root != Path::new("/") && !is_host_served(root)
}

/// Writes `<root>/etc/hostname` and makes `<root>/etc/hosts` resolve it and `localhost`.
/// Both are resolved inside the root as the container sees it (an image's `etc`
/// symlink cannot point the write at the guest's own files) and replaced, never written
/// through a symlink; a read-only root is written through a private writable view
/// ([`crate::container::with_writable_root`]), never made writable for the container.
pub fn write_hostname_files(root: &Path, hostname: &str) -> io::Result<()> {
    use crate::container::{read_in_root, replace_in_root, with_writable_root};
    with_writable_root(root, |root| {
        replace_in_root(root, "/etc/hostname", format!("{hostname}\n").as_bytes())?;
        let existing = read_in_root(root, "/etc/hosts")?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        replace_in_root(
            root,
            "/etc/hosts",
            hosts_with(&existing, Some(hostname)).as_bytes(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_retry_of_an_identity_never_sets_the_clock_back_but_a_new_identity_does() {
        let seen = ("fork-1".to_owned(), 2_000);
        assert!(!superseded(None, "fork-1", 1_000));
        assert!(superseded(Some(&seen), "fork-1", 1_000), "an older attempt");
        assert!(superseded(Some(&seen), "fork-1", 2_000), "the same attempt");
        assert!(!superseded(Some(&seen), "fork-1", 3_000), "a later attempt");
        // A child of this child (or of a template saved from it), after the host's
        // clock stepped back: its own identity, compared afresh.
        assert!(!superseded(Some(&seen), "fork-2", 1_000));
    }

    #[test]
    fn a_child_clock_is_set_only_when_behind_the_host_or_far_ahead() {
        const S: u64 = 1_000_000_000;
        let sent = 1_796_000_000 * S;
        // Moved on right: the request took a while to arrive.
        assert_eq!(clock_correction(sent, sent), None);
        assert_eq!(clock_correction(sent + 3 * S, sent), None);
        assert_eq!(clock_correction(sent - CLOCK_BEHIND_SLACK_NS, sent), None);
        // Stuck at a save eight seconds ago, or a template booted at the epoch (the
        // failure CI saw once: a child reading 179 s since 1970).
        assert_eq!(clock_correction(sent - 8 * S, sent), Some(sent));
        assert_eq!(clock_correction(179 * S, sent), Some(sent));
        assert_eq!(clock_correction(0, sent), Some(sent));
        // Far ahead (a host clock stepped back since the save).
        assert_eq!(
            clock_correction(sent + CLOCK_AHEAD_SLACK_NS + 1, sent),
            Some(sent)
        );
        assert_eq!(clock_correction(u64::MAX, sent), Some(sent));
    }

    #[test]
    fn only_a_root_of_the_vms_own_takes_the_hostname_files() {
        // The guest's own `/` is not a container root; a local directory is one of the
        // VM's own (not FUSE, which only a guest with a shared root mounts).
        assert!(!root_takes_hostname_files(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_host_served(dir.path()));
        assert!(root_takes_hostname_files(dir.path()));
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 0x0a, 0xff, 0, 1]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:0:0:0:0:1",
            "zz:00:00:00:00:00",
            "+1:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_random_device_is_opened_ahead_for_writing() {
        let f = random_device().unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_WRONLY);
        // Opened once: a second call keeps the first file.
        let fd = f.as_raw_fd();
        assert_eq!(random_device().unwrap().as_raw_fd(), fd);
    }

    #[test]
    fn a_short_seed_is_refused_before_touching_the_kernel() {
        assert!(matches!(
            reseed(&[0; 31]),
            Err(IdentityError::ShortSeed(31))
        ));
    }

    #[test]
    fn hosts_gets_localhost_and_the_hostname_once() {
        let h = hosts_with("", Some("web"));
        assert_eq!(h, "127.0.0.1\tlocalhost\n127.0.1.1\tweb\t# forkvm\n");
        // Existing content is kept; the previous forkvm line is replaced.
        let h2 = hosts_with(&h, Some("fork-1"));
        assert_eq!(h2, "127.0.0.1\tlocalhost\n127.0.1.1\tfork-1\t# forkvm\n");
        let debian = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n";
        assert_eq!(
            hosts_with(debian, None),
            debian,
            "nothing added when localhost is there"
        );
        assert!(
            hosts_with("127.0.0.1 other # localhost\n", None).starts_with("127.0.0.1\tlocalhost\n")
        );
    }

    #[test]
    fn hostname_files_are_written_into_the_root() {
        let dir = std::env::temp_dir().join(format!("forkvm-agent-init-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hosts"), "10.0.0.1 db\n").unwrap();
        write_hostname_files(&dir, "web-1").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/hostname")).unwrap(),
            "web-1\n"
        );
        let hosts = std::fs::read_to_string(dir.join("etc/hosts")).unwrap();
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n10.0.0.1 db\n127.0.1.1\tweb-1\t# forkvm\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
