//! The version every forkvm program prints with `--version`: the release and the commit
//! it was built from (`unknown` outside a git checkout). A crate of its own so that a
//! new commit rebuilds only the programs, not the libraries.

/// The commit forkvm was built from (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("FORKVM_COMMIT");

/// `<release> (commit <commit>)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FORKVM_COMMIT"),
    ")"
);
