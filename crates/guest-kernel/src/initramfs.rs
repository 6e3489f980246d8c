//! Owns [`InitramfsBuilder`]: assembles a busybox initramfs (static busybox,
//! kernel modules under `/lib/modules/`, an `/init` script, extra files) into an
//! uncompressed newc cpio archive.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::Error;

#[derive(Debug, Clone)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
    CharDev(u32, u32, u32),
}

/// Builds an initramfs image.
///
/// Paths are absolute inside the image (a leading `/` is optional); parent
/// directories are created automatically; a later entry for the same path
/// replaces an earlier one. The output is deterministic: the same inputs give
/// the same bytes, so the image can be cached by a hash of its contents.
///
/// A fresh builder already contains the usual empty directories (`/bin`,
/// `/sbin`, `/usr/bin`, `/usr/sbin` (for `busybox --install -s`), `/dev`, `/proc`, `/sys`, `/tmp`, `/run`, `/mnt`, `/etc`, `/root`,
/// `/lib/modules`) and the `/dev/console` and `/dev/null` device nodes, so that
/// the kernel can give `/init` a console before devtmpfs is mounted.
#[derive(Debug, Clone)]
pub struct InitramfsBuilder {
    nodes: BTreeMap<String, Node>,
    modules: Vec<String>,
}

impl Default for InitramfsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn clean(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Whether an ELF executable has no `PT_INTERP` program header (is static).
fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| u32_at(phoff + i * usize::from(phentsize)) != Some(3))
}

