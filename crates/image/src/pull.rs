//! `Store::pull`: fetches an image from a registry (Docker Registry HTTP API v2 / OCI
//! distribution) with `oci-client`, picking the linux/amd64 entry of an index, and
//! imports it like `load` does: every blob verified, the index written last.

use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::digest::{self, sha256_of};
use crate::error::{io_err, Error};
use crate::image::Image;
use crate::import::{short, ImageParts, Staging};
use crate::progress::Progress;
use crate::reference::{DefaultRegistry, ImageRef};
use crate::spec::{
    check_layer_media_type, parse_manifest, pick_platform, Descriptor, Manifest, ManifestKind,
    ACCEPTED_MANIFESTS,
};
use crate::store::Store;

/// How to reach the registry.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Talk plain HTTP even to a registry that is not on this machine (registries on
    /// `localhost`, 127.0.0.0/8 and `[::1]` always get plain HTTP, as in Docker).
    pub plain_http: bool,
    /// Basic-auth user name; anonymous when `None`.
    pub username: Option<String>,
    /// Basic-auth password (with `username`).
    pub password: Option<String>,
}

/// Connection and read timeouts for registry requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A registry client for `config`, with rustls's crypto provider (ring) installed for
/// this process first: the HTTP client panics without one.
pub fn client(config: ClientConfig) -> Client {
    // An error only says that a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(config)
}

impl Store {
    /// Pulls `reference` (`busybox`, `127.0.0.1:5000/img:tag`, `name@sha256:…`; no host
    /// means Docker Hub) and stores it under its normalized name (for a pull by digest
    /// alone, `registry/repository@sha256:…`).
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Image, Error> {
        let result = self.pull_inner(reference, opts, progress);
        progress.done();
        result
    }

    fn pull_inner(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Image, Error> {
        let image_ref = ImageRef::parse(reference, DefaultRegistry::DockerHub)?;
        let remote = to_oci_reference(&image_ref);
        let protocol = if opts.plain_http || image_ref.is_loopback_registry() {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = client(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        });
        let auth = match &opts.username {
            Some(user) => {
                RegistryAuth::Basic(user.clone(), opts.password.clone().unwrap_or_default())
            }
            None => RegistryAuth::Anonymous,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err(
                "starting the registry client runtime for",
                self.root(),
            ))?;
        let lock = self.lock()?;
        let mut staging = Staging::new(self, &lock)?;
        let mut puller = Puller {
            client: &client,
            auth: &auth,
            remote: &remote,
            reference,
            staging: &mut staging,
            progress,
        };
        let mut image = runtime.block_on(puller.run())?;
        image.names = vec![image_ref.name()];
        let mut images = staging.commit(self, &lock, vec![image])?;
        Ok(images.remove(0))
    }
}

fn to_oci_reference(r: &ImageRef) -> Reference {
    let (registry, repository) = (r.registry.clone(), r.repository.clone());
    match (&r.tag, &r.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.clone(), digest.clone())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.clone()),
        (tag, None) => Reference::with_tag(
            registry,
            repository,
            tag.clone().unwrap_or_else(|| "latest".into()),
        ),
    }
}

/// One pull in progress.
struct Puller<'a> {
    client: &'a Client,
    auth: &'a RegistryAuth,
    remote: &'a Reference,
    /// The reference as the user gave it, for messages.
    reference: &'a str,
    staging: &'a mut Staging,
    progress: &'a dyn Progress,
}

impl Puller<'_> {
    fn registry_err(&self) -> impl FnOnce(OciDistributionError) -> Error + '_ {
        move |source| Error::Registry {
            reference: self.reference.to_string(),
            source,
        }
    }

    async fn run(&mut self) -> Result<Image, Error> {
        self.progress.step(&format!("Resolving {}", self.reference));
        let (bytes, mut digest) = self.fetch_manifest(self.remote).await?;
        if let Some(expected) = self.remote.digest() {
            digest::check(
                || format!("manifest of {}", self.reference),
                expected,
                &digest,
            )?;
        }
        let mut what = format!("manifest {digest} of {}", self.reference);
        let manifest: Manifest = match parse_manifest(&bytes, &what)? {
            ManifestKind::Manifest(m) => {
                self.staging
                    .add_bytes(&bytes, Some(&digest), || what.clone())?;
                m
            }
            ManifestKind::Index(index) => {
                let entry = pick_platform(&index).ok_or_else(|| Error::NoMatchingPlatform {
                    reference: self.reference.to_string(),
                })?;
                let platform_ref = self.remote.clone_with_digest(entry.digest.clone());
                let (bytes, actual) = self.fetch_manifest(&platform_ref).await?;
                digest = actual;
                what = format!("manifest {digest} (linux/amd64) of {}", self.reference);
                digest::check(|| what.clone(), &entry.digest, &digest)?;
                match parse_manifest(&bytes, &what)? {
                    ManifestKind::Manifest(m) => {
                        self.staging
                            .add_bytes(&bytes, Some(&digest), || what.clone())?;
                        m
                    }
                    ManifestKind::Index(_) => {
                        return Err(Error::InvalidImage {
                            what,
                            reason: "an index inside an index".into(),
                        })
                    }
                }
            }
        };
        self.fetch_blob(&manifest.config, format!("config of {what}"))
            .await?;
        let n = manifest.layers.len();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let layer_what = crate::spec::layer_label(i, n, &layer.digest, self.reference);
            check_layer_media_type(&layer.media_type, &layer_what)?;
            self.fetch_blob(layer, layer_what).await?;
        }
        let parts = ImageParts {
            manifest_digest: digest,
            config_digest: &manifest.config.digest,
            layers: &manifest.layers,
            members: None,
            names: Vec::new(),
        };
        self.staging
            .finish_image(self.reference, parts, self.progress)
    }

    /// A manifest's bytes and their digest (computed here, not taken from headers).
    async fn fetch_manifest(&self, remote: &Reference) -> Result<(Vec<u8>, String), Error> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(remote, self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(self.registry_err())?;
        let digest = sha256_of(&bytes);
        Ok((bytes.to_vec(), digest))
    }

    /// Streams a blob into staging, checking its digest.
    async fn fetch_blob(&mut self, desc: &Descriptor, what: String) -> Result<(), Error> {
        crate::digest::digest_hex(&desc.digest, &what)?;
        let label = format!("Copying blob {}", short(&desc.digest));
        self.progress.step(&label);
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(self.remote, &oci_desc)
            .await
            .map_err(self.registry_err())?;
        let total = stream.content_length.or(Some(desc.size));
        let mut blob = self.staging.begin()?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Registry {
                reference: self.reference.to_string(),
                source: OciDistributionError::IoError(e),
            })?;
            blob.write(&chunk)?;
            self.progress.bytes(&label, blob.size(), total);
        }
        self.staging.finish(blob, Some(&desc.digest), || what)?;
        Ok(())
    }
}
