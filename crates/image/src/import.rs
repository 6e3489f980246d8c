//! Staging and committing an import, shared by `load` and `pull`: blobs are copied
//! into a staging directory while hashed, checked against their digests (and layers
//! against the config's `rootfs.diff_ids`), and only then renamed into `blobs/`; the
//! index is replaced last.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tempfile::TempDir;

use crate::digest::{self, digest_hex, HashReader, Hasher};
use crate::error::{io_err, Error};
use crate::image::{Image, ImageConfig, Layer};
use crate::progress::Progress;
use crate::spec::{check_layer_media_type, parse_json, Compression, ConfigFile, Descriptor};
use crate::store::{sync_dir, Store, StoreState, WriteLock};

/// JSON documents (manifests, configs, indexes) larger than this are refused.
pub(crate) const MAX_JSON: u64 = 16 << 20;

/// Blobs being imported, in a private directory under the store's `tmp/`.
pub(crate) struct Staging {
    dir: TempDir,
    /// digest → staged file.
    blobs: BTreeMap<String, PathBuf>,
    next: usize,
}

/// The staged parts of one image, for [`Staging::finish_image`].
pub(crate) struct ImageParts<'a> {
    pub(crate) manifest_digest: String,
    pub(crate) config_digest: &'a str,
    pub(crate) layers: &'a [Descriptor],
    /// How the source names the layers when not by digest (docker archive members).
    pub(crate) members: Option<&'a [String]>,
    pub(crate) names: Vec<String>,
}

/// A blob being written chunk by chunk (registry downloads).
pub(crate) struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Hasher,
    size: u64,
}

impl BlobWriter {
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.file
            .write_all(chunk)
            .map_err(io_err("writing", &self.path))?;
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }
}

