//! Test fixtures, for this crate's tests and other crates' end-to-end tests: a small
//! image built from the host's static busybox (Debian `busybox-static`), written as
//! an OCI image layout, an OCI archive or a docker archive, plus helpers to build
//! arbitrary layers and to corrupt written images.
//!
//! The busybox image has two layers:
//! 1. `/bin/busybox` with a symlink in `/bin` for every applet, `/etc/passwd` (root
//!    and nobody 65534), `/etc/group`, `/etc/removed-by-whiteout`, `/opaque/old.txt`,
//!    `/tmp` (1777), `/root` (0700), `/home`, and empty `/dev`, `/proc`, `/sys`,
//!    `/run` mount points;
//! 2. a whiteout of `/etc/removed-by-whiteout`, an opaque `/opaque` holding
//!    `new.txt`, `/hello.txt` ([`HELLO`]) and an empty `/work`.
//!
//! Its config (see [`config`]) runs `sh` in `/` with
//! `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` and `FIXTURE=1`.
//! Everything is deterministic: the same call writes the same digests.
//!
//! ```no_run
//! use forkvm_image::{fixtures, NoProgress, Store};
//!
//! let dir = tempfile::tempdir().unwrap();
//! fixtures::write_oci_layout(&dir.path().join("layout"), "fixture:1").unwrap();
//! let store = Store::open(&dir.path().join("store")).unwrap();
//! let images = store.load(&dir.path().join("layout"), None, &NoProgress).unwrap();
//! assert_eq!(images[0].names, ["localhost/fixture:1"]);
//! ```
//!
//! The builders panic on impossible input (a path the tar format cannot hold): they
//! are for tests.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use flate2::write::GzEncoder;
use serde_json::json;
use tar::{EntryType, Header};

use crate::digest::{digest_hex, sha256_of};
use crate::spec::{OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, REF_NAME};
use crate::ImageConfig;

/// The mtime of every fixture entry.
pub const FIXTURE_MTIME: u64 = 1_700_000_000;
/// Content of `/hello.txt` (layer 2).
pub const HELLO: &str = "hello from layer 2\n";
/// Content of `/opaque/new.txt` (layer 2).
pub const OPAQUE_NEW: &str = "new in layer 2\n";
/// The host's static busybox that layer 1 copies.
pub const BUSYBOX: &str = "/bin/busybox";
/// `PATH` in the fixture config.
pub const FIXTURE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds one layer tar in memory, entry by entry (root-owned unless said otherwise,
/// mtime [`FIXTURE_MTIME`]). Paths are relative to the root (`etc/passwd`).
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Complete);
        Self { tar }
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(FIXTURE_MTIME);
        h.set_size(0);
        h
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(EntryType::Directory, mode, 0, 0);
        let path = format!("{}/", path.trim_end_matches('/'));
        self.tar
            .append_data(&mut h, &path, io::empty())
            .expect("fixture dir entry");
        self
    }

    /// A root-owned regular file.
    pub fn file(self, path: &str, mode: u32, content: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, content)
    }

    /// A regular file with an owner.
    pub fn file_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, content: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, mode, uid, gid);
        h.set_size(content.len() as u64);
        self.tar
            .append_data(&mut h, path, content)
            .expect("fixture file entry");
        self
    }

    /// A symlink to `target` (stored as given, absolute or relative).
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Symlink, 0o777, 0, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("fixture symlink entry");
        self
    }

    /// A hard link to the earlier entry `target` (a path from the root).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Link, 0o644, 0, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("fixture hard link entry");
        self
    }

    /// A character device node.
    pub fn char_device(mut self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        let mut h = Self::header(EntryType::Char, mode, 0, 0);
        h.set_device_major(major).expect("device major");
        h.set_device_minor(minor).expect("device minor");
        self.tar
            .append_data(&mut h, path, io::empty())
            .expect("fixture device entry");
        self
    }

    /// A whiteout deleting `path` from the layers below (`etc/x` → `etc/.wh.x`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let entry = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&entry, 0o644, b"")
    }

    /// An opaque marker: `dir` keeps only this layer's content.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            0o644,
            b"",
        )
    }

    /// The uncompressed tar.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("fixture tar")
    }
}

