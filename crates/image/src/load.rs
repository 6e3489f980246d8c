//! `Store::load`: imports every image of an OCI image layout (directory or tar) or a
//! `docker save` / `podman save` archive, detecting which it is.
//!
//! Names: a docker archive's `RepoTags` are normalized like local names. In an OCI
//! layout, an `io.containerd.image.name` annotation (Docker 25+, containerd) is the
//! full name; otherwise `org.opencontainers.image.ref.name` is used: when it contains
//! `:` or `/` it is a name (`fixture:1` → `localhost/fixture:1`), otherwise it is a
//! tag of a repository named after the source file or directory (`v1` in
//! `./myapp.tar` → `localhost/myapp:v1`). An explicit tag replaces all of these.

use std::path::Path;

use crate::digest::{digest_hex, is_hex};
use crate::error::Error;
use crate::image::Image;
use crate::import::{short, ImageParts, Staging, MAX_JSON};
use crate::progress::Progress;
use crate::reference::normalize_name;
use crate::source::Source;
use crate::spec::{
    parse_json, parse_manifest, pick_platform, Compression, Descriptor, DockerArchiveEntry, Index,
    Manifest, ManifestKind, CONTAINERD_NAME, OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP, OCI_MANIFEST,
    REF_NAME,
};
use crate::store::Store;

/// Nested indexes followed at most.
const MAX_INDEX_DEPTH: usize = 4;

impl Store {
    /// Imports every image found in `source`: an OCI image layout directory, an OCI
    /// archive (a tar of a layout) or a docker archive (`docker save`: `manifest.json`
    /// and layer tars, gzip-compressed or not); the whole archive may be gzipped. `tag`
    /// names the image instead of the names in the source, when it holds exactly one.
    /// Every blob is verified; on error the store is unchanged.
    pub fn load(
        &self,
        source: &Path,
        tag: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<Vec<Image>, Error> {
        let result = self.load_inner(source, tag, progress);
        progress.done();
        result
    }

    fn load_inner(
        &self,
        source: &Path,
        tag: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<Vec<Image>, Error> {
        let tag = tag.map(normalize_name).transpose()?;
        let lock = self.lock()?;
        let mut staging = Staging::new(self, &lock)?;
        let src = Source::open(source, staging.dir())?;
        let with_names = tag.is_none();
        let mut images = if src.exists("manifest.json") {
            load_docker_archive(&src, &mut staging, with_names, progress)?
        } else if src.exists("index.json") {
            load_oci_layout(&src, &mut staging, with_names, progress)?
        } else {
            return Err(Error::UnknownFormat {
                path: source.to_path_buf(),
            });
        };
        if images.is_empty() {
            return Err(Error::EmptySource {
                path: source.to_path_buf(),
            });
        }
        if let Some(tag) = tag {
            if images.len() != 1 {
                return Err(Error::TagNeedsOneImage {
                    path: source.to_path_buf(),
                    count: images.len(),
                });
            }
            images[0].names = vec![tag];
        }
        staging.commit(self, &lock, images)
    }
}

/// Imports the images an OCI layout's `index.json` lists (skipping entries for other
/// platforms).
fn load_oci_layout(
    src: &Source,
    staging: &mut Staging,
    with_names: bool,
    progress: &dyn Progress,
) -> Result<Vec<Image>, Error> {
    let what = src.describe("index.json");
    let index: Index = parse_json(&src.read("index.json", MAX_JSON)?, &what)?;
    let mut images = Vec::new();
    for desc in &index.manifests {
        let other_platform = desc
            .platform
            .as_ref()
            .is_some_and(|p| p.os != "linux" || p.architecture != "amd64");
        if other_platform {
            continue;
        }
        let names = if with_names {
            oci_names(desc, src.origin())?
        } else {
            Vec::new()
        };
        images.push(load_oci_manifest(src, staging, desc, names, 0, progress)?);
    }
    Ok(images)
}

/// Imports the image `desc` points to, following nested indexes to their linux/amd64
/// entry.
fn load_oci_manifest(
    src: &Source,
    staging: &mut Staging,
    desc: &Descriptor,
    names: Vec<String>,
    depth: usize,
    progress: &dyn Progress,
) -> Result<Image, Error> {
    let what = format!("manifest {} of {}", desc.digest, src.origin().display());
    let bytes = src.read(&blob_name(&desc.digest, &what)?, MAX_JSON)?;
    let manifest = match parse_manifest(&bytes, &what)? {
        ManifestKind::Index(index) => {
            crate::digest::check(
                || what.clone(),
                &desc.digest,
                &crate::digest::sha256_of(&bytes),
            )?;
            let Some(inner) = pick_platform(&index).filter(|_| depth < MAX_INDEX_DEPTH) else {
                return Err(Error::NoMatchingPlatform { reference: what });
            };
            return load_oci_manifest(src, staging, inner, names, depth + 1, progress);
        }
        ManifestKind::Manifest(m) => m,
    };
    let manifest_digest = staging.add_bytes(&bytes, Some(&desc.digest), || what.clone())?;
    copy_blob(
        src,
        staging,
        &manifest.config,
        &format!("config of {what}"),
        progress,
    )?;
    let n = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let layer_what = crate::spec::layer_label(i, n, &layer.digest, src.origin().display());
        crate::spec::check_layer_media_type(&layer.media_type, &layer_what)?;
        copy_blob(src, staging, layer, &layer_what, progress)?;
    }
    let parts = ImageParts {
        manifest_digest,
        config_digest: &manifest.config.digest,
        layers: &manifest.layers,
        members: None,
        names,
    };
    staging.finish_image(&src.origin().display().to_string(), parts, progress)
}

/// Stages the blob `desc` from the layout's `blobs/` after checking its digest.
fn copy_blob(
    src: &Source,
    staging: &mut Staging,
    desc: &Descriptor,
    what: &str,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let (reader, size) = src.open_member(&blob_name(&desc.digest, what)?)?;
    let label = format!("Copying blob {}", short(&desc.digest));
    progress.step(&label);
    staging.add_reader(
        reader,
        Some(size),
        Some(&desc.digest),
        &label,
        || what.to_string(),
        progress,
    )?;
    Ok(())
}

/// `blobs/sha256/<hex>` for a (validated) digest.
fn blob_name(digest: &str, what: &str) -> Result<String, Error> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest, what)?))
}

