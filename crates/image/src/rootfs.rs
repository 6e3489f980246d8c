//! `Store::rootfs`: an image's layers unpacked (in a staging directory inside the
//! store) and turned into a read-only ext4 file with `mkfs.ext4 -d`, built once and
//! cached by image ID at `rootfs/<hex>.ext4`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::read::GzDecoder;

use crate::digest::{self, HashReader};
use crate::error::{io_err, Error};
use crate::image::{Image, Rootfs};
use crate::import::{read_head, short};
use crate::progress::Progress;
use crate::spec::Compression;
use crate::store::{sync_dir, Store};
use crate::unpack::Unpacker;

const MIB: u64 = 1 << 20;
/// Bytes per inode in the ext4 inode table (mkfs's default inode size).
const INODE_SIZE: u64 = 256;
/// Fixed headroom for ext4 metadata (superblocks, group descriptors, bitmaps).
const HEADROOM: u64 = 16 * MIB;
const LABEL: &str = "forkvm-rootfs";

impl Store {
    /// The image's root filesystem as a read-only ext4 file, built on first use and
    /// cached by image ID; `cached` says whether this call found it already built.
    /// Building needs root (owners, device nodes) and `mkfs.ext4`.
    pub fn rootfs(&self, image: &Image, progress: &dyn Progress) -> Result<Rootfs, Error> {
        let result = self.rootfs_inner(image, progress);
        progress.done();
        result
    }

    fn rootfs_inner(&self, image: &Image, progress: &dyn Progress) -> Result<Rootfs, Error> {
        let path = self.rootfs_path(&image.id)?;
        if let Some(done) = cached(&path)? {
            return Ok(done);
        }
        let uid = rustix::process::geteuid().as_raw();
        if uid != 0 {
            return Err(Error::NotRoot { uid });
        }
        let _lock = self.lock()?;
        // Another process may have built it while we waited for the lock.
        if let Some(done) = cached(&path)? {
            return Ok(done);
        }
        // Use the store's record: the image (and its blobs) must still be there.
        let image = self
            .read_state()?
            .images
            .into_iter()
            .find(|i| i.id == image.id)
            .ok_or_else(|| Error::NotFound {
                name: image.id.clone(),
            })?;
        let tmp = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(&tmp)
            .map_err(io_err("creating staging directory in", &tmp))?;
        let dir = staging.path().join("root");
        fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &dir))?;

        let mut unpacker = Unpacker::new(&dir);
        let n = image.layers.len();
        for (i, layer) in image.layers.iter().enumerate() {
            progress.step(&format!(
                "Unpacking layer {}/{n} {}",
                i + 1,
                short(&layer.digest)
            ));
            let what = || {
                format!(
                    "layer {}/{n} ({}) of image {}",
                    i + 1,
                    layer.digest,
                    image.id
                )
            };
            let mut hashed = HashReader::new(self.open_layer(&layer.digest, &what())?);
            unpacker.apply(&mut hashed, &layer.digest)?;
            let (actual, _) = hashed.finish().map_err(|source| Error::Unpack {
                layer: layer.digest.clone(),
                path: String::new(),
                source,
            })?;
            digest::check(
                || format!("{}: uncompressed content", what()),
                &layer.diff_id,
                &actual,
            )?;
        }
        unpacker.finish()?;

        progress.step("Building ext4 root filesystem");
        let img = staging.path().join("rootfs.ext4");
        make_ext4(&format!("image {}", image.id), &dir, &img)?;
        let file = File::open(&img).map_err(io_err("opening", &img))?;
        file.sync_all().map_err(io_err("syncing", &img))?;
        let size = file.metadata().map_err(io_err("reading", &img))?.len();
        fs::set_permissions(&img, fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &img))?;
        fs::rename(&img, &path).map_err(io_err("moving root filesystem into place", &path))?;
        sync_dir(path.parent().unwrap_or(self.root()))?;
        Ok(Rootfs {
            path,
            cached: false,
            size,
        })
    }

    /// The uncompressed tar stream of a stored layer.
    fn open_layer(&self, digest: &str, what: &str) -> Result<Box<dyn Read>, Error> {
        let blob = self.blob_path(digest)?;
        let mut file = File::open(&blob).map_err(io_err("opening", &blob))?;
        let mut head = [0u8; 8];
        let n = read_head(&mut file, &mut head).map_err(io_err("reading", &blob))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("reading", &blob))?;
        let file = BufReader::new(file);
        Ok(match Compression::sniff(&head[..n], what)? {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(GzDecoder::new(file)),
        })
    }
}

