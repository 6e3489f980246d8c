//! Capabilities of a VM process once it is set up.
//!
//! A VM process starts with whatever its launcher had (root's full set for `forkvm boot`
//! as root): it needs some of it to build the VM (open TAPs, put them on bridges). Once
//! the VM is built it drops, for good, every capability but those later work needs
//! ([`Needs`]): from the bounding set (so nothing it executes can have them), the
//! inheritable and ambient sets, and the permitted set. The effective set keeps only
//! what a shared directory's file server uses all the time ([`FILE_SERVER`]); a
//! capability needed now and then (`CAP_NET_ADMIN` to put a fork child's TAP on its
//! bridge) stays permitted and is raised around that one call ([`with_raised`]).
//!
//! Capabilities are per thread: the calls here change the calling thread's sets, and the
//! threads it starts afterwards inherit them. vCPU and API threads, started while the VM
//! is being built, drop everything themselves ([`drop_all`]).

pub use caps::Capability;
use caps::{CapSet, CapsHashSet};

/// Why capabilities could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// The kernel refused a change.
    #[error("cannot {what}")]
    Change {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: caps::errors::CapsError,
    },
    /// A capability could not be dropped from the bounding set.
    #[error("cannot drop capability {index} from the bounding set")]
    Bounding {
        /// Its number.
        index: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a set-up VM process still needs capabilities for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// It has NICs on a bridge: its fork children make TAPs of their own and put them on
    /// the bridge (`CAP_NET_ADMIN`, permitted, raised only for that).
    pub network: bool,
    /// It serves shared directories: its FUSE server creates files as the guest's users,
    /// sets owners and modes, and reads what root may read ([`FILE_SERVER`], effective).
    pub files: bool,
}

/// The capabilities a shared directory's file server acts with (virtiofsd keeps the same).
pub const FILE_SERVER: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
];

impl Needs {
    /// The capabilities kept permitted.
    pub fn permitted(&self) -> CapsHashSet {
        let mut set = self.effective();
        if self.network {
            set.insert(Capability::CAP_NET_ADMIN);
        }
        set
    }

    /// The capabilities kept effective.
    pub fn effective(&self) -> CapsHashSet {
        if self.files {
            FILE_SERVER.iter().copied().collect()
        } else {
            CapsHashSet::new()
        }
    }
}

