//! What the container benchmarks share on the host: finding programs, an image made of
//! the busybox fixture plus host programs, and runc bundles of it (the baseline a
//! forkvm VM is measured against).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_image::fixtures::{self, LayerBuilder};

/// Waits for `child`, looking every `poll`, for at most `limit`; past it the child is
/// killed and the error says that `what` did not finish.
pub fn wait_within(
    child: &mut Child,
    what: &str,
    limit: Duration,
    poll: Duration,
) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(poll);
    }
}

/// Whether `name` is a file in a `PATH` directory.
pub fn program_exists(name: &str) -> bool {
    which(name).is_ok()
}

/// `program`'s path on `PATH`.
pub fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("no {program} on PATH"))
}

/// Fails naming the first of `programs` this host lacks.
pub fn require(verb: &str, programs: &[&str]) -> Result<()> {
    for program in programs {
        if !program_exists(program) {
            bail!("forkvm bench {verb} needs `{program}` (scripts/setup.sh installs it)");
        }
    }
    Ok(())
}

/// The busybox fixture's layers, then one with each of the host's `programs` and every
/// shared library `ldd` says it loads, at the same paths, and `files` (path, mode,
/// content).
pub fn image_layers(programs: &[&str], files: &[(&str, u32, &[u8])]) -> Result<Vec<Vec<u8>>> {
    let mut paths = Vec::new();
    for program in programs {
        let exe = which(program)?;
        let ldd = Command::new("ldd")
            .arg(&exe)
            .output()
            .context("cannot run ldd")?;
        paths.push(exe);
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libx.so.1 => /lib/.../libx.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                paths.push(PathBuf::from(p));
            }
        }
    }
    paths.sort();
    paths.dedup();
    let mut layer = LayerBuilder::new();
    let mut dirs = std::collections::BTreeSet::new();
    let rel_paths = paths
        .iter()
        .map(|p| p.strip_prefix("/").unwrap_or(p).to_owned())
        .chain(files.iter().map(|(p, _, _)| PathBuf::from(p)));
    for rel in rel_paths {
        for a in rel.ancestors().skip(1) {
            if !a.as_os_str().is_empty() && a != Path::new("bin") {
                dirs.insert(a.to_owned());
            }
        }
    }
    for d in &dirs {
        layer = layer.dir(&d.to_string_lossy(), 0o755);
    }
    for p in &paths {
        // The library a symlink names is what the loader reads.
        let content = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        let rel = p.strip_prefix("/").unwrap_or(p);
        layer = layer.file(&rel.to_string_lossy(), 0o755, &content);
    }
    for (path, mode, content) in files {
        layer = layer.file(path, *mode, content);
    }
    let mut layers = fixtures::busybox_layer_tars()?.to_vec();
    layers.push(layer.finish());
    Ok(layers)
}

/// Loads `layers` as image `name` into the store of `forkvm` (`exe`, with `env`), through
/// an OCI layout written under `dir`.
pub fn load_image(
    exe: &Path,
    env: &[(&str, PathBuf)],
    dir: &Path,
    name: &str,
    layers: &[Vec<u8>],
) -> Result<()> {
    let layout = dir.join("layout");
    fixtures::write_oci_layout_with(&layout, Some(name), layers, &fixtures::config())?;
    let status = Command::new(exe)
        .args(["load", "-q", "-i"])
        .arg(&layout)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("forkvm load of the benchmark image failed ({status})");
    }
    Ok(())
}

/// runc needs a cgroup file system. The virtual KVM host mounts none: there cgroup v2 is
/// mounted (as the engine tests do); on any other host cgroups are the system's own.
pub fn ensure_cgroups() -> Result<()> {
    let mounted = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory").exists();
    if mounted {
        return Ok(());
    }
    if !forkvm_testhost::in_test_host() {
        bail!("runc needs a cgroup file system at /sys/fs/cgroup, and this host has none");
    }
    let status = Command::new("mount")
        .args(["-t", "cgroup2", "none", "/sys/fs/cgroup"])
        .status()?;
    if !status.success() {
        bail!("cannot mount cgroup2 on /sys/fs/cgroup for runc");
    }
    Ok(())
}

/// A runc bundle at `bundle` whose root is `layers` unpacked (writable), running `args`
/// without a terminal; `edit` changes its `config.json` further.
pub fn runc_bundle(
    bundle: &Path,
    layers: &[Vec<u8>],
    args: &[&str],
    edit: impl FnOnce(&mut serde_json::Value) -> Result<()>,
) -> Result<()> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    for l in layers {
        tar::Archive::new(&l[..])
            .unpack(&rootfs)
            .context("cannot unpack a layer for runc")?;
    }
    let spec = Command::new("runc")
        .args(["spec", "-b"])
        .arg(bundle)
        .status()?;
    if !spec.success() {
        bail!("runc spec failed");
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(args);
    config["root"]["readonly"] = false.into();
    edit(&mut config)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}
