//! Root filesystem builds: the fixture's layers applied (whiteouts, opaque
//! directories, modes, links), the cache, confinement to the root, and corrupt
//! stored layers. Inspected with `debugfs` (e2fsprogs).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use forkvm_image::fixtures::{self, LayerBuilder};
use forkvm_image::{Error, NoProgress};

use common::{cat, debugfs, files, ls, stat, store};

#[test]
fn the_fixture_rootfs_has_its_layers_applied() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    let image = store.load(&layout, None, &NoProgress).unwrap().remove(0);
    let rootfs = store.rootfs(&image, &NoProgress).unwrap();
    assert!(!rootfs.cached);
    assert_eq!(
        rootfs.path,
        store.root().join(format!("rootfs/{}.ext4", &image.id[7..]))
    );
    let meta = fs::metadata(&rootfs.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(meta.len(), rootfs.size);
    assert_eq!(rootfs.size % (1 << 20), 0);
    let img = &rootfs.path;

    assert_eq!(cat(img, "/hello.txt"), fixtures::HELLO);
    let etc = ls(img, "/etc");
    assert!(
        etc.contains(&"passwd".to_string()) && etc.contains(&"group".to_string()),
        "{etc:?}"
    );
    assert!(
        !etc.iter().any(|n| n.contains("removed-by-whiteout")),
        "whiteout ignored: {etc:?}"
    );
    assert_eq!(ls(img, "/opaque"), ["new.txt"], "opaque dir");
    assert_eq!(cat(img, "/opaque/new.txt"), fixtures::OPAQUE_NEW);
    let root = ls(img, "/");
    assert!(!root.iter().any(|n| n.starts_with(".wh.")), "{root:?}");
    for dir in [
        "bin", "etc", "tmp", "root", "home", "work", "dev", "proc", "sys",
    ] {
        assert!(root.contains(&dir.to_string()), "/{dir} missing: {root:?}");
    }
    assert_eq!(stat(img, "/tmp"), (0o41777, 0, 0));
    assert_eq!(stat(img, "/root"), (0o40700, 0, 0));
    assert_eq!(stat(img, "/bin/busybox"), (0o100755, 0, 0));
    assert_eq!(stat(img, "/bin/sh").0 & 0o170000, 0o120000, "symlink");
    let (out, _) = debugfs(img, "stat /bin/sh");
    assert!(out.contains("Fast link dest: \"busybox\""), "{out}");
    let bin = ls(img, "/bin");
    for applet in [
        "sh",
        "echo",
        "cat",
        "ls",
        "env",
        "sleep",
        "sha256sum",
        "id",
        "stat",
    ] {
        assert!(bin.contains(&applet.to_string()), "/bin/{applet} missing");
    }
    assert!(cat(img, "/etc/passwd").contains("nobody:x:65534:65534"));
    let (label, _) = debugfs(img, "stats");
    assert!(label.contains("forkvm-rootfs"), "volume label");

    // The unpacked tree and staging files are gone; the second call is a cache hit.
    assert!(files(&store, "tmp").is_empty());
    let again = store.rootfs(&image, &NoProgress).unwrap();
    assert!(again.cached);
    assert_eq!((again.path, again.size), (rootfs.path.clone(), rootfs.size));

    // rmi deletes the rootfs with the image.
    store.remove("fixture:1").unwrap();
    assert!(!rootfs.path.exists());
    let err = store.rootfs(&image, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[test]
fn layers_cannot_write_through_symlinks_to_outside_the_root() {
    let (dir, store) = store();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let marker = format!("forkvm-escape-test-{}", std::process::id());
    let layer1 = LayerBuilder::new()
        .symlink("etc", "/")
        .symlink("out", outside.to_str().unwrap())
        .symlink("up", "../../../../..")
        .finish();
    let layer2 = LayerBuilder::new()
        .file(&format!("etc/{marker}"), 0o644, b"inside via etc\n")
        .file("out/x", 0o644, b"inside via an absolute link\n")
        .file(&format!("up/{marker}-up"), 0o644, b"inside via ..\n")
        .hardlink("hard", &format!("etc/{marker}"))
        .finish();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout_with(
        &layout,
        Some("escape:1"),
        &[layer1, layer2],
        &fixtures::config(),
    )
    .unwrap();
    let image = store.load(&layout, None, &NoProgress).unwrap().remove(0);
    let rootfs = store.rootfs(&image, &NoProgress).unwrap();

    // Everything landed inside the root, as if the root were `/`.
    assert_eq!(cat(&rootfs.path, &format!("/{marker}")), "inside via etc\n");
    assert_eq!(
        cat(&rootfs.path, &format!("/{marker}-up")),
        "inside via ..\n"
    );
    assert_eq!(
        cat(&rootfs.path, &format!("{}/x", outside.display())),
        "inside via an absolute link\n"
    );
    assert_eq!(cat(&rootfs.path, "/hard"), "inside via etc\n");
    // ... and nothing outside it.
    assert!(!std::path::Path::new("/").join(&marker).exists());
    assert!(!std::path::Path::new("/")
        .join(format!("{marker}-up"))
        .exists());
    assert!(!outside.join("x").exists());
}

#[test]
fn a_layer_corrupted_in_the_store_fails_the_build_naming_it() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    let layer = LayerBuilder::new()
        .file("a.txt", 0o644, &[b'a'; 10_000])
        .finish();
    fixtures::write_oci_layout_with(&layout, Some("c:1"), &[layer], &fixtures::config()).unwrap();
    let image = store.load(&layout, None, &NoProgress).unwrap().remove(0);
    // Replace the stored (gzip) blob with a valid gzip of different content.
    let blob = store
        .root()
        .join("blobs/sha256")
        .join(&image.layers[0].digest[7..]);
    let other = LayerBuilder::new()
        .file("a.txt", 0o644, &[b'b'; 10_000])
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &other).unwrap();
    fs::write(&blob, gz.finish().unwrap()).unwrap();
    let err = store.rootfs(&image, &NoProgress).unwrap_err();
    match &err {
        Error::DigestMismatch { what, expected, .. } => {
            assert!(what.contains(&image.layers[0].digest), "{what}");
            assert_eq!(expected, &image.layers[0].diff_id);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(files(&store, "rootfs").is_empty());
    assert!(files(&store, "tmp").is_empty());
}
