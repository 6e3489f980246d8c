//! VM homes under a root directory (like runc's `--root`), IDs, names and lookup.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::liveness::ProcessIdentity;
use crate::state::{Status, VmState};
use crate::Error;

/// Environment variable that overrides the default state root (as `--root` does).
pub const ENV_ROOT: &str = forkvm_config::Setting::Root.var();

const STATE_FILE: &str = "state.json";
const CONSOLE_FILE: &str = "console.log";
const SOCKET_FILE: &str = "api.sock";
/// Where staged homes wait under a root (not an ID, so [`list`] skips it).
const STAGING_DIR: &str = ".staged";

/// The default root: `$FORKVM_ROOT`, else `root` in `forkvm.toml`, else `/run/forkvm` for root, else
/// `$XDG_RUNTIME_DIR/forkvm`, else `/tmp/forkvm-<uid>`; `root` in `forkvm.toml` comes
/// before the built-in defaults.
pub fn default_root() -> PathBuf {
    if let Some(r) = forkvm_config::Setting::Root.get() {
        return r;
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/forkvm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|r| !r.is_empty()) {
        Some(x) => PathBuf::from(x).join("forkvm"),
        None => PathBuf::from(format!("/tmp/forkvm-{uid}")),
    }
}

/// A fresh random ID: 32 lowercase hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("getrandom failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `s` is a VM ID ([`new_id`]'s form: 32 lowercase hex digits).
pub fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a VM name: 1-64 of `[A-Za-z0-9_.-]`, starting alphanumeric, not an ID.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !is_id(name);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

fn ensure_root(root: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(Error::io(format!(
            "cannot create the state root {}",
            root.display()
        )))
}

/// A VM's home directory and its files.
#[derive(Debug)]
pub struct VmHome {
    id: String,
    dir: PathBuf,
    root: PathBuf,
}

/// Serializes this process's read-modify-write cycles of state files: one lock for
/// every [`VmHome`] of the process, so that two handles on one home (a VM process's
/// own, and the one its fork identity thread opens to record the identity) cannot
/// each write back a state missing the other's change.
static UPDATES: Mutex<()> = Mutex::new(());

/// One VM under a root, as [`list`] finds it.
#[derive(Debug)]
pub struct Entry {
    /// Its ID (the directory name).
    pub id: String,
    /// Its home directory.
    pub dir: PathBuf,
    /// Its state, or why it cannot be read.
    pub state: Result<VmState, Error>,
}

impl VmHome {
    /// Registers a new VM under `root` (created 0700 if missing): a fresh ID, a home
    /// directory (0700) and a state file with status `creating`. `name` must be valid
    /// and unused under `root`; `parent` is the ID of the VM it was forked from.
    pub fn create(root: &Path, name: Option<&str>, parent: Option<&str>) -> Result<Self, Error> {
        Self::create_with(root, name, parent, |_| {})
    }

    /// [`VmHome::create`] with `init` filling in the rest of the first state (its process
    /// and machine, for a VM whose process registers itself): one write instead of one
    /// per field, which matters on a fork child's way to running.
    pub fn create_with(
        root: &Path,
        name: Option<&str>,
        parent: Option<&str>,
        init: impl FnOnce(&mut VmState),
    ) -> Result<Self, Error> {
        ensure_root(root)?;
        if let Some(name) = name {
            validate_name(name)?;
            for e in list(root)? {
                if let Ok(s) = &e.state {
                    if s.name.as_deref() == Some(name) {
                        return Err(Error::NameInUse {
                            name: name.to_owned(),
                            id: e.id,
                        });
                    }
                }
            }
        }
        let id = new_id();
        let home = Self::make(root, root.join(&id), id, name, parent, init)?;
        tracing::debug!(id = %home.id, dir = %home.dir.display(), "registered VM");
        Ok(home)
    }

    /// Makes the home directory `dir` (0700) of VM `id` and its first state.
    fn make(
        root: &Path,
        dir: PathBuf,
        id: String,
        name: Option<&str>,
        parent: Option<&str>,
        init: impl FnOnce(&mut VmState),
    ) -> Result<Self, Error> {
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        // The mode given to mkdir is filtered by the umask; make it exact.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("cannot chmod {}", dir.display())))?;
        let home = Self {
            id: id.clone(),
            dir,
            root: root.to_owned(),
        };
        let mut state = VmState::new(id, name.map(str::to_owned), parent.map(str::to_owned));
        init(&mut state);
        if let Err(e) = state.write(&home.state_path()) {
            let _ = std::fs::remove_dir_all(&home.dir);
            return Err(e);
        }
        Ok(home)
    }