impl Staging {
    /// A fresh staging directory (the caller holds the write lock, so `open`'s
    /// clean-up cannot remove it under us).
    pub(crate) fn new(store: &Store, _lock: &WriteLock) -> Result<Self, Error> {
        let tmp = store.tmp_dir();
        let dir = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&tmp)
            .map_err(io_err("creating staging directory in", &tmp))?;
        Ok(Self {
            dir,
            blobs: BTreeMap::new(),
            next: 0,
        })
    }

    /// The staging directory (for scratch files such as a decompressed archive).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a blob.
    pub(crate) fn begin(&mut self) -> Result<BlobWriter, Error> {
        self.next += 1;
        let path = self.dir.path().join(format!("blob-{}", self.next));
        let file = File::create(&path).map_err(io_err("creating", &path))?;
        Ok(BlobWriter {
            file,
            path,
            hasher: Hasher::default(),
            size: 0,
        })
    }

    /// Finishes a blob: it must hash to `expected` when given. Returns its digest.
    pub(crate) fn finish(
        &mut self,
        blob: BlobWriter,
        expected: Option<&str>,
        what: impl FnOnce() -> String,
    ) -> Result<(String, u64), Error> {
        let BlobWriter {
            file,
            path,
            hasher,
            size,
        } = blob;
        file.sync_all().map_err(io_err("syncing", &path))?;
        let actual = hasher.finish();
        if let Some(expected) = expected {
            digest::check(what, expected, &actual)?;
        }
        self.blobs.entry(actual.clone()).or_insert(path);
        Ok((actual, size))
    }

    /// Copies `reader` into a staged blob, reporting progress as `label`.
    pub(crate) fn add_reader(
        &mut self,
        mut reader: impl Read,
        total: Option<u64>,
        expected: Option<&str>,
        label: &str,
        what: impl FnOnce() -> String,
        progress: &dyn Progress,
    ) -> Result<(String, u64), Error> {
        let mut blob = self.begin()?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::Io {
                        what: format!("reading {}", what()),
                        path: blob.path.clone(),
                        source: e,
                    })
                }
            };
            blob.write(&buf[..n])?;
            progress.bytes(label, blob.size, total);
        }
        self.finish(blob, expected, what)
    }

    /// Stages an in-memory blob (manifests, configs).
    pub(crate) fn add_bytes(
        &mut self,
        data: &[u8],
        expected: Option<&str>,
        what: impl FnOnce() -> String,
    ) -> Result<String, Error> {
        let mut blob = self.begin()?;
        blob.write(data)?;
        self.finish(blob, expected, what).map(|(digest, _)| digest)
    }

    fn staged(&self, digest: &str) -> Result<&Path, Error> {
        self.blobs
            .get(digest)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::InvalidImage {
                what: digest.to_string(),
                reason: "blob was not staged".into(),
            })
    }

    /// Builds the image record once its config and layers are staged: parses the
    /// config, and checks every layer's uncompressed content against
    /// `rootfs.diff_ids`. `source` names the image in errors.
    pub(crate) fn finish_image(
        &self,
        source: &str,
        parts: ImageParts<'_>,
        progress: &dyn Progress,
    ) -> Result<Image, Error> {
        let ImageParts {
            manifest_digest,
            config_digest,
            layers,
            members,
            names,
        } = parts;
        let config_what = format!("config {config_digest} of {source}");
        let config_path = self.staged(config_digest)?;
        let bytes = read_capped(config_path, MAX_JSON)?;
        let config: ConfigFile = parse_json(&bytes, &config_what)?;
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != layers.len() {
            return Err(Error::InvalidImage {
                what: config_what,
                reason: format!(
                    "rootfs.diff_ids lists {} layers, the manifest {}",
                    diff_ids.len(),
                    layers.len()
                ),
            });
        }
        let n = layers.len();
        let mut records = Vec::with_capacity(n);
        let mut size = 0;
        for (i, (desc, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
            let label = members.and_then(|m| m.get(i)).unwrap_or(&desc.digest);
            let what = format!("layer {}/{n} ({label}) of {source}", i + 1);
            check_layer_media_type(&desc.media_type, &what)?;
            digest_hex(diff_id, &format!("rootfs.diff_ids[{i}] of {config_what}"))?;
            progress.step(&format!(
                "Verifying layer {}/{n} {}",
                i + 1,
                short(&desc.digest)
            ));
            let (actual, uncompressed) = self.uncompressed_digest(&desc.digest, &what)?;
            digest::check(
                || format!("{what}: uncompressed content vs rootfs.diff_ids[{i}]"),
                diff_id,
                &actual,
            )?;
            size += uncompressed;
            records.push(Layer {
                digest: desc.digest.clone(),
                diff_id: diff_id.clone(),
                size: desc.size,
                media_type: desc.media_type.clone(),
            });
        }
        Ok(Image {
            id: config_digest.to_string(),
            names,
            manifest_digest,
            layers: records,
            config: ImageConfig::from(&config),
            size,
            created: config.created.clone(),
        })
    }

    /// The compression of a staged layer, sniffed from its first bytes.
    pub(crate) fn compression(&self, digest: &str, what: &str) -> Result<Compression, Error> {
        let path = self.staged(digest)?;
        let mut head = [0u8; 8];
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let n = read_head(&mut file, &mut head).map_err(io_err("reading", path))?;
        Compression::sniff(&head[..n], what)
    }

    fn uncompressed_digest(&self, digest: &str, what: &str) -> Result<(String, u64), Error> {
        let compression = self.compression(digest, what)?;
        let path = self.staged(digest)?;
        let file = BufReader::new(File::open(path).map_err(io_err("opening", path))?);
        let unpack_err = |source| Error::Unpack {
            layer: what.to_string(),
            path: String::new(),
            source,
        };
        match compression {
            Compression::None => HashReader::new(file).finish().map_err(unpack_err),
            Compression::Gzip => HashReader::new(GzDecoder::new(file))
                .finish()
                .map_err(unpack_err),
        }
    }

    /// Makes the import visible: renames the staged blobs into `blobs/`, then adds the
    /// images to the index (moving names that other images had; an image that thereby
    /// loses its last name is deleted), then collects garbage.
    pub(crate) fn commit(
        self,
        store: &Store,
        lock: &WriteLock,
        images: Vec<Image>,
    ) -> Result<Vec<Image>, Error> {
        for (digest, staged) in &self.blobs {
            let dest = store.blob_path(digest)?;
            if !dest.exists() {
                fs::rename(staged, &dest).map_err(io_err("moving blob into place", &dest))?;
            }
        }
        if let Some(any) = self.blobs.keys().next() {
            let dir = store.blob_path(any)?;
            sync_dir(dir.parent().unwrap_or(store.root()))?;
        }
        #[cfg(test)]
        if failpoint::FAIL_BEFORE_INDEX.get() {
            return Err(Error::Io {
                what: "simulated crash before writing".into(),
                path: store.root().join("images.json"),
                source: io::Error::other("failpoint"),
            });
        }
        let mut state = store.read_state()?;
        let ids: Vec<String> = images.iter().map(|i| i.id.clone()).collect();
        for image in images {
            add_image(&mut state, image);
        }
        let out = ids
            .iter()
            .filter_map(|id| state.images.iter().find(|i| i.id == *id).cloned())
            .collect();
        store.write_state(lock, &state)?;
        store.collect_garbage(lock, &state)?;
        Ok(out)
    }
}

