//! Addresses on forkvm's own network: one lease file per address under
//! [`LEASE_ROOT`]`/<bridge>/` (one directory per bridge, whatever state root the VMs
//! register under: the bridge is the host's), created exclusively (so two VMs starting at once never
//! take the same address) and naming the process that holds it. A lease whose process is
//! gone is free again: a VM that ends, however it ends, gives its address back without
//! anyone cleaning up after it. The holder is the process that runs the VM (`forkvm run`,
//! or a fork child's own VM process, which takes its address when it takes its identity).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::ProcessIdentity;

/// Where the leases of each bridge are kept.
pub const LEASE_ROOT: &str = forkvm_jail::LEASE_ROOT;

/// A lease file that is still empty this long after it was made belongs to nobody (its
/// maker died between creating and writing it).
const UNWRITTEN_GRACE: Duration = Duration::from_secs(10);

/// An IPv4 subnet, `address/prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// Its network address (host bits zero).
    pub network: Ipv4Addr,
    /// Its prefix length, 8 to 30.
    pub prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = LeaseError;

    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let bad = |why: &str| LeaseError::BadSubnet(format!("{s:?}: {why}"));
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("the prefix must be 8 to 30"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(addr) & !mask != 0 {
            return Err(bad("host bits are set (give the network address)"));
        }
        Ok(Self {
            network: addr,
            prefix,
        })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Subnet {
    /// The subnet `addr/prefix` is in (prefix 8 to 30).
    pub fn of(addr: Ipv4Addr, prefix: u8) -> Result<Self, LeaseError> {
        if !(8..=30).contains(&prefix) {
            return Err(LeaseError::BadSubnet(format!(
                "{addr}/{prefix}: the prefix must be 8 to 30"
            )));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// The `n`th address of the subnet (0 is the network address itself).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    /// Whether `addr` is in the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(addr) & mask == u32::from(self.network)
    }
}

/// Why no address could be leased.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The subnet is malformed.
    #[error("bad subnet {0}")]
    BadSubnet(String),
    /// Every address is held by a live process.
    #[error("no free address left in {0}")]
    Exhausted(Subnet),
    /// The lease directory cannot be used.
    #[error("cannot use the lease directory {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The addresses of one network of forkvm's.
#[derive(Clone, Debug)]
pub struct Leases {
    dir: PathBuf,
    subnet: Subnet,
    gateway: Ipv4Addr,
}

/// An address held by a process.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    /// The address.
    pub addr: Ipv4Addr,
    holder: ProcessIdentity,
}

impl Leases {
    /// The leases of the bridge `bridge`'s network, `subnet`; `gateway` (the host's
    /// address on it) is never leased.
    pub fn of_bridge(bridge: &str, subnet: Subnet, gateway: Ipv4Addr) -> Self {
        Self::in_dir(&Path::new(LEASE_ROOT).join(bridge), subnet, gateway)
    }

    /// Leases kept in `dir` (tests).
    pub fn in_dir(dir: &Path, subnet: Subnet, gateway: Ipv4Addr) -> Self {
        Self {
            dir: dir.to_owned(),
            subnet,
            gateway,
        }
    }

    /// Leases the lowest free address to `holder`.
    pub fn acquire(&self, holder: ProcessIdentity) -> Result<Lease, LeaseError> {
        let io = |source| LeaseError::Io {
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        // Fork children of a family with a uid of its own take their leases here.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = forkvm_jail::uid::open_to_families(&self.dir) {
                tracing::warn!("VM families may not lease addresses here: {e}");
            }
        }
        // Host addresses: not the network address, not the broadcast address.
        for n in 1..self.subnet.size() - 1 {
            let addr = self.subnet.nth(n).expect("n is below the size");
            if addr == self.gateway {
                continue;
            }
            let path = self.dir.join(addr.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        let body = serde_json::to_vec(&holder).expect("plain data");
                        f.write_all(&body).map_err(io)?;
                        return Ok(Lease { path, addr, holder });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if !is_stale(&path) {
                            break;
                        }
                        // Free again; another process may take it first (then this one
                        // moves on).
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => return Err(io(e)),
                }
            }
        }
        Err(LeaseError::Exhausted(self.subnet))
    }

    /// The addresses held now, with their holders (stale leases left out).
    pub fn held(&self) -> Vec<(Ipv4Addr, ProcessIdentity)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let addr: Ipv4Addr = e.file_name().to_str()?.parse().ok()?;
                let holder = holder_of(&e.path())?;
                holder.is_alive().then_some((addr, holder))
            })
            .collect();
        out.sort_by_key(|(addr, _)| *addr);
        out
    }
}

