//! Applying layer tars, lowest first, to a directory that becomes the root filesystem.
//!
//! OCI whiteouts: `.wh.NAME` deletes NAME as left by the lower layers, and
//! `.wh..wh..opq` drops the lower layers' contents of its directory while keeping this
//! layer's; whiteout entries themselves never appear. Modes (setuid, setgid, sticky),
//! owners, mtimes, symlinks, hard links, device nodes and fifos are kept; extended
//! attributes (file capabilities, SELinux labels) are not.
//!
//! Nothing is written outside the root: entry paths are cleaned (`..` may not climb
//! out), and every parent directory is resolved component by component inside the
//! root, following symlinks laid down by earlier entries as if the root were `/` (an
//! absolute target restarts at the root, `..` stops at it). The final component is
//! never followed: an existing symlink there is replaced, not written through.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
use tar::EntryType;

use crate::error::Error;
use crate::store::remove_any;

/// Symlinks followed at most while resolving one path (Linux's limit).
const MAX_SYMLINKS: usize = 40;
/// Most bytes of file contents one image's layers may unpack to, all layers together: a
/// layer that decompresses without end (a gzip bomb) stops here with an error instead
/// of filling the host's disk.
pub(crate) const MAX_IMAGE_BYTES: u64 = 32 << 30;
/// Most entries one image's layers may hold, all layers together (an inode bomb).
pub(crate) const MAX_IMAGE_ENTRIES: u64 = 4_000_000;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Applies layers to `root` in order.
pub(crate) struct Unpacker {
    root: PathBuf,
    /// Directory mtimes, applied at the end (adding entries changes them).
    dir_times: HashMap<PathBuf, u64>,
    /// File bytes and entries unpacked so far, and their limits.
    bytes: u64,
    entries: u64,
    max_bytes: u64,
    max_entries: u64,
}

impl Unpacker {
    pub(crate) fn new(root: &Path) -> Self {
        Self::with_quota(root, MAX_IMAGE_BYTES, MAX_IMAGE_ENTRIES)
    }

    /// An unpacker that stops after `max_bytes` of file contents or `max_entries`
    /// entries, all layers together.
    pub(crate) fn with_quota(root: &Path, max_bytes: u64, max_entries: u64) -> Self {
        Self {
            root: root.to_path_buf(),
            dir_times: HashMap::new(),
            bytes: 0,
            entries: 0,
            max_bytes,
            max_entries,
        }
    }

