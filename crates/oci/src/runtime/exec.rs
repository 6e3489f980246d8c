//! `exec`: another process in a running container, run by the guest agent.
//!
//! In the foreground this process relays the new process's stdio and exits with its
//! code. With `--detach` it starts a copy of itself in the foreground role (with a
//! pty's slave as stdio when the process has a terminal, the master sent to
//! `--console-socket`), waits until the process runs, writes that copy's pid to
//! `--pid-file` and returns: the copy stands for the process on the host, as the
//! monitor stands for the container's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::client::{self, ExecError};
use forkvm_agent_proto::{ProcessSpec, User};

use super::create::write_pid_file;
use super::helper::{self, Report};
use super::{ExecArgs, Global};
use crate::state::StateStore;
use crate::term::ForwardedSignals;

/// Set on the foreground copy that a `--detach` exec starts: where it reports.
const ENV_READY: &str = "FORKVM_RUNTIME_EXEC_READY";

/// `exec`; returns the exit code.
pub fn exec(g: &Global, a: ExecArgs) -> Result<i32> {
    let mut spec = process(&a)?;
    let state = StateStore::open(&g.root)?.load(&a.id)?;
    if !state.process_alive() {
        bail!("cannot exec in a stopped container {}", a.id);
    }
    let uds = state.vsock.clone().context("the container has no VM")?;
    if a.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: host descriptors cannot be passed into a VM");
    }
    if a.detach {
        return detach(g, &a, &spec).map(|()| 0);
    }
    let report = std::env::var_os(ENV_READY).map(PathBuf::from);
    if report.is_some() {
        helper::own_session(spec.tty)?;
    }
    spec.stdin = true;
    // A pod's container (a forked sandbox's too) is one of the containers in its VM.
    let container = state.in_vm_container().then_some(a.id.as_str());
    foreground(&uds, container, &spec, report.as_deref())
}

/// The process to run: `--process` (a runtime spec `process` object), else the command
/// and flags.
fn process(a: &ExecArgs) -> Result<ProcessSpec> {
    if let Some(path) = &a.process {
        let mut spec = crate::bundle::exec_process(path)?;
        spec.tty |= a.tty;
        return Ok(spec);
    }
    if a.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let user = match &a.user {
        None => User::default(),
        Some(u) => {
            let (uid, gid) = match u.split_once(':') {
                Some((u, g)) => (u.parse()?, g.parse()?),
                None => (u.parse()?, 0),
            };
            User {
                uid,
                gid,
                additional_gids: a.additional_gids.clone(),
                name: None,
            }
        }
    };
    Ok(ProcessSpec {
        env: a.env.clone(),
        cwd: a.cwd.clone().unwrap_or_else(|| "/".into()),
        user,
        tty: a.tty,
        stdin: true,
        ..ProcessSpec::new(a.command.clone())
    })
}

