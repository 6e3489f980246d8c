//! How every forkvm program logs to its stderr: filtered by the `--log` directives when
//! given, else by `RUST_LOG`, else warnings only; in colour only for a person at a
//! terminal, so logs and pipes get plain text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter when none is given: `level`, with the vendored FUSE server (which logs
/// what a guest sends it at error level, a line per bad request) silenced.
pub fn default_filter(level: &str) -> EnvFilter {
    EnvFilter::new(format!("{level},fuse_backend_rs=off"))
}

/// Installs the stderr logger; `directives` are `--log`'s (e.g. `forkvm_vmm=debug`).
pub fn init_stderr(directives: Option<&str>) {
    let filter = directives.map(EnvFilter::new).unwrap_or_else(|| {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter("warn"))
    });
    // A second install (a test harness, a library that got there first) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// `err` and its causes on one line, `outer: inner: innermost`: how an error is written
/// where it travels as text (a log line, an API answer, a test's message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