    /// Registers VM `id` (a fresh [`new_id`]) ahead of its start without listing it: its
    /// home is made under `root/.staged/`, where [`list`] does not look, until
    /// [`VmHome::publish`] moves it into place. A warm fork process does this while it
    /// waits, so that registering is one rename on the fork's way to running.
    pub fn stage(
        root: &Path,
        id: &str,
        parent: Option<&str>,
        init: impl FnOnce(&mut VmState),
    ) -> Result<Self, Error> {
        if !is_id(id) {
            return Err(Error::InvalidId(id.to_owned()));
        }
        ensure_root(&root.join(STAGING_DIR))?;
        Self::make(
            root,
            staged_dir(root, id),
            id.to_owned(),
            None,
            parent,
            init,
        )
    }

    /// Moves a staged home ([`VmHome::stage`]) into place under its ID, where [`list`]
    /// finds it; a home in place stays where it is. Open files in it (the console log)
    /// stay open.
    pub fn publish(&mut self) -> Result<(), Error> {
        let listed = self.root.join(&self.id);
        if self.dir == listed {
            return Ok(());
        }
        std::fs::rename(&self.dir, &listed).map_err(Error::io(format!(
            "cannot move {} to {}",
            self.dir.display(),
            listed.display()
        )))?;
        self.dir = listed;
        Ok(())
    }

    /// Opens the home of an existing VM by full ID.
    pub fn open(root: &Path, id: &str) -> Result<Self, Error> {
        let dir = root.join(id);
        if !is_id(id) || !dir.join(STATE_FILE).exists() {
            return Err(Error::NotFound(id.to_owned()));
        }
        Ok(Self {
            id: id.to_owned(),
            dir,
            root: root.to_owned(),
        })
    }

    /// The VM's ID.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The root it lives under.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    /// `console.log`.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_FILE)
    }
    /// `api.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    /// Reads its state.
    pub fn state(&self) -> Result<VmState, Error> {
        VmState::read(&self.state_path())
    }

    /// Read-modify-writes its state atomically; returns the new state.
    pub fn update(&self, f: impl FnOnce(&mut VmState)) -> Result<VmState, Error> {
        let _g = UPDATES.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self.state()?;
        f(&mut s);
        s.write(&self.state_path())?;
        Ok(s)
    }

    /// Records the machine's shape (shown by `ps` before the API is asked).
    pub fn record_machine(&self, vcpus: u8, mem_mib: u64) -> Result<(), Error> {
        self.update(|s| {
            s.vcpus = vcpus;
            s.mem_mib = mem_mib;
        })
        .map(drop)
    }

    /// Records the process that runs (or is about to run) the VMM.
    pub fn record_process(&self, process: ProcessIdentity) -> Result<(), Error> {
        self.update(|s| s.process = Some(process)).map(drop)
    }

    /// Records how the VM ended.
    pub fn record_exit(&self, exit: crate::ExitRecord) -> Result<(), Error> {
        self.update(|s| {
            s.status = Status::Exited;
            s.exit = Some(exit);
        })
        .map(drop)
    }

    /// Opens `console.log` for appending (created 0600); the console's writer bounds it
    /// ([`crate::console::ConsoleLog`]).
    pub fn console_writer(&self) -> Result<File, Error> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.console_path())
            .map_err(Error::io(format!(
                "cannot open {}",
                self.console_path().display()
            )))
    }

    /// IDs of the VMs registered with this one as parent.
    pub fn children(&self) -> Vec<String> {
        list(&self.root)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e.state
                    .as_ref()
                    .is_ok_and(|s| s.parent.as_deref() == Some(self.id.as_str()))
            })
            .map(|e| e.id)
            .collect()
    }

    /// Deletes the home and everything in it.
    pub fn remove(&self) -> Result<(), Error> {
        if let Some(group) = self.state().ok().and_then(|s| s.cgroup) {
            forkvm_jail::cgroup::remove_when_empty(&group, std::time::Duration::from_secs(2));
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(Error::io(format!("cannot remove {}", self.dir.display())))
    }
}

/// Where [`VmHome::stage`] makes the home of VM `id` under `root` (what to remove when
/// the process that staged it was killed before it could).
pub fn staged_dir(root: &Path, id: &str) -> PathBuf {
    root.join(STAGING_DIR).join(id)
}