/// Adds or updates `image` in `state`; its names move to it from other images, and an
/// image that thereby loses its last name is dropped.
fn add_image(state: &mut StoreState, image: Image) {
    for other in state.images.iter_mut().filter(|i| i.id != image.id) {
        let before = other.names.len();
        other.names.retain(|n| !image.names.contains(n));
        if before > 0 && other.names.is_empty() {
            tracing::debug!(id = %other.id, "image lost its last name; deleting it");
            other.id.clear();
        }
    }
    state.images.retain(|i| !i.id.is_empty());
    match state.images.iter_mut().find(|i| i.id == image.id) {
        Some(existing) => {
            let mut names = std::mem::take(&mut existing.names);
            for name in image.names.iter() {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
            *existing = Image { names, ..image };
        }
        None => state.images.push(image),
    }
}

/// Reads up to `buf.len()` bytes (fewer only at end of file).
pub(crate) fn read_head(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `sha256:0123456789ab`: a digest shortened for progress lines.
pub(crate) fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

#[cfg(test)]
pub(crate) mod failpoint {
    //! Test-only fault injection: a crash between moving blobs into place and
    //! writing the index.
    use std::cell::Cell;

    thread_local! {
        pub(crate) static FAIL_BEFORE_INDEX: Cell<bool> = const { Cell::new(false) };
    }
}

/// Reads the JSON document at `path`, refusing one larger than `limit` bytes before
/// reading it (a blob's descriptor may lie about its size).
pub(crate) fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let file = fs::File::open(path).map_err(io_err("reading", path))?;
    let size = file.metadata().map_err(io_err("reading", path))?.len();
    let too_large = |size: u64| Error::InvalidImage {
        what: path.display().to_string(),
        reason: format!("{size} bytes, more than the {limit} allowed for a JSON document"),
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn blob_names(store: &Store) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A crash after the blobs are moved into place but before the index is written:
    /// the index does not know the image, and the next open removes the orphans.
    #[test]
    fn a_crash_before_the_index_write_leaves_only_garbage_that_open_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let first = dir.path().join("first");
        crate::fixtures::write_oci_layout(&first, "first:1").unwrap();
        let before = store.load(&first, None, &NoProgress).unwrap();
        let blobs_before = blob_names(&store);

        let second = dir.path().join("second");
        let config = crate::ImageConfig {
            cmd: vec!["true".into()],
            ..crate::fixtures::config()
        };
        let layers = crate::fixtures::busybox_layer_tars().unwrap();
        crate::fixtures::write_oci_layout_with(&second, Some("second:1"), &layers, &config)
            .unwrap();
        failpoint::FAIL_BEFORE_INDEX.set(true);
        let result = store.load(&second, None, &NoProgress);
        failpoint::FAIL_BEFORE_INDEX.set(false);
        assert!(result.unwrap_err().to_string().contains("simulated crash"));

        assert_eq!(store.list().unwrap(), before);
        assert!(matches!(store.get("second:1"), Err(Error::NotFound { .. })));
        assert_eq!(
            blob_names(&store).len(),
            blobs_before.len() + 2,
            "config and manifest orphans"
        );

        let reopened = Store::open(store.root()).unwrap();
        assert_eq!(blob_names(&reopened), blobs_before);
        assert_eq!(reopened.list().unwrap(), before);
        let again = reopened.load(&second, None, &NoProgress).unwrap();
        assert_eq!(reopened.get("second:1").unwrap().id, again[0].id);
    }

    #[test]
    fn a_json_blob_over_its_limit_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        fs::write(&p, vec![b' '; 2048]).unwrap();
        assert_eq!(read_capped(&p, 4096).unwrap().len(), 2048);
        let e = read_capped(&p, 1024).unwrap_err().to_string();
        assert!(e.contains("2048 bytes, more than the 1024 allowed"), "{e}");
    }
}