fn change<T>(
    what: impl Into<String>,
    r: Result<T, caps::errors::CapsError>,
) -> Result<T, CapsError> {
    r.map_err(|source| CapsError::Change {
        what: what.into(),
        source,
    })
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`), or
/// the highest this crate knows.
fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| caps::all().iter().map(|c| c.index()).max().unwrap_or(40))
}

/// Drops, for the calling thread and what it starts from now on, every capability but
/// those `needs` keeps (see the module doc). A thread without `CAP_SETPCAP` (a process
/// that is not root's) cannot shrink its bounding set; with `no_new_privs` set nothing it
/// executes gains capabilities anyway, and its other sets are cleared as usual.
pub fn drop_all_but(needs: Needs) -> Result<(), CapsError> {
    // What it has of what it needs (a user that is not root has none of it).
    let has = change(
        "read the permitted capabilities",
        caps::read(None, CapSet::Permitted),
    )?;
    let permitted: CapsHashSet = needs.permitted().intersection(&has).copied().collect();
    let effective: CapsHashSet = needs.effective().intersection(&has).copied().collect();
    // Only a thread that can change its user ID (CAP_SETUID, the FUSE server's) gets
    // its effective set refilled, and only one with more permitted than effective minds.
    let refillable = effective.contains(&Capability::CAP_SETUID) && permitted != effective;
    KEEP_EFFECTIVE.with(|k| *k.borrow_mut() = refillable.then(|| effective.clone()));
    if change(
        "read the effective capabilities",
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP),
    )? {
        let keep: Vec<u8> = permitted.iter().map(|c| c.index()).collect();
        for index in 0..=last_cap() {
            if keep.contains(&index) {
                continue;
            }
            // SAFETY: prctl(PR_CAPBSET_DROP) takes a capability number and changes only
            // this thread's bounding set.
            let r =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(index), 0, 0, 0) };
            // EINVAL: a number this kernel does not have.
            if r != 0 {
                let source = std::io::Error::last_os_error();
                if source.raw_os_error() != Some(libc::EINVAL) {
                    return Err(CapsError::Bounding { index, source });
                }
            }
        }
    }
    change(
        "clear the ambient capabilities",
        caps::clear(None, CapSet::Ambient),
    )?;
    // What the processes it executes (its fork children, its pool's zygote) must have:
    // a process of uid 0 gets its bounding set (which is `permitted` now), one of a
    // family's own uid ([`crate::uid`]) only its ambient set, which `CAP_NET_ADMIN`
    // joins (a fork child makes its TAP and puts its own children's on a bridge).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let passed: CapsHashSet = match unsafe { libc::geteuid() } {
        0 => CapsHashSet::new(),
        _ => permitted
            .iter()
            .copied()
            .filter(|c| *c == Capability::CAP_NET_ADMIN)
            .collect(),
    };
    change(
        "set the inheritable capabilities",
        caps::set(None, CapSet::Inheritable, &passed),
    )?;
    // Effective first: it must stay a subset of the permitted set at every step.
    change(
        "set the effective capabilities",
        caps::set(None, CapSet::Effective, &effective),
    )?;
    change(
        "set the permitted capabilities",
        caps::set(None, CapSet::Permitted, &permitted),
    )?;
    for c in passed {
        change(
            "pass CAP_NET_ADMIN on",
            caps::raise(None, CapSet::Ambient, c),
        )?;
    }
    Ok(())
}

thread_local! {
    /// The effective set [`drop_all_but`] left this thread with.
    static KEEP_EFFECTIVE: std::cell::RefCell<Option<CapsHashSet>> =
        const { std::cell::RefCell::new(None) };
}

/// Puts the calling thread's effective set back to what [`drop_all_but`] left: the
/// kernel refills it from the permitted set whenever the thread's effective user ID
/// returns to 0 (the FUSE server acting as a guest's user does that), which would make
/// a capability kept only permitted (`CAP_NET_ADMIN`) effective: the FUSE server calls it
/// after each request it serves as a guest's user. Nothing for a thread that did not drop, or cannot change its
/// user ID.
pub fn restore_effective() {
    KEEP_EFFECTIVE.with(|k| {
        let Some(keep) = &*k.borrow() else { return };
        if caps::read(None, CapSet::Effective).is_ok_and(|now| now != *keep) {
            if let Err(e) = caps::set(None, CapSet::Effective, keep) {
                tracing::warn!("cannot lower the effective capabilities again: {e}");
            }
        }
    });
}

/// Drops every capability of the calling thread (a vCPU or API thread): none of their
/// work needs one.
pub fn drop_all() -> Result<(), CapsError> {
    drop_all_but(Needs::default())
}

/// Runs `f` with `cap` raised in the calling thread's effective set, then lowered again.
/// A thread that does not have `cap` permitted runs `f` as it is (a VM of a user without
/// capabilities, or one not jailed that has it effective already).
pub fn with_raised<T>(cap: Capability, f: impl FnOnce() -> T) -> T {
    let raise = matches!(caps::has_cap(None, CapSet::Permitted, cap), Ok(true))
        && matches!(caps::has_cap(None, CapSet::Effective, cap), Ok(false));
    if raise {
        if let Err(e) = caps::raise(None, CapSet::Effective, cap) {
            tracing::warn!("cannot raise {cap}: {e}");
        }
    }
    let out = f();
    if raise {
        if let Err(e) = caps::drop(None, CapSet::Effective, cap) {
            tracing::warn!("cannot lower {cap} again: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_need_keeps() {
        assert!(Needs::default().permitted().is_empty());
        assert!(Needs::default().effective().is_empty());
        let net = Needs {
            network: true,
            files: false,
        };
        assert_eq!(
            net.permitted(),
            [Capability::CAP_NET_ADMIN].into_iter().collect()
        );
        assert!(net.effective().is_empty(), "raised only when used");
        let files = Needs {
            network: false,
            files: true,
        };
        assert_eq!(files.effective().len(), FILE_SERVER.len());
        assert!(!files.permitted().contains(&Capability::CAP_NET_ADMIN));
        assert!(!files.permitted().contains(&Capability::CAP_SYS_ADMIN));
    }

    #[test]
    fn a_thread_that_drops_everything_keeps_nothing_and_cannot_raise() {
        // In a thread of its own: capabilities are per thread.
        std::thread::spawn(|| {
            drop_all().unwrap();
            for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
                assert!(caps::read(None, set).unwrap().is_empty(), "{set:?}");
            }
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_NET_ADMIN).is_err());
            // Root's bounding set is emptied; without CAP_SETPCAP it is left as it is.
            let bounding = caps::read(None, CapSet::Bounding).unwrap();
            if !bounding.contains(&Capability::CAP_SETPCAP) {
                assert!(bounding.is_empty(), "{bounding:?}");
            }
        })
        .join()
        .unwrap();
    }
}
