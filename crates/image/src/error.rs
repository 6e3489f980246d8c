//! The image store's one error type: every variant names the file, digest or reference
//! it is about, and keeps its cause.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "creating blob", ...).
        what: String,
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Content did not hash to the digest that names it (a corrupt or tampered blob, or a
    /// layer whose uncompressed content does not match the config's `rootfs.diff_ids`).
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob concerned (layer number and digest, config, manifest).
        what: String,
        /// The digest the image claims.
        expected: String,
        /// The digest of the content actually read.
        actual: String,
    },
    /// A digest string that is not `sha256:<64 lowercase hex digits>`.
    #[error("{what}: unsupported or malformed digest {digest:?} (want sha256:<64 hex digits>)")]
    InvalidDigest {
        /// Where the digest came from.
        what: String,
        /// The digest as found.
        digest: String,
    },
    /// An image name or reference that does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// No image has this name, ID or ID prefix.
    #[error("image {name:?} not found")]
    NotFound {
        /// The name or ID asked for.
        name: String,
    },
    /// An ID prefix that matches more than one image.
    #[error("image ID prefix {prefix:?} is ambiguous: it matches {}", matches.join(", "))]
    AmbiguousId {
        /// The prefix asked for.
        prefix: String,
        /// The IDs it matches.
        matches: Vec<String>,
    },
    /// A load source that is none of the supported formats.
    #[error("{}: not an OCI image layout, OCI archive or docker archive (no index.json or manifest.json)", path.display())]
    UnknownFormat {
        /// The source.
        path: PathBuf,
    },
    /// A JSON document (index, manifest, config, store index) that does not parse.
    #[error("{what}: malformed JSON: {source}")]
    Json {
        /// The document concerned.
        what: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed JSON that does not describe a usable image.
    #[error("{what}: {reason}")]
    InvalidImage {
        /// The document or blob concerned.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest or layer of a kind the store cannot use (zstd layers, schema 1
    /// manifests, artifacts that are not container images).
    #[error("{what}: unsupported media type {media_type}")]
    UnsupportedMediaType {
        /// The blob concerned.
        what: String,
        /// Its media type (or a description of its content when sniffed).
        media_type: String,
    },
    /// An image index without a linux/amd64 entry.
    #[error("{reference}: the image index has no linux/amd64 image")]
    NoMatchingPlatform {
        /// The reference or source concerned.
        reference: String,
    },
    /// `load` with a tag of a source that holds several images (or none).
    #[error("{}: a tag can only rename a source that holds exactly one image; it holds {count}", path.display())]
    TagNeedsOneImage {
        /// The source.
        path: PathBuf,
        /// How many images it holds.
        count: usize,
    },
    /// A source that holds no image at all.
    #[error("{}: holds no image", path.display())]
    EmptySource {
        /// The source.
        path: PathBuf,
    },
    /// The registry refused or failed a request.
    #[error("pulling {reference}: {source}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The registry client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A layer entry that would land outside the root filesystem, or cannot be placed.
    #[error("layer {layer}: entry {path:?}: {reason}")]
    UnsafePath {
        /// The layer's digest.
        layer: String,
        /// The entry's path as written in the layer.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// Unpacking a layer entry failed.
    #[error("layer {layer}: entry {path:?}: {source}")]
    Unpack {
        /// The layer's digest.
        layer: String,
        /// The entry's path as written in the layer (empty for the archive itself).
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The root filesystem build needs root privileges.
    #[error("building a root filesystem needs root (to keep file owners and create device nodes); running as uid {uid}")]
    NotRoot {
        /// The effective uid we run as.
        uid: u32,
    },
    /// `mkfs.ext4` could not be run or failed.
    #[error("mkfs.ext4 for {image} failed ({status}): {stderr}")]
    Mkfs {
        /// What was being built: an image ID, or a directory.
        image: String,
        /// Its exit status, or why it could not start.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Shorthand for `map_err` on filesystem calls: `.map_err(io_err("reading", &path))`.
pub(crate) fn io_err(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> Error {
    let (what, path) = (what.into(), path.into());
    move |source| Error::Io { what, path, source }
}