fn holder_of(path: &Path) -> Option<ProcessIdentity> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the lease at `path` holds nothing: its holder is gone, or it was never
/// written and is older than [`UNWRITTEN_GRACE`].
fn is_stale(path: &Path) -> bool {
    match holder_of(path) {
        Some(h) => !h.is_alive(),
        None => std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > UNWRITTEN_GRACE),
    }
}

impl Lease {
    /// Gives the address back (when this lease still holds it).
    pub fn release(self) {
        if holder_of(&self.path) == Some(self.holder) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(dir: &Path, subnet: &str) -> Leases {
        let subnet: Subnet = subnet.parse().unwrap();
        Leases::in_dir(dir, subnet, subnet.nth(1).unwrap())
    }

    #[test]
    fn subnets_parse_and_bad_ones_say_why() {
        let s: Subnet = "10.77.0.0/16".parse().unwrap();
        assert_eq!(s.to_string(), "10.77.0.0/16");
        assert_eq!(s.nth(1), Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(s.nth(65536), None);
        assert!(s.contains(Ipv4Addr::new(10, 77, 200, 3)));
        assert!(!s.contains(Ipv4Addr::new(10, 78, 0, 1)));
        for (bad, why) in [
            ("10.77.0.0", "ADDRESS/PREFIX"),
            ("10.77.0.1/16", "host bits"),
            ("10.77.0.0/31", "8 to 30"),
            ("ten/8", "IPv4"),
        ] {
            let e = bad.parse::<Subnet>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn addresses_are_unique_skip_the_gateway_and_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let l = leases(tmp.path(), "10.9.0.0/29");
        let me = ProcessIdentity::current();
        let a = l.acquire(me).unwrap();
        let b = l.acquire(me).unwrap();
        assert_eq!(
            a.addr,
            Ipv4Addr::new(10, 9, 0, 2),
            "the gateway .1 is skipped"
        );
        assert_eq!(b.addr, Ipv4Addr::new(10, 9, 0, 3));
        assert_eq!(l.held().len(), 2);
        a.release();
        assert_eq!(l.acquire(me).unwrap().addr, Ipv4Addr::new(10, 9, 0, 2));
        // .4 .5 .6 are left, .7 is the broadcast address.
        for want in [4, 5, 6] {
            assert_eq!(l.acquire(me).unwrap().addr, Ipv4Addr::new(10, 9, 0, want));
        }
        let e = l.acquire(me).unwrap_err();
        assert!(matches!(e, LeaseError::Exhausted(_)), "{e}");
    }

    #[test]
    fn a_dead_holders_address_is_free_again() {
        let tmp = tempfile::tempdir().unwrap();
        let l = leases(tmp.path(), "10.9.0.0/24");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = ProcessIdentity::of(child.id()).unwrap_or(ProcessIdentity {
            pid: child.id(),
            start_ticks: 1,
        });
        child.wait().unwrap();
        let gone = l.acquire(dead).unwrap();
        assert!(l.held().is_empty(), "a dead holder holds nothing");
        let mine = l.acquire(ProcessIdentity::current()).unwrap();
        assert_eq!(mine.addr, gone.addr);
        // Its release does not give away what another process now holds.
        gone.release();
        assert_eq!(l.held().len(), 1);
    }

    #[test]
    fn an_unwritten_lease_is_held_until_it_is_old() {
        let tmp = tempfile::tempdir().unwrap();
        let l = leases(tmp.path(), "10.9.0.0/24");
        std::fs::create_dir_all(&l.dir).unwrap();
        std::fs::write(l.dir.join("10.9.0.2"), b"").unwrap();
        let a = l.acquire(ProcessIdentity::current()).unwrap();
        assert_eq!(
            a.addr,
            Ipv4Addr::new(10, 9, 0, 3),
            "a lease being written is taken"
        );
    }
}