/// The image config the fixture writers put in an image (amd64 Linux): `sh` in `/`
/// with [`FIXTURE_PATH`] and `FIXTURE=1`, labelled `org.forkvm.fixture=busybox`.
pub fn config() -> ImageConfig {
    ImageConfig {
        cmd: vec!["sh".into()],
        env: vec![FIXTURE_PATH.into(), "FIXTURE=1".into()],
        working_dir: "/".into(),
        labels: [("org.forkvm.fixture".to_string(), "busybox".to_string())].into(),
        architecture: "amd64".into(),
        os: "linux".into(),
        ..ImageConfig::default()
    }
}

/// The OCI image config JSON of `config` for layers with these (uncompressed) digests.
pub fn config_json(config: &ImageConfig, diff_ids: &[String]) -> Vec<u8> {
    let mut run = serde_json::Map::new();
    if !config.entrypoint.is_empty() {
        run.insert("Entrypoint".into(), json!(config.entrypoint));
    }
    run.insert("Cmd".into(), json!(config.cmd));
    run.insert("Env".into(), json!(config.env));
    run.insert("WorkingDir".into(), json!(config.working_dir));
    if !config.user.is_empty() {
        run.insert("User".into(), json!(config.user));
    }
    run.insert("Labels".into(), json!(config.labels));
    if let Some(signal) = &config.stop_signal {
        run.insert("StopSignal".into(), json!(signal));
    }
    let history: Vec<_> = (1..=diff_ids.len())
        .map(|i| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("forkvm fixtures: layer {i}")}))
        .collect();
    let doc = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": config.architecture,
        "os": config.os,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    serde_json::to_vec(&doc).expect("config JSON")
}

/// The two busybox layers as uncompressed tars (built once per process).
pub fn busybox_layer_tars() -> io::Result<Arc<Vec<Vec<u8>>>> {
    static CACHE: Mutex<Option<Arc<Vec<Vec<u8>>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(layers) = cache.as_ref() {
        return Ok(layers.clone());
    }
    let layers = Arc::new(vec![busybox_layer1()?, busybox_layer2()]);
    *cache = Some(layers.clone());
    Ok(layers)
}

/// Writes the two busybox layers as `layer1.tar` and `layer2.tar` (uncompressed) into
/// `dir` (created if needed) and returns their paths.
pub fn busybox_layers(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for (i, layer) in busybox_layer_tars()?.iter().enumerate() {
        let path = dir.join(format!("layer{}.tar", i + 1));
        fs::write(&path, layer)?;
        paths.push(path);
    }
    Ok(paths)
}

fn busybox_layer1() -> io::Result<Vec<u8>> {
    let missing = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("fixtures need {BUSYBOX} (Debian package busybox-static): {e}"),
        )
    };
    let busybox = fs::read(BUSYBOX).map_err(missing)?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(missing)?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut layer = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in applets.lines().map(str::trim) {
        let valid = !applet.is_empty() && applet != "busybox" && !applet.contains('/');
        if valid {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    Ok(layer
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .file(
            "etc/removed-by-whiteout",
            0o644,
            b"layer 2 deletes this file with a whiteout\n",
        )
        .dir("opaque", 0o755)
        .file("opaque/old.txt", 0o644, b"old in layer 1\n")
        .dir("tmp", 0o1777)
        .dir("root", 0o700)
        .dir("home", 0o755)
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("run", 0o755)
        .finish())
}

fn busybox_layer2() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .whiteout("etc/removed-by-whiteout")
        .dir("opaque", 0o755)
        .opaque("opaque")
        .file("opaque/new.txt", 0o644, OPAQUE_NEW.as_bytes())
        .file("hello.txt", 0o644, HELLO.as_bytes())
        .dir("work", 0o755)
        .finish()
}

/// gzip, deterministic (no name, mtime 0).
fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// The busybox layers gzipped, with their digests (built once per process).
fn busybox_gz() -> io::Result<Arc<Vec<Vec<u8>>>> {
    static CACHE: Mutex<Option<Arc<Vec<Vec<u8>>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(gz) = cache.as_ref() {
        return Ok(gz.clone());
    }
    let gz = Arc::new(
        busybox_layer_tars()?
            .iter()
            .map(|l| gzip(l))
            .collect::<io::Result<Vec<_>>>()?,
    );
    *cache = Some(gz.clone());
    Ok(gz)
}