    /// Applies one layer (an uncompressed tar stream); `layer` names it in errors.
    pub(crate) fn apply(&mut self, tar: impl Read, layer: &str) -> Result<(), Error> {
        let archive_err = |source| Error::Unpack {
            layer: layer.to_string(),
            path: String::new(),
            source,
        };
        let mut archive = tar::Archive::new(tar);
        // Host paths this layer created (and their parents): whiteouts and opaque
        // markers only hide what lower layers left.
        let mut this_layer = HashSet::new();
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let ctx = Ctx {
                layer,
                path: &shown,
            };
            // The quota counts what the archive says before anything is written: the
            // entry's size as it will be read (a PAX `size` record overrides the
            // header's field, and is what gets copied).
            self.entries += 1;
            self.bytes = self.bytes.saturating_add(entry.size());
            if self.entries > self.max_entries {
                return Err(ctx.over_quota(format!(
                    "the image has more than {} files and directories",
                    self.max_entries
                )));
            }
            if self.bytes > self.max_bytes {
                return Err(ctx.over_quota(format!(
                    "the image unpacks to more than {} bytes",
                    self.max_bytes
                )));
            }
            let parts =
                split_path(&raw).ok_or_else(|| ctx.unsafe_path("it climbs out of the root"))?;
            let Some((name, parents)) = parts.split_last() else {
                // The root directory itself ("./").
                if entry.header().entry_type().is_dir() {
                    let root = self.root.clone();
                    self.set_dir_meta(&entry, &root, &ctx)?;
                }
                continue;
            };
            if let Some(victim) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                let opaque = name.as_bytes() == OPAQUE_MARKER.as_bytes();
                if !opaque && matches!(victim, b"" | b"." | b"..") {
                    return Err(ctx.unsafe_path("a whiteout of nothing"));
                }
                let Some(dir) = self.resolve_dir(parents, false, &ctx)? else {
                    continue;
                };
                if opaque {
                    make_opaque(&dir, &this_layer)?;
                } else {
                    let victim = dir.join(OsStr::from_bytes(victim));
                    if !this_layer.contains(&victim) {
                        remove_any(&victim)?;
                    }
                }
                continue;
            }
            let dir = self
                .resolve_dir(parents, true, &ctx)?
                .ok_or_else(|| ctx.unsafe_path("its directory could not be created"))?;
            let host = dir.join(name);
            let mut p = host.as_path();
            while p.starts_with(&self.root) && this_layer.insert(p.to_path_buf()) {
                match p.parent() {
                    Some(parent) => p = parent,
                    None => break,
                }
            }
            self.place(&mut entry, &host, &ctx)?;
        }
        Ok(())
    }

    /// Sets the directory mtimes recorded while unpacking.
    pub(crate) fn finish(self) -> Result<(), Error> {
        for (dir, mtime) in &self.dir_times {
            match set_mtime(dir, mtime_spec(*mtime)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other.map_err(crate::error::io_err("setting mtime of", dir))?,
            }
        }
        Ok(())
    }

    /// The host path of directory `parts` (relative to the root), resolving symlinks
    /// inside the root; missing directories are created when `create`, else `None`.
    fn resolve_dir(
        &self,
        parts: &[OsString],
        create: bool,
        ctx: &Ctx,
    ) -> Result<Option<PathBuf>, Error> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = parts.iter().cloned().collect();
        let mut hops = 0;
        while let Some(part) = queue.pop_front() {
            match part.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let path = self.host(&resolved).join(&part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(ctx.unsafe_path("too many levels of symbolic links"));
                    }
                    let target = fs::read_link(&path).map_err(|e| ctx.io(e))?;
                    let target = target.as_os_str().as_bytes();
                    if target.starts_with(b"/") {
                        resolved.clear();
                    }
                    for t in target.split(|&b| b == b'/').rev() {
                        queue.push_front(OsStr::from_bytes(t).to_os_string());
                    }
                }
                Ok(meta) if meta.is_dir() => resolved.push(part),
                Ok(_) => {
                    return Err(ctx.unsafe_path(&format!(
                        "{} is not a directory",
                        path.strip_prefix(&self.root).unwrap_or(&path).display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&path).map_err(|e| ctx.io(e))?;
                    resolved.push(part);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(ctx.io(e)),
            }
        }
        Ok(Some(self.host(&resolved)))
    }

    fn host(&self, parts: &[OsString]) -> PathBuf {
        let mut path = self.root.clone();
        path.extend(parts);
        path
    }

    /// Creates the entry at `host` (whose parent is resolved), replacing what is there.
    fn place<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        host: &Path,
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| ctx.io(e))? & 0o7777;
        let uid = header.uid().map_err(|e| ctx.io(e))?;
        let gid = header.gid().map_err(|e| ctx.io(e))?;
        let mtime = header.mtime().map_err(|e| ctx.io(e))?;
        let (uid, gid) = (id32(uid, ctx)?, id32(gid, ctx)?);
        let existing = fs::symlink_metadata(host).ok();
        let existing_dir = existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !(kind.is_dir() && existing_dir) {
            remove_any(host)?;
        }
        match kind {
            EntryType::Directory => {
                if !existing_dir {
                    fs::create_dir(host).map_err(|e| ctx.io(e))?;
                }
                return self.set_dir_meta(entry, host, ctx);
            }
            EntryType::Regular | EntryType::Continuous => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(host)
                    .map_err(|e| ctx.io(e))?;
                io::copy(entry, &mut file).map_err(|e| ctx.io(e))?;
                // chown first: it clears setuid/setgid bits.
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(|e| ctx.io(e))?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx.io(e))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.unsafe_path("a symlink without a target"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), host)
                    .map_err(|e| ctx.io(e))?;
                std::os::unix::fs::lchown(host, Some(uid), Some(gid)).map_err(|e| ctx.io(e))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.unsafe_path("a hard link without a target"))?;
                let parts = split_path(&target).ok_or_else(|| {
                    ctx.unsafe_path("its hard link target climbs out of the root")
                })?;
                let Some((name, parents)) = parts.split_last() else {
                    return Err(ctx.unsafe_path("a hard link to the root"));
                };
                let source = self
                    .resolve_dir(parents, false, ctx)?
                    .map(|d| d.join(name))
                    .filter(|s| fs::symlink_metadata(s).is_ok_and(|m| !m.is_dir()))
                    .ok_or_else(|| {
                        ctx.unsafe_path(&format!(
                            "hard link target {:?} is not a file in the root",
                            String::from_utf8_lossy(&target)
                        ))
                    })?;
                // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                fs::hard_link(&source, host).map_err(|e| ctx.io(e))?;
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().map_err(|e| ctx.io(e))?.unwrap_or(0);
                let minor = header.device_minor().map_err(|e| ctx.io(e))?.unwrap_or(0);
                let dev = rustix::fs::makedev(major, minor);
                rustix::fs::mknodat(CWD, host, file_type, Mode::from_raw_mode(mode), dev)
                    .map_err(|e| ctx.io(e.into()))?;
                std::os::unix::fs::lchown(host, Some(uid), Some(gid)).map_err(|e| ctx.io(e))?;
                // mknod's mode went through the umask.
                fs::set_permissions(host, fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx.io(e))?;
            }
            other => {
                tracing::warn!(layer = ctx.layer, path = ctx.path, kind = ?other, "skipping unsupported tar entry");
                return Ok(());
            }
        }
        set_mtime(host, mtime_spec(mtime)).map_err(|e| ctx.io(e))
    }

    fn set_dir_meta<R: Read>(
        &mut self,
        entry: &tar::Entry<R>,
        dir: &Path,
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let header = entry.header();
        let mode = header.mode().map_err(|e| ctx.io(e))? & 0o7777;
        let uid = id32(header.uid().map_err(|e| ctx.io(e))?, ctx)?;
        let gid = id32(header.gid().map_err(|e| ctx.io(e))?, ctx)?;
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(|e| ctx.io(e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|e| ctx.io(e))?;
        let mtime = header.mtime().map_err(|e| ctx.io(e))?;
        self.dir_times.insert(dir.to_path_buf(), mtime);
        Ok(())
    }
}

