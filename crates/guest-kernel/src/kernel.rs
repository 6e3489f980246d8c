//! Owns the kernel cache: locating the cache directory, resolving Debian's
//! `linux-image-*` meta packages to versioned ones, and fetching and unpacking
//! them atomically with `apt-get download` + `dpkg-deb -x`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::modules::generate_modules_dep;
use crate::Error;

/// Which Debian kernel package to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// `linux-image-amd64`: the generic kernel (virtio-pci, 9p and KVM as modules).
    Amd64,
    /// `linux-image-cloud-amd64`: the slimmer cloud kernel (no 9p).
    CloudAmd64,
}

impl Flavour {
    /// The Debian meta package that depends on the current versioned kernel.
    pub fn meta_package(self) -> &'static str {
        match self {
            Flavour::Amd64 => "linux-image-amd64",
            Flavour::CloudAmd64 => "linux-image-cloud-amd64",
        }
    }
}

/// An unpacked kernel package in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTree {
    /// Versioned package name, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// Root of the unpacked package (contains `boot/` and `lib/modules/`).
    pub root: PathBuf,
}

impl KernelTree {
    /// Opens an already unpacked package tree, checking that the kernel image exists.
    pub fn open(root: impl Into<PathBuf>, package: &str) -> Result<Self, Error> {
        let root = root.into();
        let version = package
            .strip_prefix("linux-image-")
            .ok_or_else(|| Error::BadPackage {
                package: package.to_owned(),
                what: "not a linux-image-* package".into(),
            })?
            .to_owned();
        let tree = Self {
            package: package.to_owned(),
            version,
            root,
        };
        if !tree.vmlinuz().is_file() {
            return Err(Error::BadPackage {
                package: package.to_owned(),
                what: format!("no kernel image at {}", tree.vmlinuz().display()),
            });
        }
        Ok(tree)
    }

    /// The kernel release string (`uname -r`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Path to the compressed kernel image (`boot/vmlinuz-<version>`).
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }

    /// Path to the kernel build configuration (`boot/config-<version>`).
    pub fn config(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("config-{}", self.version))
    }

    /// Directory holding `kernel/**.ko` and `modules.dep`.
    pub fn modules_dir(&self) -> PathBuf {
        let lib = self.root.join("lib/modules").join(&self.version);
        if lib.is_dir() {
            return lib;
        }
        self.root.join("usr/lib/modules").join(&self.version)
    }

    fn complete(&self) -> bool {
        self.vmlinuz().is_file() && self.modules_dir().join("modules.dep").is_file()
    }
}

/// The forkvm cache directory: `$FORKVM_CACHE`, else `cache` in `forkvm.toml`, else
/// `$XDG_CACHE_HOME/forkvm`, else `~/.cache/forkvm`. Not created.
pub fn cache_dir() -> Result<PathBuf, Error> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = forkvm_config::Setting::Cache.get() {
        return Ok(dir);
    }
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("forkvm"));
    }
    if let Some(home) = nonempty("HOME") {
        return Ok(PathBuf::from(home).join(".cache/forkvm"));
    }
    Err(Error::NoCacheDir)
}

/// Writes `bytes` as the cache file `path` (in an existing directory), readable by all
/// as the packages' own files are (the virtual test host reads the cache): whole or
/// not at all, so processes and threads may write the same file at once.
pub(crate) fn write_cache_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|s| io_err(dir, s))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|s| io_err(tmp.path(), s))?;
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|s| io_err(tmp.path(), s))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

/// Ensures the current kernel of `flavour` is unpacked in [`cache_dir`] and returns it.
pub fn ensure_kernel(flavour: Flavour) -> Result<KernelTree, Error> {
    ensure_kernel_in(&cache_dir()?, flavour)
}

