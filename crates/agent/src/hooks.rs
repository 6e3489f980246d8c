//! The OCI hooks that run in the container ([`forkvm_agent_proto::Request::Hooks`]):
//! `createContainer` (at create, once the container's mounts, devices and paths are in
//! place) and `startContainer` (at start, before its process), as runc runs them in the
//! container's namespaces: `path` executed in the container's root (its path resolves
//! there), with the hook's arguments and exactly its environment, as root, the
//! container's state on stdin, `args` its whole argument vector (`argv[0]` included;
//! none: the path). A hook that exits non-zero or outlives its `timeout` (killed then,
//! with its process group) stops the rest; the error names the hook
//! (`hooks.createContainer[0] (/bin/x)`) and ends with what it wrote to stderr. All the
//! hooks of one request share [`LIMIT`]; what a hook leaves running is not waited for
//! past [`LINGER`].

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use forkvm_agent_proto::{GuestHook, ProcessSpec, MAX_HOOKS};

use crate::containers::Container;
use crate::reaper::Reaper;
use crate::spawn::ProcessIo;

/// Longest the hooks of one request may run together, whatever their `timeout`s: the
/// host waits a minute for the whole request.
pub const LIMIT: Duration = Duration::from_secs(50);

/// How long the output of a hook that exited is read on: what it started in a session
/// of its own may hold its pipes open.
pub const LINGER: Duration = Duration::from_secs(1);

/// Most bytes of a hook's stderr an error shows (its end).
const STDERR_SHOWN: usize = 4096;

/// Runs `hooks` (of `kind`) in `container` in order with `state` on stdin; the first
/// failure is the error, naming the hook.
pub fn run_all(
    container: &Container,
    kind: &str,
    hooks: &[GuestHook],
    state: &str,
    reaper: &Reaper,
) -> Result<(), String> {
    if hooks.len() > MAX_HOOKS {
        return Err(format!(
            "hooks.{kind}: {} hooks, at most {MAX_HOOKS}",
            hooks.len()
        ));
    }
    let deadline = Instant::now() + LIMIT;
    for (i, hook) in hooks.iter().enumerate() {
        run(container, hook, state, deadline, reaper)
            .map_err(|e| format!("hooks.{kind}[{i}] ({}): {e}", hook.path))?;
    }
    Ok(())
}

