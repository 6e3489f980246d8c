//! Loading images into the store: OCI layouts and archives, docker archives, names,
//! lookups, removal, and bad input that must leave the store as it was.

mod common;

use std::fs;
use std::io::Write;

use forkvm_image::fixtures;
use forkvm_image::ImageConfig;
use forkvm_image::{Error, NoProgress, Removed};

use common::{files, store};

#[test]
fn an_oci_layout_loads_with_its_name_config_and_layers() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let images = store.load(&layout, None, &NoProgress).unwrap();
    assert_eq!(images.len(), 1);
    let image = &images[0];
    assert_eq!(image.names, ["localhost/fixture:1"]);
    assert!(
        image.id.starts_with("sha256:") && image.id.len() == 71,
        "{}",
        image.id
    );
    assert_eq!(image.config.cmd, ["sh"]);
    assert!(image.config.entrypoint.is_empty());
    assert_eq!(image.config.env, [fixtures::FIXTURE_PATH, "FIXTURE=1"]);
    assert_eq!(image.config.working_dir, "/");
    assert_eq!(
        (image.config.os.as_str(), image.config.architecture.as_str()),
        ("linux", "amd64")
    );
    assert_eq!(image.config.labels["org.forkvm.fixture"], "busybox");
    assert_eq!(image.created.as_deref(), Some("2024-01-01T00:00:00Z"));
    assert_eq!(image.layers.len(), 2);
    for layer in &image.layers {
        assert_eq!(
            layer.media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_ne!(layer.digest, layer.diff_id);
    }
    assert!(image.size > 1_000_000, "uncompressed size {}", image.size);
    // Every blob is stored under its digest; nothing is left in tmp/.
    let blobs = files(&store, "blobs/sha256");
    for digest in [
        &image.id,
        &image.manifest_digest,
        &image.layers[0].digest,
        &image.layers[1].digest,
    ] {
        assert!(
            blobs.contains(&digest[7..].to_string()),
            "{digest} not stored"
        );
    }
    assert_eq!(blobs.len(), 4);
    assert!(files(&store, "tmp").is_empty());
    assert_eq!(store.get("fixture:1").unwrap(), *image);
    assert_eq!(store.list().unwrap(), images);
}

#[test]
fn oci_archives_plain_and_gzipped_load_like_the_layout() {
    let (dir, store) = store();
    let archive = dir.path().join("fixture.tar");
    fixtures::write_oci_archive(&archive, "fixture:tar").unwrap();
    let from_tar = store.load(&archive, None, &NoProgress).unwrap();
    assert_eq!(from_tar[0].names, ["localhost/fixture:tar"]);

    let gz_path = dir.path().join("fixture.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(
        fs::File::create(&gz_path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&fs::read(&archive).unwrap()).unwrap();
    gz.finish().unwrap();
    let from_gz = store.load(&gz_path, Some("gz:1"), &NoProgress).unwrap();
    assert_eq!(from_gz[0].id, from_tar[0].id, "same content, same image");
    assert_eq!(
        from_gz[0].names,
        ["localhost/fixture:tar", "localhost/gz:1"]
    );
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn a_docker_archive_loads_with_its_repo_tags() {
    let (dir, store) = store();
    let archive = dir.path().join("busybox.tar");
    fixtures::write_docker_archive(&archive, "docker.io/library/busybox:1.36").unwrap();
    let images = store.load(&archive, None, &NoProgress).unwrap();
    let image = &images[0];
    assert_eq!(image.names, ["docker.io/library/busybox:1.36"]);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.layers.len(), 2);
    for layer in &image.layers {
        assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(
            layer.digest, layer.diff_id,
            "uncompressed layers are their diff_ids"
        );
    }
    // A short name finds a Docker Hub name, like podman.
    assert_eq!(store.get("busybox:1.36").unwrap().id, image.id);

    // The same config as the OCI fixture: the same image ID.
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let oci = store.load(&layout, None, &NoProgress).unwrap();
    assert_eq!(oci[0].id, image.id);
}

#[test]
fn a_tag_renames_one_image_and_is_refused_for_several() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let images = store.load(&layout, Some("renamed"), &NoProgress).unwrap();
    assert_eq!(images[0].names, ["localhost/renamed:latest"]);

    let layers = fixtures::busybox_layer_tars().unwrap();
    let other = ImageConfig {
        cmd: vec!["true".into()],
        ..fixtures::config()
    };
    fixtures::write_oci_layout_with(&layout, Some("v2"), &layers, &other).unwrap();
    let err = store.load(&layout, Some("x"), &NoProgress).unwrap_err();
    assert!(
        matches!(err, Error::TagNeedsOneImage { count: 2, .. }),
        "{err}"
    );
    // Without a tag both load; a bare ref.name is a tag of the directory's name.
    let images = store.load(&layout, None, &NoProgress).unwrap();
    let names: Vec<_> = images.iter().map(|i| i.names.clone()).collect();
    assert_eq!(
        names,
        [
            vec![
                "localhost/renamed:latest".to_string(),
                "localhost/fixture:1".into()
            ],
            vec!["localhost/layout:v2".into()]
        ]
    );
    assert!(matches!(
        store.load(&layout, Some("Bad Name"), &NoProgress),
        Err(Error::InvalidReference { .. })
    ));
}

