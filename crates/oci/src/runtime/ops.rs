//! The short verbs: `start`, `state`, `kill`, `delete`, `ps`, `list`, `pause`,
//! `resume`, `features`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::{Request, Response};

use super::create::{remove_vm, remove_vm_of, request_start};
use super::{DeleteArgs, EventsArgs, Global, KillArgs, ListArgs, Log, PsArgs};
use crate::hooks;
use crate::state::{ContainerState, StateStore, Status};

/// How long `delete --force` waits for a killed container to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

fn store(g: &Global) -> Result<StateStore> {
    Ok(StateStore::open(&g.root)?)
}

/// `start`.
pub fn start(g: &Global, id: &str) -> Result<()> {
    let store = store(g)?;
    let state = store.load(id)?;
    match state.status {
        Status::Created => {}
        Status::Running => bail!("container {id} is already running"),
        other => bail!("cannot start a container that is {other}"),
    }
    let dir = store.container_dir(id)?;
    let guest_pid = request_start(&dir)?;
    let state = store.update(id, |s| {
        s.guest_pid = Some(guest_pid);
        // A process that is already done leaves the container stopped, not running.
        if s.status == Status::Created {
            s.transition(Status::Running)?;
        }
        Ok(s.clone())
    })?;
    hooks::run_all_logged(
        "poststart",
        &state.hooks.poststart,
        &state.to_runtime_spec_json(),
    );
    Ok(())
}

/// `state`.
pub fn state(g: &Global, id: &str) -> Result<()> {
    let state = store(g)?.load(id)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&state.to_runtime_spec_json())?
    );
    Ok(())
}

/// A signal from its number or name (`9`, `KILL`, `SIGKILL`, case-insensitive).
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {n} is out of range");
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => bail!("unknown signal {s:?}"),
    };
    Ok(n)
}

/// Sends `sig` to the host process `pid`.
fn signal_host(pid: i32, sig: i32) -> std::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or(std::io::ErrorKind::InvalidInput)?;
    let sig =
        rustix::process::Signal::from_named_raw(sig).ok_or(std::io::ErrorKind::InvalidInput)?;
    rustix::process::kill_process(pid, sig)?;
    Ok(())
}

/// Sends `sig` to the container's process. A container with a monitor gets it through
/// the monitor, which forwards it into the guest; a forked container (its host process
/// is a VMM) gets it through its agent. SIGKILL ends the VM at once.
pub fn signal_container(state: &ContainerState, sig: i32) -> Result<()> {
    let pid = match state.pid {
        Some(pid) if state.status != Status::Stopped && state.process_alive() => pid,
        _ => bail!("container {} not running", state.id),
    };
    // A pod's container: its process is in the pod's VM, which runs on (signalled there
    // once started; its monitor alone before that).
    if state.pod_sandbox().is_some() && state.guest_pid.is_some() {
        return match super::member::signal(state, sig) {
            // A VM that does not answer does not keep a container from being killed:
            // its monitor goes, the container in the VM when it is deleted.
            Err(e) if sig == libc::SIGKILL => {
                tracing::warn!("{e:#}: killing the container's monitor");
                signal_host(pid, sig)
                    .with_context(|| format!("cannot signal the container's monitor {pid}"))
            }
            r => r,
        };
    }
    if sig == libc::SIGKILL || state.parent.is_none() {
        let Some(monitor) = state.monitor_pid else {
            return signal_host(pid, sig)
                .with_context(|| format!("cannot signal the container's process {pid}"));
        };
        // A holder: SIGKILL ends it as it ends runc's container process (its exit is
        // the engine's to see as a kill), then the monitor, which would end with it;
        // other signals are the monitor's to forward.
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if sig == libc::SIGKILL && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        };
        if sig == libc::SIGKILL {
            gone(signal_host(pid, sig))
                .with_context(|| format!("cannot kill the container's process {pid}"))?;
        }
        if !state.monitor_alive() {
            return match sig {
                libc::SIGKILL => Ok(()),
                _ => bail!("container {}'s monitor {monitor} is gone", state.id),
            };
        }
        return gone(signal_host(monitor, sig))
            .with_context(|| format!("cannot signal the container's monitor {monitor}"));
    }
    let (Some(uds), Some(guest_pid)) = (&state.vsock, state.guest_pid) else {
        bail!("container {} has no agent to signal", state.id);
    };
    let signal = Request::Signal {
        pid: guest_pid,
        signal: sig,
    };
    signal_in_guest(uds, &state.id, &signal, Duration::from_secs(5))
}

