//! Shared helpers of the image store's integration tests: a store in a temp dir and
//! `debugfs` to look inside built ext4 images.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use forkvm_image::Store;
use tempfile::TempDir;

/// A store in a fresh temp dir, and the dir (sources go in it too).
pub fn store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

/// Files under `<store>/<sub>`, sorted.
pub fn files(store: &Store, sub: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(store.root().join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn debugfs_binary() -> PathBuf {
    ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| "debugfs".into())
}

/// Runs `debugfs -R REQUEST IMG` and returns its stdout (it reports errors on stderr
/// with status 0, so stderr comes back too).
pub fn debugfs(img: &Path, request: &str) -> (String, String) {
    let out = Command::new(debugfs_binary())
        .args(["-R", request])
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The content of `path` inside the ext4 image.
pub fn cat(img: &Path, path: &str) -> String {
    debugfs(img, &format!("cat {path}")).0
}

/// The names in directory `path` inside the ext4 image.
pub fn ls(img: &Path, path: &str) -> Vec<String> {
    let (out, err) = debugfs(img, &format!("ls -p {path}"));
    assert!(!err.contains("File not found"), "ls {path}: {err}");
    // `ls -p` lines: /inode/mode/uid/gid/name/size/
    out.lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// `(mode, uid, gid)` of `path` inside the ext4 image, from `ls -p` of its directory.
pub fn stat(img: &Path, path: &str) -> (u32, u32, u32) {
    let (dir, name) = path.rsplit_once('/').unwrap();
    let dir = if dir.is_empty() { "/" } else { dir };
    let (out, _) = debugfs(img, &format!("ls -p {dir}"));
    for line in out.lines() {
        let f: Vec<&str> = line.split('/').collect();
        if f.len() > 5 && f[5] == name {
            let mode = u32::from_str_radix(f[2], 8).unwrap();
            return (mode, f[3].parse().unwrap(), f[4].parse().unwrap());
        }
    }
    panic!("{path} not found in {img:?}: {out}");
}
