//! OCI hooks that run on the host: `prestart`, `createRuntime`, `poststart`, `poststop`.
//!
//! Each hook is run as the runtime spec and runc run it: `path` executed with `args`
//! (`args[0]` is the program's `argv[0]`) and exactly `env` as its environment, the
//! container's state JSON on its stdin, and killed when it outlives its `timeout`
//! ([`DEFAULT_TIMEOUT`] when the spec gives none, at most [`MAX_TIMEOUT`]: every wait
//! has a deadline), with whatever it started (it runs in a process group of its own). A
//! hook
//! fails when it cannot start, exits non-zero, is killed by a signal or times out; the
//! error names the hook (`hooks.prestart[0]`, its path) and ends with what it wrote to
//! stderr (the last [`OUTPUT_TAIL`] bytes), so that the engine shows why.
//!
//! Docker 20.10 configures a container's network this way: its `libnetwork-setkey`
//! prestart hook asks dockerd to move the container's veth into the network namespace
//! of the state's `pid` (the container's monitor, see `runtime::create`).

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

/// How long a hook may run when the spec sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest `timeout` honoured; longer ones are cut to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// How much of a failed hook's stderr its error quotes.
pub const OUTPUT_TAIL: usize = 2048;

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The program could not be started.
    #[error("{field} ({path}): cannot run it: {source}")]
    Spawn {
        /// The hook, as a JSON path (`hooks.prestart[0]`).
        field: String,
        /// Its program.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It ended unsuccessfully.
    #[error("{field} ({path}) {how}{}", stderr_suffix(.stderr))]
    Failed {
        /// The hook, as a JSON path.
        field: String,
        /// Its program.
        path: String,
        /// "exited with 1", "was killed by signal 9", "timed out after 5 s".
        how: String,
        /// The end of its stderr.
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// Runs `hooks` in order with `state` (the runtime spec's state JSON) on stdin; stops at
/// the first that fails. `kind` is the spec's name for the list (`prestart`).
pub fn run_all(kind: &str, hooks: &[Hook], state: &serde_json::Value) -> Result<(), HookError> {
    let state = state.to_string();
    for (i, hook) in hooks.iter().enumerate() {
        run(&format!("hooks.{kind}[{i}]"), hook, state.as_bytes())?;
    }
    Ok(())
}

/// Runs every hook in `hooks`, logging the failures instead of stopping (`poststart` and
/// `poststop`, whose failures the spec says must not change the container's fate).
pub fn run_all_logged(kind: &str, hooks: &[Hook], state: &serde_json::Value) {
    let state = state.to_string();
    for (i, hook) in hooks.iter().enumerate() {
        if let Err(e) = run(&format!("hooks.{kind}[{i}]"), hook, state.as_bytes()) {
            tracing::warn!("{e}");
        }
    }
}

/// Runs one hook; `field` names it in errors.
pub fn run(field: &str, hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    if let Some(args) = hook.args() {
        if let Some((argv0, rest)) = args.split_first() {
            cmd.arg0(argv0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        match kv.split_once('=') {
            Some((k, v)) => cmd.env(k, v),
            None => cmd.env(kv, ""),
        };
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        field: field.to_owned(),
        path: path.clone(),
        source,
    })?;
    // Written on a thread: a hook that neither reads it nor exits must still meet its
    // deadline. A hook that does not read it (or exits first) is fine.
    if let Some(mut stdin) = child.stdin.take() {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
    // Drained on a thread so that a hook that writes much never blocks on a full pipe;
    // only the tail is kept.
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > OUTPUT_TAIL {
                    tail.drain(..tail.len() - OUTPUT_TAIL);
                }
            }
            String::from_utf8_lossy(&tail).into_owned()
        })
    });
    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
        .min(MAX_TIMEOUT);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.wait();
                break Err(format!("timed out after {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("could not be waited for: {e}")),
        }
    };
    // A hook's own children may keep stderr open (a hook that succeeded may leave a
    // daemon behind); its tail is not waited for past a moment.
    let stderr = stderr
        .map(|t| join_within(t, Duration::from_secs(1)))
        .unwrap_or_default();
    let how = match status {
        Ok(s) if s.success() => return Ok(()),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => format!("failed ({s})"),
        },
        Err(how) => how,
    };
    Err(HookError::Failed {
        field: field.to_owned(),
        path,
        how,
        stderr,
    })
}

/// SIGKILL to the process group `pgid` (a hook and what it started).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is
        // involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// The thread's result if it ends within `limit`, else an empty string.
fn join_within(t: std::thread::JoinHandle<String>, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    while !t.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if t.is_finished() {
        t.join().unwrap_or_default()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn sh(script: &str, timeout: Option<i64>) -> Hook {
        let mut b = HookBuilder::default()
            .path("/bin/sh")
            .args(vec!["sh".into(), "-c".into(), script.into()])
            .env(vec!["HOOK_VAR=from the spec".into()]);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap()
    }

    #[test]
    fn a_hook_gets_the_state_argv_and_only_its_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}.state; echo \"$0|$HOOK_VAR|${{HOME-unset}}\" > {0}",
            out.display()
        );
        let state = serde_json::json!({"id": "c1", "pid": 42});
        run_all("prestart", &[sh(&script, None)], &state).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "sh|from the spec|unset\n"
        );
        let got: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.with_extension("state")).unwrap()).unwrap();
        assert_eq!(got, state);
    }

    #[test]
    fn a_failing_hook_is_named_with_its_stderr_and_stops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("second-ran");
        let hooks = [
            sh("echo no network for you >&2; exit 3", None),
            sh(&format!("touch {}", marker.display()), None),
        ];
        let e = run_all("createRuntime", &hooks, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "hooks.createRuntime[0] (/bin/sh) exited with 3: no network for you"
        );
        assert!(!marker.exists(), "a hook after the failed one ran");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let started = Instant::now();
        let e = run("hooks.prestart[1]", &sh("sleep 30", Some(1)), b"{}")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "hooks.prestart[1] (/bin/sh) timed out after 1 s");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let hook = HookBuilder::default()
            .path("/nonexistent/hook")
            .build()
            .unwrap();
        let e = run("hooks.poststop[0]", &hook, b"{}")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hooks.poststop[0] (/nonexistent/hook): cannot run it"),
            "{e}"
        );
    }

    #[test]
    fn logged_hooks_all_run_even_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("second-ran");
        let hooks = [
            sh("exit 1", None),
            sh(&format!("touch {}", marker.display()), None),
        ];
        run_all_logged("poststop", &hooks, &serde_json::json!({}));
        assert!(marker.exists());
    }
}
