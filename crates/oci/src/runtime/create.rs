//! `create` and the container's monitor process.
//!
//! `create` checks the bundle and spawns the monitor (this binary, `__monitor ID`) with
//! the caller's stdio (or a pty's slave, the master sent to `--console-socket`), in the
//! namespaces the bundle lists: mount, UTS, IPC and network namespaces new or joined by
//! path, the runtime's own where the type is not listed, and a pid namespace joined by
//! path; in a mount namespace of its own the container's root is
//! mounted over `/`, so that an engine joining it finds the container's files. Where
//! the bundle lists pid, cgroup or user namespaces without a path, `create` starts the
//! container's holder too ([`super::holder`]), in the monitor's namespaces and those:
//! the state's `pid` is then the holder's, else the monitor's. `create` then runs the
//! bundle's `prestart` and `createRuntime` hooks with that pid (Docker's network hook
//! moves the container's veth into the monitor's namespace this way, and rewrites the
//! container's `resolv.conf`), prepares the root ([`crate::rootfs`]) and tells the monitor to go on. The monitor ties
//! the namespace's interfaces to TAPs, starts its own session, boots the VM, waits for
//! the agent, then binds `start.sock` in the container's directory and reports on
//! [`READY_FILE`]; `create` waits for that report, writes `--pid-file` and returns. On
//! `start` the monitor has the agent run the process and relays its stdio until it
//! exits, then exits with its exit code (handed to the holder, which exits with it):
//! the monitor is the container's process on the host. An engine's namespace with no interface at `create` may get its interfaces
//! before `start` (engines that set the network up after `create` returns), and a VM
//! takes its NICs when it boots: then the monitor reports at once and boots the VM at
//! `start`, after reading the namespace again. A create that fails leaves no state, VM
//! or process behind (and runs the `poststop` hooks).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::client::{self, ExecError};
use forkvm_agent_proto::{ProcessSpec, Request};
use forkvm_registry::{ProcessIdentity, VmHome};
use serde::{Deserialize, Serialize};

use super::helper::{self, Report};
use super::holder::{Holder, MonitorLink};
use super::{CreateArgs, Global, Log, MonitorArgs};
use crate::bundle::{self, NetworkPlan};
use crate::hooks;
use crate::state::{validate_id, ContainerState, StateStore, Status};
use crate::term::{ForwardedSignals, SignalRelay};
use crate::vm::{self, Outcome};

/// The monitor's report to `create`, in the container's directory.
pub const READY_FILE: &str = "ready.json";
/// The socket `start` connects to, in the container's directory.
pub const START_SOCKET: &str = "start.sock";
/// The monitor's own log when the runtime has no `--log`.
pub const MONITOR_LOG: &str = "monitor.log";
/// Under the container's state directory: its volumes' shares, each a directory holding
/// the volume bound in the monitor's mount namespace ([`vm::bind_volume_shares`]).
const VOLUMES_DIR: &str = "volumes";
/// Exit code of a monitor whose VM failed (the process's code is unknown).
pub const EXIT_VM_FAILED: i32 = 255;

/// What the monitor reports once the VM's agent answers (or, when the engine's network
/// namespace has no interface yet, before the VM boots at `start`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ready {
    /// The forkvm VM's id.
    pub vm_id: String,
    /// The forkvm VM root it is registered under.
    pub vm_root: PathBuf,
    /// The VM's vsock socket.
    pub vsock: PathBuf,
}

/// `create`.
pub fn create(g: &Global, log: &Log, a: CreateArgs) -> Result<()> {
    validate_id(&a.id)?;
    if a.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: host descriptors cannot be passed into a VM");
    }
    let bundle = std::path::absolute(a.bundle.clone().unwrap_or_else(|| ".".into()))?;
    // Everything that can be refused is refused before anything exists.
    let mut plan = bundle::load(&bundle)?;
    // The host's own network namespace by path (Docker's --network host hands
    // `/var/run/docker/netns/default` over) is the host's network: its interfaces are
    // never tied to a VM.
    if let NetworkPlan::Join(netns) = &plan.network {
        if forkvm_net::is_own_netns(netns)
            .with_context(|| format!("cannot join the network of {}", netns.display()))?
        {
            plan.warnings.push(format!(
                "linux.namespaces[network].path ({}) is the runtime's own network namespace: {}",
                netns.display(),
                bundle::HOST_NETWORK
            ));
            plan.network = NetworkPlan::Host;
        }
    }
    for w in &plan.warnings {
        log.warn(w);
    }
    if plan.process.tty && a.console_socket.is_none() {
        bail!("process.terminal is true but no --console-socket was given");
    }
    if a.pod_template.is_some() && plan.network == NetworkPlan::Host {
        bail!(
            "--pod-template: the pod is on the host's network (no network namespace), and a \
             pod template's VM has a NIC for the pod's network: boot such a pod instead"
        );
    }
    let pod_template = match (&plan.pod, &a.pod_template) {
        (_, None) => None,
        (Some(bundle::PodRole::Sandbox), Some(dir)) => Some(check_pod_template(dir)?),
        (Some(bundle::PodRole::Member { .. }), Some(_)) => {
            tracing::debug!(
                "a pod's container is made in its sandbox's VM: --pod-template ignored"
            );
            None
        }
        (None, Some(_)) => bail!(
            "--pod-template forks a Kubernetes pod sandbox's VM; container {} is not a pod's \
             sandbox (annotation {}: sandbox)",
            a.id,
            bundle::CRI_CONTAINER_TYPE
        ),
    };
    if let Some(bundle::PodRole::Member { sandbox }) = &plan.pod {
        return super::member::create(g, log, &a, &bundle, &plan, sandbox);
    }
    let store = StateStore::open(&g.root)?;
    let mut state = ContainerState::new(&a.id, &bundle);
    state.annotations = plan.annotations.clone();
    state.hooks = plan.hooks.clone();
    state.pod_template = pod_template;
    state.host_network = plan.network == NetworkPlan::Host;
    store.create(&state)?;
    let dir = store.container_dir(&a.id)?;
    let mut monitor = None;
    let mut holder = None;
    let result = create_in(
        g,
        &a,
        &plan,
        &dir,
        &store,
        &state,
        &mut monitor,
        &mut holder,
    );
    if result.is_err() {
        if let Some(holder) = holder {
            holder.kill();
        }
        abandon(&store, &state, &plan, monitor, || {
            remove_vm_of(&dir);
            if plan.pod == Some(bundle::PodRole::Sandbox) {
                crate::pod::release(store.root(), &a.id);
            }
        });
    }
    result
}