/// Like [`ensure_kernel`] with an explicit cache directory.
///
/// The first call resolves the meta package with `apt-cache depends`, downloads
/// the versioned package with `apt-get download`, unpacks it with `dpkg-deb -x`
/// into a temporary directory, generates `modules.dep` if the package has none,
/// and renames it into `<cache>/kernels/<package>`. It records the resolved
/// package in `<cache>/kernels/<meta>.current`, so later calls do no work at all
/// (delete that file to pick up a newer Debian kernel).
pub fn ensure_kernel_in(cache: &Path, flavour: Flavour) -> Result<KernelTree, Error> {
    let meta = flavour.meta_package();
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels).map_err(|source| io_err(&kernels, source))?;
    let pointer = kernels.join(format!("{meta}.current"));

    if let Ok(pkg) = fs::read_to_string(&pointer) {
        let pkg = pkg.trim();
        if let Ok(tree) = KernelTree::open(kernels.join(pkg), pkg) {
            if tree.complete() {
                tracing::debug!(package = pkg, "kernel already cached");
                return Ok(tree);
            }
        }
    }

    let package = resolve_meta_package(meta)?;
    let dest = kernels.join(&package);
    let cached = KernelTree::open(&dest, &package)
        .ok()
        .filter(|t| t.complete());
    let tree = match cached {
        Some(tree) => tree,
        None => fetch(&kernels, &package)?,
    };
    let tmp_pointer = kernels.join(format!(".{meta}.current.{}", std::process::id()));
    fs::write(&tmp_pointer, format!("{package}\n")).map_err(|s| io_err(&tmp_pointer, s))?;
    fs::rename(&tmp_pointer, &pointer).map_err(|s| io_err(&pointer, s))?;
    Ok(tree)
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn run(package: &str, cmd: &mut Command) -> Result<String, Error> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    tracing::debug!(%command, "running");
    let out = cmd.output().map_err(|source| Error::Spawn {
        package: package.to_owned(),
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            package: package.to_owned(),
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `apt-cache depends <meta>` output for the versioned `linux-image-*` dependency.
pub(crate) fn parse_apt_cache_depends(meta: &str, text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with("linux-image-") && *dep != meta && !dep.starts_with('<'))
        .map(str::to_owned)
}

fn resolve_meta_package(meta: &str) -> Result<String, Error> {
    let out = run(meta, Command::new("apt-cache").args(["depends", meta]))?;
    parse_apt_cache_depends(meta, &out).ok_or_else(|| Error::BadPackage {
        package: meta.to_owned(),
        what: format!("`apt-cache depends {meta}` names no linux-image-* dependency:\n{out}"),
    })
}

fn fetch(kernels: &Path, package: &str) -> Result<KernelTree, Error> {
    tracing::info!(package, dir = %kernels.display(), "downloading kernel package");
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(kernels)
        .map_err(|s| io_err(kernels, s))?;
    run(
        package,
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(work.path()),
    )?;
    let deb = fs::read_dir(work.path())
        .map_err(|s| io_err(work.path(), s))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::BadPackage {
            package: package.to_owned(),
            what: format!("apt-get download left no .deb in {}", work.path().display()),
        })?;
    let tree_dir = work.path().join("tree");
    run(
        package,
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree_dir),
    )?;
    let tree = KernelTree::open(&tree_dir, package)?;
    let dep = tree.modules_dir().join("modules.dep");
    if !dep.is_file() {
        tracing::info!(package, "generating modules.dep from .modinfo sections");
        let text = generate_modules_dep(&tree.modules_dir())?;
        fs::write(&dep, text).map_err(|s| io_err(&dep, s))?;
    }
    let dest = kernels.join(package);
    if let Err(source) = fs::rename(&tree_dir, &dest) {
        // Another process may have finished the same download first.
        let winner = KernelTree::open(&dest, package)
            .ok()
            .filter(|t| t.complete());
        if winner.is_none() {
            return Err(io_err(&dest, source));
        }
    }
    KernelTree::open(dest, package)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_cache_output_is_parsed() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_apt_cache_depends("linux-image-amd64", text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            parse_apt_cache_depends("linux-image-amd64", "linux-image-amd64\n"),
            None
        );
    }

    #[test]
    fn tree_paths_and_pointer_cache() {
        let cache = tempfile::tempdir().unwrap();
        let pkg = "linux-image-9.9.9-1-amd64";
        let root = cache.path().join("kernels").join(pkg);
        let mods = root.join("lib/modules/9.9.9-1-amd64");
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::create_dir_all(&mods).unwrap();
        fs::write(root.join("boot/vmlinuz-9.9.9-1-amd64"), b"k").unwrap();
        fs::write(mods.join("modules.dep"), b"").unwrap();
        fs::write(
            cache.path().join("kernels/linux-image-amd64.current"),
            format!("{pkg}\n"),
        )
        .unwrap();
        // With the pointer in place no external command runs.
        let tree = ensure_kernel_in(cache.path(), Flavour::Amd64).unwrap();
        assert_eq!(tree.version(), "9.9.9-1-amd64");
        assert_eq!(tree.modules_dir(), mods);
        assert!(tree.config().ends_with("boot/config-9.9.9-1-amd64"));
    }
}
