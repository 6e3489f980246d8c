//! The host key templates are authenticated with.
//!
//! A template's state and memory carry a keyed BLAKE3 hash (a MAC) made with a key
//! only this host's forkvm reads: 32 random bytes in a file of mode 0600 (forkvm.toml's
//! `template_key`, default `/var/lib/forkvm/template.key` for root and
//! `$XDG_DATA_HOME/forkvm/template.key` otherwise), made the first time a template is
//! saved. An unkeyed checksum only catches accidents: whoever can write a template can
//! recompute it, and a forged state could then point a restored disk at any host file.
//! With the MAC, a template edited by anyone without the key is refused; a template
//! from another host is refused too (copy the key along with it to use it there).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use forkvm_snapshot::OpenRegularError;

/// Length of the key, in bytes.
const KEY_LEN: usize = 32;

/// Why the template key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file is not there (loading a template never makes one).
    #[error(
        "no template key at {}: templates are only used on the host that saved them \
         (or one given a copy of its key)",
        .0.display()
    )]
    Missing(PathBuf),
    /// The key file is there but unusable.
    #[error("template key {}: {problem}", path.display())]
    Bad {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or making the key file failed.
    #[error("template key {}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A host's template key.
pub struct TemplateKey([u8; KEY_LEN]);

impl std::fmt::Debug for TemplateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemplateKey(..)")
    }
}

impl TemplateKey {
    /// The configured key file: forkvm.toml's `template_key` (`FORKVM_TEMPLATE_KEY`
    /// overrides it), else the built-in default for this user.
    pub fn configured_path() -> PathBuf {
        forkvm_config::Setting::TemplateKey
            .get()
            .unwrap_or_else(|| forkvm_config::data_path("template.key"))
    }

    /// The configured key, made if there is none (saving a template).
    pub fn host_or_new() -> Result<Self, KeyError> {
        Self::open_or_create(&Self::configured_path())
    }

    /// The configured key; none is an error (using a template).
    pub fn host() -> Result<Self, KeyError> {
        Self::open(&Self::configured_path())
    }

    /// Reads the key at `path`: a regular file (not a link) of this user, readable by
    /// nobody else, of exactly 32 bytes.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let bad = |problem: String| KeyError::Bad {
            path: path.to_owned(),
            problem,
        };
        let (file, meta) = forkvm_snapshot::open_regular(path).map_err(|e| match e {
            OpenRegularError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                KeyError::Missing(path.to_owned())
            }
            OpenRegularError::Io(e) => io(e),
            OpenRegularError::Link => bad("is a symbolic link, not the key file".into()),
            refused => bad(refused.to_string()),
        })?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid {
            return Err(bad(format!(
                "belongs to uid {}, not to this user (uid {uid})",
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "is readable or writable by others (mode {mode:03o}); make it 0600"
            )));
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(bad(format!("is {} bytes, a key is {KEY_LEN}", meta.len())));
        }
        let mut key = [0u8; KEY_LEN];
        (&file).read_exact(&mut key).map_err(io)?;
        Ok(Self(key))
    }

    /// Reads the key at `path`, first making one (32 random bytes, mode 0600, its
    /// directory made if needed) if there is none. Two processes making it at once end
    /// up with the same key: it is written aside and linked into place.
    pub fn open_or_create(path: &Path) -> Result<Self, KeyError> {
        match Self::open(path) {
            Err(KeyError::Missing(_)) => {}
            other => return other,
        }
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let tmp = path.with_file_name(format!(
            ".{}.{}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let written = (|| {
            let mut f: File = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            match std::fs::hard_link(&tmp, path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        written.map_err(io)?;
        // Whoever linked first made the key; read what is there.
        Self::open(path)
    }

    /// A keyed hasher for what `context` names (one context per kind of data, so a MAC
    /// of one can never pass for the other's).
    pub(crate) fn hasher(&self, context: &str) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(context.as_bytes());
        h.update(&[0]);
        h
    }

    /// The MAC of `bytes` under `context`.
    pub(crate) fn mac(&self, context: &str, bytes: &[u8]) -> [u8; 32] {
        let mut h = self.hasher(context);
        h.update(bytes);
        *h.finalize().as_bytes()
    }
}

/// Whether two MACs are equal, in time that does not depend on where they differ.
pub(crate) fn same_mac(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/template.key");
        assert!(matches!(
            TemplateKey::open(&path),
            Err(KeyError::Missing(_))
        ));
        let a = TemplateKey::open_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let b = TemplateKey::open_or_create(&path).unwrap();
        assert_eq!(a.0, b.0, "an existing key is kept");
        assert_eq!(
            a.mac("x", b"data"),
            TemplateKey::open(&path).unwrap().mac("x", b"data")
        );
        assert_ne!(a.mac("x", b"data"), a.mac("y", b"data"), "contexts differ");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn unsafe_key_files_are_refused_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.key");
        TemplateKey::open_or_create(&path).unwrap();
        let msg = |p: &Path| TemplateKey::open(p).unwrap_err().to_string();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(msg(&path).contains("mode 644"), "{}", msg(&path));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(msg(&link).contains("symbolic link"), "{}", msg(&link));
        let short = dir.path().join("short.key");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&short)
            .unwrap()
            .write_all(b"short")
            .unwrap();
        assert!(msg(&short).contains("is 5 bytes"), "{}", msg(&short));
        assert!(msg(dir.path()).contains("not a regular file"));
    }
}
