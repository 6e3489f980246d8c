//! Where forkvm's programs and files are, and how the programs log ([`logging`]).
//!
//! forkvm is several executables that start one another (`forkvm` and `forkvm-runtime`
//! start `forkvm-vmm`, `forkvm bench` runs `forkvm-bench`, the benchmarks run
//! `forkvm`); each finds the others with [`find_program`]: installed side by side, or
//! on `PATH`.
//!
//! An installed forkvm reads its places from `forkvm.toml` ([`Config`]): the first of
//! `<prefix>/etc/forkvm/forkvm.toml` (the prefix the running program is installed in:
//! `<prefix>/bin/<program>`) and `/etc/forkvm/forkvm.toml`. A container engine
//! therefore needs no environment variables to drive forkvm-runtime. The `FORKVM_*`
//! variables still override the file, for development.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub mod install;
pub mod logging;

use serde::Deserialize;

/// The system-wide configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/forkvm/forkvm.toml";
/// Where the configuration file is under an installation prefix.
pub const PREFIX_CONFIG: &str = "etc/forkvm/forkvm.toml";

/// `forkvm.toml`: where forkvm keeps its state and finds its files. Every key is
/// optional; a missing one takes the built-in default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The VM state root (`--root`; default `/run/forkvm` for root).
    pub root: Option<PathBuf>,
    /// The image store (default `/var/lib/forkvm/images` for root).
    pub store: Option<PathBuf>,
    /// Guest kernels and initramfs images (default `~/.cache/forkvm`).
    pub cache: Option<PathBuf>,
    /// The static guest agent (default: the build tree's).
    pub agent: Option<PathBuf>,
    /// The host key templates are authenticated with (default
    /// `/var/lib/forkvm/template.key` for root); made on first use, mode 0600.
    pub template_key: Option<PathBuf>,
}

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It exists but cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid `forkvm.toml`.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        message: String,
    },
    /// A path in it is relative.
    #[error("{}: {key} = {value:?} is not an absolute path", path.display())]
    Relative {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: PathBuf,
    },
}

impl Config {
    /// Parses `text`, the contents of the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        for setting in Setting::ALL {
            let key = setting.key();
            if let Some(v) = setting.of(&config).filter(|v| !v.is_absolute()) {
                return Err(ConfigError::Relative {
                    path: path.to_owned(),
                    key,
                    value: v.clone(),
                });
            }
        }
        Ok(config)
    }

    /// Reads the first configuration file of `candidates` that exists; none is the
    /// default configuration. Returns it with its path.
    pub fn read_first(candidates: &[PathBuf]) -> Result<(Self, Option<PathBuf>), ConfigError> {
        for path in candidates {
            match std::fs::read_to_string(path) {
                Ok(text) => return Ok((Self::parse(path, &text)?, Some(path.clone()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok((Self::default(), None))
    }
}

/// Where this program looks for `forkvm.toml`, in order: under its installation
/// prefix, then [`SYSTEM_CONFIG`].
pub fn config_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(prefix) = exe.parent().and_then(Path::parent) {
            out.push(prefix.join(PREFIX_CONFIG));
        }
    }
    out.push(PathBuf::from(SYSTEM_CONFIG));
    out
}

static LOADED: OnceLock<Result<(Config, Option<PathBuf>), String>> = OnceLock::new();

/// This program's configuration, read once. A program calls it first thing, so that a
/// broken file is a clear error before anything runs.
pub fn load() -> Result<&'static Config, String> {
    loaded().map(|(c, _)| c)
}

/// The file [`load`] read the configuration from (`None`: there was none, or it could
/// not be used). A VM process binds it into its root, so that the processes it starts
/// read the same.
pub fn loaded_from() -> Option<&'static Path> {
    loaded().ok().and_then(|(_, path)| path.as_deref())
}

fn loaded() -> Result<&'static (Config, Option<PathBuf>), String> {
    LOADED
        .get_or_init(|| {
            Config::read_first(&config_candidates()).map_err(|e| {
                let mut msg = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    msg.push_str(&format!(": {src}"));
                }
                msg
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// This program's configuration; the defaults when the file could not be used (which
/// [`load`] reports).
pub fn get() -> &'static Config {
    static DEFAULT: Config = Config {
        root: None,
        store: None,
        cache: None,
        agent: None,
        template_key: None,
    };
    load().unwrap_or(&DEFAULT)
}

/// A place `forkvm.toml` sets, and the environment variable that overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `root`, overridden by `FORKVM_ROOT`.
    Root,
    /// `store`, overridden by `FORKVM_STORE`.
    Store,
    /// `cache`, overridden by `FORKVM_CACHE`.
    Cache,
    /// `agent`, overridden by `FORKVM_AGENT`.
    Agent,
    /// `template_key`, overridden by `FORKVM_TEMPLATE_KEY`.
    TemplateKey,
}

impl Setting {
    /// Every setting.
    pub const ALL: [Setting; 5] = [
        Setting::Root,
        Setting::Store,
        Setting::Cache,
        Setting::Agent,
        Setting::TemplateKey,
    ];

    /// Its key in `forkvm.toml`.
    pub const fn key(self) -> &'static str {
        match self {
            Setting::Root => "root",
            Setting::Store => "store",
            Setting::Cache => "cache",
            Setting::Agent => "agent",
            Setting::TemplateKey => "template_key",
        }
    }

    /// The environment variable that overrides it.
    pub const fn var(self) -> &'static str {
        match self {
            Setting::Root => "FORKVM_ROOT",
            Setting::Store => "FORKVM_STORE",
            Setting::Cache => "FORKVM_CACHE",
            Setting::Agent => "FORKVM_AGENT",
            Setting::TemplateKey => "FORKVM_TEMPLATE_KEY",
        }
    }

    /// Its value in `config`.
    pub fn of(self, config: &Config) -> Option<&PathBuf> {
        match self {
            Setting::Root => config.root.as_ref(),
            Setting::Store => config.store.as_ref(),
            Setting::Cache => config.cache.as_ref(),
            Setting::Agent => config.agent.as_ref(),
            Setting::TemplateKey => config.template_key.as_ref(),
        }
    }

    /// Its variable when set and not empty, else this program's configuration's value.
    pub fn get(self) -> Option<PathBuf> {
        std::env::var_os(self.var())
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| self.of(get()).cloned())
    }
}