fn foreground(
    uds: &Path,
    container: Option<&str>,
    spec: &ProcessSpec,
    report: Option<&Path>,
) -> Result<i32> {
    let signals = ForwardedSignals::block().context("cannot block signals")?;
    // Retried until the agent answers: a container just forked loses connection
    // requests (or has them reset) until its guest has taken its new CID.
    let stream =
        client::wait_for_agent(uds, std::time::Instant::now() + Duration::from_secs(10))
            .with_context(|| format!("cannot reach the container's agent at {}", uds.display()))?;
    let started = match container {
        Some(id) => client::exec_in_container(stream, id, spec),
        None => client::exec(stream, spec),
    };
    let session = match started {
        Ok(s) => s,
        Err(ExecError::ExecFailed { message, exit_code }) => {
            if let Some(path) = report {
                let _ = helper::write_report::<i32>(path, &Report::Error(message));
            } else {
                eprintln!("forkvm-runtime: {message}");
            }
            return Ok(exit_code);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot start the process")),
    };
    let relay = signals.spawn(spec.tty)?;
    let pid = session.pid();
    // The engine resizes the terminal once `exec --detach` returns: report only when
    // the resize has somewhere to go.
    let mut reported = Ok(());
    let code = crate::vm::relay_stdio(session, &relay, spec.tty, true, || {
        if let Some(path) = report {
            reported = helper::write_report(path, &Report::Ok(pid));
        }
    })
    .context("lost the connection to the process")?;
    reported?;
    Ok(code)
}

fn detach(g: &Global, a: &ExecArgs, spec: &ProcessSpec) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("ready");
    let spec_file = dir.path().join("process.json");
    std::fs::write(&spec_file, serde_json::to_vec(&to_oci_process(spec))?)?;
    let spec_arg = spec_file.to_str().context("a temporary path is UTF-8")?;
    let mut cmd = helper::command(g, &["exec", "--process", spec_arg, &a.id])?;
    cmd.env(ENV_READY, &report);
    if spec.tty {
        let socket = a
            .console_socket
            .as_deref()
            .context("a terminal process needs --console-socket with --detach")?;
        helper::give_terminal(&mut cmd, socket)?;
    }
    let mut child = cmd.spawn().context("cannot start the exec process")?;
    let started: Result<i32> = helper::wait_report(
        &report,
        &mut child,
        Duration::from_secs(60),
        ("the exec process", "the process started"),
        String::new,
    );
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    if let Some(p) = &a.pid_file {
        write_pid_file(p, child.id() as i32)?;
    }
    Ok(())
}

/// `spec` as a runtime spec `process` object, for the foreground copy's `--process`.
fn to_oci_process(spec: &ProcessSpec) -> serde_json::Value {
    // Capability names in a set, in capability order.
    let names = |set: u64| {
        let mut caps: Vec<caps::Capability> = caps::all()
            .into_iter()
            .filter(|c| set & c.bitmask() != 0)
            .collect();
        caps.sort_by_key(caps::Capability::index);
        caps.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    serde_json::json!({
        "terminal": spec.tty,
        "user": {
            "uid": spec.user.uid,
            "gid": spec.user.gid,
            "additionalGids": spec.user.additional_gids,
            "umask": spec.umask,
        },
        "capabilities": spec.capabilities.map(|c| serde_json::json!({
            "bounding": names(c.bounding),
            "effective": names(c.effective),
            "permitted": names(c.permitted),
            "inheritable": names(c.inheritable),
            "ambient": names(c.ambient),
        })),
        "noNewPrivileges": spec.no_new_privileges,
        "oomScoreAdj": spec.oom_score_adj,
        "args": spec.args,
        "env": spec.env,
        "cwd": spec.cwd,
        "consoleSize": spec.console_size.map(|[h, w]| serde_json::json!({"height": h, "width": w})),
        "rlimits": spec.rlimits.iter().map(|r| serde_json::json!({"type": r.kind, "soft": r.soft, "hard": r.hard})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_survives_the_trip_through_a_process_file() {
        let spec = ProcessSpec {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=1".into()],
            cwd: "/tmp".into(),
            user: User {
                uid: 1000,
                gid: 100,
                additional_gids: vec![5],
                name: None,
            },
            tty: true,
            stdin: true,
            rlimits: vec![forkvm_agent_proto::Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 10,
                hard: 20,
            }],
            init: false,
            console_size: Some([22, 77]),
            capabilities: Some(forkvm_agent_proto::Capabilities {
                bounding: (1 << 0) | (1 << 21) | (1 << 40),
                effective: 1 << 21,
                permitted: 1 << 21,
                inheritable: 0,
                ambient: 1 << 5,
            }),
            no_new_privileges: true,
            oom_score_adj: Some(-17),
            umask: Some(0o027),
            pid_namespace: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(&f, to_oci_process(&spec).to_string()).unwrap();
        assert_eq!(crate::bundle::exec_process(&f).unwrap(), spec);
    }
}
