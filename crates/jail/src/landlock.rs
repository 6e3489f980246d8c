//! Where a VM process may change the file system: a Landlock ruleset.
//!
//! A VM process is uid 0 without capabilities: the file modes of most of the host's files
//! would let it write them. Landlock (an unprivileged LSM, in Linux since 5.13) takes
//! that away: once [`restrict`] ran, the process and everything it starts may create,
//! write, truncate, rename or remove files only beneath the directories and in the files
//! it was given (its state root, its cgroups, its disks and shares, `/dev/kvm`, ...).
//! Reading, executing, ioctls and connecting to sockets are not restricted here (the
//! seccomp filters narrow those).
//!
//! The ruleset binds the calling thread and what it starts (Landlock before ABI 8 has no
//! process-wide form): it is applied while the VM process is still single-threaded.
//! Where the kernel has no Landlock (or an older ABI), the rights it does not know are
//! left out and [`Restricted`] says so; the process runs on.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};
use serde::{Deserialize, Serialize};

/// The newest ABI whose rights are asked for; a kernel with less gets what it has.
const TARGET: ABI = ABI::V3;

/// Why the ruleset could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel refused the ruleset, a rule or the restriction.
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// More than one thread runs: the others would not be bound.
    #[error(
        "landlock: {0} threads run; the file-system rules must be applied while the VM \
         process has one"
    )]
    Threads(usize),
}

/// How far the kernel enforces the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restricted {
    /// Every right asked for is enforced.
    Fully,
    /// The kernel's Landlock is older (ABI 2): truncating a file by its path is not
    /// ruled.
    Partially,
    /// The kernel has no Landlock (not built in, or not enabled at boot), or only its
    /// first version (Linux 5.13-5.18), which forkvm's renames cannot live with.
    Not,
}

/// The places a VM process may change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writable {
    /// Directories beneath which it may create, write, rename and remove anything.
    pub dirs: Vec<PathBuf>,
    /// Files (or devices) it may open for writing and truncate.
    pub files: Vec<PathBuf>,
    /// Directories beneath which it may only make Unix sockets (where a vsock socket
    /// lies, and its fork children's beside it: often a shared one, such as `/tmp`).
    #[serde(default)]
    pub sockets: Vec<PathBuf>,
}

impl Writable {
    /// Adds the directory `dir` (beneath which everything may change).
    pub fn dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.dirs.push(resolved(dir.as_ref()));
        self
    }

    /// Adds the file `file` (which may be written).
    pub fn file(&mut self, file: impl AsRef<Path>) -> &mut Self {
        self.files.push(resolved(file.as_ref()));
        self
    }

    /// Adds the directory `dir` (beneath which Unix sockets may be made).
    pub fn sockets(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.sockets.push(resolved(dir.as_ref()));
        self
    }

    /// Adds everything in `other`.
    pub fn extend(&mut self, other: &Writable) -> &mut Self {
        self.dirs.extend(other.dirs.iter().cloned());
        self.files.extend(other.files.iter().cloned());
        self.sockets.extend(other.sockets.iter().cloned());
        self
    }

    /// Whether `path` lies where the rules let the process make or write a file (as the
    /// kernel sees it: links resolved, as far as the path exists). A path that climbs
    /// (`..`) is not taken: where it leads may not exist yet.
    pub fn allows(&self, path: &Path) -> bool {
        if climbs(path) {
            return false;
        }
        let path = resolved(path);
        self.dirs.iter().any(|d| path.starts_with(d)) || self.files.contains(&path)
    }

    /// Whether the rules let the process make a Unix socket at `path`.
    pub fn allows_socket(&self, path: &Path) -> bool {
        self.allows(path)
            || (!climbs(path) && {
                let path = resolved(path);
                self.sockets.iter().any(|d| path.starts_with(d))
            })
    }
}

/// Whether `path` has a `..` component.
fn climbs(path: &Path) -> bool {
    path.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// `path` made absolute, with links resolved in the part of it that exists (the rules
/// hold for where a path leads, not how it is spelled).
fn resolved(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// This kernel's Landlock ABI version (asked as landlock(7) says); 0 without Landlock.
pub fn kernel_abi() -> i64 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with no attributes reads nothing.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}

/// The oldest ABI the rules are applied with: ABI 1 refuses every rename or link
/// across directories, even within the places allowed, and a VM process makes such a
/// rename (a warm process's staged home becomes the VM's).
const OLDEST: i64 = 2;

/// How the rules a process is bound by hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforced {
    /// Its own, every right enforced.
    Fully,
    /// Its own, on a kernel whose Landlock is older (see [`Restricted::Partially`]).
    Partially,
    /// The rules of the VM process that started it (a fork child), which it inherits.
    Inherited,
}