/// Removes the staged homes under `root` whose process is no longer alive (a warm
/// process killed together with its pool could not remove its own); one with an
/// unreadable state only when it is older than a minute (it may be mid-write).
pub fn prune_staged(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root.join(STAGING_DIR)) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for d in rd.filter_map(Result::ok) {
        let dir = d.path();
        // Another family's (see `forkvm_jail::uid`): neither readable nor removable here.
        if me != 0 && d.metadata().is_ok_and(|m| m.uid() != me) {
            continue;
        }
        let dead = match VmState::read(&dir.join(STATE_FILE)) {
            Ok(s) => !s.is_alive(),
            Err(_) => d
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60)),
        };
        if dead {
            tracing::debug!(dir = %dir.display(), "removing a staged home whose process is gone");
            let _ = std::fs::remove_dir_all(&dir);
            // The group a warm process joined while it waited (named by its ID).
            if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
                forkvm_jail::cgroup::remove_when_empty(
                    &forkvm_jail::cgroup::vm_group(id),
                    std::time::Duration::ZERO,
                );
            }
        }
    }
}

/// Every VM under `root`, sorted by creation time (unreadable ones last); an absent root
/// has none.
pub fn list(root: &Path) -> Result<Vec<Entry>, Error> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", root.display()))(e)),
    };
    let mut out: Vec<Entry> = rd
        .filter_map(Result::ok)
        .filter_map(|d| {
            let id = d.file_name().into_string().ok()?;
            if !is_id(&id) || !d.file_type().ok()?.is_dir() {
                return None;
            }
            let dir = d.path();
            let state = VmState::read(&dir.join(STATE_FILE));
            Some(Entry { id, dir, state })
        })
        .collect();
    out.sort_by_key(|e| {
        (
            e.state.as_ref().map_or(u64::MAX, |s| s.created_ms),
            e.id.clone(),
        )
    });
    Ok(out)
}