/// Has the agent behind `uds` deliver `signal` (a `Signal` request, or one wrapped for a
/// pod's container) for container `id`.
pub(super) fn signal_in_guest(
    uds: &std::path::Path,
    id: &str,
    signal: &Request,
    timeout: Duration,
) -> Result<()> {
    match crate::vm::agent_call(uds, signal, timeout)
        .with_context(|| format!("cannot reach the agent of container {id}"))?
    {
        Response::Error { message } => bail!("the agent refused the signal: {message}"),
        _ => Ok(()),
    }
}

/// `kill`.
pub fn kill(g: &Global, a: &KillArgs) -> Result<()> {
    let sig = parse_signal(&a.signal)?;
    let state = store(g)?.load(&a.id)?;
    // `--all`: every process of the container lives in its VM, which the container's
    // process holds; signalling it reaches them all when it is fatal.
    signal_container(&state, sig)
}

/// `delete`.
pub fn delete(g: &Global, log: &Log, a: &DeleteArgs) -> Result<()> {
    let store = store(g)?;
    let state = store.load(&a.id)?;
    if state.process_alive() {
        match state.status {
            Status::Running if !a.force => bail!(
                "cannot delete container {} that is not stopped: running",
                a.id
            ),
            _ => {
                signal_container(&state, libc::SIGKILL)?;
                // The holder, then the monitor (its VM process follows it).
                let running = || state.process_alive() || state.monitor_alive();
                if !forkvm_registry::liveness::wait_gone(KILL_WAIT, running) {
                    bail!("container {} did not stop within {KILL_WAIT:?}", a.id);
                }
            }
        }
    }
    // A holder killed from outside: its monitor follows it (and its VM the monitor);
    // nothing of theirs is removed before it is gone.
    if let Some(monitor) = state.monitor_pid.filter(|_| state.monitor_alive()) {
        let _ = signal_host(monitor, libc::SIGKILL);
        if !forkvm_registry::liveness::wait_gone(KILL_WAIT, || state.monitor_alive()) {
            bail!(
                "container {}'s monitor {monitor} did not stop within {KILL_WAIT:?}",
                a.id
            );
        }
    }
    match (state.pod_sandbox(), state.vm_location()) {
        (Some(sandbox), _) => super::member::remove(&store, log, &state, sandbox),
        (None, Some((root, id))) => remove_vm(&root, id),
        (None, None) => remove_vm_of(&store.container_dir(&a.id)?),
    }
    // A pod's sandbox: its pod directory, with any container root still bound in it.
    if state.is_pod_sandbox() {
        crate::pod::release(store.root(), &a.id);
    }
    let mut stopped = state.clone();
    stopped.status = Status::Stopped;
    hooks::run_all_logged(
        "poststop",
        &state.hooks.poststop,
        &stopped.to_runtime_spec_json(),
    );
    if let Err(e) = store.remove(&a.id) {
        log.warn(&format!("removing container {}: {e}", a.id));
        return Err(e.into());
    }
    Ok(())
}

/// `ps`.
pub fn ps(g: &Global, a: &PsArgs) -> Result<()> {
    let state = store(g)?.load(&a.id)?;
    let pids: Vec<i32> = state
        .pid
        .filter(|_| state.process_alive())
        .into_iter()
        .collect();
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID\tCMD");
            for pid in pids {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                println!("{pid}\t{}", cmd.trim());
            }
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
    Ok(())
}

/// `events --stats`: what the container uses, from its cgroup in the guest, printed as
/// runc prints it (one JSON event of type `stats`; CPU times in ns, an absent limit as
/// runc has it: memory `u64::MAX`, tasks 0).
pub fn events(g: &Global, a: &EventsArgs) -> Result<()> {
    if !a.stats {
        bail!("events: only --stats is supported (no stream of events)");
    }
    let state = store(g)?.load(&a.id)?;
    if state.status == Status::Stopped || !state.process_alive() {
        bail!("container {} is not running", a.id);
    }
    let uds = state
        .vsock
        .as_deref()
        .with_context(|| format!("container {} has no VM agent to ask", a.id))?;
    let req = match state.in_vm_container() {
        true => super::member::in_container(&a.id, Request::Stats),
        false => Request::Stats,
    };
    let usage = match crate::vm::agent_call(uds, &req, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the agent of container {}", a.id))?
    {
        Response::Stats { usage } => usage,
        // The guest's words, bounded (they reach the engine's log).
        Response::Error { message } => bail!(
            "the guest could not say what container {} uses: {}",
            a.id,
            clipped(&message)
        ),
        other => bail!(
            "the guest agent answered the request for stats with {}",
            clipped(&format!("{other:?}"))
        ),
    };
    println!("{}", serde_json::to_string(&runc_stats(&a.id, &usage))?);
    Ok(())
}

/// At most the first 200 characters of `text`, marked when cut.
fn clipped(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// `usage` as runc's `events --stats` event.
fn runc_stats(id: &str, usage: &forkvm_agent_proto::ResourceUse) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": usage.cpu_usec.saturating_mul(1000),
                    "user": usage.cpu_user_usec.saturating_mul(1000),
                    "kernel": usage.cpu_system_usec.saturating_mul(1000),
                },
                "throttling": {},
            },
            "memory": {
                "usage": {
                    "usage": usage.memory_bytes,
                    "limit": usage.memory_limit.unwrap_or(u64::MAX),
                },
                "cache": usage.memory_file,
                "raw": {
                    "anon": usage.memory_anon,
                    "file": usage.memory_file,
                    "inactive_file": usage.memory_inactive_file,
                },
            },
            "pids": {
                "current": usage.tasks,
                "limit": usage.tasks_limit.unwrap_or(0),
            },
        },
    })
}