impl InitramfsBuilder {
    /// A builder holding the standard skeleton (see the type docs).
    pub fn new() -> Self {
        let mut b = Self {
            nodes: BTreeMap::new(),
            modules: Vec::new(),
        };
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "mnt",
            "etc",
            "root",
            "lib/modules",
        ] {
            b.dir(d, 0o755);
        }
        b.nodes.insert("tmp".into(), Node::Dir(0o1777));
        b.char_device("dev/console", 0o600, 5, 1);
        b.char_device("dev/null", 0o666, 1, 3);
        b
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.nodes.insert(path, Node::Dir(mode));
        self
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.nodes.insert(path, Node::File(mode, contents.into()));
        self
    }

    /// Adds a regular file copied from the host.
    pub fn file_from_host(
        &mut self,
        path: &str,
        src: &Path,
        mode: u32,
    ) -> Result<&mut Self, Error> {
        let data = read(src)?;
        Ok(self.file(path, data, mode))
    }

    /// Adds a symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.nodes.insert(path, Node::Symlink(target.to_owned()));
        self
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.nodes.insert(path, Node::CharDev(mode, major, minor));
        self
    }

    /// Adds a static busybox at `/bin/busybox` with `/bin/sh` linking to it.
    ///
    /// Other applets are not linked here: run `/bin/busybox --install -s` early
    /// in `/init`. Fails if `src` is dynamically linked.
    pub fn busybox(&mut self, src: &Path) -> Result<&mut Self, Error> {
        let data = read(src)?;
        if !is_static_elf(&data) {
            return Err(Error::Io {
                path: src.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "busybox is not a static ELF executable (install busybox-static)",
                ),
            });
        }
        self.file("bin/busybox", data, 0o755);
        self.symlink("bin/sh", "busybox");
        Ok(self)
    }

    /// [`busybox`](Self::busybox) from [`host_busybox`](Self::host_busybox).
    pub fn busybox_from_host(&mut self) -> Result<&mut Self, Error> {
        self.busybox(Self::host_busybox())
    }

    /// The host's busybox (Debian's `busybox-static`): `/bin/busybox`, else
    /// `/usr/bin/busybox`.
    pub fn host_busybox() -> &'static Path {
        let candidates = [Path::new("/bin/busybox"), Path::new("/usr/bin/busybox")];
        candidates
            .iter()
            .find(|p| p.is_file())
            .copied()
            .unwrap_or(candidates[0])
    }

    /// Where [`module`](Self::module) puts `ko` in the image: `/lib/modules/<file name>`.
    pub fn image_path(ko: &Path) -> PathBuf {
        Path::new("/lib/modules").join(ko.file_name().unwrap_or_default())
    }

    /// Adds one module as `/lib/modules/<file name>`, remembering the load order.
    pub fn module(&mut self, ko: &Path) -> Result<&mut Self, Error> {
        let name = ko
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::Io {
                path: ko.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            })?;
        let data = read(ko)?;
        let dest = clean(&Self::image_path(Path::new(&name)).to_string_lossy());
        if !self.modules.contains(&dest) {
            self.modules.push(dest.clone());
        }
        self.file(&dest, data, 0o644);
        Ok(self)
    }

    /// Adds modules in order (e.g. the output of [`crate::resolve_modules`]).
    pub fn modules<P: AsRef<Path>>(&mut self, kos: &[P]) -> Result<&mut Self, Error> {
        for ko in kos {
            self.module(ko.as_ref())?;
        }
        Ok(self)
    }

    /// Image paths of the added modules, in load order.
    pub fn module_paths(&self) -> Vec<PathBuf> {
        self.modules
            .iter()
            .map(|m| Path::new("/").join(m))
            .collect()
    }

    /// Shell lines that `insmod` every added module in order, reporting failures
    /// on the console without stopping (a module may already be built in).
    pub fn insmod_script(&self) -> String {
        self.modules
            .iter()
            .map(|m| format!("insmod /{m} || echo \"forkvm-init: insmod /{m} failed\"\n"))
            .collect()
    }

    /// Sets `/init` (mode 0755).
    pub fn init_script(&mut self, script: &str) -> &mut Self {
        self.file("init", script.as_bytes().to_vec(), 0o755)
    }

    /// Serializes the image as an uncompressed newc cpio archive.
    pub fn build(&self) -> Result<Vec<u8>, Error> {
        let mut w = CpioWriter::new(Vec::new());
        for (path, node) in &self.nodes {
            let res = match node {
                Node::Dir(mode) => w.dir(path, *mode),
                Node::File(mode, data) => w.file(path, *mode, data),
                Node::Symlink(target) => w.symlink(path, target),
                Node::CharDev(mode, maj, min) => w.char_device(path, *mode, *maj, *min),
            };
            res.map_err(|source| Error::Cpio {
                entry: path.clone(),
                source,
            })?;
        }
        w.finish().map_err(|source| Error::Cpio {
            entry: "TRAILER!!!".into(),
            source,
        })
    }

    /// Builds the image and keeps it in `dir` as `<stem>-<hash of its bytes>.cpio`,
    /// unless a file of that name is there already (an unchanged image is never
    /// written again); returns its path. The file appears whole or not at all: callers
    /// in several processes and threads may store the same image at once.
    ///
    /// The hash is BLAKE3 (built optimised in debug builds too): every VM start asks
    /// for its guest's image, and std's SipHash over its 4-5 MiB was 15 of the 25 ms a
    /// debug build took to find it (natively; the whole lookup was half a second in the
    /// virtual test host, where the end-to-end tests run debug builds).
    pub fn store_in(&self, dir: &Path, stem: &str) -> Result<PathBuf, Error> {
        let bytes = self.build()?;
        let hash = blake3::hash(&bytes);
        let short: String = hash.as_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = dir.join(format!("{stem}-{short}.cpio"));
        if path.is_file() {
            return Ok(path);
        }
        fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        crate::kernel::write_cache_file(&path, &bytes)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir(0o755));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse_newc, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};

    fn find<'a>(e: &'a [crate::cpio::CpioEntry], name: &str) -> &'a crate::cpio::CpioEntry {
        e.iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("{name} not in archive"))
    }

    #[test]
    fn assembles_busybox_modules_init_and_extras() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("virtio-foo.ko");
        let b = dir.path().join("bar.ko");
        fs::write(&a, b"AAAA").unwrap();
        fs::write(&b, b"BB").unwrap();
        let mut ib = InitramfsBuilder::new();
        ib.modules(&[&b, &a]).unwrap();
        ib.init_script("#!/bin/sh\necho hi\n");
        ib.file("/etc/deep/nested/conf", "x=1", 0o600);
        ib.symlink("/sbin/init", "/init");
        let have_busybox = ib.busybox_from_host().is_ok();
        let bytes = ib.build().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse_newc(&bytes).unwrap();

        let init = find(&e, "init");
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        assert_eq!(find(&e, "lib/modules/virtio-foo.ko").data, b"AAAA");
        assert_eq!(find(&e, "lib/modules/bar.ko").mode, S_IFREG | 0o644);
        assert_eq!(find(&e, "etc/deep/nested").mode, S_IFDIR | 0o755);
        assert_eq!(find(&e, "etc/deep/nested/conf").mode, S_IFREG | 0o600);
        assert_eq!(find(&e, "sbin/init").mode & S_IFMT, S_IFLNK);
        assert_eq!(find(&e, "tmp").mode, S_IFDIR | 0o1777);
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "proc",
            "sys",
            "dev",
            "lib/modules",
        ] {
            assert_eq!(find(&e, d).mode, S_IFDIR | 0o755, "{d}");
        }
        let console = find(&e, "dev/console");
        assert_eq!((console.mode & S_IFMT, console.rdev), (S_IFCHR, (5, 1)));
        if have_busybox {
            assert_eq!(find(&e, "bin/busybox").mode, S_IFREG | 0o755);
            assert_eq!(find(&e, "bin/sh").data, b"busybox");
        }

        // Parents precede children.
        let pos = |n: &str| e.iter().position(|x| x.name == n).unwrap();
        assert!(pos("etc/deep") < pos("etc/deep/nested/conf"));
        assert!(pos("lib/modules") < pos("lib/modules/bar.ko"));

        // Load order is insertion order, not path order.
        let script = ib.insmod_script();
        let (i_bar, i_foo) = (
            script.find("/lib/modules/bar.ko").unwrap(),
            script.find("/lib/modules/virtio-foo.ko").unwrap(),
        );
        assert!(i_bar < i_foo);
        assert_eq!(
            ib.module_paths(),
            vec![
                PathBuf::from("/lib/modules/bar.ko"),
                PathBuf::from("/lib/modules/virtio-foo.ko")
            ]
        );
        // Deterministic output.
        assert_eq!(ib.build().unwrap(), bytes);
    }

    #[test]
    fn an_image_is_stored_once_under_a_name_its_contents_give() {
        let dir = tempfile::tempdir().unwrap();
        let mut ib = InitramfsBuilder::new();
        ib.init_script("#!/bin/sh\necho one\n");
        let first = ib.store_in(dir.path(), "guest-6.1").unwrap();
        let name = first.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with("guest-6.1-") && name.ends_with(".cpio"),
            "{name}"
        );
        assert_eq!(fs::read(&first).unwrap(), ib.build().unwrap());
        // The same contents: the same file, not written again.
        let before = fs::metadata(&first).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(ib.store_in(dir.path(), "guest-6.1").unwrap(), first);
        assert_eq!(fs::metadata(&first).unwrap().modified().unwrap(), before);
        // Other contents: another file beside it.
        ib.init_script("#!/bin/sh\necho two\n");
        let second = ib.store_in(dir.path(), "guest-6.1").unwrap();
        assert_ne!(second, first);
        assert_eq!(fs::read(&second).unwrap(), ib.build().unwrap());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file left"
        );
    }

    #[test]
    fn dynamic_busybox_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("busybox");
        fs::write(&fake, b"#!/bin/sh\n").unwrap();
        assert!(InitramfsBuilder::new().busybox(&fake).is_err());
    }
}