/// The pod template in `dir`, absolute, if it is one made on this host: its state is
/// read and authenticated now (its memory when the sandbox's VM is forked), so that a
/// wrong directory is named before anything exists.
fn check_pod_template(dir: &Path) -> Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    let unusable = || format!("cannot use the pod template in {}", dir.display());
    let key = forkvm_vmm::template::TemplateKey::host().with_context(unusable)?;
    let template = forkvm_vmm::template::Template::open(&dir, &key).with_context(unusable)?;
    crate::pod_template::check_template(template.config()).with_context(unusable)?;
    Ok(dir)
}

/// Runs container `id`'s `prestart` and `createRuntime` hooks on the host, as runc
/// shows them the container while creating: its pid is `pid` (the holder's, else the
/// monitor's), whose network namespace is the container's.
pub(super) fn run_create_hooks(
    store: &StateStore,
    id: &str,
    plan: &bundle::ContainerPlan,
    pid: i32,
) -> Result<()> {
    let mut hook_state = store.load(id)?;
    hook_state.record_pid(pid)?;
    let hook_state = hook_state.to_runtime_spec_json();
    hooks::run_all("prestart", &plan.hooks.prestart, &hook_state)?;
    hooks::run_all("createRuntime", &plan.hooks.create_runtime, &hook_state)?;
    Ok(())
}

/// Undoes a `create` that failed, as runc destroys such a container: its `monitor`
/// killed, what it made undone (`undo`), the `poststop` hooks run, its state removed.
pub(super) fn abandon(
    store: &StateStore,
    state: &ContainerState,
    plan: &bundle::ContainerPlan,
    monitor: Option<Child>,
    undo: impl FnOnce(),
) {
    if let Some(mut child) = monitor {
        let _ = child.kill();
        let _ = child.wait();
    }
    undo();
    let mut stopped = state.clone();
    stopped.status = Status::Stopped;
    hooks::run_all_logged(
        "poststop",
        &plan.hooks.poststop,
        &stopped.to_runtime_spec_json(),
    );
    let _ = store.remove(&state.id);
}

#[allow(clippy::too_many_arguments)]
fn create_in(
    g: &Global,
    a: &CreateArgs,
    plan: &bundle::ContainerPlan,
    dir: &Path,
    store: &StateStore,
    state: &ContainerState,
    monitor: &mut Option<Child>,
    holder: &mut Option<Holder>,
) -> Result<()> {
    // The monitor waits for "go" on this pipe: the hooks below configure its namespace.
    let (go_rx, mut go_tx) = std::io::pipe().context("cannot make a pipe")?;
    let go_fd = go_rx.as_raw_fd();
    let go_arg = go_fd.to_string();
    let mut args = vec!["__monitor", a.id.as_str(), "--go-fd", go_arg.as_str()];
    // With a holder (pid, cgroup or user namespaces of the spec's on the host), the
    // monitor and the holder each hold one end of this pair: the exit code goes over
    // it, and each learns of the other's end by it.
    let pair = match plan.namespaces.holder.any() {
        true => Some(std::os::unix::net::UnixStream::pair().context("cannot make a socket pair")?),
        false => None,
    };
    let holder_arg = pair.as_ref().map(|(ours, _)| ours.as_raw_fd().to_string());
    if let Some(fd) = &holder_arg {
        args.extend(["--holder-fd", fd.as_str()]);
    }
    let mut cmd = helper::command(g, &args)?;
    if plan.process.tty {
        let socket = a.console_socket.as_deref().context("no --console-socket")?;
        helper::give_terminal(&mut cmd, socket)?;
    }
    // A pod's sandbox: the pod directory, a shared mount the monitor's namespace (made
    // below) receives the pod's containers' roots through.
    if plan.pod == Some(bundle::PodRole::Sandbox) {
        crate::pod::prepare(store.root(), &a.id).context("cannot make the pod's directory")?;
    }
    // The monitor is the container's process on the host (the state's pid): hooks and
    // engines act on its namespaces (`nsenter -t PID -n`; containerd's CRI gives a pod's
    // containers the sandbox's `/proc/<pid>/ns/net`), which are the spec's, as runc's
    // container process's would be. A mount namespace it makes holds the container's
    // root over `/` ([`container_root_over_slash`]).
    let ns = MonitorNs::of(plan)?;
    let keep: Vec<RawFd> = [Some(go_fd), pair.as_ref().map(|(ours, _)| ours.as_raw_fd())]
        .into_iter()
        .flatten()
        .collect();
    monitor_namespaces(&mut cmd, &keep, &ns.borrowed(), ns.unshare);
    let child = monitor.insert(
        ns.spawn(&mut cmd)
            .context("cannot start the container's monitor in its namespaces")?,
    );
    drop(go_rx);
    let monitor_pid = child.id();
    // The state's pid: the holder, in the monitor's namespaces and the spec's pid,
    // cgroup and user ones, where there is one; else the monitor.
    let pid = match pair {
        Some((monitor_end, holder_end)) => {
            drop(monitor_end);
            // This binary, by descriptor: the holder's mount namespace may not show it.
            let exe = std::fs::File::open("/proc/self/exe").context("cannot open this binary")?;
            let exe_name = std::env::current_exe().unwrap_or_else(|_| "forkvm-runtime".into());
            let h = holder.insert(Holder::start(
                (&exe, &exe_name.to_string_lossy()),
                &a.id,
                monitor_pid,
                &ns.holder_joins(plan),
                &plan.namespaces.holder,
                OwnedFd::from(holder_end),
                ns.pid.as_ref(),
            )?);
            let pid = h.pid();
            store.update(&a.id, |s| {
                s.record_pid(pid)?;
                s.record_monitor(monitor_pid as i32)?;
                Ok(())
            })?;
            pid
        }
        None => monitor_pid as i32,
    };
    run_create_hooks(store, &a.id, plan, pid)?;
    match &state.pod_template {
        // A sandbox forked from a pod template is made in its VM as the pod's other
        // containers are: its root bound into the pod directory, its bound files and
        // volumes given to the pod's VM as the hooks left them.
        Some(_) => {
            let pod = crate::pod::pod_dir(store.root(), &a.id);
            crate::pod::bind_member_root(&pod, &a.id, &plan.rootfs)
                .context("cannot give the pod's VM the sandbox's root filesystem")?;
            super::member::give_files_to_pod(&pod, &a.id, plan)?;
        }
        // The root takes the bound files as the hooks left them: Docker's network hook
        // rewrites resolv.conf for its embedded resolver.
        None => crate::rootfs::prepare(plan, dir)?,
    }
    go_tx
        .write_all(b"go")
        .context("the container's monitor ended before its hooks ran")?;
    drop(go_tx);
    let ready: Ready = helper::wait_report(
        &dir.join(READY_FILE),
        child,
        vm::AGENT_DEADLINE + Duration::from_secs(30),
        ("the container's monitor", "the VM was ready"),
        || forkvm_registry::tail(&dir.join(MONITOR_LOG), 10),
    )?;
    if let Some(pid_file) = &a.pid_file {
        write_pid_file(pid_file, pid)?;
    }
    store.update(&a.id, |s| {
        s.record_pid(pid)?;
        s.vm_id = Some(ready.vm_id.clone());
        s.vm_root = Some(ready.vm_root.clone());
        s.vsock = Some(ready.vsock.clone());
        s.transition(Status::Created)
    })?;
    Ok(())
}