/// The file-system rules a process is bound by: what `forkvm inspect` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// How they hold.
    pub enforced: Enforced,
    /// Where it may change the file system (for inherited rules: what its own would
    /// have been; its parent's cover at least that).
    #[serde(flatten)]
    pub writable: Writable,
}

/// The rules this process is bound by, once it is (see [`bound`]).
static BOUND: OnceLock<Bound> = OnceLock::new();

/// The rules this process is bound by (its own or, in a fork child, its parent's), if
/// any: what a request naming a path is checked against, to refuse by name what the
/// kernel would refuse with `EACCES`.
pub fn bound() -> Option<&'static Bound> {
    BOUND.get()
}

/// Checks that this process may make or write a file at `path` (named `what` in the
/// answer): `Err` with a message naming the places it may, when its rules do not let it
/// (the kernel would answer `EACCES`, naming nothing).
pub fn check_writable(what: &str, path: &Path) -> Result<(), String> {
    check(what, path, Writable::allows)
}

/// As [`check_writable`], for a Unix socket to be made at `path`.
pub fn check_socket(what: &str, path: &Path) -> Result<(), String> {
    check(what, path, Writable::allows_socket)
}

fn check(what: &str, path: &Path, allows: fn(&Writable, &Path) -> bool) -> Result<(), String> {
    match bound().map(|b| &b.writable) {
        Some(w) if !allows(w, path) => {
            let list = |paths: &[PathBuf]| {
                paths
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let sockets = match w.sockets.is_empty() {
                true => String::new(),
                false => format!(" (and make sockets under {})", list(&w.sockets)),
            };
            Err(format!(
                "{what} {}: the VM process's jail lets it write only under {}{sockets}",
                path.display(),
                list(&w.dirs),
            ))
        }
        _ => Ok(()),
    }
}

/// Records the rules this process is bound by (the first ones: rules only narrow).
pub fn set_bound(enforced: Enforced, writable: Writable) {
    let _ = BOUND.set(Bound { enforced, writable });
}

/// The rights a rule on a directory grants: every write-side right the target ABI knows.
fn handled() -> BitFlags<AccessFs> {
    // Not handled: ioctls on devices (a fork child's KVM and TUN files are opened after
    // the restriction) and connecting to sockets (host vsock listeners lie anywhere).
    AccessFs::from_write(TARGET) & !(AccessFs::IoctlDev | AccessFs::ResolveUnix)
}

/// Number of threads of this process.
pub(crate) fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

/// Fails unless this process has one thread: what it changes of itself now (rules, a
/// namespace, its root) a thread started before would not have.
pub(crate) fn one_thread() -> Result<(), LandlockError> {
    match threads() {
        1 => Ok(()),
        n => Err(LandlockError::Threads(n)),
    }
}

/// Binds this process (its one thread) and everything it starts to `writable`: the file
/// system changes only there. Paths that do not exist are left out (they cannot be made
/// later), and said; the places the rules hold for are returned. Needs `no_new_privs`
/// (or `CAP_SYS_ADMIN`).
pub fn restrict(writable: &Writable) -> Result<(Restricted, Writable), LandlockError> {
    one_thread()?;
    let mut applied = Writable::default();
    if kernel_abi() < OLDEST {
        return Ok((Restricted::Not, applied));
    }
    let all = handled();
    let file_rights = all & (AccessFs::WriteFile | AccessFs::Truncate);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .create()?;
    type Kind = fn(&mut Writable) -> &mut Vec<PathBuf>;
    let kinds: [(&Vec<PathBuf>, BitFlags<AccessFs>, Kind); 3] = [
        (&writable.dirs, all, |w| &mut w.dirs),
        (&writable.files, file_rights, |w| &mut w.files),
        (&writable.sockets, all & AccessFs::MakeSock, |w| {
            &mut w.sockets
        }),
    ];
    for (paths, rights, kind) in kinds {
        for path in paths {
            match PathFd::new(path) {
                Ok(fd) => {
                    ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
                    kind(&mut applied).push(path.clone());
                }
                // Debug only: what the VM needs there (a disk, a share, its socket's
                // directory) fails on its own with a clearer error; `inspect` shows
                // the places the rules hold for.
                Err(e) => tracing::debug!(
                    "the VM process may not write in {}: it is not there ({e})",
                    path.display()
                ),
            }
        }
    }
    let RestrictionStatus { ruleset, .. } = ruleset.restrict_self()?;
    let how = match ruleset {
        RulesetStatus::FullyEnforced => Restricted::Fully,
        RulesetStatus::PartiallyEnforced => Restricted::Partially,
        RulesetStatus::NotEnforced => Restricted::Not,
    };
    Ok((how, applied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Runs `f` in a forked child (Landlock cannot be undone) and returns its exit code.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the test binary's other threads may hold locks; the child only makes
        // system calls and plain std file operations, then `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(99);
                // SAFETY: ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(code) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                libc::WEXITSTATUS(status)
            }
        }
    }

    #[test]
    fn writes_land_only_where_the_rules_allow() {
        if kernel_abi() < OLDEST {
            eprintln!("this kernel has no Landlock: nothing to check here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("inside");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let file = outside.join("disk.img");
        std::fs::write(&file, b"old").unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).unwrap();
        std::fs::write(sockets.join("other"), b"keep").unwrap();
        let code = in_child(|| {
            // SAFETY: sets a flag of this (child) process.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let mut w = Writable::default();
            w.dir(&inside).file(&file).dir(dir.path().join("missing"));
            w.sockets(&sockets);
            if restrict(&w).unwrap().0 == Restricted::Not {
                return 2;
            }
            let denied = |r: std::io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EACCES));
            let checks = [
                std::fs::write(inside.join("sub/new"), b"x").is_ok(),
                std::fs::create_dir(inside.join("made")).is_ok(),
                UnixListener::bind(inside.join("sock")).is_ok(),
                std::fs::remove_file(inside.join("sub/new")).is_ok(),
                std::fs::OpenOptions::new().write(true).open(&file).is_ok(),
                denied(std::fs::write(outside.join("new"), b"x")),
                denied(std::fs::write(outside.join("victim"), b"x")),
                denied(std::fs::create_dir(outside.join("made"))),
                denied(std::fs::remove_file(outside.join("victim"))),
                denied(UnixListener::bind(outside.join("sock")).map(drop)),
                denied(std::fs::rename(&file, inside.join("moved"))),
                // Where only sockets may be made: a socket, no file, no removal.
                UnixListener::bind(sockets.join("vm.sock")).is_ok(),
                denied(std::fs::write(sockets.join("file"), b"x")),
                denied(std::fs::remove_file(sockets.join("other"))),
                denied(std::fs::write(sockets.join("other"), b"x")),
                // Reading stays open.
                std::fs::read(outside.join("victim")).is_ok(),
            ];
            match checks.iter().position(|ok| !ok) {
                None => 0,
                Some(i) => 10 + i as i32,
            }
        });
        assert_eq!(code, 0, "check {} failed (see `checks`)", code - 10);
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert!(!outside.join("new").exists());
    }

    #[test]
    fn a_second_thread_is_refused_rather_than_left_unbound() {
        let code = in_child(|| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || rx.recv());
            let r = restrict(&Writable::default());
            drop(tx);
            let _ = t.join();
            match r {
                Err(LandlockError::Threads(2)) => 0,
                _ => 1,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn allows_is_by_whole_components_and_where_links_lead() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&root, dir.path().join("link")).unwrap();
        let mut w = Writable::default();
        w.dir(&root).file("/dev/null");
        assert!(w.allows(&root.join("abc/tpl")));
        assert!(w.allows(&dir.path().join("link/abc")));
        assert!(!w.allows(&dir.path().join("root-other/x")));
        assert!(!w.allows(&root.join("../x")));
        assert!(!w.allows(&root.join("missing/../../x")));
        let socks = dir.path().join("socks");
        w.sockets(&socks);
        assert!(w.allows_socket(&socks.join("vm.sock")));
        assert!(!w.allows(&socks.join("vm.sock")));
        assert!(!w.allows_socket(&dir.path().join("elsewhere/vm.sock")));
        assert!(w.allows_socket(&root.join("vm.sock")));
        assert!(w.allows(Path::new("/dev/null")));
        assert!(!w.allows(Path::new("/dev/nullx")));
    }
}