/// The blobs of the busybox image as a registry holds them.
#[derive(Clone, Debug)]
pub struct FixtureBlobs {
    /// The image config JSON ([`config`]).
    pub config: Vec<u8>,
    /// The layers, gzipped (media type `application/vnd.oci.image.layer.v1.tar+gzip`).
    pub layers: Vec<Vec<u8>>,
}

/// The busybox image's config and gzipped layers, e.g. to push to a test registry.
pub fn busybox_blobs(config: &ImageConfig) -> io::Result<FixtureBlobs> {
    let diff_ids: Vec<String> = busybox_layer_tars()?.iter().map(|l| sha256_of(l)).collect();
    Ok(FixtureBlobs {
        config: config_json(config, &diff_ids),
        layers: busybox_gz()?.to_vec(),
    })
}

/// Writes the busybox image as an OCI image layout in `dir` (gzip layers,
/// `index.json` with an `org.opencontainers.image.ref.name` of `name_tag`).
pub fn write_oci_layout(dir: &Path, name_tag: &str) -> io::Result<()> {
    let layers = busybox_layer_tars()?;
    let gz = busybox_gz()?;
    let parts: Vec<(&[u8], &[u8])> = layers
        .iter()
        .zip(gz.iter())
        .map(|(l, g)| (&l[..], &g[..]))
        .collect();
    write_layout(dir, Some(name_tag), &parts, &config())
}

/// Adds an image with these layers (uncompressed tars; gzipped here) and config to
/// the OCI layout in `dir`, creating it or appending to its `index.json`.
pub fn write_oci_layout_with(
    dir: &Path,
    name_tag: Option<&str>,
    layers: &[Vec<u8>],
    config: &ImageConfig,
) -> io::Result<()> {
    let gz = layers
        .iter()
        .map(|l| gzip(l))
        .collect::<io::Result<Vec<_>>>()?;
    let parts: Vec<(&[u8], &[u8])> = layers
        .iter()
        .zip(&gz)
        .map(|(l, g)| (&l[..], &g[..]))
        .collect();
    write_layout(dir, name_tag, &parts, config)
}

/// `(uncompressed, gzipped)` layers into a layout.
fn write_layout(
    dir: &Path,
    name_tag: Option<&str>,
    layers: &[(&[u8], &[u8])],
    config: &ImageConfig,
) -> io::Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> io::Result<String> {
        let digest = sha256_of(data);
        let hex = digest_hex(&digest, "fixture").map_err(io::Error::other)?;
        fs::write(blobs.join(hex), data)?;
        Ok(digest)
    };
    let diff_ids: Vec<String> = layers.iter().map(|(tar, _)| sha256_of(tar)).collect();
    let config_json = config_json(config, &diff_ids);
    let mut layer_descs = Vec::new();
    for (_, gz) in layers {
        layer_descs
            .push(json!({"mediaType": OCI_LAYER_GZIP, "digest": put(gz)?, "size": gz.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(&config_json)?, "size": config_json.len()},
        "layers": layer_descs,
    }))?;
    let mut desc =
        json!({"mediaType": OCI_MANIFEST, "digest": put(&manifest)?, "size": manifest.len()});
    if let Some(name) = name_tag {
        desc["annotations"] = json!({ REF_NAME: name });
    }
    let index_path = dir.join("index.json");
    let mut index = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        }
        Err(e) => return Err(e),
    };
    index["manifests"]
        .as_array_mut()
        .ok_or_else(|| io::Error::other("index.json without a manifests array"))?
        .push(desc);
    fs::write(&index_path, serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
}

/// Writes the busybox image as an OCI archive: a tar of an OCI layout.
pub fn write_oci_archive(path: &Path, name_tag: &str) -> io::Result<()> {
    let layout = tempfile::tempdir()?;
    write_oci_layout(layout.path(), name_tag)?;
    tar_directory(layout.path(), path)
}

/// Tars the contents of `dir` (names relative to it) into `out`.
pub fn tar_directory(dir: &Path, out: &Path) -> io::Result<()> {
    let mut tar = tar::Builder::new(File::create(out)?);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.sync_all()
}