/// A container monitor's namespaces, as its plan gives them: the files of those it
/// joins, the `CLONE_NEW*` flags of those it makes, the pid namespace it starts in.
struct MonitorNs {
    join: Vec<(OwnedFd, libc::c_int)>,
    unshare: libc::c_int,
    pid: Option<OwnedFd>,
}

impl MonitorNs {
    /// Opens the namespaces `plan` joins (a path that is no namespace is named when the
    /// monitor cannot join it).
    fn of(plan: &bundle::ContainerPlan) -> Result<Self> {
        use bundle::HostNamespace;
        let mut wanted: Vec<(PathBuf, libc::c_int)> = Vec::new();
        let mut unshare = 0;
        let ns = &plan.namespaces;
        for (host, kind) in [
            (&ns.mount, libc::CLONE_NEWNS),
            (&ns.uts, libc::CLONE_NEWUTS),
            (&ns.ipc, libc::CLONE_NEWIPC),
        ] {
            match host {
                HostNamespace::Inherit => {}
                HostNamespace::New => unshare |= kind,
                HostNamespace::Join(path) => wanted.push((path.clone(), kind)),
            }
        }
        match &plan.network {
            NetworkPlan::Join(path) => wanted.push((path.clone(), libc::CLONE_NEWNET)),
            NetworkPlan::New => unshare |= libc::CLONE_NEWNET,
            NetworkPlan::Host => {}
        }
        let open = |path: &Path| {
            std::fs::File::open(path)
                .map(OwnedFd::from)
                .with_context(|| format!("cannot open the namespace {}", path.display()))
        };
        let mut join = Vec::with_capacity(wanted.len());
        for (path, kind) in wanted {
            join.push((open(&path)?, kind));
        }
        let pid = ns.pid.as_deref().map(open).transpose()?;
        Ok(Self { join, unshare, pid })
    }

    /// The kinds of the monitor's namespaces its holder joins: those the plan makes or
    /// names (the others are the runtime's, the holder's already).
    fn holder_joins(&self, plan: &bundle::ContainerPlan) -> Vec<libc::c_int> {
        let ns = &plan.namespaces;
        let mut kinds = Vec::new();
        for (host, kind) in [
            (&ns.mount, libc::CLONE_NEWNS),
            (&ns.uts, libc::CLONE_NEWUTS),
            (&ns.ipc, libc::CLONE_NEWIPC),
        ] {
            if *host != bundle::HostNamespace::Inherit {
                kinds.push(kind);
            }
        }
        if plan.network != NetworkPlan::Host {
            kinds.push(libc::CLONE_NEWNET);
        }
        kinds
    }

    fn borrowed(&self) -> Vec<(BorrowedFd<'_>, libc::c_int)> {
        self.join.iter().map(|(f, k)| (f.as_fd(), *k)).collect()
    }

    /// Spawns `cmd`: in the pid namespace it joins, from a thread of this process whose
    /// children alone start there.
    fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        let Some(pid_ns) = &self.pid else {
            return cmd.spawn();
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on an open namespace descriptor: it changes the pid
                // namespace this thread's children start in, and nothing else; the
                // thread ends after the one spawn below.
                if unsafe { libc::setns(pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                cmd.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
        })
    }
}

