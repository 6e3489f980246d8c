//! `cargo xtask prepare-conformance`: builds the OCI runtime-tools validation suite
//! vendored in `third_party/runtime-tools` (see `third_party/README.md`) into
//! `target/runtime-tools/<name>`: `runtimetest` (static: it runs inside the
//! containers), the `validation/<test>/<test>.t` programs and the root filesystem they
//! unpack. The conformance test (`crates/oci/tests/conformance_e2e.rs`) runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// The vendored archive's name (without `.tar.xz`): the suite at the commit it names.
pub const RUNTIME_TOOLS: &str = "runtime-tools-5e63903";

/// The Go toolchains to try, newest first: the suite's modules need Go 1.23
/// (`scripts/setup.sh` installs Debian's `golang-1.23-go`).
const GO: [&str; 2] = ["/usr/lib/go-1.23/bin/go", "go"];

/// Builds the suite (once: a finished build is kept) and returns its directory.
pub fn prepare(workspace: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let out = target.join("runtime-tools").join(RUNTIME_TOOLS);
    let stamp = out.join(".built");
    if stamp.exists() {
        return Ok(out);
    }
    let archive = workspace
        .join("third_party/runtime-tools")
        .join(format!("{RUNTIME_TOOLS}.tar.xz"));
    anyhow::ensure!(archive.is_file(), "{} is missing", archive.display());
    let go = GO
        .iter()
        .find(|go| {
            Command::new(go)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no Go toolchain (run scripts/setup.sh: it installs golang-1.23-go)")?;

    // Unpacked and built beside, then moved into place: a half-built suite is never
    // taken for a built one.
    let unpack = target.join("runtime-tools").join(".unpack");
    if unpack.exists() {
        std::fs::remove_dir_all(&unpack)
            .with_context(|| format!("removing {}", unpack.display()))?;
    }
    std::fs::create_dir_all(&unpack).with_context(|| format!("creating {}", unpack.display()))?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpack))?;
    let src = unpack.join("runtime-tools");
    let go_cmd = || {
        let mut c = Command::new(go);
        c.current_dir(&src)
            .env("GOFLAGS", "-mod=vendor")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0");
        c
    };
    eprintln!("prepare-conformance: building runtimetest and the validation programs with {go}");
    run(go_cmd().args([
        "build",
        "-tags",
        "netgo osusergo",
        "-o",
        "runtimetest",
        "./cmd/runtimetest",
    ]))?;
    let mut built = 0;
    for entry in std::fs::read_dir(src.join("validation"))? {
        let dir = entry?.path();
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("a validation directory's name is not UTF-8")?
            .to_owned();
        let main = dir.join(format!("{name}.go"));
        if name == "util" || !main.is_file() {
            continue;
        }
        let rel = format!("./validation/{name}/{name}.go");
        let exe = format!("validation/{name}/{name}.t");
        run(go_cmd().args(["build", "-o", &exe, &rel]))?;
        built += 1;
    }
    anyhow::ensure!(built > 0, "no validation programs in {}", src.display());
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::rename(&src, &out)
        .with_context(|| format!("moving the suite to {}", out.display()))?;
    std::fs::remove_dir_all(&unpack).ok();
    std::fs::write(&stamp, format!("{built} validation programs\n"))?;
    Ok(out)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}