/// Writes the busybox image as a `docker save` archive: `manifest.json` with
/// `Config`, `RepoTags` (`[repo_tag]`) and `Layers`, `<config hex>.json`, and
/// uncompressed `<diff_id hex>/layer.tar` files.
pub fn write_docker_archive(path: &Path, repo_tag: &str) -> io::Result<()> {
    write_docker_archive_with(path, Some(repo_tag), &busybox_layer_tars()?, &config())
}

/// Writes a docker archive with these layers (uncompressed) and config; no
/// `RepoTags` when `repo_tag` is `None`.
pub fn write_docker_archive_with(
    path: &Path,
    repo_tag: Option<&str>,
    layers: &[Vec<u8>],
    config: &ImageConfig,
) -> io::Result<()> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_of(l)).collect();
    let config_json = config_json(config, &diff_ids);
    let config_name = format!("{}.json", hex_of(&sha256_of(&config_json)));
    let layer_names: Vec<String> = diff_ids
        .iter()
        .map(|d| format!("{}/layer.tar", hex_of(d)))
        .collect();
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": repo_tag.map(|t| vec![t]),
        "Layers": layer_names,
    }]))?;
    let mut members: Vec<(String, Vec<u8>)> = vec![(config_name, config_json)];
    members.extend(layer_names.iter().cloned().zip(layers.iter().cloned()));
    members.push(("manifest.json".into(), manifest));
    write_tar(path, &members)
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// A tar of regular files (parent directories implied).
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut tar = tar::Builder::new(File::create(path)?);
    for (name, data) in members {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(FIXTURE_MTIME);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, &data[..])?;
    }
    tar.into_inner()?.sync_all()
}

/// Corrupts the last layer of the first image in the OCI layout `dir` (see
/// [`corrupt_oci_layer`]) and returns that layer's digest, which a load must name.
pub fn corrupt_layer(dir: &Path) -> io::Result<String> {
    let count = first_manifest(dir)?["layers"]
        .as_array()
        .map_or(0, Vec::len);
    let last = count
        .checked_sub(1)
        .ok_or_else(|| io::Error::other("the image has no layers"))?;
    corrupt_oci_layer(dir, last)
}

/// Flips the last byte of layer `layer` (0-based) of the first image in the OCI
/// layout `dir`, so that it no longer matches its digest; returns that digest.
pub fn corrupt_oci_layer(dir: &Path, layer: usize) -> io::Result<String> {
    let manifest = first_manifest(dir)?;
    let digest = manifest["layers"][layer]["digest"]
        .as_str()
        .ok_or_else(|| io::Error::other(format!("no layer {layer}")))?;
    flip_last_byte(&dir.join("blobs/sha256").join(hex_of(digest)))?;
    Ok(digest.to_string())
}

/// The manifest of the first image of an OCI layout.
fn first_manifest(dir: &Path) -> io::Result<serde_json::Value> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| io::Error::other("index.json lists no manifest"))?;
    let blob = dir.join("blobs/sha256").join(hex_of(digest));
    Ok(serde_json::from_slice(&fs::read(blob)?)?)
}

/// Flips the last byte of layer `layer` (0-based) of the first image in the docker
/// archive `path` (an uncompressed layer stays a valid tar, but no longer matches its
/// `rootfs.diff_ids` entry). Returns the layer's member name.
pub fn corrupt_docker_layer(path: &Path, layer: usize) -> io::Result<String> {
    let mut members = Vec::new();
    let mut archive = tar::Archive::new(File::open(path)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        members.push((name, data));
    }
    let manifest = members
        .iter()
        .find(|(n, _)| n == "manifest.json")
        .ok_or_else(|| io::Error::other("no manifest.json"))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.1)?;
    let target = manifest[0]["Layers"][layer]
        .as_str()
        .ok_or_else(|| io::Error::other("no such layer"))?
        .to_string();
    let member = members
        .iter_mut()
        .find(|(n, _)| *n == target)
        .ok_or_else(|| io::Error::other("layer member missing"))?;
    if let Some(last) = member.1.last_mut() {
        *last ^= 0xff;
    }
    write_tar(path, &members)?;
    Ok(target)
}

fn flip_last_byte(path: &Path) -> io::Result<()> {
    let mut data = fs::read(path)?;
    if let Some(last) = data.last_mut() {
        *last ^= 0xff;
    }
    fs::write(path, data)
}