/// The layer and entry an error is about.
struct Ctx<'a> {
    layer: &'a str,
    path: &'a str,
}

impl Ctx<'_> {
    fn unsafe_path(&self, reason: &str) -> Error {
        Error::UnsafePath {
            layer: self.layer.to_string(),
            path: self.path.to_string(),
            reason: reason.to_string(),
        }
    }

    fn over_quota(&self, what: String) -> Error {
        self.io(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "{what}: refused (a limit of forkvm's, against archives that expand without end)"
            ),
        ))
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Unpack {
            layer: self.layer.to_string(),
            path: self.path.to_string(),
            source,
        }
    }
}

/// Cleans an entry path into components (`./a//b/../c` → `[a, c]`); `None` when `..`
/// would climb above the root.
fn split_path(raw: &[u8]) -> Option<Vec<OsString>> {
    let mut parts: Vec<OsString> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            p => parts.push(OsStr::from_bytes(p).to_os_string()),
        }
    }
    Some(parts)
}

/// Removes, below `dir`, everything this layer did not create.
fn make_opaque(dir: &Path, this_layer: &HashSet<PathBuf>) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(crate::error::io_err("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(crate::error::io_err("listing", dir))?;
        let path = entry.path();
        if !this_layer.contains(&path) {
            remove_any(&path)?;
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_opaque(&path, this_layer)?;
        }
    }
    Ok(())
}

fn id32(id: u64, ctx: &Ctx) -> Result<u32, Error> {
    u32::try_from(id).map_err(|_| ctx.unsafe_path(&format!("owner id {id} does not fit 32 bits")))
}

fn mtime_spec(secs: u64) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    }
}

