//! The store's public records: an image, its layers and its run configuration, and
//! what `remove` and `rootfs` report.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::ConfigFile;

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:<hex>`: the digest of the image config, as in Docker and podman.
    pub id: String,
    /// Normalized names (`localhost/busybox:latest`), oldest first; empty for an image
    /// imported without any name (then it is reachable by ID only).
    pub names: Vec<String>,
    /// The digest of the image manifest (for docker archives: of the OCI manifest the
    /// store wrote for it).
    pub manifest_digest: String,
    /// The layers, lowest first.
    pub layers: Vec<Layer>,
    /// How to run it.
    pub config: ImageConfig,
    /// Total uncompressed size of the layers in bytes (what `podman images` calls SIZE).
    pub size: u64,
    /// The config's `created` timestamp (RFC 3339), when it has one.
    pub created: Option<String>,
}

impl Image {
    /// The first 12 hex digits of the ID, as `docker images` shows it.
    pub fn short_id(&self) -> &str {
        let hex = self
            .id
            .strip_prefix(crate::digest::SHA256_PREFIX)
            .unwrap_or(&self.id);
        &hex[..hex.len().min(12)]
    }
}

/// One layer of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the blob as stored (compressed or not).
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Media type of the blob.
    pub media_type: String,
}

/// The run configuration: the OCI image config's `config` object plus its platform.
/// Absent fields are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User` (`uid`, `uid:gid`, `name`, ...; empty: root).
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal` (e.g. `SIGTERM`).
    pub stop_signal: Option<String>,
    /// `architecture` (e.g. `amd64`).
    pub architecture: String,
    /// `os` (e.g. `linux`).
    pub os: String,
}

impl From<&ConfigFile> for ImageConfig {
    fn from(file: &ConfigFile) -> Self {
        let c = file.config.as_ref();
        Self {
            entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
            cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
            env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
            working_dir: c.and_then(|c| c.working_dir.clone()).unwrap_or_default(),
            user: c.and_then(|c| c.user.clone()).unwrap_or_default(),
            labels: c.and_then(|c| c.labels.clone()).unwrap_or_default(),
            stop_signal: c.and_then(|c| c.stop_signal.clone()),
            architecture: file.architecture.clone(),
            os: file.os.clone(),
        }
    }
}

/// What [`Store::remove`](crate::Store::remove) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The names removed.
    pub untagged: Vec<String>,
    /// The image ID, when the image itself (rootfs and unshared blobs) was deleted
    /// because no name was left.
    pub deleted: Option<String>,
}

/// An image's root filesystem, from [`Store::rootfs`](crate::Store::rootfs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rootfs {
    /// The read-only ext4 file (`<store>/rootfs/<hex>.ext4`, mode 0444).
    pub path: PathBuf,
    /// True when it was already built (this call did no image work).
    pub cached: bool,
    /// Its size in bytes.
    pub size: u64,
}
