//! Pulls from a real registry on this host: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1 with storage in a temp dir. The fixture image
//! is pushed with oci-client, then pulled with `Store::pull` (plain HTTP, as Docker
//! does for loopback registries). Fails, rather than skips, when the registry is not
//! installed: `scripts/setup.sh` installs it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_image::fixtures;
use forkvm_image::ImageConfig;
use forkvm_image::{Error, NoProgress, PullOptions};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageIndex;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tempfile::TempDir;

use common::{cat, store};

const REGISTRY: &str = "/usr/bin/docker-registry";

/// A registry process, killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Registry {
    fn start() -> Registry {
        assert!(
            Path::new(REGISTRY).is_file(),
            "{REGISTRY} is not installed: the pull tests need the Debian package docker-registry \
             (run scripts/setup.sh, or apt-get install docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        // A free port: bind, read it back, release it for the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {REGISTRY}: {e}"));
        let mut registry = Registry { child, port, dir };
        registry.wait_ready();
        registry
    }

    /// Waits until `GET /v2/` answers 200.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.port);
                let mut answer = String::new();
                if s.write_all(request.as_bytes()).is_ok()
                    && s.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.")
                    && answer.split(' ').nth(1) == Some("200")
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer GET /v2/: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> Client {
    forkvm_image::registry_client(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    })
}

/// Pushes the busybox fixture with `config` as `reference`; returns its manifest digest.
fn push_fixture(reference: &str, config: &ImageConfig) -> String {
    let blobs = fixtures::busybox_blobs(config).unwrap();
    let layers: Vec<ImageLayer> = blobs
        .layers
        .into_iter()
        .map(|l| ImageLayer::oci_v1_gzip(l, None))
        .collect();
    let reference: Reference = reference.parse().unwrap();
    let client = client();
    runtime().block_on(async {
        client
            .push(
                &reference,
                &layers,
                Config::oci_v1(blobs.config, None),
                &RegistryAuth::Anonymous,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
        client
            .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
            .await
            .unwrap()
    })
}

#[test]
fn an_image_pushed_to_a_local_registry_pulls_and_builds() {
    let registry = Registry::start();
    let reference = registry.reference("fixture:1");
    let manifest_digest = push_fixture(&reference, &fixtures::config());

    let (dir, store) = store();
    let image = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .unwrap();
    assert_eq!(image.names, std::slice::from_ref(&reference));
    assert_eq!(image.manifest_digest, manifest_digest);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.env, [fixtures::FIXTURE_PATH, "FIXTURE=1"]);
    assert_eq!(image.config.working_dir, "/");
    assert_eq!(image.layers.len(), 2);
    assert_eq!(store.get(&reference).unwrap(), image);

    // The same content as the fixture layout: the same image ID.
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    assert_eq!(
        store.load(&layout, None, &NoProgress).unwrap()[0].id,
        image.id
    );

    let rootfs = store.rootfs(&image, &NoProgress).unwrap();
    assert_eq!(cat(&rootfs.path, "/hello.txt"), fixtures::HELLO);

    // By digest: stored under repository@digest.
    let by_digest = registry.reference(&format!("fixture@{manifest_digest}"));
    let again = store
        .pull(&by_digest, &PullOptions::default(), &NoProgress)
        .unwrap();
    assert_eq!(again.id, image.id);
    assert!(again.names.contains(&by_digest), "{:?}", again.names);
}

#[test]
fn the_linux_amd64_entry_of_a_multi_arch_index_is_pulled() {
    let registry = Registry::start();
    let amd64 = registry.reference("fixture:amd64");
    let arm64 = registry.reference("fixture:arm64");
    let amd64_digest = push_fixture(&amd64, &fixtures::config());
    let arm_config = ImageConfig {
        cmd: vec!["arm64".into()],
        ..fixtures::config()
    };
    let arm64_digest = push_fixture(&arm64, &arm_config);
    let client = client();
    let rt = runtime();
    let manifest_size = |r: &str| -> usize {
        let r: Reference = r.parse().unwrap();
        rt.block_on(client.pull_manifest_raw(
            &r,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        ))
        .unwrap()
        .0
        .len()
    };
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64_digest,
             "size": manifest_size(&arm64), "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64_digest,
             "size": manifest_size(&amd64), "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let multi = registry.reference("fixture:multi");
    rt.block_on(client.push_manifest_list(
        &multi.parse().unwrap(),
        &RegistryAuth::Anonymous,
        index,
    ))
    .unwrap();

    let (_dir, store) = store();
    let image = store
        .pull(&multi, &PullOptions::default(), &NoProgress)
        .unwrap();
    assert_eq!(image.manifest_digest, amd64_digest);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.names, [multi]);
}

#[test]
fn pulling_a_missing_tag_or_registry_is_an_error_naming_the_reference() {
    let registry = Registry::start();
    push_fixture(&registry.reference("fixture:1"), &fixtures::config());
    let (_dir, store) = store();

    let missing = registry.reference("fixture:nope");
    let err = store
        .pull(&missing, &PullOptions::default(), &NoProgress)
        .unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err}");
    assert!(err.to_string().contains(&missing), "{err}");
    let missing_repo = registry.reference("nothing/here:1");
    let err = store
        .pull(&missing_repo, &PullOptions::default(), &NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains(&missing_repo), "{err}");

    // Nobody listens on this port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}/fixture:1");
    let err = store
        .pull(&nowhere, &PullOptions::default(), &NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains(&nowhere), "{err}");

    let err = store
        .pull("Not A Reference", &PullOptions::default(), &NoProgress)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidReference { .. }), "{err}");
    assert!(store.list().unwrap().is_empty());
    assert!(common::files(&store, "blobs/sha256").is_empty());
    assert!(common::files(&store, "tmp").is_empty());
}

/// A registry that is not on a loopback address is reached over TLS (rustls with its
/// crypto provider installed): the server sees a TLS handshake, and a server that is
/// not TLS is an error naming the reference, not a panic.
#[test]
fn a_registry_off_loopback_is_reached_over_tls() {
    // 0.0.0.0 is not a loopback address to the reference parser, and connects here.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut first = [0u8; 1];
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.read_exact(&mut first).unwrap();
        // Not TLS: an HTTP answer, and the connection closed.
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        first[0]
    });
    let (_dir, store) = store();
    let reference = format!("0.0.0.0:{port}/fixture:1");
    let err = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains(&reference), "{err}");
    // 0x16: a TLS handshake record (the ClientHello).
    assert_eq!(server.join().unwrap(), 0x16, "the client did not start TLS");
    assert!(store.list().unwrap().is_empty());
}