/// Sets atime and mtime of `path` itself (never following a symlink).
fn set_mtime(path: &Path, time: Timespec) -> io::Result<()> {
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_test_support::error_chain as chain;
    use std::os::unix::fs::MetadataExt;

    /// A tar built entry by entry.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h.set_size(0);
            h
        }

        fn dir(mut self, path: &str) -> Self {
            let mut h = Self::header(EntryType::Directory, 0o755);
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        fn file(self, path: &str, data: &str) -> Self {
            self.file_mode(path, data, 0o644, 0)
        }

        fn file_mode(mut self, path: &str, data: &str, mode: u32, uid: u64) -> Self {
            let mut h = Self::header(EntryType::Regular, mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
            self
        }

        fn link(mut self, kind: EntryType, path: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0o777);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        fn node(mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> Self {
            let mut h = Self::header(kind, 0o620);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        /// A raw entry name, bypassing the builder's own `..` check.
        fn raw_file(mut self, path: &[u8], data: &str) -> Self {
            let mut h = Self::header(EntryType::Regular, 0o644);
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data.as_bytes()).unwrap();
            self
        }

        /// A raw entry of `kind`: name and link target written as given, bypassing the
        /// builder's checks.
        fn raw(mut self, kind: EntryType, path: &[u8], target: &[u8], data: &str) -> Self {
            let mut h = Self::header(kind, 0o755);
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data.as_bytes()).unwrap();
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// `root/rootfs` unpacked from `layers`, with `root` the sandbox around it.
    fn unpack(layers: Vec<Layer>) -> (tempfile::TempDir, PathBuf, Result<(), Error>) {
        let sandbox = tempfile::tempdir().unwrap();
        let root = sandbox.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let mut u = Unpacker::new(&root);
        let mut result = Ok(());
        for (i, layer) in layers.into_iter().enumerate() {
            result = u.apply(&layer.bytes()[..], &format!("layer{i}"));
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = u.finish();
        }
        (sandbox, root, result)
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    /// One entry of a hostile layer: its kind, a path built from hostile pieces and a
    /// link target built from them too.
    fn hostile_entry() -> impl proptest::strategy::Strategy<Value = (u8, String, String)> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "..",
            ".",
            "etc",
            "a",
            "b",
            "/",
            "//",
            ".wh.a",
            ".wh..wh..opq",
            "link",
            "x",
        ]);
        let path = prop::collection::vec(piece.clone(), 1..5).prop_map(|p| p.join("/"));
        let target = prop::collection::vec(piece, 1..5).prop_map(|p| p.join("/"));
        (0u8..5, path, target)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Layers of entries with hostile paths (`..`, absolute, whiteouts) and symlinks
        /// and hard links pointing anywhere, in any order: unpacked or refused, and
        /// nothing is ever written outside the root.
        #[test]
        fn hostile_layers_never_write_outside_the_root(
            layers in proptest::collection::vec(proptest::collection::vec(hostile_entry(), 1..12), 1..3)
        ) {
            let sandbox = tempfile::tempdir().unwrap();
            let root = sandbox.path().join("rootfs");
            fs::create_dir(&root).unwrap();
            let mut u = Unpacker::new(&root);
            for (i, entries) in layers.iter().enumerate() {
                let mut l = Layer::new();
                for (kind, path, target) in entries {
                    let (p, t) = (path.as_bytes(), target.as_bytes());
                    l = match kind {
                        0 => l.raw(EntryType::Regular, p, b"", "data"),
                        1 => l.raw(EntryType::Directory, p, b"", ""),
                        2 => l.raw(EntryType::Symlink, p, t, ""),
                        3 => l.raw(EntryType::Link, p, t, ""),
                        _ => l.raw(EntryType::Regular, b"link/x", b"", "through the link"),
                    };
                }
                if u.apply(&l.bytes()[..], &format!("layer{i}")).is_err() {
                    break;
                }
            }
            let outside: Vec<_> = fs::read_dir(sandbox.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "rootfs")
                .collect();
            proptest::prop_assert!(outside.is_empty(), "written outside the root: {outside:?}");
        }
    }

    #[test]
    fn layers_that_expand_past_the_quota_are_refused_naming_the_entry() {
        let sandbox = tempfile::tempdir().unwrap();
        let root = sandbox.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let mut u = Unpacker::with_quota(&root, 100, 10);
        let data = "x".repeat(64);
        u.apply(&Layer::new().file("a", &data).bytes()[..], "layer0")
            .unwrap();
        // The second layer's file passes the byte quota, all layers together.
        let e = u
            .apply(&Layer::new().file("b", &data).bytes()[..], "layer1")
            .unwrap_err();
        let msg = chain(&e);
        assert!(
            msg.contains("layer1") && msg.contains("b") && msg.contains("more than 100 bytes"),
            "{msg}"
        );
        assert!(!root.join("b").exists(), "refused before it was written");
        // A PAX `size` record past the quota, the header's own size field 0: counted as
        // what will be copied, not as the header says.
        let mut pax = Layer::new();
        pax.0
            .append_pax_extensions([("size", &b"5000"[..])])
            .unwrap();
        let mut h = Layer::header(EntryType::Regular, 0o644);
        h.set_path("c").unwrap();
        h.set_size(0);
        h.set_cksum();
        pax.0.append(&h, &vec![b'y'; 5000][..]).unwrap();
        let mut u = Unpacker::with_quota(&root, 100, 10);
        let e = u.apply(&pax.bytes()[..], "layer3").unwrap_err();
        let msg = chain(&e);
        assert!(msg.contains("more than 100 bytes"), "{msg}");
        assert!(!root.join("c").exists(), "refused before it was written");
        let mut many = Layer::new();
        for i in 0..12 {
            many = many.dir(&format!("d{i}/"));
        }
        let mut u = Unpacker::with_quota(&root, 100, 10);
        let e = u.apply(&many.bytes()[..], "layer2").unwrap_err();
        let msg = chain(&e);
        assert!(msg.contains("more than 10 files and directories"), "{msg}");
    }

    #[test]
    fn whiteouts_delete_lower_entries_and_never_appear() {
        let lower = Layer::new()
            .dir("etc/")
            .file("etc/a", "a")
            .file("etc/b", "b")
            .dir("d/")
            .file("d/x", "x");
        let upper = Layer::new()
            .file("etc/.wh.a", "")
            .file("etc/new", "n")
            .file(".wh.d", "")
            .file("etc/.wh.ghost", "");
        let (_s, root, r) = unpack(vec![lower, upper]);
        r.unwrap();
        assert!(!root.join("etc/a").exists());
        assert!(!root.join("d").exists());
        assert_eq!(read(&root.join("etc/b")), "b");
        assert_eq!(read(&root.join("etc/new")), "n");
        let names: Vec<_> = fs::read_dir(root.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !names.iter().any(|n| n.as_bytes().starts_with(b".wh.")),
            "{names:?}"
        );
    }

    #[test]
    fn opaque_directories_keep_only_this_layers_content() {
        let lower = Layer::new()
            .dir("o/")
            .file("o/old", "old")
            .dir("o/sub/")
            .file("o/sub/deep", "deep")
            .file("keep", "k");
        // The marker after some of this layer's entries and before others.
        let upper = Layer::new()
            .dir("o/")
            .file("o/sub/mine", "mine")
            .file("o/.wh..wh..opq", "")
            .file("o/later", "later");
        let (_s, root, r) = unpack(vec![lower, upper]);
        r.unwrap();
        assert!(!root.join("o/old").exists());
        assert!(
            !root.join("o/sub/deep").exists(),
            "lower content under a kept dir"
        );
        assert_eq!(read(&root.join("o/sub/mine")), "mine");
        assert_eq!(read(&root.join("o/later")), "later");
        assert_eq!(read(&root.join("keep")), "k");
        assert!(!root.join("o/.wh..wh..opq").exists());
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_root() {
        let sandbox_file = |root: &Path| root.parent().unwrap().join("outside");
        // etc -> / ; then etc/passwd must land at <root>/passwd.
        let l1 = Layer::new()
            .link(EntryType::Symlink, "etc", "/")
            .link(EntryType::Symlink, "up", "../../../..")
            .link(EntryType::Symlink, "abs", "/../../outside-dir");
        let l2 = Layer::new()
            .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
            .file("up/outside", "escaped?")
            .file("abs/f", "f");
        let (_s, root, r) = unpack(vec![l1, l2]);
        r.unwrap();
        assert_eq!(read(&root.join("passwd")), "root:x:0:0::/root:/bin/sh\n");
        assert!(fs::symlink_metadata(root.join("etc"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            read(&root.join("outside")),
            "escaped?",
            "`..` stops at the root"
        );
        assert!(!sandbox_file(&root).exists(), "wrote outside the root");
        assert_eq!(read(&root.join("outside-dir/f")), "f");
        assert!(!root.parent().unwrap().join("outside-dir").exists());
    }

    #[test]
    fn a_symlink_in_the_final_component_is_replaced_not_followed() {
        let l1 = Layer::new().link(EntryType::Symlink, "target", "/../../victim");
        let l2 = Layer::new().file("target", "new");
        let (_s, root, r) = unpack(vec![l1, l2]);
        r.unwrap();
        assert!(fs::symlink_metadata(root.join("target")).unwrap().is_file());
        assert!(!root.parent().unwrap().join("victim").exists());
    }

    #[test]
    fn entries_and_links_that_climb_out_are_refused() {
        let (_s, root, r) = unpack(vec![Layer::new().raw_file(b"../escape", "x")]);
        assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
        assert!(!root.parent().unwrap().join("escape").exists());
        let (_s, _root, r) = unpack(vec![Layer::new().raw_file(b"a/../../escape", "x")]);
        assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
        let hard = Layer::new().link(EntryType::Link, "pw", "../../etc/passwd");
        let (_s, _root, r) = unpack(vec![hard]);
        let err = r.unwrap_err();
        assert!(
            matches!(err, Error::UnsafePath { .. }) && err.to_string().contains("layer0"),
            "{err}"
        );
        // A hard link through a symlink to outside: resolved inside, where nothing is.
        let l = Layer::new().link(EntryType::Symlink, "e", "/..").link(
            EntryType::Link,
            "pw",
            "e/etc/hostname",
        );
        let (_s, _root, r) = unpack(vec![l]);
        assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
        let (_s, _root, r) = unpack(vec![Layer::new().raw_file(b"d/.wh...", "")]);
        assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
    }

    #[test]
    fn modes_owners_times_links_and_nodes_are_kept() {
        let l = Layer::new()
            .dir("bin/")
            .file_mode("bin/su", "#!", 0o4755, 0)
            .file_mode("home-file", "h", 0o640, 1000)
            .dir("tmp/")
            .link(EntryType::Symlink, "bin/sh", "busybox")
            .link(EntryType::Link, "bin/su2", "bin/su")
            .node(EntryType::Char, "null", 1, 3)
            .node(EntryType::Fifo, "fifo", 0, 0);
        let mut tmp = Layer::header(EntryType::Directory, 0o1777);
        let mut l = l;
        l.0.append_data(&mut tmp, "tmp/", io::empty()).unwrap();
        let (_s, root, r) = unpack(vec![l]);
        r.unwrap();
        let m = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(m("bin/su").mode() & 0o7777, 0o4755);
        assert_eq!((m("home-file").uid(), m("home-file").gid()), (1000, 1000));
        assert_eq!(m("home-file").mode() & 0o7777, 0o640);
        assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(
            m("bin").mtime(),
            1_600_000_000,
            "directory mtime after children"
        );
        assert_eq!(m("bin/su").mtime(), 1_600_000_000);
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(m("bin/sh").mtime(), 1_600_000_000);
        assert_eq!(m("bin/su2").ino(), m("bin/su").ino());
        assert_eq!(m("null").rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(m("null").mode() & 0o170000, 0o020000);
        assert_eq!(m("fifo").mode() & 0o170000, 0o010000);
    }

    #[test]
    fn later_layers_replace_files_dirs_and_links() {
        let l1 = Layer::new().dir("a/").file("a/x", "x").file("f", "1").link(
            EntryType::Symlink,
            "l",
            "f",
        );
        let l2 = Layer::new()
            .file("a", "now a file")
            .dir("f/")
            .file("l", "plain");
        let (_s, root, r) = unpack(vec![l1, l2]);
        r.unwrap();
        assert_eq!(read(&root.join("a")), "now a file");
        assert!(root.join("f").is_dir());
        assert_eq!(read(&root.join("l")), "plain");
    }

    #[test]
    fn a_file_where_a_parent_directory_should_be_is_an_error() {
        let (_s, _root, r) = unpack(vec![Layer::new().file("f", "1").file("f/x", "2")]);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