/// Sets `cmd` up to start a container's monitor: the descriptors in `keep` (the read end
/// of the pipe on which `create` says "go", the write end of the holder's) kept across
/// the exec; the namespaces in `join` (opened
/// namespace files and their `CLONE_NEW*` types) joined, then those in `unshare`
/// (`CLONE_NEW*` flags) made. A mount namespace it makes is a slave of this process's
/// (the host's later mounts and unmounts reach it, its own never reach the host). The
/// caller keeps `join`'s files open until the monitor is spawned.
pub(super) fn monitor_namespaces(
    cmd: &mut Command,
    keep: &[RawFd],
    join: &[(BorrowedFd<'_>, libc::c_int)],
    unshare: libc::c_int,
) {
    let join: Vec<(RawFd, libc::c_int)> = join.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    let keep = keep.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (fcntl, setns, unshare, mount) on plain values it
    // copied and static strings (the pipe's descriptor and the namespace files stay
    // open in the child until the exec); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // The pipes' ends survive the exec (they were made close-on-exec).
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &(fd, kind) in &join {
                if libc::setns(fd, kind) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if unshare != 0 && libc::unshare(unshare) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if unshare & libc::CLONE_NEWNS != 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Writes `pid` to `path` atomically (a reader never sees an empty file).
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write the pid file in {}", dir.display()))?;
    write!(tmp, "{pid}")?;
    tmp.persist(path)
        .with_context(|| format!("cannot write the pid file {}", path.display()))?;
    Ok(())
}

/// Removes the VM home of the container in `dir` (read from its ready report), once its
/// VMM is gone.
pub fn remove_vm_of(dir: &Path) {
    let Ok(bytes) = std::fs::read(dir.join(READY_FILE)) else {
        return;
    };
    if let Ok(Report::Ok(Ready { vm_id, vm_root, .. })) = serde_json::from_slice(&bytes) {
        remove_vm(&vm_root, &vm_id);
    }
}

/// Removes VM `id`'s home under `root` (its VMM must be gone), when there is one.
pub fn remove_vm(root: &Path, id: &str) {
    if let Ok(home) = VmHome::open(root, id) {
        let _ = home.remove();
    }
}

/// The monitor: returns its exit code (the container process's), which it hands its
/// container's holder first, if it has one.
pub fn monitor(g: &Global, log: &Log, a: &MonitorArgs) -> i32 {
    // Its holder gone (killed, or never started: `create` ended), so is the container.
    let link = a.holder_fd.map(|fd| {
        let link = MonitorLink::adopt(fd)?;
        link.follow()?;
        anyhow::Ok(link)
    });
    let link = match link.transpose() {
        Ok(link) => link,
        Err(e) => {
            log.error(&format!("monitor {}: {e:#}", a.id));
            return EXIT_VM_FAILED;
        }
    };
    let code =
        helper::monitor_process::<Ready>(g, log, &a.id, READY_FILE, |store, dir, reported| {
            wait_for_go(a.go_fd).and_then(|()| run_monitor(store, dir, &a.id, reported))
        });
    if let Some(link) = link {
        link.exit(code);
    }
    code
}

/// Waits until `create` has run the host hooks: "go" on `fd`, which `create` passed to
/// this process alone. EOF first means `create` ended (it failed or was killed).
pub(super) fn wait_for_go(fd: i32) -> Result<()> {
    if !helper::passed_fd_is(fd, libc::S_IFIFO) {
        bail!("--go-fd {fd} is not the pipe create passes");
    }
    // SAFETY: `fd` is the pipe's read end that `create` left open across our exec for
    // this function alone (checked to be a pipe); nothing else here owns or closes it.
    let pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut word = Vec::new();
    pipe.take(2)
        .read_to_end(&mut word)
        .context("cannot read create's go")?;
    if word != b"go" {
        bail!("create ended before the container's hooks ran");
    }
    Ok(())
}

/// Mounts the container's root over `/` in this process's mount namespace (its own,
/// a slave of the host's: see `create_in`), with a read-only `/proc` of processes only
/// (`subset=pid`) in it. This process and what it
/// starts keep the host's root (a root directory does not follow a mount stacked on
/// it), but a process that joins the namespace (`setns`, `nsenter -m -t PID`) lands in
/// the mount on top: the container's files, as in a runc container's namespace. Engines
/// copy files in and out of a running container that way (`podman cp`, whose copier
/// runs `/proc/self/exe` there), which must never reach the host's `/`.
fn container_root_over_slash(rootfs: &Path) -> Result<()> {
    let failed = |what: &str, path: &Path| {
        let e = std::io::Error::last_os_error();
        anyhow::Error::new(e).context(format!(
            "cannot {what} {} in the container's monitor's namespace",
            path.display()
        ))
    };
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes());
    let root = c(rootfs).context("the root path holds a NUL byte")?;
    let proc_dir = rootfs.join("proc");
    let proc = c(&proc_dir).context("the root path holds a NUL byte")?;
    // `/proc` first, so that the recursive bind carries it; then taken off the
    // directory itself, which the VM process shares with the guest (the guest must
    // never see the host's `/proc` through it).
    let with_proc = proc_dir.is_dir() && !proc_dir.is_symlink();
    // SAFETY: NUL-terminated strings that outlive the calls; no filesystem data.
    unsafe {
        if with_proc
            && libc::mount(
                c"proc".as_ptr(),
                proc.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                c"subset=pid".as_ptr().cast(),
            ) != 0
        {
            return Err(failed("mount /proc on", &proc_dir));
        }
        if libc::mount(
            root.as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(failed("mount the container's root", rootfs));
        }
        if with_proc && libc::umount2(proc.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(failed("unmount /proc from", &proc_dir));
        }
    }
    Ok(())
}

fn run_monitor(store: &StateStore, dir: &Path, id: &str, reported: &mut bool) -> Result<i32> {
    let signals = ForwardedSignals::block().context("cannot block signals")?;
    let state = store.load(id)?;
    let mut plan = bundle::load(&state.bundle)?;
    // The host's network by path, as `create` found it (in the namespace this process
    // joined, the path is its own).
    if state.host_network {
        plan.network = NetworkPlan::Host;
    }
    // A mount namespace joined by path must show this process in its `/proc` (this
    // process and its VM process name themselves through it): one made from the
    // runtime's (`unshare --mount`) does, another container's shows its own pid
    // namespace.
    if let bundle::HostNamespace::Join(path) = &plan.namespaces.mount {
        if ProcessIdentity::proc_self_pid() != Some(std::process::id()) {
            bail!(
                "linux.namespaces[mount].path ({}): its /proc is not the runtime's (it shows \
                 another pid namespace), and the container's monitor cannot find itself there",
                path.display()
            );
        }
    }
    if plan.namespaces.mount == bundle::HostNamespace::New {
        container_root_over_slash(&plan.rootfs)?;
    }
    // The container's network namespace (the engine's, or this process's own which the
    // hooks configured), before anything is registered: a namespace that cannot be
    // joined leaves nothing behind.
    // This process is in it already (its spawn joined the engine's by path, or made
    // one): named through this process, never by the spec's path again (a mount
    // namespace joined by path may resolve it elsewhere).
    let netns = PathBuf::from("/proc/self/ns/net");
    let named = match &plan.network {
        NetworkPlan::Join(path) => path.display().to_string(),
        _ => "the container's namespace".to_owned(),
    };
    let plumb = |netns: &Path| -> Result<Plumbed> {
        Ok(Plumbed {
            network: forkvm_net::plumb(netns)
                .with_context(|| format!("cannot take the network of {named}"))?,
            netns: netns.to_owned(),
        })
    };
    // On the host's network the guest has loopback only: no interface of the host is
    // ever tied to a VM.
    let mut plumbed = match plan.network {
        NetworkPlan::Host => Plumbed {
            network: forkvm_net::Network::default(),
            netns: netns.clone(),
        },
        _ => plumb(&netns)?,
    };
    let tty = plan.process.tty;
    helper::own_session(tty)?;
    let vm_root = std::path::absolute(forkvm_registry::default_root())?;
    let home =
        VmHome::create(&vm_root, None, None).context("cannot register the container's VM")?;
    // The VM process records itself once it starts; until then, this monitor owns it.
    home.record_process(ProcessIdentity::current())?;
    let hostname = plan.hostname.clone().unwrap_or_else(|| short_hostname(id));
    let uds = home.dir().join(vm::VSOCK_SOCKET);
    let mut kept_copy = None;
    let origin = (|| -> Result<Origin> {
        Ok(match &state.pod_template {
            // A pod's sandbox forked from a pod template: its container is made in the VM
            // as the pod's others are, over what `create` put in the pod directory.
            Some(dir) => {
                super::member::filesystems_in_pod(&mut plan, id)?;
                let pod = crate::pod::pod_dir(store.root(), id);
                let unusable = || format!("cannot use the pod template in {}", dir.display());
                let key = forkvm_vmm::template::TemplateKey::host().with_context(unusable)?;
                let t = std::time::Instant::now();
                use forkvm_vmm::template::Template;
                let opened = Template::open(dir, &key).with_context(unusable)?;
                let (vcpus, mem_mib) = opened.machine();
                if let Some(short) = plan.pod_size.short_of(vcpus, mem_mib) {
                    anyhow::bail!(
                        "the pod template in {} is too small for the pod: {short}; make one \
                         at least that large (`forkvm-runtime pod-template --vcpus N \
                         --memory-mib M`) for pods this size",
                        dir.display()
                    );
                }
                // The memory another pod of the template checked, shared; else checked
                // here.
                let mac = opened.memory_mac();
                let template = match crate::pod_template::checked_copy(store, dir, &mac, id) {
                    Some(copy) => match opened.with_checked_copy(copy) {
                        Ok(template) => template,
                        Err(e) => {
                            tracing::warn!("the template copy handed over: {e}; checking anew");
                            Template::load(dir, &key).with_context(unusable)?
                        }
                    },
                    None => opened.verify(&key).with_context(unusable)?,
                };
                tracing::info!(
                    ms = t.elapsed().as_millis() as u64,
                    "the pod template's state and memory checked"
                );
                // Kept while the pod's VM runs, for the next pods of the template.
                let kept = template.memory().try_clone()?;
                store.update(id, |s| {
                    s.template_copy = Some(crate::state::TemplateCopy {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&kept),
                        memory_mac: template.memory_mac(),
                    });
                    Ok(())
                })?;
                kept_copy = Some(kept);
                let spec = crate::pod_template::child_spec(
                    template.config(),
                    &plumbed.network,
                    &uds,
                    &hostname,
                    &pod,
                )
                .with_context(unusable)?;
                home.record_machine(vcpus, mem_mib)?;
                Origin::Fork(template.child_start(&spec).with_context(unusable)?)
            }
            None => {
                let mut cfg = vm::config(
                    &vm::container_guest()?,
                    &crate::rootfs::root(&plan, dir),
                    plan.vcpus,
                    plan.mem_mib,
                    &hostname,
                    &uds,
                )?;
                // The volumes' mounts are among the filesystems, in the spec's order; each is
                // bound in a directory of its share here, in this monitor's own mount
                // namespace.
                cfg.shares.extend(vm::bind_volume_shares(
                    &dir.join(VOLUMES_DIR),
                    &plan.volumes,
                )?);
                // A pod's sandbox shares the pod directory, where its containers' roots
                // appear.
                if plan.pod == Some(bundle::PodRole::Sandbox) {
                    cfg.shares.push(forkvm_vmm::FsConfig {
                        tag: crate::pod::POD_SHARE_TAG.to_owned(),
                        host_path: crate::pod::pod_dir(store.root(), id),
                        read_only: false,
                    });
                }
                home.record_machine(cfg.vcpus, cfg.mem_mib)?;
                Origin::Boot(cfg)
            }
        })
    })();
    // Nothing was started: the home goes (create never learnt of it).
    let mut origin = origin.inspect_err(|_| {
        let _ = home.remove();
    })?;
    let relay = signals.spawn(tty)?;
    let ready = Ready {
        vm_id: home.id().to_owned(),
        vm_root,
        vsock: uds.clone(),
    };
    let dir_owned = dir.to_owned();
    let filesystems = plan.filesystems_request();
    let cgroup = plan.cgroup_request();
    // The hooks in the container see it as runc shows them: its pid is its holder's or
    // this monitor's.
    let mut hook_state = state.clone();
    let pid = state.pid.filter(|_| state.monitor_pid.is_some());
    hook_state.record_pid(pid.unwrap_or(ProcessIdentity::current().pid as i32))?;
    let guest_hooks = |kind: &str, hooks: &[forkvm_agent_proto::GuestHook], status| {
        let mut state = hook_state.clone();
        state.status = status;
        (!hooks.is_empty()).then(|| Request::Hooks {
            kind: kind.to_owned(),
            hooks: hooks.to_vec(),
            state: state.to_runtime_spec_json().to_string(),
        })
    };
    let create_hooks = guest_hooks(
        "createContainer",
        &plan.guest_hooks.create_container,
        crate::state::Status::Creating,
    );
    let start_hooks = guest_hooks(
        "startContainer",
        &plan.guest_hooks.start_container,
        crate::state::Status::Created,
    );
    // As runc orders them: the user namespace and device nodes, the createContainer
    // hooks (in that namespace), then the
    // kernel parameters, masked and read-only paths and the read-only root (a hook may
    // write in the root).
    let (container, settings) = match create_hooks {
        Some(_) => (plan.devices_request(), plan.settings_request()),
        None => (plan.container_request(), None),
    };
    let spec = plan.process;
    // Reported from the session once the agent answers; errors before that are
    // reported by `monitor`.
    let (tx, rx) = std::sync::mpsc::channel();
    let (vm_root, vm_id) = (home.root().to_owned(), home.id().to_owned());
    // An engine's namespace (given by path) with no interface yet may be given its
    // interfaces between `create` and `start` (engines that configure the network after
    // `create` returns): then `create` is answered now, and the namespace is read again
    // at `start`, before the VM boots (a VM takes its NICs at boot). A namespace the
    // runtime made is configured by `create`'s hooks, before this point.
    // (A forked VM has its NICs already: its namespace has its interfaces by now.)
    let late_network =
        matches!(plan.network, NetworkPlan::Join(_)) && matches!(origin, Origin::Boot(_));
    let early_start = if late_network && plumbed.network.interfaces.is_empty() {
        let listener = bind_start_socket(dir)?;
        helper::write_report(&dir.join(READY_FILE), &Report::Ok(ready.clone()))
            .context("cannot report the container created")?;
        *reported = true;
        let conn = match wait_for_start(&listener, &relay, &|| false)? {
            Started::Conn(conn) => conn,
            Started::Killed(sig) => {
                remove_vm(&vm_root, &vm_id);
                return Ok(128 + sig);
            }
        };
        plumbed = plumb(&netns)?;
        if !plumbed.network.interfaces.is_empty() {
            tracing::info!(
                interfaces = plumbed.network.interfaces.len(),
                "the network namespace was given interfaces after create"
            );
        }
        Some(conn)
    } else {
        None
    };
    // A guest NIC per interface of the namespace, with its MAC, on its TAP; the VM
    // process, in this process's namespace, opens them.
    if let Origin::Boot(cfg) = &mut origin {
        cfg.nets = plumbed
            .network
            .interfaces
            .iter()
            .map(|i| forkvm_vmm::NetConfig {
                tap: i.tap.clone(),
                mac: Some(i.mac),
                bridge: None,
                guest_ip: None,
            })
            .collect();
    }
    // `--network none` leaves a namespace with no interface: the guest has only its
    // loopback.
    let networked = !plumbed.network.interfaces.is_empty();
    // A resolver on a loopback address of the namespace (Docker's 127.0.0.11) is
    // relayed: in the guest that address is its own loopback. The first such
    // nameserver is (engines write one).
    let nameserver = if networked {
        loopback_nameservers(&plan.files).first().copied()
    } else {
        None
    };
    let _dns_relay = match nameserver {
        Some(upstream) => Some(
            forkvm_net::dns::Relay::start(&vm::dns_relay_socket(&uds), &plumbed.netns, upstream)
                .context("cannot start the DNS relay")?,
        ),
        None => None,
    };
    // A pod's port-forwards: containerd dials the loopback of the pod's network
    // namespace, which is the guest's (`kubectl port-forward`).
    let _loopback = (plan.pod == Some(bundle::PodRole::Sandbox)
        && plan.network != NetworkPlan::Host)
        .then(|| {
            let uds = uds.clone();
            forkvm_net::loopback::LoopbackRelay::start(Box::new(move |port| {
                forkvm_agent_proto::forward::connect(&uds, port, FORWARD_HANDSHAKE)
            }))
            .inspect_err(|e| tracing::warn!("the pod's port-forwards will not reach it: {e}"))
            .ok()
        })
        .flatten();
    let work = GuestWork {
        process: spec,
        cgroup,
        filesystems,
        container,
        create_hooks,
        settings,
        start_hooks,
        network: networked.then(|| plumbed.network.agent_request()),
        dns_relay: nameserver.map(|ns| Request::DnsRelay {
            addresses: vec![ns.to_string()],
        }),
        plumbed: networked.then(|| (plumbed.netns.clone(), plumbed.network.clone())),
        pod_container: matches!(origin, Origin::Fork(_)).then(|| id.to_owned()),
    };
    let early = early_start.is_some();
    // The engine's cgroup (cgroupsPath) when it gave one, forkvm's own otherwise. The
    // VM process inherits this process's network namespace (the container's); on the
    // host's network, it has no NIC and an empty one of its own.
    let jail = forkvm_jail::JailSpec {
        cgroup: plan.cgroup.clone(),
        own_netns: plan.network == NetworkPlan::Host,
        container: true,
        ..forkvm_jail::JailSpec::default()
    };
    let session = move |s: &vm::Session| {
        monitor_session(s, &dir_owned, ready, work, relay, tty, tx, early_start)
    };
    let result = match origin {
        Origin::Boot(cfg) => vm::run(home, &cfg, jail, session),
        // The sandbox's process is a container of the VM, not its init: the VM goes
        // when it exits.
        Origin::Fork(start) => vm::run_from(home, &uds, start, jail, false, session),
    };
    *reported = early || rx.try_recv().is_ok();
    if result.is_err() && !*reported {
        // create never learnt of this VM, so its cleanup cannot remove it; its VMM (this
        // process's) has ended.
        remove_vm(&vm_root, &vm_id);
    }
    result
}

/// How long a port-forward waits for the guest agent's answer (the agent's own connect
/// to the port waits at most 5 s of it).
const FORWARD_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// A hostname from a container id: its first 12 characters, as Docker does.
fn short_hostname(id: &str) -> String {
    let h: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(12)
        .collect();
    if h.is_empty() {
        "container".into()
    } else {
        h
    }
}

/// A namespace plumbed for the VM, unplumbed when dropped (the monitor ends with the
/// VM, or fails before it): the namespace is the engine's, left as it was given.
struct Plumbed {
    netns: PathBuf,
    network: forkvm_net::Network,
}

impl Drop for Plumbed {
    fn drop(&mut self) {
        if let Err(e) = forkvm_net::unplumb(&self.netns, &self.network) {
            tracing::warn!(
                "cannot undo the network plumbing in {}: {e}",
                self.netns.display()
            );
        }
    }
}

/// What the guest is given: the container's process, the agent request that makes it
/// take over the namespace's network, when the container has one, and the one that
/// makes it relay DNS for the namespace's loopback resolvers, when it names any.
/// What a container's VM starts from.
enum Origin {
    /// A boot of this configuration.
    Boot(forkvm_vmm::VmConfig),
    /// A pod template's child (a pod's sandbox): its start and the files beside it.
    Fork((forkvm_vmm::launch::Start, Vec<std::fs::File>)),
}

struct GuestWork {
    process: ProcessSpec,
    /// The agent's request that makes the container's cgroup in the guest (first).
    cgroup: Request,
    /// The agent's request that mounts the spec's filesystems and volumes, in order.
    filesystems: Option<Request>,
    /// The agent's request that makes the user namespace and the device nodes and
    /// applies the kernel parameters, masked and read-only paths (after the volumes, as
    /// runc does).
    container: Option<Request>,
    /// The `createContainer` hooks, run by `create` after the rest.
    create_hooks: Option<Request>,
    /// With `createContainer` hooks, the rest of the spec after them (the user
    /// namespace and device nodes, in `container`, come before).
    settings: Option<Request>,
    /// The `startContainer` hooks, run by `start` before the process.
    start_hooks: Option<Request>,
    network: Option<Request>,
    dns_relay: Option<Request>,
    /// The namespace and what the VM took over from it, checked again at `start`.
    plumbed: Option<(PathBuf, forkvm_net::Network)>,
    /// The container's id when it is made in the VM as a pod's container (a sandbox
    /// forked from a pod template), its root in the pod share, rather than being the
    /// VM's own.
    pod_container: Option<String>,
}

/// The loopback nameservers of the `/etc/resolv.conf` the engine binds into the
/// container (read up to 64 KiB).
fn loopback_nameservers(files: &[bundle::FileCopy]) -> Vec<std::net::IpAddr> {
    let Some(conf) = files
        .iter()
        .find(|f| f.destination == Path::new("/etc/resolv.conf"))
    else {
        return Vec::new();
    };
    let mut text = String::new();
    let read =
        std::fs::File::open(&conf.source).and_then(|f| f.take(64 * 1024).read_to_string(&mut text));
    match read {
        Ok(_) => forkvm_net::dns::loopback_nameservers(&text),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", conf.source.display());
            Vec::new()
        }
    }
}