fn run(
    container: &Container,
    hook: &GuestHook,
    state: &str,
    deadline: Instant,
    reaper: &Reaper,
) -> Result<(), String> {
    if !hook.path.starts_with('/') {
        return Err("the path is not absolute".into());
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!(
            "not run: the hooks before it took the {} s all may take",
            LIMIT.as_secs()
        ));
    }
    let args = match hook.args.is_empty() {
        true => vec![hook.path.clone()],
        false => hook.args.clone(),
    };
    let spec = ProcessSpec {
        env: hook.env.clone(),
        stdin: true,
        ..ProcessSpec::new(args)
    };
    let spawned = crate::spawn::spawn_program(container, &spec, &hook.path, reaper)
        .map_err(|e| e.to_string())?;
    let ProcessIo::Pipes {
        stdin,
        stdout,
        stderr,
    } = spawned.io
    else {
        unreachable!("a process without a terminal has pipes");
    };
    // Fed and drained beside the wait: a hook that neither reads its stdin nor keeps
    // its output short must not block on a full pipe.
    let state = state.as_bytes().to_vec();
    std::thread::spawn(move || {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&state);
        }
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut { stdout }, &mut std::io::sink());
    });
    // The end of its stderr, sent when the pipe closes.
    let (tx, errors) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        let mut stderr = stderr;
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * STDERR_SHOWN {
                kept.drain(..kept.len() - STDERR_SHOWN);
            }
        }
        let _ = tx.send(kept);
    });
    let limit = hook
        .timeout
        .map_or(left, |t| Duration::from_secs(t.into()).min(left));
    let status = spawned.child.wait_timeout(limit);
    if status.is_none() {
        // Past its time: the hook and its process group (spawn's `setsid` made it the
        // leader) go, and its pipes close.
        // SAFETY: kill(2) with a negative pid signals that group; no memory is involved.
        unsafe { libc::kill(-spawned.child.pid(), libc::SIGKILL) };
        spawned.child.wait();
    }
    let mut stderr = errors.recv_timeout(LINGER).unwrap_or_default();
    if stderr.len() > STDERR_SHOWN {
        stderr.drain(..stderr.len() - STDERR_SHOWN);
    }
    let stderr = String::from_utf8_lossy(&stderr);
    let said = match stderr.trim() {
        "" => String::new(),
        s => format!(": {s}"),
    };
    match status {
        None => Err(format!("did not finish within {} s{said}", limit.as_secs())),
        Some(s) => match forkvm_agent_proto::exit_code(s) {
            0 => Ok(()),
            code => Err(format!("exit {code}{said}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(path: &str, args: &[&str], timeout: Option<u32>) -> GuestHook {
        GuestHook {
            path: path.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["HOOK_VAR=yes".into()],
            timeout,
        }
    }

    #[test]
    fn hooks_get_the_state_their_args_and_env_and_failures_name_the_hook() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let reaper = Reaper::global();
        let root = Container::boot(std::path::Path::new("/"));
        let script = format!(
            "cat > {0}.state; echo \"$0|$HOOK_VAR|${{HOME-unset}}\" > {0}",
            out.display()
        );
        let ok = hook("/bin/sh", &["sh", "-c", &script, "first"], None);
        run_all(
            &root,
            "createContainer",
            std::slice::from_ref(&ok),
            "{\"id\":\"c\"}",
            reaper,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "first|yes|unset\n");
        assert_eq!(
            std::fs::read_to_string(out.with_extension("state")).unwrap(),
            "{\"id\":\"c\"}"
        );

        // The second fails: named, with its stderr; the third never runs.
        let third = dir.path().join("third");
        let hooks = [
            ok,
            hook("/bin/sh", &["sh", "-c", "echo broken >&2; exit 3"], None),
            hook(
                "/bin/sh",
                &["sh", "-c", &format!("touch {}", third.display())],
                None,
            ),
        ];
        let e = run_all(&root, "startContainer", &hooks, "{}", reaper).unwrap_err();
        assert_eq!(e, "hooks.startContainer[1] (/bin/sh): exit 3: broken");
        assert!(!third.exists());

        // Past its timeout: killed, and said so.
        let slow = hook("/bin/sh", &["sh", "-c", "sleep 30"], Some(1));
        let started = std::time::Instant::now();
        let e = run_all(&root, "startContainer", &[slow], "{}", reaper).unwrap_err();
        assert_eq!(
            e,
            "hooks.startContainer[0] (/bin/sh): did not finish within 1 s"
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        // The spec's args[0] is the program's argv[0] (a multi-call program reads it).
        let named = dir.path().join("argv0");
        let custom = hook(
            "/bin/sh",
            &[
                "custom-name",
                "-c",
                &format!("echo $0 > {}", named.display()),
            ],
            None,
        );
        run_all(&root, "startContainer", &[custom], "{}", reaper).unwrap();
        assert_eq!(std::fs::read_to_string(&named).unwrap(), "custom-name\n");

        // What a hook leaves running in a session of its own, holding its output, is
        // not waited for.
        let daemon = hook("/bin/sh", &["sh", "-c", "setsid sleep 30 & exit 0"], None);
        let started = std::time::Instant::now();
        run_all(&root, "createContainer", &[daemon], "{}", reaper).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));

        // A program the container does not have, or a relative path: named.
        let e = run_all(
            &root,
            "createContainer",
            &[hook("/no/such", &[], None)],
            "{}",
            reaper,
        )
        .unwrap_err();
        assert!(
            e.starts_with("hooks.createContainer[0] (/no/such): "),
            "{e}"
        );
        let e = run_all(
            &root,
            "createContainer",
            &[hook("sh", &[], None)],
            "{}",
            reaper,
        )
        .unwrap_err();
        assert_eq!(e, "hooks.createContainer[0] (sh): the path is not absolute");
        let many = vec![hook("/bin/true", &[], None); MAX_HOOKS + 1];
        let e = run_all(&root, "createContainer", &many, "{}", reaper).unwrap_err();
        assert!(e.contains("at most 64"), "{e}");
    }
}