/// Where forkvm keeps `name` for good: `/var/lib/forkvm/<name>` for root, else
/// `$XDG_DATA_HOME/forkvm/<name>` (default `~/.local/share/forkvm/<name>`); empty
/// variables count as unset. (The image store and the template key, unless
/// `forkvm.toml` places them.)
pub fn data_path(name: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    data_path_from(
        |var| std::env::var_os(var).filter(|v| !v.is_empty()),
        is_root,
        name,
    )
}

/// [`data_path`] from an environment lookup and whether the user is root.
pub fn data_path_from(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
    is_root: bool,
    name: &str,
) -> PathBuf {
    if is_root {
        return Path::new("/var/lib/forkvm").join(name);
    }
    let data = env("XDG_DATA_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env("HOME").unwrap_or_else(|| "/".into())).join(".local/share")
    });
    data.join("forkvm").join(name)
}

/// Finds forkvm's program `name`: beside this process's executable (or beside its
/// directory, for the test binaries cargo puts in `target/<profile>/deps`), else on
/// `PATH`. The error names where it looked.
pub fn find_program(name: &str) -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    find_program_from(name, &exe, std::env::var_os("PATH").as_deref())
}

fn find_program_from(
    name: &str,
    exe: &Path,
    path: Option<&std::ffi::OsStr>,
) -> std::io::Result<PathBuf> {
    let beside = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    let on_path = || {
        path.and_then(|paths| {
            std::env::split_paths(paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "cannot find {name} beside {} or on PATH (is forkvm installed?)",
                exe.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files() {
        let p = Path::new("/etc/forkvm/forkvm.toml");
        let c = Config::parse(p, "root = \"/r\"\nagent = \"/a/forkvm-agent\"\n").unwrap();
        assert_eq!(c.root.as_deref(), Some(Path::new("/r")));
        assert_eq!(c.agent.as_deref(), Some(Path::new("/a/forkvm-agent")));
        assert_eq!(c.store, None);
        assert_eq!(Config::parse(p, "").unwrap(), Config::default());
        let e = Config::parse(p, "rooot = \"/r\"").unwrap_err().to_string();
        assert!(
            e.contains("/etc/forkvm/forkvm.toml") && e.contains("rooot"),
            "{e}"
        );
        let e = Config::parse(p, "cache = \"rel/dir\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache") && e.contains("not an absolute path"),
            "{e}"
        );
        let e = Config::parse(p, "root = 5").unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn the_first_file_that_exists_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        let (c, from) = Config::read_first(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((c, from), (Config::default(), None));
        std::fs::write(&b, "store = \"/s\"").unwrap();
        let (c, from) = Config::read_first(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(c.store.as_deref(), Some(Path::new("/s")));
        assert_eq!(from, Some(b.clone()));
        std::fs::write(&a, "store = ").unwrap();
        assert!(matches!(
            Config::read_first(&[a, b]),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn beside_then_parent_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let deps = bin.join("deps");
        let elsewhere = dir.path().join("elsewhere");
        for d in [&deps, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        let exe = deps.join("test-binary");
        let path = std::env::join_paths([&elsewhere]).unwrap();
        let find = |name| find_program_from(name, &exe, Some(&path));
        let err = find("forkvm-vmm").unwrap_err();
        assert!(
            err.to_string().contains("cannot find forkvm-vmm beside"),
            "{err}"
        );
        std::fs::write(elsewhere.join("forkvm-vmm"), b"").unwrap();
        assert_eq!(find("forkvm-vmm").unwrap(), elsewhere.join("forkvm-vmm"));
        std::fs::write(bin.join("forkvm-vmm"), b"").unwrap();
        assert_eq!(find("forkvm-vmm").unwrap(), bin.join("forkvm-vmm"));
        std::fs::write(deps.join("forkvm-vmm"), b"").unwrap();
        assert_eq!(find("forkvm-vmm").unwrap(), deps.join("forkvm-vmm"));
        // A directory of that name is not the program.
        std::fs::create_dir(deps.join("forkvm")).unwrap();
        assert!(find("forkvm").is_err());
    }
}
