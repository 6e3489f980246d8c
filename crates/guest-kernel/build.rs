//! Hashes this crate's sources into `FORKVM_GUEST_IMAGE_CODE`: the images it builds are
//! a function of its inputs and of this code, so a cached image found by its inputs
//! alone (`guest_image`'s memo) is trusted only from the code that built it.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn main() {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    files.sort();
    let mut h = DefaultHasher::new();
    for f in &files {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!(
        "cargo:rustc-env=FORKVM_GUEST_IMAGE_CODE={:016x}",
        h.finish()
    );
    println!("cargo:rerun-if-changed=src");
}
