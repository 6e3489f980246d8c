//! Wire formats, converted at the edge in one place: the OCI image index, manifest and
//! config, their Docker v2 equivalents (same shapes, other media types) and the `docker
//! save` `manifest.json`. Only the fields the store uses are modelled; unknown fields
//! are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a registry is asked for when pulling a manifest.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];
/// The annotation naming an image in an OCI layout's `index.json`.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and Docker 25+'s `docker save`'s) full-name annotation.
pub(crate) const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// An OCI content descriptor.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Platform>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
}

/// An OCI image index or Docker manifest list (also an OCI layout's `index.json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    pub(crate) schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) media_type: Option<String>,
    pub(crate) manifests: Vec<Descriptor>,
}

/// An OCI image manifest or Docker v2 schema 2 manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub(crate) schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) media_type: Option<String>,
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// Just enough of a manifest-like document to tell what it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
}

/// A manifest-like document after telling index from manifest.
pub(crate) enum ManifestKind {
    Index(Index),
    Manifest(Manifest),
}

/// Parses a manifest or index, by its `mediaType` (or its shape when that is absent, as
/// OCI allows). `what` names the blob in errors.
pub(crate) fn parse_manifest(bytes: &[u8], what: &str) -> Result<ManifestKind, Error> {
    let probe: Probe = parse_json(bytes, what)?;
    let media_type = probe.media_type.clone().unwrap_or_default();
    match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(ManifestKind::Index(parse_json(bytes, what)?)),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(ManifestKind::Manifest(parse_json(bytes, what)?)),
        "" if probe.schema_version == 2 && probe.manifests.is_some() => {
            Ok(ManifestKind::Index(parse_json(bytes, what)?))
        }
        "" if probe.schema_version == 2 && probe.layers.is_some() => {
            Ok(ManifestKind::Manifest(parse_json(bytes, what)?))
        }
        "" => Err(Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type: format!(
                "schema version {} without a mediaType",
                probe.schema_version
            ),
        }),
        other => Err(Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type: other.to_string(),
        }),
    }
}

/// The OCI image config (Docker's is the same document).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub(crate) created: Option<String>,
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) config: Option<ContainerConfig>,
    pub(crate) rootfs: RootFs,
}

/// The config's `config` object: how to run the image.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stop_signal: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) diff_ids: Vec<String>,
}

/// One entry of a `docker save` / `podman save` `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerArchiveEntry {
    pub(crate) config: String,
    #[serde(default)]
    pub(crate) repo_tags: Option<Vec<String>>,
    pub(crate) layers: Vec<String>,
}

/// `serde_json::from_slice` whose error names the document.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        what: what.to_string(),
        source,
    })
}

/// How a layer blob is compressed, from its first bytes (media types are often
/// imprecise: Docker archives say nothing, some tools mislabel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
}

impl Compression {
    /// Sniffs `head` (the first bytes of a layer). zstd and other compressions are
    /// refused with [`Error::UnsupportedMediaType`].
    pub(crate) fn sniff(head: &[u8], what: &str) -> Result<Self, Error> {
        let unsupported = |kind: &str| Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type: kind.to_string(),
        };
        match head {
            [0x1f, 0x8b, ..] => Ok(Self::Gzip),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Err(unsupported("zstd-compressed layer (+zstd)")),
            [b'B', b'Z', b'h', ..] => Err(unsupported("bzip2-compressed layer")),
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Err(unsupported("xz-compressed layer")),
            _ => Ok(Self::None),
        }
    }
}

/// Refuses layer media types that are not (possibly compressed) tar layers.
pub(crate) fn check_layer_media_type(media_type: &str, what: &str) -> Result<(), Error> {
    let is_layer = media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.");
    if is_layer && !media_type.ends_with("zstd") {
        Ok(())
    } else {
        Err(Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type: media_type.to_string(),
        })
    }
}

/// The linux/amd64 entry of an index, or its only entry when no entry names a
/// platform (as in many OCI layouts).
pub(crate) fn pick_platform(index: &Index) -> Option<&Descriptor> {
    let amd64 = index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    match (amd64, index.manifests.as_slice()) {
        (Some(d), _) => Some(d),
        (None, [only]) if only.platform.is_none() => Some(only),
        _ => None,
    }
}

/// How errors and progress name layer `i` (0-based) of `n`: `layer 2/3 (sha256:...) of SOURCE`.
pub(crate) fn layer_label(i: usize, n: usize, id: &str, origin: impl std::fmt::Display) -> String {
    format!("layer {}/{n} ({id}) of {origin}", i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let m =
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"d","size":1},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(m, "m").unwrap(),
            ManifestKind::Manifest(_)
        ));
        let i = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_manifest(i, "i").unwrap(),
            ManifestKind::Index(_)
        ));
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest(v1, "v1"),
            Err(Error::UnsupportedMediaType { .. })
        ));
        let art = br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        assert!(matches!(
            parse_manifest(art, "a"),
            Err(Error::UnsupportedMediaType { .. })
        ));
        assert!(matches!(
            parse_manifest(b"{not json", "bad"),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn compression_is_sniffed_and_zstd_refused() {
        assert_eq!(
            Compression::sniff(&[0x1f, 0x8b, 8], "l").unwrap(),
            Compression::Gzip
        );
        assert_eq!(Compression::sniff(b"etc/", "l").unwrap(), Compression::None);
        let err = Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd], "layer 1").unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
        assert!(check_layer_media_type(OCI_LAYER_GZIP, "l").is_ok());
        assert!(
            check_layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "l").is_err()
        );
    }

    #[test]
    fn the_amd64_entry_of_an_index_is_picked() {
        let index: Index = parse_json(
            br#"{"schemaVersion":2,"manifests":[
                {"digest":"a","platform":{"architecture":"arm64","os":"linux"}},
                {"digest":"b","platform":{"architecture":"amd64","os":"linux"}}]}"#,
            "i",
        )
        .unwrap();
        assert_eq!(pick_platform(&index).unwrap().digest, "b");
    }
}