/// Binds the start socket in the container's directory `dir`, non-blocking.
pub(super) fn bind_start_socket(dir: &Path) -> Result<UnixListener> {
    std::env::set_current_dir(dir)?;
    let _ = std::fs::remove_file(START_SOCKET);
    // Bound by a relative name: engines' state paths can be longer than a socket
    // address may be.
    let listener = UnixListener::bind(START_SOCKET)
        .with_context(|| format!("cannot listen on {}", dir.join(START_SOCKET).display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// How the wait for `start` ended.
pub(super) enum Started {
    /// `start` connected and asked.
    Conn(std::os::unix::net::UnixStream),
    /// The container was killed while created, with this signal: the process never
    /// runs.
    Killed(i32),
}

/// How often a created container's monitor looks whether its VM stopped or a kill came
/// while it waits for `start` (which wakes it at once).
const START_LOOK: Duration = Duration::from_millis(100);

/// Waits for `start` on `listener` (or a kill, or `vm_stopped`) and reads its request.
pub(super) fn wait_for_start(
    listener: &UnixListener,
    relay: &SignalRelay,
    vm_stopped: &dyn Fn() -> bool,
) -> Result<Started> {
    let conn = loop {
        if vm_stopped() {
            bail!("the VM stopped before the container was started");
        }
        if let Some(sig) = relay.early() {
            return Ok(Started::Killed(sig));
        }
        match listener.accept() {
            Ok((conn, _)) => break conn,
            // Asleep until `start` connects, looking at the VM and for a kill every
            // START_LOOK: a created container may wait long, and a 10 ms poll took
            // ~5% of the virtual test host's CPU from the guests.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                helper::wait_readable(&[listener.as_fd()], START_LOOK);
            }
            Err(e) => return Err(e).context("cannot accept on the start socket"),
        }
    };
    conn.set_nonblocking(false)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    if line.trim() != "start" {
        bail!("unexpected request on the start socket: {line:?}");
    }
    Ok(Started::Conn(conn))
}

/// The guest side of the monitor: the network, the report to `create` and the wait for
/// `start` (unless `create` was answered before the VM booted: then `early_start` is
/// `start`'s connection), the process, its stdio.
#[allow(clippy::too_many_arguments)]
fn monitor_session(
    s: &vm::Session,
    dir: &Path,
    ready: Ready,
    work: GuestWork,
    relay: SignalRelay,
    tty: bool,
    reported: std::sync::mpsc::Sender<()>,
    early_start: Option<std::os::unix::net::UnixStream>,
) -> Result<Outcome> {
    let GuestWork {
        process: spec,
        cgroup,
        filesystems,
        container,
        create_hooks,
        settings,
        start_hooks,
        network,
        dns_relay,
        plumbed,
        pod_container,
    } = work;
    // A pod's container's requests name it.
    let wrap = |r: Option<Request>| match &pod_container {
        Some(id) => r.map(|r| super::member::in_container(id, r)),
        None => r,
    };
    let (cgroup, filesystems, container, create_hooks, settings, start_hooks) = (
        wrap(Some(cgroup)),
        wrap(filesystems),
        wrap(container),
        wrap(create_hooks),
        wrap(settings),
        wrap(start_hooks),
    );
    let mut stream = s.connect_agent()?;
    if matches!(
        &container,
        Some(Request::Container {
            user_namespace: Some(_),
            ..
        })
    ) {
        vm::require_agent_version(&mut stream, 10, "a user namespace (linux.uidMappings)")?;
    }
    if let Some(Request::Filesystems { mounts }) = &filesystems {
        if mounts
            .iter()
            .any(|m| m.fs_type == "virtiofs" && m.source.contains('/'))
        {
            vm::require_agent_version(&mut stream, 12, "a bound directory")?;
        }
    }
    // A pod's container forked VM: the guest takes the pod's network first (once its
    // VM process has given it the pod interface's MAC, as it gives a fork child its
    // identity), then the container is made over its root in the pod share.
    let (network, dns_relay) = match &pod_container {
        Some(id) => {
            vm::require_agent_version(
                &mut stream,
                11,
                "a pod sandbox forked from a pod template (remake the template)",
            )?;
            if let Some(network) = network {
                pod_network(&mut stream, &network)?;
            }
            let (root, _) = crate::pod::member_root(Path::new(""), id);
            vm::configure_guest(
                &mut stream,
                [
                    ("its DNS relay", dns_relay),
                    (
                        "the container's root",
                        Some(Request::CreateContainer {
                            id: id.clone(),
                            root: forkvm_agent_proto::ContainerRoot {
                                share: Some(crate::pod::POD_SHARE_TAG.to_owned()),
                                path: root,
                            },
                        }),
                    ),
                ],
            )?;
            (None, None)
        }
        None => (network, dns_relay),
    };
    // The guest makes the container's cgroup, mounts the spec's filesystems and volumes
    // in order, takes the namespace's addresses and routes, relays DNS, and applies the
    // rest of the spec around the createContainer hooks (last: it may make the root
    // read-only), before anything runs.
    vm::configure_guest(
        &mut stream,
        [
            ("its cgroup", cgroup),
            ("its filesystems and volumes", filesystems),
            ("its network", network),
            ("its DNS relay", dns_relay),
            (
                "its user namespace, devices, kernel parameters, masked and read-only paths",
                container,
            ),
            ("its createContainer hooks", create_hooks),
            (
                "its kernel parameters, masked and read-only paths",
                settings,
            ),
        ],
    )?;
    let mut conn = match early_start {
        Some(conn) => conn,
        None => {
            let listener = bind_start_socket(dir)?;
            helper::write_report(&dir.join(READY_FILE), &Report::Ok(ready))
                .context("cannot report the VM ready")?;
            let _ = reported.send(());
            match wait_for_start(&listener, &relay, &|| s.vm_stopped())? {
                Started::Conn(conn) => conn,
                // Killed while created: the process never runs.
                Started::Killed(sig) => return Ok(Outcome::NotStarted(128 + sig)),
            }
        }
    };
    // An interface the VM took over at create that the engine removed since: the VM
    // would run cut off, so start fails saying which.
    if let Some((netns, network)) = &plumbed {
        let gone = forkvm_net::vanished(netns, network)
            .with_context(|| format!("cannot read the network of {}", netns.display()))?;
        if !gone.is_empty() {
            let msg = format!(
                "the interface {} vanished from the container's network namespace before start",
                gone.join(", ")
            );
            let _ = writeln!(conn, "error {msg}");
            bail!(msg);
        }
    }
    // The startContainer hooks, in the container, just before its process; one that
    // fails fails `start`, and the process never runs.
    if let Err(e) = vm::configure_guest(&mut stream, [("its startContainer hooks", start_hooks)]) {
        let msg = format!("{e:#}");
        let _ = writeln!(conn, "error {}", msg.replace('\n', " "));
        return Ok(Outcome::NotStarted(1));
    }
    let started = match &pod_container {
        Some(id) => client::exec_in_container(stream, id, &spec),
        None => client::exec(stream, &spec),
    };
    let session = match started {
        Ok(session) => {
            writeln!(conn, "ok {}", session.pid())?;
            session
        }
        Err(ExecError::ExecFailed { message, exit_code }) => {
            let _ = writeln!(conn, "error {}", message.replace('\n', " "));
            return Ok(Outcome::NotStarted(exit_code));
        }
        Err(e) => {
            let _ = writeln!(conn, "error cannot start the process: {e}");
            return Err(anyhow::Error::new(e).context("cannot start the process"));
        }
    };
    drop(conn);
    let code = vm::relay_stdio(session, &relay, tty, true, || ())
        .context("lost the connection to the container's process")?;
    Ok(Outcome::Exited(code))
}

/// How long a forked pod VM's guest may take to be given its NICs' MACs: as long as
/// its VM process's identity thread keeps trying.
const FORK_IDENTITY_DEADLINE: Duration = forkvm_vmm::fork::AGENT_TIMEOUT;

/// Has the guest of a VM just forked from a pod template take the pod's `network`
/// (a [`Request::Network`]): its NICs are found by the pod interfaces' MACs, which its
/// VM process gives the guest as the child's identity, on a thread of its own; until
/// then the agent finds no NIC with such a MAC, and the request is made again.
fn pod_network(stream: &mut std::os::unix::net::UnixStream, network: &Request) -> Result<()> {
    let deadline = std::time::Instant::now() + FORK_IDENTITY_DEADLINE;
    loop {
        match client::call_within(stream, network, client::CALL_TIMEOUT)
            .context("cannot give the guest its network")?
        {
            forkvm_agent_proto::Response::Ok => return Ok(()),
            // The agent's words for a MAC no NIC has (`NetworkError::NoNic`).
            forkvm_agent_proto::Response::Error { message }
                if message.contains("no NIC has the MAC") =>
            {
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "the guest was not given the pod interface's MAC (the fork child's \
                         identity) within {FORK_IDENTITY_DEADLINE:?}: {message}"
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            forkvm_agent_proto::Response::Error { message } => {
                bail!("the guest could not take its network: {message}")
            }
            other => bail!("the guest agent answered the request for its network with {other:?}"),
        }
    }
}

/// Asks the monitor of the created container in `dir` to start its process; returns
/// the process's pid in the guest.
pub fn request_start(dir: &Path) -> Result<i32> {
    std::env::set_current_dir(dir)?;
    let mut conn = std::os::unix::net::UnixStream::connect(START_SOCKET)
        .context("the container's monitor is not listening")?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.write_all(b"start\n")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .context("no answer from the container's monitor")?;
    let line = line.trim();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid.parse().context("bad answer from the monitor");
    }
    match line.strip_prefix("error ") {
        Some(msg) => bail!("{msg}"),
        None => bail!("the container's monitor ended before starting the process"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_from_ids() {
        assert_eq!(
            short_hostname("0123456789abcdef0123456789abcdef"),
            "0123456789ab"
        );
        assert_eq!(short_hostname("my_ctr"), "myctr");
        assert_eq!(short_hostname("___"), "container");
    }

    #[test]
    fn pid_files_are_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pid");
        write_pid_file(&p, 4242).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "4242");
        write_pid_file(&p, 7).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7");
    }
}
