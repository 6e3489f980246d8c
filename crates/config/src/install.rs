//! An installation of forkvm under a prefix, laid out like runc's and containerd's:
//!
//! | path | what |
//! |---|---|
//! | `<prefix>/bin/` | [`PROGRAMS`]: `forkvm`, `forkvm-runtime`, `containerd-shim-forkvm-v1`, `forkvm-vmm`, `forkvm-bench` |
//! | `<prefix>/lib/forkvm/forkvm-agent` | the static guest agent |
//! | `<prefix>/etc/forkvm/forkvm.toml` | the configuration ([`crate::Config`]), kept if it exists |
//!
//! `cargo xtask install` builds the programs and calls [`install`]; the engine tests
//! install the same way into a temporary prefix and drive that copy.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{Config, Setting, PREFIX_CONFIG};

/// The programs an installation puts in `<prefix>/bin`.
pub const PROGRAMS: &[&str] = &[
    "forkvm",
    "forkvm-runtime",
    "containerd-shim-forkvm-v1",
    "forkvm-vmm",
    "forkvm-bench",
];

/// The guest agent's place under a prefix.
pub const AGENT: &str = "lib/forkvm/forkvm-agent";

/// What [`install`] did.
#[derive(Debug)]
pub struct Installed {
    /// The prefix.
    pub prefix: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// Whether the configuration file was written (false: one was there and is kept).
    pub config_written: bool,
}

impl Installed {
    /// Program `name` of this installation.
    pub fn program(&self, name: &str) -> PathBuf {
        self.prefix.join("bin").join(name)
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn copy_executable(from: &Path, to: &Path) -> io::Result<()> {
    // A new file then a rename: a running copy of the old program keeps its inode.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).map_err(io_at(from))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, to).map_err(io_at(to))
}

/// The text of a `forkvm.toml`: `config`'s settings, the rest as comments.
pub fn render(config: &Config) -> String {
    let vars: Vec<&str> = Setting::ALL.iter().map(|s| s.var()).collect();
    let mut s = format!(
        "# forkvm configuration (forkvm.toml). Paths are absolute; a commented key takes\n\
         # its built-in default. {} override these for one process.\n",
        vars.join(", ")
    );
    for setting in Setting::ALL {
        let (key, value) = (setting.key(), setting.of(config));
        let default = match setting {
            Setting::Root => "/run/forkvm",
            Setting::Store => "/var/lib/forkvm/images",
            Setting::Cache => "/var/lib/forkvm/cache",
            Setting::Agent => "<prefix>/lib/forkvm/forkvm-agent",
            Setting::TemplateKey => "/var/lib/forkvm/template.key",
        };
        match value {
            Some(v) => {
                let _ = writeln!(s, "{key} = {:?}", v.display().to_string());
            }
            None => {
                let _ = writeln!(s, "# {key} = {default:?}");
            }
        }
    }
    s
}

/// Installs the programs found in `bin` and the guest agent `agent` under `prefix`, and
/// writes `<prefix>/etc/forkvm/forkvm.toml` from `config` (its `agent` set to the
/// installed one) unless that file exists.
pub fn install(bin: &Path, agent: &Path, prefix: &Path, config: &Config) -> io::Result<Installed> {
    if !prefix.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the prefix {} is not an absolute path", prefix.display()),
        ));
    }
    let missing: Vec<String> = PROGRAMS
        .iter()
        .map(|p| bin.join(p))
        .chain([agent.to_owned()])
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("not built: {}", missing.join(", ")),
        ));
    }
    let config_path = prefix.join(PREFIX_CONFIG);
    let installed_agent = prefix.join(AGENT);
    for dir in [
        prefix.join("bin"),
        installed_agent.parent().expect("a parent").to_owned(),
        config_path.parent().expect("a parent").to_owned(),
    ] {
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    }
    for p in PROGRAMS {
        copy_executable(&bin.join(p), &prefix.join("bin").join(p))?;
    }
    copy_executable(agent, &installed_agent)?;
    let config_written = !config_path.exists();
    if config_written {
        let config = Config {
            agent: Some(installed_agent),
            ..config.clone()
        };
        // Written only where none exists: no reader can see it half-written.
        std::fs::write(&config_path, render(&config)).map_err(io_at(&config_path))?;
    }
    Ok(Installed {
        prefix: prefix.to_owned(),
        config: config_path,
        config_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_programs_agent_and_a_config_it_then_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("target");
        std::fs::create_dir(&bin).unwrap();
        let prefix = dir.path().join("prefix");
        let agent = bin.join("agent-binary");
        std::fs::write(&agent, b"agent").unwrap();
        let config = Config {
            root: Some("/srv/vms".into()),
            ..Config::default()
        };
        // Nothing built yet: the error names what is missing.
        let e = install(&bin, &agent, &prefix, &config)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("forkvm-vmm") && e.contains("forkvm-runtime"),
            "{e}"
        );
        for p in PROGRAMS {
            std::fs::write(bin.join(p), p.as_bytes()).unwrap();
        }
        let got = install(&bin, &agent, &prefix, &config).unwrap();
        assert!(got.config_written);
        for p in PROGRAMS {
            let at = got.program(p);
            assert_eq!(std::fs::read(&at).unwrap(), p.as_bytes());
            assert_eq!(
                std::fs::metadata(&at).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        assert_eq!(std::fs::read(prefix.join(AGENT)).unwrap(), b"agent");
        let text = std::fs::read_to_string(&got.config).unwrap();
        let read = Config::parse(&got.config, &text).unwrap();
        assert_eq!(read.root.as_deref(), Some(Path::new("/srv/vms")));
        assert_eq!(read.agent, Some(prefix.join(AGENT)));
        assert_eq!(read.store, None);
        // A second install keeps the (possibly edited) configuration.
        std::fs::write(&got.config, "root = \"/elsewhere\"\n").unwrap();
        let again = install(&bin, &agent, &prefix, &Config::default()).unwrap();
        assert!(!again.config_written);
        assert_eq!(
            std::fs::read_to_string(&got.config).unwrap(),
            "root = \"/elsewhere\"\n"
        );
        assert!(install(&bin, &agent, Path::new("rel"), &config).is_err());
    }
}
