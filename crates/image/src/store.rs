//! The store on disk: its layout, the write lock, the image index (`images.json`,
//! replaced atomically), lookups, removal and garbage collection.
//!
//! ```text
//! <root>/
//!   lock               flock(LOCK_EX) held by every writer for its whole operation
//!   images.json        the index: every image record with its names; written last
//!   blobs/sha256/<hex> manifests, configs and layers, each verified before it lands
//!   rootfs/<hex>.ext4  read-only root filesystem per image ID (config digest)
//!   tmp/               staging for imports and builds; emptied by `open`
//! ```
//!
//! Crash consistency: every file is written under `tmp/` and renamed into place; an
//! import renames its verified blobs into `blobs/` and then replaces `images.json`, so
//! until that rename the index does not know the new image. Whatever an interrupted
//! writer leaves (staging files, blobs no record references, rootfs files of unknown
//! images) is removed by the next `open` that finds the store unlocked.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::digest::{digest_hex, is_hex, SHA256_PREFIX};
use crate::error::{io_err, Error};
use crate::image::{Image, Removed};
use crate::reference::lookup_candidates;
use crate::spec::parse_json;

const LOCK_FILE: &str = "lock";
const INDEX_FILE: &str = "images.json";
const BLOBS_DIR: &str = "blobs/sha256";
const ROOTFS_DIR: &str = "rootfs";
const TMP_DIR: &str = "tmp";
/// Version of `images.json`; a store written by a newer format is refused.
const STATE_VERSION: u32 = 1;
/// The shortest ID prefix a lookup accepts.
const MIN_ID_PREFIX: usize = 4;

/// A local image store. Cheap to open; all state is on disk, so several `Store`s (and
/// processes) may use one root at once.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// The persisted index: `images.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct StoreState {
    pub(crate) version: u32,
    pub(crate) images: Vec<Image>,
}

/// The store's exclusive write lock; released when dropped.
pub(crate) struct WriteLock {
    _file: File,
}