fn cached(path: &Path) -> Result<Option<Rootfs>, Error> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(Rootfs {
            path: path.to_path_buf(),
            cached: true,
            size: meta.len(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("checking", path)(e)),
    }
}

/// What an unpacked tree occupies (`du`, counting hard links once) and holds.
struct DiskUsage {
    bytes: u64,
    inodes: u64,
}

impl DiskUsage {
    fn measure(dir: &Path) -> Result<Self, Error> {
        let mut usage = DiskUsage {
            bytes: 0,
            inodes: 0,
        };
        let mut seen = HashSet::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            let meta = fs::symlink_metadata(&path).map_err(io_err("measuring", &path))?;
            if seen.insert((meta.dev(), meta.ino())) {
                usage.bytes += meta.blocks() * 512;
                usage.inodes += 1;
            }
            if meta.is_dir() {
                for entry in fs::read_dir(&path).map_err(io_err("listing", &path))? {
                    stack.push(entry.map_err(io_err("listing", &path))?.path());
                }
            }
        }
        Ok(usage)
    }

    /// The file system size: 1.2 × usage, plus the inode table and fixed headroom,
    /// rounded up to MiB.
    fn fs_size_mib(&self) -> u64 {
        let bytes = self.bytes + self.bytes / 5 + self.inode_count() * INODE_SIZE + HEADROOM;
        bytes.div_ceil(MIB)
    }

    /// Inodes to ask for: what the tree holds plus a quarter and some spare.
    fn inode_count(&self) -> u64 {
        self.inodes + self.inodes / 4 + 256
    }
}

/// Makes the ext4 file `img` from the directory tree `dir` with `mkfs.ext4 -d`, sized
/// from what the tree occupies plus headroom (the way image root filesystems are built).
/// `what` names the tree in errors. Owners and device nodes are kept only as root.
pub fn make_ext4(what: &str, dir: &Path, img: &Path) -> Result<(), Error> {
    let usage = DiskUsage::measure(dir)?;
    mkfs(what, dir, img, &usage)
}

/// Runs `mkfs.ext4 -d` to make `img` from `dir`.
fn mkfs(id: &str, dir: &Path, img: &Path, usage: &DiskUsage) -> Result<(), Error> {
    let fail = |status: String, stderr: String| Error::Mkfs {
        image: id.to_string(),
        status,
        stderr,
    };
    let output = Command::new(mkfs_binary())
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .args([
            "-O",
            "^has_journal",
            "-b",
            "4096",
            "-m",
            "0",
            "-L",
            LABEL,
            "-N",
        ])
        .arg(usage.inode_count().to_string())
        .arg(img)
        .arg(format!("{}M", usage.fs_size_mib()))
        .output()
        .map_err(|e| {
            fail(
                format!("could not run {}", mkfs_binary().display()),
                e.to_string(),
            )
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(fail(
            output.status.to_string(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

/// `mkfs.ext4`, see [`system_tool`].
fn mkfs_binary() -> PathBuf {
    system_tool("mkfs.ext4")
}

/// A system tool (`mkfs.ext4`, `debugfs`) from `PATH`, else from the sbin directories,
/// which are not in a user's `PATH`; the bare name when it is in neither.
pub fn system_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_system_is_sized_from_usage_with_headroom() {
        let usage = DiskUsage {
            bytes: 100 * MIB,
            inodes: 1000,
        };
        // 120 MiB + (1250 + 256) * 256 B + 16 MiB → 137 MiB (rounded up).
        assert_eq!(usage.fs_size_mib(), 137);
        let empty = DiskUsage {
            bytes: 0,
            inodes: 1,
        };
        assert_eq!(empty.fs_size_mib(), 17);
    }
}