/// Finds a VM by name, full ID or unique ID prefix.
pub fn resolve(root: &Path, query: &str) -> Result<VmHome, Error> {
    if query.is_empty() {
        return Err(Error::NotFound(String::new()));
    }
    let entries = list(root)?;
    let by_name = entries.iter().find(|e| {
        e.state
            .as_ref()
            .is_ok_and(|s| s.name.as_deref() == Some(query))
    });
    let id = if let Some(e) = entries.iter().find(|e| e.id == query) {
        e.id.clone()
    } else if let Some(e) = by_name {
        e.id.clone()
    } else {
        let matches: Vec<String> = entries
            .iter()
            .filter(|e| e.id.starts_with(query))
            .map(|e| e.id.clone())
            .collect();
        match matches.len() {
            0 => return Err(Error::NotFound(query.to_owned())),
            1 => matches.into_iter().next().expect("one match"),
            _ => {
                return Err(Error::Ambiguous {
                    query: query.to_owned(),
                    matches,
                })
            }
        }
    };
    VmHome::open(root, &id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ids_and_names() {
        let a = new_id();
        assert!(is_id(&a));
        assert_ne!(a, new_id());
        for ok in ["web", "a", "web-1.prod_2", "0abc"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "é",
            &"x".repeat(65),
            &new_id(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_lays_out_a_private_home() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().join("nested/root");
        let home = VmHome::create(&r, Some("web"), Some(&"ab".repeat(16))).unwrap();
        assert_eq!(mode(&r), 0o700);
        assert_eq!(mode(home.dir()), 0o700);
        let s = home.state().unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.status, Status::Creating);
        assert_eq!(
            s.parent.as_deref(),
            Some("abababababababababababababababab")
        );
        let mut c = home.console_writer().unwrap();
        std::io::Write::write_all(&mut c, b"hi").unwrap();
        assert_eq!(mode(&home.console_path()), 0o600);
        // The name is taken now.
        assert!(matches!(
            VmHome::create(&r, Some("web"), None),
            Err(Error::NameInUse { .. })
        ));
        assert!(matches!(
            VmHome::create(&r, Some("bad name"), None),
            Err(Error::InvalidName(_))
        ));
        home.remove().unwrap();
        assert!(list(&r).unwrap().is_empty());
    }

    #[test]
    fn create_with_writes_the_whole_first_state() {
        let root = tempfile::tempdir().unwrap();
        let me = ProcessIdentity::current();
        let h = VmHome::create_with(root.path(), None, Some("parent-id"), |s| {
            s.process = Some(me);
            s.vcpus = 2;
            s.mem_mib = 256;
        })
        .unwrap();
        let s = h.state().unwrap();
        assert_eq!(s.process, Some(me));
        assert_eq!((s.vcpus, s.mem_mib), (2, 256));
        assert_eq!(s.parent.as_deref(), Some("parent-id"));
        assert_eq!(s.id, h.id());
    }

    #[test]
    fn resolves_names_ids_and_unique_prefixes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // Hand-made IDs so prefixes are predictable.
        let mk = |id: &str, name: Option<&str>| {
            std::fs::create_dir(r.join(id)).unwrap();
            VmState::new(id.into(), name.map(Into::into), None)
                .write(&r.join(id).join(STATE_FILE))
                .unwrap();
        };
        let a = format!("aaaa{}", "0".repeat(28));
        let b = format!("aaab{}", "0".repeat(28));
        let c = format!("c{}", "1".repeat(31));
        mk(&a, Some("alpha"));
        mk(&b, None);
        mk(&c, Some("aaab")); // a name that is also a prefix of b: the name wins
        assert_eq!(resolve(r, &a).unwrap().id(), a);
        assert_eq!(resolve(r, "alpha").unwrap().id(), a);
        assert_eq!(resolve(r, "aaaa").unwrap().id(), a);
        assert_eq!(resolve(r, "aaab").unwrap().id(), c);
        assert_eq!(resolve(r, "aaab0").unwrap().id(), b);
        assert_eq!(resolve(r, "c").unwrap().id(), c);
        match resolve(r, "aa") {
            Err(Error::Ambiguous { matches, .. }) => assert_eq!(matches.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(resolve(r, "zzz"), Err(Error::NotFound(_))));
        assert!(matches!(resolve(r, ""), Err(Error::NotFound(_))));
        assert!(matches!(
            resolve(&r.join("absent"), "a"),
            Err(Error::NotFound(_))
        ));
        // A corrupt VM is still listed (so `rm -f` can remove it) and found by ID.
        std::fs::write(r.join(&c).join(STATE_FILE), b"not json").unwrap();
        let entries = list(r).unwrap();
        assert_eq!(entries.len(), 3);
        assert!(entries.iter().any(|e| e.state.is_err()));
        assert_eq!(resolve(r, "c1").unwrap().id(), c);
        // Stray files and non-ID directories are ignored.
        std::fs::write(r.join("junk"), b"").unwrap();
        std::fs::create_dir(r.join("notanid")).unwrap();
        assert_eq!(list(r).unwrap().len(), 3);
    }

    #[test]
    fn a_staged_home_is_listed_once_published_and_keeps_its_open_files() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let parent = "cd".repeat(16);
        let id = new_id();
        let mut home = VmHome::stage(r, &id, Some(&parent), |s| {
            s.process = Some(ProcessIdentity::current());
            s.vcpus = 2;
        })
        .unwrap();
        assert_eq!(home.dir(), staged_dir(r, &id));
        assert_eq!(mode(home.dir()), 0o700);
        assert!(list(r).unwrap().is_empty(), "a staged home is listed");
        let mut console = home.console_writer().unwrap();
        std::io::Write::write_all(&mut console, b"before ").unwrap();

        home.publish().unwrap();
        std::io::Write::write_all(&mut console, b"after").unwrap();
        let listed = list(r).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        let s = listed[0].state.as_ref().unwrap();
        assert_eq!((s.parent.as_deref(), s.vcpus), (Some(parent.as_str()), 2));
        assert_eq!(home.dir(), r.join(&id));
        assert_eq!(
            std::fs::read_to_string(home.console_path()).unwrap(),
            "before after"
        );
        assert!(!staged_dir(r, &id).exists());
        home.publish().expect("publishing twice is a no-op");

        assert!(matches!(
            VmHome::stage(r, "../x", None, |_| {}),
            Err(Error::InvalidId(_))
        ));
    }

    #[test]
    fn pruning_removes_staged_homes_whose_process_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // A process that cannot exist (pid above the kernel's limit).
        let gone = ProcessIdentity {
            pid: u32::MAX - 1,
            start_ticks: 1,
        };
        let (dead, live) = (new_id(), new_id());
        VmHome::stage(r, &dead, None, |s| s.process = Some(gone)).unwrap();
        VmHome::stage(r, &live, None, |s| {
            s.process = Some(ProcessIdentity::current())
        })
        .unwrap();
        prune_staged(r);
        assert!(
            !staged_dir(r, &dead).exists(),
            "the dead process's home stayed"
        );
        assert!(staged_dir(r, &live).exists());
    }
}