impl Store {
    /// Opens the store at `root`, creating it (and its parents) if needed. When no
    /// other process is writing, also removes what an interrupted writer left behind.
    pub fn open(root: &Path) -> Result<Store, Error> {
        let store = Store {
            root: root.to_path_buf(),
        };
        for dir in [BLOBS_DIR, ROOTFS_DIR, TMP_DIR] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err("creating store directory", &path))?;
        }
        if let Some(lock) = store.try_lock()? {
            store.clean_tmp()?;
            // An index that does not parse is reported by the calls that read it;
            // without it nothing can be collected safely.
            if let Ok(state) = store.read_state() {
                store.collect_garbage(&lock, &state)?;
            }
        }
        Ok(store)
    }

    /// `$FORKVM_STORE` if set; else `store` in `forkvm.toml`; else
    /// `/var/lib/forkvm/images` when running as root; else `$XDG_DATA_HOME/forkvm/images`
    /// (default `~/.local/share/forkvm/images`).
    pub fn default_root() -> PathBuf {
        if let Some(dir) = forkvm_config::Setting::Store.get() {
            return dir;
        }
        forkvm_config::data_path("images")
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks an image up by name (`busybox`, `busybox:latest`,
    /// `localhost/busybox:latest`, `127.0.0.1:5000/x:1`), by full ID, or by a unique ID
    /// prefix of at least 4 hex digits (with or without `sha256:`).
    pub fn get(&self, name_or_id: &str) -> Result<Image, Error> {
        let state = self.read_state()?;
        let i = find(&state, name_or_id)?.index;
        Ok(state.images[i].clone())
    }

    /// Every image, in the order they were first imported.
    pub fn list(&self) -> Result<Vec<Image>, Error> {
        Ok(self.read_state()?.images)
    }

    /// Removes a name; once an image has no name left, deletes it: its record, its
    /// rootfs, and the blobs no other image uses. Removing by ID removes all the
    /// image's names (an ambiguous prefix is an error).
    pub fn remove(&self, name_or_id: &str) -> Result<Removed, Error> {
        let lock = self.lock()?;
        let mut state = self.read_state()?;
        let found = find(&state, name_or_id)?;
        let image = &mut state.images[found.index];
        let untagged = match found.by_name {
            Some(name) => {
                image.names.retain(|n| *n != name);
                vec![name]
            }
            None => std::mem::take(&mut image.names),
        };
        let deleted = if image.names.is_empty() {
            let id = image.id.clone();
            state.images.remove(found.index);
            Some(id)
        } else {
            None
        };
        self.write_state(&lock, &state)?;
        self.collect_garbage(&lock, &state)?;
        Ok(Removed { untagged, deleted })
    }

    /// Path of the blob `digest` (validated: the digest names a file).
    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        Ok(self.root.join(BLOBS_DIR).join(digest_hex(digest, "blob")?))
    }

    /// Path of the rootfs file of image `id`.
    pub(crate) fn rootfs_path(&self, id: &str) -> Result<PathBuf, Error> {
        let hex = digest_hex(id, "image ID")?;
        Ok(self.root.join(ROOTFS_DIR).join(format!("{hex}.ext4")))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// Takes the write lock, waiting for other writers.
    pub(crate) fn lock(&self) -> Result<WriteLock, Error> {
        let (file, path) = self.open_lock_file()?;
        rustix::fs::flock(&file, FlockOperation::LockExclusive).map_err(|e| Error::Io {
            what: "locking".into(),
            path,
            source: e.into(),
        })?;
        Ok(WriteLock { _file: file })
    }

    /// Takes the write lock if no one holds it.
    fn try_lock(&self) -> Result<Option<WriteLock>, Error> {
        let (file, path) = self.open_lock_file()?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(WriteLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::Io {
                what: "locking".into(),
                path,
                source: e.into(),
            }),
        }
    }

    fn open_lock_file(&self) -> Result<(File, PathBuf), Error> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        Ok((file, path))
    }

    /// Reads `images.json` (an absent file is an empty store).
    pub(crate) fn read_state(&self) -> Result<StoreState, Error> {
        let path = self.root.join(INDEX_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(StoreState {
                    version: STATE_VERSION,
                    images: Vec::new(),
                })
            }
            Err(e) => return Err(io_err("reading image index", &path)(e)),
        };
        let state: StoreState = parse_json(&bytes, &path.display().to_string())?;
        if state.version != STATE_VERSION {
            return Err(Error::InvalidImage {
                what: path.display().to_string(),
                reason: format!(
                    "image index version {} (this forkvm reads version {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Replaces `images.json` atomically (temp file, fsync, rename, fsync directory).
    pub(crate) fn write_state(&self, _lock: &WriteLock, state: &StoreState) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(state).map_err(|source| Error::Json {
            what: "image index".into(),
            source,
        })?;
        let index = self.root.join(INDEX_FILE);
        forkvm_registry::write_atomic(&index, &json).map_err(io_err("writing", &index))
    }

    /// Deletes blobs no image references and rootfs files of unknown images.
    pub(crate) fn collect_garbage(
        &self,
        _lock: &WriteLock,
        state: &StoreState,
    ) -> Result<(), Error> {
        let mut blobs = HashSet::new();
        let mut ids = HashSet::new();
        for image in &state.images {
            for digest in [&image.id, &image.manifest_digest]
                .into_iter()
                .chain(image.layers.iter().map(|l| &l.digest))
            {
                if let Some(hex) = digest.strip_prefix(SHA256_PREFIX) {
                    blobs.insert(hex.to_string());
                }
            }
            if let Some(hex) = image.id.strip_prefix(SHA256_PREFIX) {
                ids.insert(format!("{hex}.ext4"));
            }
        }
        for (dir, keep) in [(BLOBS_DIR, &blobs), (ROOTFS_DIR, &ids)] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let entry = entry.map_err(io_err("listing", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    tracing::debug!(path = %entry.path().display(), "removing unreferenced file");
                    remove_any(&entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Empties `tmp/` (only called with the write lock held).
    fn clean_tmp(&self) -> Result<(), Error> {
        let dir = self.tmp_dir();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            remove_any(&entry.path())?;
        }
        Ok(())
    }
}

/// Removes a file, symlink or directory tree; an absent path is fine.
pub(crate) fn remove_any(path: &Path) -> Result<(), Error> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// fsyncs a directory so that renames into it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Where a lookup found its image.
struct Found {
    index: usize,
    /// The normalized name that matched, or `None` for a match by ID.
    by_name: Option<String>,
}

/// Resolves a name, ID or ID prefix. Names win over ID prefixes (a name may look
/// like hex); an input starting with `sha256:` is always an ID.
fn find(state: &StoreState, name_or_id: &str) -> Result<Found, Error> {
    let not_found = || Error::NotFound {
        name: name_or_id.to_string(),
    };
    let hex = match name_or_id.strip_prefix(SHA256_PREFIX) {
        Some(hex) => hex,
        None => {
            for name in lookup_candidates(name_or_id) {
                if let Some(index) = state.images.iter().position(|i| i.names.contains(&name)) {
                    return Ok(Found {
                        index,
                        by_name: Some(name),
                    });
                }
            }
            name_or_id
        }
    };
    if hex.len() < MIN_ID_PREFIX || !is_hex(hex) {
        return Err(not_found());
    }
    let matches: Vec<usize> = state
        .images
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.id.strip_prefix(SHA256_PREFIX)
                .is_some_and(|h| h.starts_with(hex))
        })
        .map(|(n, _)| n)
        .collect();
    match matches.as_slice() {
        [] => Err(not_found()),
        [index] => Ok(Found {
            index: *index,
            by_name: None,
        }),
        _ => Err(Error::AmbiguousId {
            prefix: name_or_id.to_string(),
            matches: matches
                .iter()
                .map(|&i| state.images[i].id.clone())
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageConfig;

    fn image(id_hex_start: &str, names: &[&str]) -> Image {
        let id = format!("{SHA256_PREFIX}{id_hex_start:0<64}");
        Image {
            id: id.clone(),
            names: names.iter().map(|s| s.to_string()).collect(),
            manifest_digest: id,
            layers: Vec::new(),
            config: ImageConfig::default(),
            size: 0,
            created: None,
        }
    }

    #[test]
    fn the_built_in_root_follows_the_environment_and_privileges() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
        };
        let at = |p: &str| PathBuf::from(p);
        assert_eq!(
            forkvm_config::data_path_from(env(&[("HOME", "/h")]), true, "images"),
            at("/var/lib/forkvm/images")
        );
        assert_eq!(
            forkvm_config::data_path_from(env(&[("HOME", "/h")]), false, "images"),
            at("/h/.local/share/forkvm/images")
        );
        assert_eq!(
            forkvm_config::data_path_from(
                env(&[("HOME", "/h"), ("XDG_DATA_HOME", "/x")]),
                false,
                "images"
            ),
            at("/x/forkvm/images")
        );
    }

    #[test]
    fn state_round_trips_through_the_index_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.list().unwrap().is_empty());
        let state = StoreState {
            version: STATE_VERSION,
            images: vec![image("ab", &["localhost/a:latest"])],
        };
        let lock = store.lock().unwrap();
        store.write_state(&lock, &state).unwrap();
        assert_eq!(store.list().unwrap(), state.images);
        assert!(
            fs::read_dir(store.tmp_dir()).unwrap().next().is_none(),
            "temp file left"
        );
    }

    #[test]
    fn a_corrupt_or_newer_index_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join(INDEX_FILE), b"{\"version\":1,\"images\":[").unwrap();
        let err = store.list().unwrap_err();
        assert!(
            matches!(err, Error::Json { .. }) && err.to_string().contains(INDEX_FILE),
            "{err}"
        );
        fs::write(
            dir.path().join(INDEX_FILE),
            b"{\"version\":99,\"images\":[]}",
        )
        .unwrap();
        let err = store.list().unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }

    #[test]
    fn lookups_by_name_id_and_prefix() {
        let state = StoreState {
            version: STATE_VERSION,
            images: vec![
                image("abcd1", &["localhost/busybox:latest"]),
                image("abcd2", &["docker.io/library/alpine:3"]),
                image("ef", &[]),
            ],
        };
        let at = |s: &str| find(&state, s).map(|f| f.index);
        assert_eq!(at("busybox").unwrap(), 0);
        assert_eq!(at("localhost/busybox").unwrap(), 0);
        assert_eq!(at("alpine:3").unwrap(), 1);
        assert_eq!(at("abcd2").unwrap(), 1);
        assert_eq!(at("sha256:abcd1").unwrap(), 0);
        assert_eq!(at(&state.images[2].id).unwrap(), 2);
        assert!(matches!(at("abcd"), Err(Error::AmbiguousId { .. })));
        assert!(
            matches!(at("abc"), Err(Error::NotFound { .. })),
            "prefix too short"
        );
        let err = find(&state, "nosuch:tag").err().unwrap();
        assert_eq!(err.to_string(), "image \"nosuch:tag\" not found");
    }

    #[test]
    fn open_removes_leftovers_only_when_no_writer_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let orphan = store
            .blob_path(&crate::digest::sha256_of(b"orphan"))
            .unwrap();
        fs::write(&orphan, b"orphan").unwrap();
        fs::create_dir(store.tmp_dir().join("op-crashed")).unwrap();
        let lock = store.lock().unwrap();
        Store::open(dir.path()).unwrap();
        assert!(orphan.exists(), "cleaned up under a writer's feet");
        drop(lock);
        Store::open(dir.path()).unwrap();
        assert!(!orphan.exists());
        assert!(fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
    }
}
