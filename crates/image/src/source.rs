//! Read access to a load source, a directory or a tar archive (gzip-compressed or
//! not), by the relative names that `index.json` and `manifest.json` use. Archive
//! members are read in place (by offset) rather than extracted.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{io_err, Error};
use crate::import::read_head;
use crate::spec::Compression;

/// A directory or archive holding an OCI layout or a docker archive.
pub(crate) enum Source {
    Dir(PathBuf),
    Tar {
        /// The (uncompressed) tar file.
        file: PathBuf,
        /// The source as given, for messages.
        origin: PathBuf,
        entries: HashMap<String, Member>,
    },
}

/// A tar member, by cleaned name.
pub(crate) enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link, with its target resolved to a cleaned member name.
    Link(String),
}

/// Symlink hops allowed when resolving a member.
const MAX_HOPS: usize = 16;

impl Source {
    /// Opens `path`: a directory, or a tar archive that is decompressed into `scratch`
    /// first when gzip-compressed.
    pub(crate) fn open(path: &Path, scratch: &Path) -> Result<Self, Error> {
        let meta = fs::metadata(path).map_err(io_err("opening", path))?;
        if meta.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let mut head = [0u8; 8];
        let n = read_head(&mut file, &mut head).map_err(io_err("reading", path))?;
        let tar_path = match Compression::sniff(&head[..n], &path.display().to_string())? {
            Compression::None => path.to_path_buf(),
            Compression::Gzip => {
                let out = scratch.join("source.tar");
                file.seek(SeekFrom::Start(0))
                    .map_err(io_err("reading", path))?;
                let mut dst = File::create(&out).map_err(io_err("creating", &out))?;
                io::copy(&mut GzDecoder::new(BufReader::new(file)), &mut dst)
                    .map_err(io_err("decompressing", path))?;
                out
            }
        };
        let entries = index_tar(&tar_path).map_err(io_err("reading tar archive", path))?;
        Ok(Self::Tar {
            file: tar_path,
            origin: path.to_path_buf(),
            entries,
        })
    }

    /// Whether `name` exists (as a file) in the source.
    pub(crate) fn exists(&self, name: &str) -> bool {
        match self {
            Self::Dir(dir) => clean(name).is_some_and(|n| dir.join(n).is_file()),
            Self::Tar { entries, .. } => resolve(entries, name).is_some(),
        }
    }

    /// Opens member `name` and returns it with its size.
    pub(crate) fn open_member(&self, name: &str) -> Result<(Box<dyn Read>, u64), Error> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(clean(name).ok_or_else(|| self.missing(name))?);
                let file = File::open(&path).map_err(io_err("opening", &path))?;
                let size = file.metadata().map_err(io_err("reading", &path))?.len();
                Ok((Box::new(BufReader::new(file)), size))
            }
            Self::Tar { file, entries, .. } => {
                let (offset, size) = resolve(entries, name).ok_or_else(|| self.missing(name))?;
                let mut f = File::open(file).map_err(io_err("opening", file))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(io_err("reading", file))?;
                Ok((Box::new(BufReader::new(f).take(size)), size))
            }
        }
    }

    /// Reads a JSON member whole (refusing more than `limit` bytes).
    pub(crate) fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, Error> {
        let (mut reader, size) = self.open_member(name)?;
        if size > limit {
            return Err(Error::InvalidImage {
                what: self.describe(name),
                reason: format!("{size} bytes, more than the {limit} allowed for a JSON document"),
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        reader
            .read_to_end(&mut out)
            .map_err(io_err(format!("reading {name} in"), self.origin()))?;
        Ok(out)
    }

    /// The source as given.
    pub(crate) fn origin(&self) -> &Path {
        match self {
            Self::Dir(dir) => dir,
            Self::Tar { origin, .. } => origin,
        }
    }

    /// `name` in the source, for messages.
    pub(crate) fn describe(&self, name: &str) -> String {
        format!("{} in {}", name, self.origin().display())
    }

    fn missing(&self, name: &str) -> Error {
        Error::InvalidImage {
            what: self.origin().display().to_string(),
            reason: format!("{name:?} is missing"),
        }
    }
}

/// Lists the members of a tar file with where their data lies.
fn index_tar(path: &Path) -> io::Result<HashMap<String, Member>> {
    let mut archive = tar::Archive::new(File::open(path)?);
    let mut entries = HashMap::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = clean(&name) else { continue };
        let kind = entry.header().entry_type();
        let member = if kind.is_file() {
            Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name()? else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            // Symlinks are relative to the member's directory; hard links name a member.
            let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                (true, Some((dir, _))) if !target.starts_with('/') => format!("{dir}/{target}"),
                _ => target,
            };
            match clean(&joined) {
                Some(target) => Member::Link(target),
                None => continue,
            }
        } else {
            continue;
        };
        entries.insert(name, member);
    }
    Ok(entries)
}

/// The data of member `name`, following links.
fn resolve(entries: &HashMap<String, Member>, name: &str) -> Option<(u64, u64)> {
    let mut name = clean(name)?;
    for _ in 0..MAX_HOPS {
        match entries.get(&name)? {
            Member::File { offset, size } => return Some((*offset, *size)),
            Member::Link(target) => name = target.clone(),
        }
    }
    None
}

/// Normalizes a relative member name (`./a//b/../c` → `a/c`); `None` when it is empty
/// or climbs out of the source.
pub(crate) fn clean(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_cleaned_and_confined() {
        assert_eq!(
            clean("./blobs//sha256/ab").as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(clean("a/../b").as_deref(), Some("b"));
        assert_eq!(clean("../etc/passwd"), None);
        assert_eq!(clean("./"), None);
    }

    #[test]
    fn archive_members_are_read_in_place_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "./x/layer.tar", &b"hello"[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "y/layer.tar", "../x/layer.tar")
            .unwrap();
        b.finish().unwrap();
        drop(b);
        let src = Source::open(&tar_path, dir.path()).unwrap();
        assert!(src.exists("y/layer.tar") && !src.exists("z"));
        let mut s = String::new();
        src.open_member("y/layer.tar")
            .unwrap()
            .0
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        assert!(matches!(
            src.read("nope.json", 10),
            Err(Error::InvalidImage { .. })
        ));
    }
}