/// `list`.
pub fn list(g: &Global, a: &ListArgs) -> Result<()> {
    let states = store(g)?.list()?;
    if a.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(());
    }
    match a.format.as_str() {
        "json" => {
            let all: Vec<_> = states.iter().map(|s| s.to_runtime_spec_json()).collect();
            println!("{}", serde_json::to_string(&all)?);
        }
        "table" => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} {:<32} PARENT",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                let pid = match s.status {
                    Status::Stopped => 0,
                    _ => s.pid.unwrap_or(0),
                };
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {:<32} {}",
                    s.id,
                    pid,
                    s.status.as_str(),
                    s.bundle.display(),
                    s.created_rfc3339(),
                    s.parent.as_deref().unwrap_or("")
                );
            }
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
    Ok(())
}

/// `pause` (`pause` true) and `resume`: the whole VM, through its forkvm API.
pub fn pause(g: &Global, id: &str, pause: bool) -> Result<()> {
    let state = store(g)?.load(id)?;
    if !state.process_alive() {
        bail!("container {id} not running");
    }
    if let Some(sandbox) = state.pod_sandbox() {
        bail!(
            "container {id} cannot be paused alone: it runs in the VM of its pod sandbox \
             {sandbox}, which pauses the whole pod"
        );
    }
    let home = vm_home(&state)?;
    let client = forkvm_api::Client::new(home.socket_path());
    if pause {
        client.pause()?;
    } else {
        client.resume()?;
    }
    Ok(())
}

/// The container's VM home.
pub fn vm_home(state: &ContainerState) -> Result<forkvm_registry::VmHome> {
    let (root, id) = state
        .vm_location()
        .context("the container has no VM recorded")?;
    forkvm_registry::VmHome::open(&root, id).with_context(|| {
        format!(
            "cannot find container {}'s VM at {}",
            state.id,
            root.join(id).display()
        )
    })
}

/// `features`: the runtime spec's features document.
pub fn features() -> Result<()> {
    let doc = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": crate::state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "private", "rprivate"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false}
        },
        "annotations": {
            "org.opencontainers.runtime-spec.features.vm": "true",
            "io.forkvm.runtime.version": super::VERSION
        }
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_printed_as_runc_prints_them() {
        let usage = forkvm_agent_proto::ResourceUse {
            cpu_usec: 1500,
            cpu_user_usec: 1000,
            cpu_system_usec: 500,
            memory_bytes: 4096,
            memory_limit: None,
            memory_anon: 1024,
            memory_file: 2048,
            memory_inactive_file: 512,
            tasks: 3,
            tasks_limit: Some(64),
        };
        let v = runc_stats("c1", &usage);
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], "c1");
        let d = &v["data"];
        assert_eq!(d["cpu"]["usage"]["total"], 1_500_000);
        assert_eq!(d["cpu"]["usage"]["user"], 1_000_000);
        assert_eq!(d["cpu"]["usage"]["kernel"], 500_000);
        assert_eq!(d["memory"]["usage"]["usage"], 4096);
        assert_eq!(d["memory"]["usage"]["limit"], u64::MAX);
        assert_eq!(d["memory"]["raw"]["inactive_file"], 512);
        assert_eq!(d["memory"]["cache"], 2048);
        assert_eq!(d["pids"]["current"], 3);
        assert_eq!(d["pids"]["limit"], 64);
    }

    #[test]
    fn signals_by_number_and_name() {
        assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("SIGNOPE")
            .unwrap_err()
            .to_string()
            .contains("SIGNOPE"));
    }
}
