//! A Kubernetes pod's containers: made inside the running VM of the pod's sandbox.
//!
//! Under containerd's CRI a pod is one sandbox (its pause container, which boots the
//! pod's VM: [`crate::pod`]) and the pod's containers, each annotated with the
//! sandbox's id ([`crate::bundle::PodRole::Member`]). `create` of such a container
//! boots nothing: it binds the container's root filesystem into the sandbox's pod
//! directory (which the VM shares) and starts the container's **member monitor** (this
//! binary, `__member ID`), which asks the sandbox VM's agent to make the container
//! (`create_container`: its own root, cgroup and mounts, the pod's network and kernel)
//! and reports on [`MEMBER_READY_FILE`]. On `start` the monitor runs the process in the
//! container (`in_container` exec) and relays its stdio until it exits, then exits
//! with its exit code, as a container's monitor does: it is the container's process on
//! the host, what the shim waits for. Signals go to the process through the agent.
//! `delete` has the agent destroy the container (its processes, mounts and cgroup) and
//! unbinds its root; the VM runs on with the rest of the pod.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::client::{self, ExecError};
use forkvm_agent_proto::{ContainerRoot, PidNamespace, Request, Response};
use serde::{Deserialize, Serialize};

use super::create::{
    abandon, bind_start_socket, monitor_namespaces, run_create_hooks, wait_for_go, wait_for_start,
    write_pid_file, Started, MONITOR_LOG,
};
use super::helper::{self, Report};
use super::{CreateArgs, Global, Log, MonitorArgs};
use crate::bundle::{ContainerPlan, PodRole};
use crate::pod;
use crate::state::{ContainerState, StateStore, Status};
use crate::term::ForwardedSignals;
use crate::vm;

/// The member monitor's report to `create`, in the container's directory.
pub const MEMBER_READY_FILE: &str = "member-ready.json";

/// How long a request to the sandbox VM's agent about a member may take.
const AGENT_CALL: Duration = Duration::from_secs(30);

/// What the member monitor reports once the agent made the container.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MemberReady {
    /// The pod VM's vsock socket.
    vsock: PathBuf,
}

/// The sandbox of the pod's container `id`, as it must be for a container to join it:
/// a pod sandbox whose VM runs.
fn running_sandbox(store: &StateStore, sandbox: &str, id: &str) -> Result<ContainerState> {
    let sb = store.load(sandbox).with_context(|| {
        format!("container {id} belongs to pod sandbox {sandbox}, which this runtime does not have")
    })?;
    if !sb.is_pod_sandbox() {
        bail!("container {sandbox}, named as the pod sandbox of {id}, is not a pod sandbox");
    }
    if !sb.process_alive() || !matches!(sb.status, Status::Created | Status::Running) {
        bail!(
            "the pod sandbox {sandbox} of container {id} is not running ({})",
            sb.status
        );
    }
    Ok(sb)
}

