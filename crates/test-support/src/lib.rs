//! Helpers shared by forkvm's end-to-end tests, in a crate of their own so that no
//! product crate compiles them. A dev-dependency only.

use std::path::{Path, PathBuf};

/// Installs the forkvm built beside `target_bin` (a test's own target directory, e.g.
/// the parent of `CARGO_BIN_EXE_forkvm-runtime`) into `<scratch>/prefix` as
/// `cargo xtask install` does: the programs, the guest agent, and a `forkvm.toml` that
/// registers VMs under `vms` and finds the guests in this machine's forkvm cache (which
/// the test prepared). The engines then drive that copy with none of forkvm's
/// variables in their environment. Returns the prefix.
pub fn install_forkvm(target_bin: &Path, scratch: &Path, vms: &Path) -> PathBuf {
    let agent = forkvm_guest_kernel::find_agent()
        .expect("the guest agent is not built (run `cargo xtask prepare-guest`)");
    let cache = forkvm_guest_kernel::cache_dir().expect("a forkvm cache directory");
    let prefix = scratch.join("prefix");
    let config = forkvm_config::Config {
        root: Some(vms.to_owned()),
        cache: Some(cache),
        ..forkvm_config::Config::default()
    };
    let installed = forkvm_config::install::install(target_bin, &agent, &prefix, &config)
        .unwrap_or_else(|e| {
            panic!(
                "cannot install forkvm into {} (build every program first: \
                 `cargo build --workspace --bins`): {e}",
                prefix.display()
            )
        });
    println!(
        "installed forkvm in {}; {}:\n{}",
        prefix.display(),
        installed.config.display(),
        std::fs::read_to_string(&installed.config).unwrap_or_default()
    );
    prefix
}