#[test]
fn a_corrupt_oci_layer_is_a_digest_mismatch_naming_the_layer() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let digest = fixtures::corrupt_oci_layer(&layout, 1).unwrap();
    let err = store.load(&layout, None, &NoProgress).unwrap_err();
    match &err {
        Error::DigestMismatch {
            what,
            expected,
            actual,
        } => {
            assert!(
                what.contains("layer 2/2") && what.contains(&digest),
                "{what}"
            );
            assert_eq!(expected, &digest);
            assert_ne!(actual, &digest);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&digest));
    assert!(store.list().unwrap().is_empty());
    assert!(
        files(&store, "blobs/sha256").is_empty(),
        "unverified blobs stored"
    );
    assert!(files(&store, "tmp").is_empty());
}

#[test]
fn a_docker_layer_that_does_not_match_its_diff_id_is_refused() {
    let (dir, store) = store();
    let archive = dir.path().join("busybox.tar");
    fixtures::write_docker_archive(&archive, "busybox").unwrap();
    let member = fixtures::corrupt_docker_layer(&archive, 0).unwrap();
    let err = store.load(&archive, None, &NoProgress).unwrap_err();
    match &err {
        Error::DigestMismatch { what, .. } => {
            assert!(
                what.contains("layer 1/2") && what.contains(&member) && what.contains("diff_ids"),
                "{what}"
            );
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(store.list().unwrap().is_empty());
    assert!(files(&store, "blobs/sha256").is_empty());
}

#[test]
fn an_interrupted_import_leaves_the_store_as_it_was() {
    let (dir, store) = store();
    let good = dir.path().join("good");
    fixtures::write_oci_layout(&good, "good:1").unwrap();
    let before = store.load(&good, None, &NoProgress).unwrap();
    let blobs_before = files(&store, "blobs/sha256");
    let index_before = fs::read(store.root().join("images.json")).unwrap();

    // Another image sharing the layers, whose last layer is corrupt in the source.
    let other = ImageConfig {
        cmd: vec!["echo".into(), "other".into()],
        ..fixtures::config()
    };
    let layers = fixtures::busybox_layer_tars().unwrap();
    let bad = dir.path().join("bad");
    fixtures::write_oci_layout_with(&bad, Some("other:1"), &layers, &other).unwrap();
    let corrupt = fixtures::corrupt_layer(&bad).unwrap();
    assert_eq!(corrupt, layers_digest_of_last(&bad));
    let err = store.load(&bad, None, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

    assert_eq!(store.list().unwrap(), before);
    assert!(matches!(store.get("other:1"), Err(Error::NotFound { .. })));
    assert_eq!(files(&store, "blobs/sha256"), blobs_before);
    assert_eq!(
        fs::read(store.root().join("images.json")).unwrap(),
        index_before
    );
    assert!(files(&store, "tmp").is_empty());

    // A good copy of the same image imports.
    let fixed = dir.path().join("fixed");
    fixtures::write_oci_layout_with(&fixed, Some("other:1"), &layers, &other).unwrap();
    let images = store.load(&fixed, None, &NoProgress).unwrap();
    assert_eq!(store.get("other:1").unwrap().id, images[0].id);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn sources_that_are_no_image_are_refused_naming_them() {
    let (dir, store) = store();
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = store.load(&empty, None, &NoProgress).unwrap_err();
    assert!(
        matches!(err, Error::UnknownFormat { .. }) && err.to_string().contains("empty"),
        "{err}"
    );
    let missing = dir.path().join("missing.tar");
    let err = store.load(&missing, None, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("missing.tar"), "{err}");
    let junk = dir.path().join("junk.tar");
    fs::write(&junk, vec![7u8; 4096]).unwrap();
    let err = store.load(&junk, None, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("junk.tar"), "{err}");
    let zstd = dir.path().join("z.tar.zst");
    fs::write(&zstd, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
    let err = store.load(&zstd, None, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::UnsupportedMediaType { .. }), "{err}");
    // A layout whose index.json is not JSON.
    let broken = dir.path().join("broken");
    fixtures::write_oci_layout(&broken, "x").unwrap();
    fs::write(broken.join("index.json"), b"{").unwrap();
    let err = store.load(&broken, None, &NoProgress).unwrap_err();
    assert!(
        matches!(err, Error::Json { .. }) && err.to_string().contains("index.json"),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn lookups_by_name_id_and_id_prefix() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let image = store.load(&layout, None, &NoProgress).unwrap().remove(0);
    let hex = &image.id[7..];
    for query in [
        "fixture:1",
        "localhost/fixture:1",
        &image.id,
        hex,
        &hex[..12],
        &hex[..4],
        &format!("sha256:{}", &hex[..8]),
        image.short_id(),
    ] {
        assert_eq!(store.get(query).unwrap().id, image.id, "{query}");
    }
    for missing in [
        "fixture",
        "fixture:2",
        "other",
        &hex[..3],
        "sha256:0000",
        "127.0.0.1:5000/fixture:1",
    ] {
        let err = store.get(missing).unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { name } if name == missing),
            "{missing}: {err}"
        );
        assert!(err.to_string().contains(missing));
    }
}

#[test]
fn removal_keeps_blobs_that_another_image_uses() {
    let (dir, store) = store();
    let layers = fixtures::busybox_layer_tars().unwrap();
    let a = dir.path().join("a");
    fixtures::write_oci_layout(&a, "a:1").unwrap();
    let b = dir.path().join("b");
    let b_config = ImageConfig {
        cmd: vec!["true".into()],
        ..fixtures::config()
    };
    fixtures::write_oci_layout_with(&b, Some("b:1"), &layers, &b_config).unwrap();
    let image_a = store.load(&a, None, &NoProgress).unwrap().remove(0);
    let image_b = store.load(&b, None, &NoProgress).unwrap().remove(0);
    assert_eq!(image_a.layers, image_b.layers, "shared layers");
    assert_eq!(files(&store, "blobs/sha256").len(), 6);

    let removed = store.remove("a:1").unwrap();
    assert_eq!(
        removed,
        Removed {
            untagged: vec!["localhost/a:1".into()],
            deleted: Some(image_a.id.clone())
        }
    );
    let blobs = files(&store, "blobs/sha256");
    assert_eq!(blobs.len(), 4, "{blobs:?}");
    for layer in &image_b.layers {
        assert!(blobs.contains(&layer.digest[7..].to_string()));
    }
    assert!(!blobs.contains(&image_a.id[7..].to_string()));
    assert!(matches!(store.get("a:1"), Err(Error::NotFound { .. })));
    assert!(matches!(store.remove("a:1"), Err(Error::NotFound { .. })));

    let removed = store.remove(&image_b.id[7..19]).unwrap();
    assert_eq!(removed.deleted.as_deref(), Some(image_b.id.as_str()));
    assert!(store.list().unwrap().is_empty());
    assert!(files(&store, "blobs/sha256").is_empty());
}

#[test]
fn names_are_removed_one_at_a_time_and_by_id_all_at_once() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    store.load(&layout, None, &NoProgress).unwrap();
    let image = store
        .load(&layout, Some("second"), &NoProgress)
        .unwrap()
        .remove(0);
    assert_eq!(
        image.names,
        ["localhost/fixture:1", "localhost/second:latest"]
    );
    let removed = store.remove("second").unwrap();
    assert_eq!(removed.untagged, ["localhost/second:latest"]);
    assert_eq!(removed.deleted, None);
    assert_eq!(
        store.get("fixture:1").unwrap().names,
        ["localhost/fixture:1"]
    );
    store.load(&layout, Some("third"), &NoProgress).unwrap();
    let removed = store.remove(&image.id).unwrap();
    assert_eq!(
        removed.untagged,
        ["localhost/fixture:1", "localhost/third:latest"]
    );
    assert_eq!(removed.deleted.as_deref(), Some(image.id.as_str()));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn reimporting_a_name_moves_it_to_the_new_image() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "app:1").unwrap();
    let old = store.load(&layout, None, &NoProgress).unwrap().remove(0);
    let newer = dir.path().join("newer");
    let config = ImageConfig {
        cmd: vec!["echo".into(), "v2".into()],
        ..fixtures::config()
    };
    let layers = fixtures::busybox_layer_tars().unwrap();
    fixtures::write_oci_layout_with(&newer, Some("app:1"), &layers, &config).unwrap();
    let new = store.load(&newer, None, &NoProgress).unwrap().remove(0);
    assert_ne!(new.id, old.id);
    assert_eq!(store.get("app:1").unwrap().id, new.id);
    // The old image lost its only name, so it is gone (with its own blobs).
    assert_eq!(store.list().unwrap(), [new]);
    assert!(!files(&store, "blobs/sha256").contains(&old.id[7..].to_string()));
}

#[test]
fn a_docker_archive_with_gzipped_layers_in_podman_style_loads() {
    // podman save: <hex>.tar layers (here gzipped) and <hex>.json config at the top.
    let (dir, store) = store();
    let tars = fixtures::busybox_layer_tars().unwrap();
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    let config = fixtures::config_json(&fixtures::config(), &diff_ids);
    let config_name = format!("{}.json", &sha256(&config)[7..]);
    let mut members = vec![(config_name.clone(), config)];
    let mut layer_names = Vec::new();
    for tar in tars.iter() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap();
        let gz = gz.finish().unwrap();
        let name = format!("{}.tar", &sha256(&gz)[7..]);
        layer_names.push(name.clone());
        members.push((name, gz));
    }
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["localhost/podman:1"], "Layers": layer_names}]);
    members.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    let archive = dir.path().join("podman.tar");
    let mut tar = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (name, data) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    tar.finish().unwrap();
    drop(tar);

    let image = store.load(&archive, None, &NoProgress).unwrap().remove(0);
    assert_eq!(image.names, ["localhost/podman:1"]);
    for (layer, diff_id) in image.layers.iter().zip(&diff_ids) {
        assert_eq!(
            layer.media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(&layer.diff_id, diff_id);
        assert_ne!(&layer.digest, diff_id);
    }
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The digest of the last layer listed in an OCI layout's first manifest.
fn layers_digest_of_last(layout: &std::path::Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}