/// The names an OCI layout gives an image (see the module documentation).
fn oci_names(desc: &Descriptor, origin: &Path) -> Result<Vec<String>, Error> {
    if let Some(full) = desc.annotations.get(CONTAINERD_NAME) {
        return Ok(vec![normalize_name(full)?]);
    }
    let Some(ref_name) = desc.annotations.get(REF_NAME) else {
        return Ok(Vec::new());
    };
    let name = if ref_name.contains(':') || ref_name.contains('/') {
        ref_name.clone()
    } else {
        format!("{}:{ref_name}", repository_from_path(origin))
    };
    Ok(vec![normalize_name(&name)?])
}

/// A repository name from a source path: its file name without archive extensions,
/// lowercased, with characters a name cannot hold replaced by `-`.
fn repository_from_path(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut stem = file.as_str();
    for ext in [".tar.gz", ".tgz", ".tar", ".oci"] {
        stem = stem.strip_suffix(ext).unwrap_or(stem);
    }
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches('-');
    if cleaned.is_empty() {
        "image".to_string()
    } else {
        cleaned.to_string()
    }
}

/// Imports the images of a docker archive's `manifest.json`. The store writes an OCI
/// manifest for each (layers stored as found, gzip-compressed or not); layer digests
/// are computed and checked against the config's `rootfs.diff_ids`.
fn load_docker_archive(
    src: &Source,
    staging: &mut Staging,
    with_names: bool,
    progress: &dyn Progress,
) -> Result<Vec<Image>, Error> {
    let what = src.describe("manifest.json");
    let entries: Vec<DockerArchiveEntry> =
        parse_json(&src.read("manifest.json", MAX_JSON)?, &what)?;
    let mut images = Vec::new();
    for entry in &entries {
        let config_what = src.describe(&entry.config);
        let config_bytes = src.read(&entry.config, MAX_JSON)?;
        // Docker and podman name the config after its digest; check it when they do.
        let stem = entry
            .config
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".json");
        let expected = (stem.len() == 64 && is_hex(stem)).then(|| format!("sha256:{stem}"));
        let config_digest =
            staging.add_bytes(&config_bytes, expected.as_deref(), || config_what.clone())?;
        let n = entry.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (i, name) in entry.layers.iter().enumerate() {
            let layer_what = crate::spec::layer_label(i, n, name, src.origin().display());
            let (reader, size) = src.open_member(name)?;
            let label = format!("Copying layer {}/{n}", i + 1);
            progress.step(&label);
            let (digest, size) = staging.add_reader(
                reader,
                Some(size),
                None,
                &label,
                || layer_what.clone(),
                progress,
            )?;
            let media_type = match staging.compression(&digest, &layer_what)? {
                Compression::Gzip => OCI_LAYER_GZIP,
                Compression::None => OCI_LAYER,
            };
            layers.push(Descriptor {
                media_type: media_type.to_string(),
                digest,
                size,
                ..Descriptor::default()
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config: Descriptor {
                media_type: OCI_CONFIG.to_string(),
                digest: config_digest.clone(),
                size: config_bytes.len() as u64,
                ..Descriptor::default()
            },
            layers,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| Error::Json {
            what: format!("manifest written for {what}"),
            source,
        })?;
        let manifest_digest = staging.add_bytes(&manifest_bytes, None, || what.clone())?;
        let names = match (&entry.repo_tags, with_names) {
            (Some(tags), true) => tags
                .iter()
                .map(|t| normalize_name(t))
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        };
        let parts = ImageParts {
            manifest_digest,
            config_digest: &config_digest,
            layers: &manifest.layers,
            members: Some(&entry.layers),
            names,
        };
        images.push(staging.finish_image(&src.origin().display().to_string(), parts, progress)?);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_ref_names_are_tags_of_a_repository_named_after_the_source() {
        assert_eq!(
            repository_from_path(Path::new("/x/My_App.tar.gz")),
            "my-app"
        );
        assert_eq!(repository_from_path(Path::new("/x/layout")), "layout");
        assert_eq!(repository_from_path(Path::new("/")), "image");
        let desc = |k: &str, v: &str| Descriptor {
            annotations: [(k.to_string(), v.to_string())].into(),
            ..Descriptor::default()
        };
        let origin = Path::new("/tmp/myapp.tar");
        assert_eq!(
            oci_names(&desc(REF_NAME, "v1"), origin).unwrap(),
            ["localhost/myapp:v1"]
        );
        assert_eq!(
            oci_names(&desc(REF_NAME, "fixture:1"), origin).unwrap(),
            ["localhost/fixture:1"]
        );
        assert_eq!(
            oci_names(
                &desc(CONTAINERD_NAME, "docker.io/library/busybox:latest"),
                origin
            )
            .unwrap(),
            ["docker.io/library/busybox:latest"]
        );
        assert!(oci_names(&Descriptor::default(), origin)
            .unwrap()
            .is_empty());
    }
}