/// `create` of a pod's container of `sandbox`: `plan` is the checked bundle.
pub fn create(
    g: &Global,
    log: &Log,
    a: &CreateArgs,
    bundle: &Path,
    plan: &ContainerPlan,
    sandbox: &str,
) -> Result<()> {
    let store = StateStore::open(&g.root)?;
    let sb = running_sandbox(&store, sandbox, &a.id)?;
    let uds = sb.vsock.clone().context("the pod sandbox has no VM")?;
    let sandbox_pid = sb.pid.context("the pod sandbox has no process")?;
    // The pod's network namespace: the engine's the sandbox's VM joined, or its
    // monitor's own.
    let sandbox_netns = match crate::bundle::load(&sb.bundle)?.network {
        crate::bundle::NetworkPlan::Join(path) => path,
        crate::bundle::NetworkPlan::New | crate::bundle::NetworkPlan::Host => {
            format!("/proc/{sandbox_pid}/ns/net").into()
        }
    };
    let mut state = ContainerState::new(&a.id, bundle);
    state.annotations = plan.annotations.clone();
    state.hooks = plan.hooks.clone();
    store.create(&state)?;
    let dir = store.container_dir(&a.id)?;
    let pod = pod::pod_dir(store.root(), sandbox);
    let mut monitor = None;
    let result = create_in(
        g,
        a,
        plan,
        &dir,
        &store,
        &pod,
        (&uds, sandbox_pid, &sandbox_netns),
        &mut monitor,
    );
    if result.is_err() {
        abandon(&store, &state, plan, monitor, || {
            destroy_in_guest(&uds, &a.id, log);
            pod::unbind_member_root(&pod, &a.id);
        });
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn create_in(
    g: &Global,
    a: &CreateArgs,
    plan: &ContainerPlan,
    dir: &Path,
    store: &StateStore,
    pod: &Path,
    (uds, sandbox_pid, sandbox_netns): (&Path, i32, &Path),
    monitor: &mut Option<Child>,
) -> Result<()> {
    pod::bind_member_root(pod, &a.id, &plan.rootfs)
        .context("cannot give the pod's VM the container's root filesystem")?;
    // The monitor waits for "go" on this pipe: the host hooks run first.
    let (go_rx, mut go_tx) = std::io::pipe().context("cannot make a pipe")?;
    let go_fd = go_rx.as_raw_fd();
    let mut cmd = helper::command(g, &["__member", &a.id, "--go-fd", &go_fd.to_string()])?;
    if plan.process.tty {
        let socket = a.console_socket.as_deref().context("no --console-socket")?;
        helper::give_terminal(&mut cmd, socket)?;
    }
    // Hooks see what runc shows them of a pod's container: the pod's network, UTS and
    // IPC namespaces (the sandbox monitor's, which its VM has), a mount namespace of its
    // own.
    let namespaces = [
        (sandbox_netns.to_owned(), libc::CLONE_NEWNET),
        (
            format!("/proc/{sandbox_pid}/ns/uts").into(),
            libc::CLONE_NEWUTS,
        ),
        (
            format!("/proc/{sandbox_pid}/ns/ipc").into(),
            libc::CLONE_NEWIPC,
        ),
    ]
    .map(|(path, kind): (PathBuf, _)| {
        std::fs::File::open(&path)
            .with_context(|| format!("cannot open the pod sandbox's namespace {}", path.display()))
            .map(|f| (OwnedFd::from(f), kind))
    });
    let mut join = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        join.push(ns?);
    }
    let borrowed: Vec<_> = join.iter().map(|(f, k)| (f.as_fd(), *k)).collect();
    monitor_namespaces(&mut cmd, &[go_fd], &borrowed, libc::CLONE_NEWNS);
    let child = monitor.insert(
        cmd.spawn()
            .context("cannot start the monitor of the pod's container")?,
    );
    drop(go_rx);
    drop(join);
    let pid = child.id() as i32;
    run_create_hooks(store, &a.id, plan, pid)?;
    give_files_to_pod(pod, &a.id, plan)?;
    go_tx
        .write_all(b"go")
        .context("the monitor of the pod's container ended before its hooks ran")?;
    drop(go_tx);
    let _: MemberReady = helper::wait_report(
        &dir.join(MEMBER_READY_FILE),
        child,
        vm::AGENT_DEADLINE,
        (
            "the monitor of the pod's container",
            "the container was made in the pod's VM",
        ),
        || forkvm_registry::tail(&dir.join(MONITOR_LOG), 10),
    )?;
    if let Some(pid_file) = &a.pid_file {
        write_pid_file(pid_file, pid)?;
    }
    store.update(&a.id, |s| {
        s.record_pid(pid)?;
        s.vsock = Some(uds.to_owned());
        s.transition(Status::Created)
    })?;
    Ok(())
}

/// Gives the pod's VM what container `id` binds, as the hooks left it: its bound files
/// copied into the pod directory `pod`, its volumes bound there.
pub(super) fn give_files_to_pod(pod: &Path, id: &str, plan: &ContainerPlan) -> Result<()> {
    // The bound files as the hooks left them, copied into the pod directory.
    for (i, file) in plan.files.iter().enumerate() {
        pod::copy_member_file(pod, id, i, &file.source).with_context(|| {
            format!(
                "mount {}: cannot copy {} into the pod's VM",
                file.destination.display(),
                file.source.display()
            )
        })?;
    }
    // Its volumes as the hooks left them, bound into the pod directory.
    for (i, volume) in plan.volumes.iter().enumerate() {
        pod::bind_member_volume(pod, id, i, volume).with_context(|| {
            format!(
                "mount {}: cannot share {} into the pod's VM",
                volume.target,
                volume.host.display()
            )
        })?;
    }
    Ok(())
}

/// Points the filesystems of container `id` of the pod at what [`give_files_to_pod`]
/// put in the pod share: its bound files' copies and its volumes, in the spec's order.
pub(super) fn filesystems_in_pod(plan: &mut ContainerPlan, id: &str) -> Result<()> {
    for m in plan.filesystems.iter_mut().filter(|m| m.fs_type == "file") {
        m.source = pod::member_file_source(id, &m.source)
            .with_context(|| format!("mount {}: not a bound file's copy", m.destination))?;
    }
    let mut volumes = plan.volumes.iter().enumerate();
    for m in plan
        .filesystems
        .iter_mut()
        .filter(|m| m.fs_type == "virtiofs")
    {
        let (i, volume) = volumes
            .next()
            .with_context(|| format!("mount {}: not one of the volumes", m.destination))?;
        m.source = format!(
            "{}/{}",
            pod::POD_SHARE_TAG,
            pod::member_volume(id, i, volume)
        );
    }
    Ok(())
}

/// The member monitor: returns its exit code (the container process's).
pub fn monitor(g: &Global, log: &Log, a: &MonitorArgs) -> i32 {
    helper::monitor_process::<MemberReady>(
        g,
        log,
        &a.id,
        MEMBER_READY_FILE,
        |store, dir, reported| {
            wait_for_go(a.go_fd).and_then(|()| run_monitor(store, dir, &a.id, reported))
        },
    )
}

/// `request`, for container `id` in the pod's VM.
/// The PID namespace in the pod's VM of the pod's container `id` that names one by
/// `path` (`/proc/PID/ns/pid`): its sandbox's (containerd's `POD` mode, for
/// `shareProcessNamespace`), or that of the pod's container whose pid it is (`TARGET`
/// mode, `kubectl debug --target`). The sandbox of a pod forked from a template is one
/// of its VM's app containers, not its boot container. A pid of no container of the
/// pod: the guest's, with a warning.
fn shared_pid_namespace(
    store: &StateStore,
    sb: &ContainerState,
    sandbox: &str,
    path: Option<&Path>,
    id: &str,
) -> Option<PidNamespace> {
    let sandboxs = || match sb.pod_template {
        Some(_) => PidNamespace::Container(sandbox.to_owned()),
        None => PidNamespace::Sandbox,
    };
    let pid = path.and_then(|p| {
        let rest = p.strip_prefix("/proc").ok()?;
        let mut parts = rest.iter();
        let pid = parts.next()?.to_str()?.parse::<i32>().ok()?;
        (parts.next()? == "ns").then_some(pid)
    });
    let Some(pid) = pid.filter(|&p| Some(p) != sb.pid) else {
        return Some(sandboxs());
    };
    let target = store.list().ok().and_then(|all| {
        all.into_iter().find(|c| {
            c.id != id
                && c.pid == Some(pid)
                && c.pod_sandbox() == Some(sandbox)
                && c.process_alive()
        })
    });
    match target {
        Some(c) => Some(PidNamespace::Container(c.id)),
        None => {
            tracing::warn!(
                "container {id}'s pid namespace {} is no container's of its pod: it has the \
                 pod VM's",
                path.map_or(String::new(), |p| p.display().to_string())
            );
            None
        }
    }
}

pub(super) fn in_container(id: &str, request: Request) -> Request {
    Request::InContainer {
        id: id.to_owned(),
        request: Box::new(request),
    }
}

fn run_monitor(store: &StateStore, dir: &Path, id: &str, reported: &mut bool) -> Result<i32> {
    let signals = ForwardedSignals::block().context("cannot block signals")?;
    let state = store.load(id)?;
    let mut plan = crate::bundle::load(&state.bundle)?;
    let Some(PodRole::Member { sandbox }) = plan.pod.clone() else {
        bail!("container {id} is not a pod's container");
    };
    // Its bound files and volumes are in the pod share, not in shares of their own.
    filesystems_in_pod(&mut plan, id)?;
    let sb = running_sandbox(store, &sandbox, id)?;
    let uds = sb.vsock.clone().context("the pod sandbox has no VM")?;
    if plan.process.pid_namespace == Some(PidNamespace::Sandbox) {
        plan.process.pid_namespace =
            shared_pid_namespace(store, &sb, &sandbox, plan.pod_pid_path.as_deref(), id);
    }
    let tty = plan.process.tty;
    helper::own_session(tty)?;
    let relay = signals.spawn(tty)?;
    let mut stream = client::wait_for_agent(&uds, Instant::now() + Duration::from_secs(30))
        .with_context(|| format!("cannot reach the pod VM's agent at {}", uds.display()))?;
    match plan.volumes.is_empty() {
        true => vm::require_agent_version(&mut stream, 11, "a pod's containers")?,
        false => vm::require_agent_version(&mut stream, 12, "a pod's container's volumes")?,
    }
    let (root, _) = pod::member_root(Path::new(""), id);
    let wrap = |r: Option<Request>| r.map(|r| in_container(id, r));
    // The container's root, then as a container's VM gets them: its cgroup, its
    // filesystems in order, the rest of the spec around its createContainer hooks.
    let create_hooks = (!plan.guest_hooks.create_container.is_empty()).then(|| Request::Hooks {
        kind: "createContainer".into(),
        hooks: plan.guest_hooks.create_container.clone(),
        state: state.to_runtime_spec_json().to_string(),
    });
    let (container, settings) = match create_hooks {
        Some(_) => (plan.devices_request(), plan.settings_request()),
        None => (plan.container_request(), None),
    };
    vm::configure_guest(
        &mut stream,
        [
            (
                "the container's root",
                Some(Request::CreateContainer {
                    id: id.to_owned(),
                    root: ContainerRoot {
                        share: Some(pod::POD_SHARE_TAG.to_owned()),
                        path: root,
                    },
                }),
            ),
            ("its cgroup", wrap(Some(plan.cgroup_request()))),
            ("its filesystems", wrap(plan.filesystems_request())),
            (
                "its user namespace, devices, kernel parameters, masked and read-only paths",
                wrap(container),
            ),
            ("its createContainer hooks", wrap(create_hooks)),
            (
                "its kernel parameters, masked and read-only paths",
                wrap(settings),
            ),
        ],
    )?;
    let listener = bind_start_socket(dir)?;
    helper::write_report(
        &dir.join(MEMBER_READY_FILE),
        &Report::Ok(MemberReady { vsock: uds.clone() }),
    )
    .context("cannot report the container made")?;
    *reported = true;
    let sandbox_gone = || !sb.process_alive();
    let mut conn = match wait_for_start(&listener, &relay, &sandbox_gone)? {
        Started::Conn(conn) => conn,
        Started::Killed(sig) => return Ok(128 + sig),
    };
    let start_hooks = (!plan.guest_hooks.start_container.is_empty()).then(|| Request::Hooks {
        kind: "startContainer".into(),
        hooks: plan.guest_hooks.start_container.clone(),
        state: state.to_runtime_spec_json().to_string(),
    });
    if let Err(e) = vm::configure_guest(
        &mut stream,
        [("its startContainer hooks", wrap(start_hooks))],
    ) {
        let _ = writeln!(conn, "error {}", format!("{e:#}").replace('\n', " "));
        return Ok(1);
    }
    let session = match client::exec_in_container(stream, id, &plan.process) {
        Ok(session) => {
            writeln!(conn, "ok {}", session.pid())?;
            session
        }
        Err(ExecError::ExecFailed { message, exit_code }) => {
            let _ = writeln!(conn, "error {}", message.replace('\n', " "));
            return Ok(exit_code);
        }
        Err(e) => {
            let _ = writeln!(conn, "error cannot start the process: {e}");
            return Err(anyhow::Error::new(e).context("cannot start the process"));
        }
    };
    drop(conn);
    vm::relay_stdio(session, &relay, tty, true, || ())
        .context("lost the connection to the container's process")
}

/// Sends `sig` to the started process of the pod's container `state` through its pod
/// VM's agent.
pub fn signal(state: &ContainerState, sig: i32) -> Result<()> {
    let (Some(uds), Some(guest_pid)) = (&state.vsock, state.guest_pid) else {
        bail!("container {} has no started process to signal", state.id);
    };
    let req = in_container(
        &state.id,
        Request::Signal {
            pid: guest_pid,
            signal: sig,
        },
    );
    super::ops::signal_in_guest(uds, &state.id, &req, AGENT_CALL)
}

/// Has the agent behind `uds` destroy container `id` (its processes, mounts and
/// cgroup), if it can be reached; what fails is logged. One still being made (by a
/// monitor just killed) is waited for, a few seconds at most.
fn destroy_in_guest(uds: &Path, id: &str, log: &Log) {
    let destroy = || {
        vm::agent_call(
            uds,
            &Request::DestroyContainer { id: id.to_owned() },
            AGENT_CALL,
        )
        .map_err(|e| format!("{e:#}"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        match destroy() {
            Ok(Response::Error { message })
                if message.contains("being made") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other,
        }
    };
    match answer {
        Ok(Response::Ok) => {}
        Ok(Response::Error { message }) if message.contains("no container") => {}
        Ok(other) => log.warn(&format!(
            "the pod VM's agent answered the destruction of {id} with {other:?}"
        )),
        Err(e) => log.warn(&format!("cannot have the pod VM destroy {id}: {e}")),
    }
}

/// What `delete` does for the pod's container `state` (its process already gone):
/// the container destroyed in the VM, its root unbound from the pod directory.
pub fn remove(store: &StateStore, log: &Log, state: &ContainerState, sandbox: &str) {
    if let Some(uds) = &state.vsock {
        destroy_in_guest(uds, &state.id, log);
    }
    pod::unbind_member_root(&pod::pod_dir(store.root(), sandbox), &state.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's state: its sandbox `sb` (pid 7) and a running container `target` of it
    /// (this process's pid), and one of another pod (same pid, to be ignored).
    fn pod(forked: bool) -> (tempfile::TempDir, StateStore, ContainerState) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut sb = ContainerState::new("sb", "/b");
        sb.pid = Some(7);
        if forked {
            sb.pod_template = Some("/tpl".into());
        }
        let me = std::process::id() as i32;
        for (id, sandbox) in [("other-pod", "elsewhere"), ("target", "sb")] {
            let mut c = ContainerState::new(id, "/b");
            c.annotations = [
                (
                    crate::bundle::CRI_CONTAINER_TYPE.to_owned(),
                    "container".to_owned(),
                ),
                (crate::bundle::CRI_SANDBOX_ID.to_owned(), sandbox.to_owned()),
            ]
            .into();
            c.record_pid(me).unwrap();
            store.create(&c).unwrap();
        }
        (dir, store, sb)
    }

    #[test]
    fn a_pid_namespace_by_path_is_the_sandboxs_or_the_targets_in_the_pod() {
        let (_dir, store, sb) = pod(false);
        let shared =
            |path: &str| shared_pid_namespace(&store, &sb, "sb", Some(Path::new(path)), "c");
        assert_eq!(shared("/proc/7/ns/pid"), Some(PidNamespace::Sandbox));
        let me = std::process::id();
        assert_eq!(
            shared(&format!("/proc/{me}/ns/pid")),
            Some(PidNamespace::Container("target".into()))
        );
        // No container of the pod has that pid: the pod VM's own.
        assert_eq!(shared("/proc/999999999/ns/pid"), None);
        // A path it cannot read a pid from is taken for the sandbox's.
        assert_eq!(shared("/run/netns/x"), Some(PidNamespace::Sandbox));
        // A forked pod's sandbox is one of its VM's containers.
        let (_dir, store, sb) = pod(true);
        assert_eq!(
            shared_pid_namespace(&store, &sb, "sb", Some(Path::new("/proc/7/ns/pid")), "c"),
            Some(PidNamespace::Container("sb".into()))
        );
    }
}
