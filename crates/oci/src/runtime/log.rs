//! The runtime's `--log`: runc's format, which engines read back. With `--log-format
//! json` every line is one JSON object (`{"level":"error","msg":"...","time":"..."}`);
//! go-runc, in containerd's shim, takes the last `error` line as the reason a command
//! failed. The monitor also sends its `tracing` output there, in the same format.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Global;

/// Where runtime messages go.
#[derive(Debug)]
pub struct Log {
    path: Option<PathBuf>,
    json: bool,
    debug: bool,
}

impl Log {
    /// The log the global flags ask for.
    pub fn new(g: &Global) -> Self {
        Self {
            path: g.log.clone(),
            json: g.log_format == "json",
            debug: g.debug,
        }
    }

    /// One `level` line (`error`, `warning`, `info`, `debug`).
    pub fn write(&self, level: &str, msg: &str) {
        let Some(path) = &self.path else { return };
        let time = forkvm_registry::time::rfc3339_nanos(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let line = if self.json {
            serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
        } else {
            format!("time=\"{time}\" level={level} msg={msg:?}")
        };
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            // One write per line: O_APPEND keeps concurrent writers' lines whole.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// An error line.
    pub fn error(&self, msg: &str) {
        self.write("error", msg);
    }

    /// A warning line.
    pub fn warn(&self, msg: &str) {
        self.write("warning", msg);
    }

    /// Sends `tracing` output (the VMM's own logs) to the log file, or to `fallback`
    /// without one: never to stderr, which belongs to the container.
    pub fn install_tracing(&self, fallback: &Path) {
        let path = self.path.clone().unwrap_or_else(|| fallback.to_owned());
        let Ok(file) = OpenOptions::new().create(true).append(true).open(&path) else {
            return;
        };
        let level = if self.debug { "debug" } else { "warn" };
        let filter = tracing_subscriber::EnvFilter::try_from_env("FORKVM_LOG")
            .unwrap_or_else(|_| forkvm_config::logging::default_filter(level));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(Mutex::new(file));
        let _ = if self.json && self.path.is_some() {
            builder.json().try_init()
        } else {
            builder.try_init()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn global(args: &[&str]) -> Global {
        let mut v = vec!["forkvm-runtime"];
        v.extend_from_slice(args);
        v.push("features");
        super::super::Cli::parse_from(v).global
    }

    #[test]
    fn json_lines_are_what_go_runc_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let p = path.to_str().unwrap();
        let log = Log::new(&global(&["--log", p, "--log-format", "json"]));
        log.warn("first");
        log.error("bundle: \"quoted\"\nsecond line");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["level"], "warning");
        assert_eq!(lines[1]["level"], "error");
        assert_eq!(lines[1]["msg"], "bundle: \"quoted\"\nsecond line");
        assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn text_format_and_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = Log::new(&global(&["--log", path.to_str().unwrap()]));
        log.error("boom");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("level=error msg=\"boom\""), "{text}");
        // Without --log nothing is written anywhere (stderr is the caller's business).
        Log::new(&global(&[])).error("nowhere");
    }
}
