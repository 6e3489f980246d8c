//! The shim v2 `Task` service: containers and their exec'd processes, each backed by
//! the OCI runtime binary, with the lifecycle events containerd expects.
//!
//! One shim serves one container, or every container of a Kubernetes pod (containerd
//! groups them by the `io.kubernetes.cri.sandbox-id` annotation, as with runc-v2).
//! Per container the shim keeps the init process and the execs: their pids (the
//! runtime's pid files), statuses and exit statuses, and their stdio. Each started
//! process has a watcher thread that waits for its exit in [`Exits`], records it,
//! wakes `Wait`ers and publishes `TaskExit`. Every event goes through one publisher
//! thread, in order; `TaskStart`/`TaskExecStarted` are queued while the container's
//! lock is held, so a process's exit is always published after its start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};

use crate::error::{Error, Result};
use crate::exits::{Exits, Mark};
use crate::runtime::{self, CreateOpts, ExecOpts, Runtime};
use crate::stdio::{self, ProcessIo, StdioPaths};

mod options;
mod rootfs;

pub use options::{runtime_options, ConfigFile, RuntimeOptions, RuntimeRecord, RUNTIME_RECORD};
pub use rootfs::cleanup;
use rootfs::{mount_rootfs, unmount_rootfs};

/// How long the runtime may take to send a pty master once its command returned.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process's terminal output may keep flowing after it exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Delete` waits for a force-deleted container's process to be reaped.
const DELETE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// What a process is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// One process: the container's init, or an exec.
struct Process {
    pid: u32,
    phase: Phase,
    exit: Option<(u32, SystemTime)>,
    paths: StdioPaths,
    io: Option<ProcessIo>,
    /// An exec's process spec (JSON), until it starts.
    spec: Vec<u8>,
}

impl Process {
    fn new(paths: StdioPaths) -> Self {
        Process {
            pid: 0,
            phase: Phase::Created,
            exit: None,
            paths,
            io: None,
            spec: Vec::new(),
        }
    }
}

struct Procs {
    init: Process,
    execs: HashMap<String, Process>,
    paused: bool,
}

impl Procs {
    fn get(&self, cid: &str, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {cid}")))
    }

    fn get_mut(&mut self, cid: &str, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {cid}")))
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    rootfs: Vec<Mount>,
    rootfs_mounted: bool,
    runtime: Runtime,
    procs: Mutex<Procs>,
    changed: Condvar,
}

impl Container {
    fn lock(&self) -> MutexGuard<'_, Procs> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An event for containerd, in publishing order.
enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(TaskPaused),
    Resumed(TaskResumed),
}

impl Event {
    fn split(self) -> (&'static str, Box<dyn MessageDyn>) {
        match self {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, Box::new(e)),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
            Event::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e)),
            Event::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e)),
        }
    }
}

/// Where the service's events go, one at a time in publishing order: a topic
/// (`/tasks/exit`, ...) and the event message.
pub type EventSink = Box<dyn FnMut(&'static str, Box<dyn MessageDyn>) + Send>;

/// An [`EventSink`] that forwards to containerd (`$TTRPC_ADDRESS`) for `namespace`.
pub fn publisher_sink(publisher: RemotePublisher, namespace: String) -> EventSink {
    Box::new(move |topic, msg| {
        if let Err(e) = publisher.publish(Context::default(), topic, &namespace, msg) {
            tracing::error!(topic, error = %e, "cannot publish an event");
        }
    })
}

struct Inner {
    namespace: String,
    exits: Arc<Exits>,
    events: Mutex<mpsc::Sender<Event>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    exit_signal: Arc<ExitSignal>,
}

/// The Task service (see the module docs).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn read_pid(path: &Path) -> Result<u32> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("read {}", path.display())))?;
    text.trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Error::RuntimeOutput {
            verb: "pid file".into(),
            reason: format!("{}: {text:?} is not a pid", path.display()),
        })
}

impl Service {
    /// A service for containerd namespace `namespace`, giving its events to `events` (in
    /// order, on a thread of its own; see [`publisher_sink`]) and waiting for children
    /// through `exits`; `exit_signal` ends the shim after `Shutdown` once no container is
    /// left.
    pub fn new(
        namespace: String,
        mut events: EventSink,
        exits: Arc<Exits>,
        exit_signal: Arc<ExitSignal>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Event>();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for event in rx {
                    let (topic, msg) = event.split();
                    events(topic, msg);
                }
            })
            .expect("cannot spawn the events thread");
        Service {
            inner: Arc::new(Inner {
                namespace,
                exits,
                events: Mutex::new(tx),
                containers: Mutex::new(HashMap::new()),
                exit_signal,
            }),
        }
    }

    fn publish(&self, event: Event) {
        let _ = self
            .inner
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(event);
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// Waits in a thread for `pid` (exited after `mark`), then records the exit and
    /// publishes `TaskExit`.
    fn watch(&self, c: Arc<Container>, exec_id: String, pid: u32, mark: Mark) {
        let svc = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let exit = svc
                    .inner
                    .exits
                    .wait(pid as i32, mark, None)
                    .expect("an untimed wait returns an exit");
                tracing::info!(container = %c.id, exec = %exec_id, pid, code = exit.code, "process exited");
                // Let a terminal's last output reach the client before the exit does.
                let mut io = c.lock().get_mut(&c.id, &exec_id).ok().and_then(|p| p.io.take());
                if let Some(io) = io.as_mut() {
                    io.wait_output(OUTPUT_DRAIN_TIMEOUT);
                }
                let mut procs = c.lock();
                let Ok(p) = procs.get_mut(&c.id, &exec_id) else {
                    return; // deleted meanwhile
                };
                if p.io.is_none() {
                    p.io = io;
                }
                p.phase = Phase::Stopped;
                p.exit = Some((exit.code as u32, exit.at));
                c.changed.notify_all();
                svc.publish(Event::Exit(TaskExit {
                    container_id: c.id.clone(),
                    id: if exec_id.is_empty() { c.id.clone() } else { exec_id.clone() },
                    pid,
                    exit_status: exit.code as u32,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot spawn a process watcher");
        }
    }

    /// `Create`: mounts the rootfs, runs `RUNTIME create`, watches the container's pid.
    pub fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(Error::InvalidArgument(format!(
                "invalid container id {id:?}"
            )));
        }
        if self.containers().contains_key(&id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let opts = runtime_options(req.options.as_ref())?;
        let exe = std::env::current_exe().ok();
        let binary = runtime::select_binary(
            &opts.runc.binary_name,
            std::env::var_os(runtime::RUNTIME_ENV).as_deref(),
            exe.as_deref(),
            std::env::var_os("PATH").as_deref(),
        )?;
        let root = runtime::runtime_root(&opts.runc.root, &self.inner.namespace);
        let bundle = PathBuf::from(&req.bundle);
        RuntimeRecord {
            binary: binary.clone(),
            root: root.clone(),
        }
        .save(&bundle)?;
        let rt = Runtime::new(
            binary,
            root,
            bundle.join("log.json"),
            self.inner.exits.clone(),
        );
        tracing::info!(id, binary = %rt.binary.display(), root = %rt.root.display(), "creating a container");

        let rootfs = bundle.join("rootfs");
        let mounted = mount_rootfs(&req.rootfs, &rootfs)?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let undo = |e: Error| {
            if mounted {
                unmount_rootfs(&rootfs);
            }
            e
        };
        let prepared = stdio::prepare(&paths).map_err(undo)?;
        let pid_file = bundle.join("init.pid");
        let socket = prepared.console.as_ref().map(|c| c.path());
        let mark = self.inner.exits.mark();
        rt.create(
            &id,
            &bundle,
            &CreateOpts {
                pid_file: &pid_file,
                console_socket: socket.as_deref(),
                no_pivot: opts.runc.no_pivot_root,
                pod_template: opts.pod_template.as_deref(),
            },
            prepared.stdio,
        )
        .map_err(undo)?;
        let io = read_pid(&pid_file).and_then(|pid| {
            let io = match prepared.console {
                Some(console) => ProcessIo::with_console(console.master(CONSOLE_TIMEOUT)?, &paths)?,
                None => prepared.io,
            };
            Ok((pid, io))
        });
        let (pid, io) = match io {
            Ok(x) => x,
            Err(e) => {
                let _ = rt.delete(&id, true);
                return Err(undo(e));
            }
        };
        let mut init = Process::new(paths.clone());
        init.pid = pid;
        init.io = Some(io);
        let c = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            rootfs: req.rootfs.clone(),
            rootfs_mounted: mounted,
            runtime: rt,
            procs: Mutex::new(Procs {
                init,
                execs: HashMap::new(),
                paused: false,
            }),
            changed: Condvar::new(),
        });
        self.containers().insert(id.clone(), c.clone());
        self.watch(c.clone(), String::new(), pid, mark);
        self.publish(Event::Create(TaskCreate {
            container_id: id,
            bundle: req.bundle.clone(),
            rootfs: c.rootfs.clone(),
            io: Some(TaskIO {
                stdin: paths.stdin,
                stdout: paths.stdout,
                stderr: paths.stderr,
                terminal: paths.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        }));
        Ok(pid)
    }

    /// `Start`: `RUNTIME start` for the container, `RUNTIME exec` for an exec.
    pub fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let c = self.container(id)?;
        let mut procs = c.lock();
        if exec_id.is_empty() {
            if procs.init.phase != Phase::Created {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} was started already"
                )));
            }
            c.runtime.start(id)?;
            procs.init.phase = Phase::Running;
            let pid = procs.init.pid;
            self.publish(Event::Start(TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            }));
            return Ok(pid);
        }
        if procs.init.phase != Phase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let p = procs.get_mut(id, exec_id)?;
        if p.phase != Phase::Created {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} was started already"
            )));
        }
        let spec_file = c.bundle.join(format!("{exec_id}.process.json"));
        let pid_file = c.bundle.join(format!("{exec_id}.pid"));
        std::fs::write(&spec_file, &p.spec)
            .map_err(Error::io(format!("write {}", spec_file.display())))?;
        let prepared = stdio::prepare(&p.paths)?;
        let socket = prepared.console.as_ref().map(|s| s.path());
        let mark = self.inner.exits.mark();
        let ran = c.runtime.exec(
            id,
            &ExecOpts {
                process: &spec_file,
                pid_file: &pid_file,
                console_socket: socket.as_deref(),
            },
            prepared.stdio,
        );
        let _ = std::fs::remove_file(&spec_file);
        ran?;
        let pid = read_pid(&pid_file)?;
        let io = match prepared.console {
            Some(console) => ProcessIo::with_console(console.master(CONSOLE_TIMEOUT)?, &p.paths)?,
            None => prepared.io,
        };
        p.pid = pid;
        p.phase = Phase::Running;
        p.io = Some(io);
        self.watch(c.clone(), exec_id.into(), pid, mark);
        self.publish(Event::ExecStarted(TaskExecStarted {
            container_id: id.into(),
            exec_id: exec_id.into(),
            pid,
            ..Default::default()
        }));
        Ok(pid)
    }

    /// `Exec`: records an exec (started by `Start`).
    pub fn add_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let exec_id = &req.exec_id;
        if exec_id.is_empty() || exec_id.contains('/') {
            return Err(Error::InvalidArgument(format!(
                "invalid exec id {exec_id:?}"
            )));
        }
        let Some(spec) = req.spec.as_ref() else {
            return Err(Error::InvalidArgument("exec without a process spec".into()));
        };
        let mut procs = c.lock();
        if procs.execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!("exec {exec_id}")));
        }
        let mut p = Process::new(StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.spec = spec.value.clone();
        procs.execs.insert(exec_id.clone(), p);
        self.publish(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        }));
        Ok(())
    }

    /// `Kill`: `RUNTIME kill` for the container, a signal to the pid for an exec.
    pub fn kill_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let c = self.container(id)?;
        let finished = || Error::NotFound(format!("process {id}/{exec_id} already finished"));
        if exec_id.is_empty() {
            if c.lock().init.phase == Phase::Stopped {
                return Err(finished());
            }
            return c.runtime.kill(id, signal, all).map_err(|e| {
                if c.lock().init.phase == Phase::Stopped {
                    finished()
                } else {
                    e
                }
            });
        }
        let procs = c.lock();
        let p = procs.get(id, exec_id)?;
        if p.phase != Phase::Running {
            return Err(finished());
        }
        let sig = rustix::process::Signal::from_named_raw(signal as i32)
            .ok_or_else(|| Error::InvalidArgument(format!("invalid signal {signal}")))?;
        let pid = rustix::process::Pid::from_raw(p.pid as i32)
            .ok_or_else(|| Error::FailedPrecondition(format!("exec {exec_id} has no pid")))?;
        rustix::process::kill_process(pid, sig)
            .map_err(|e| Error::io(format!("signal exec {exec_id}"))(e.into()))
    }

    /// `Delete`: an exec is forgotten; the container is deleted in the runtime
    /// (`--force` unless its process exited), its rootfs unmounted.
    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let c = self.container(id)?;
        let response = |p: &Process| api::DeleteResponse {
            pid: p.pid,
            exit_status: p.exit.map_or(0, |e| e.0),
            exited_at: p.exit.map(|e| timestamp(e.1)).into(),
            ..Default::default()
        };
        if !exec_id.is_empty() {
            let mut procs = c.lock();
            let p = procs.get(id, exec_id)?;
            if p.phase == Phase::Running {
                return Err(Error::FailedPrecondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            let r = response(p);
            procs.execs.remove(exec_id);
            return Ok(r);
        }
        let stopped = c.lock().init.phase == Phase::Stopped;
        match c.runtime.delete(id, !stopped) {
            Err(e) if !e.is_runtime_not_found() => return Err(e),
            _ => {}
        }
        {
            // A force-deleted process exits now; wait for its status.
            let procs = c.lock();
            let (procs, _) = c
                .changed
                .wait_timeout_while(procs, DELETE_EXIT_TIMEOUT, |p| {
                    p.init.phase != Phase::Stopped && p.init.pid != 0
                })
                .unwrap_or_else(|e| e.into_inner());
            drop(procs);
        }
        if c.rootfs_mounted {
            unmount_rootfs(&c.bundle.join("rootfs"));
        }
        self.containers().remove(id);
        let r = response(&c.lock().init);
        self.publish(Event::Delete(TaskDelete {
            container_id: id.into(),
            pid: r.pid,
            exit_status: r.exit_status,
            exited_at: r.exited_at.clone(),
            id: id.into(),
            ..Default::default()
        }));
        Ok(r)
    }

    /// `Wait`: blocks until the process exited; its status and time.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<(u32, SystemTime)> {
        let c = self.container(id)?;
        let mut procs = c.lock();
        loop {
            if let Some(exit) = procs.get(id, exec_id)?.exit {
                return Ok(exit);
            }
            procs = c.changed.wait(procs).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `State`.
    pub fn process_state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let c = self.container(id)?;
        let procs = c.lock();
        let p = procs.get(id, exec_id)?;
        let status = match p.phase {
            Phase::Created => Status::CREATED,
            Phase::Running if exec_id.is_empty() && procs.paused => Status::PAUSED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: if exec_id.is_empty() {
                id.into()
            } else {
                exec_id.into()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: status.into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: p.exit.map_or(0, |e| e.0),
            exited_at: p.exit.map(|e| timestamp(e.1)).into(),
            exec_id: exec_id.into(),
            ..Default::default()
        })
    }

    /// `Pids`: `RUNTIME ps`, plus the pids of running execs it did not list (a VM
    /// runtime's host processes are not all in one cgroup), execs marked with their ids.
    pub fn list_pids(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.container(id)?;
        let mut pids = c.runtime.ps(id)?;
        let procs = c.lock();
        let mut execs: Vec<u32> = procs
            .execs
            .values()
            .filter(|p| p.phase == Phase::Running && !pids.contains(&p.pid))
            .map(|p| p.pid)
            .collect();
        execs.sort_unstable();
        pids.extend(execs);
        Ok(pids
            .into_iter()
            .map(|pid| {
                let exec = procs
                    .execs
                    .iter()
                    .find(|(_, p)| p.pid == pid && p.phase == Phase::Running);
                let info = exec.map(|(exec_id, _)| {
                    let details = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    Any {
                        type_url: "containerd.runc.v1.ProcessDetails".into(),
                        value: details.write_to_bytes().unwrap_or_default(),
                        ..Default::default()
                    }
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect())
    }

    /// `Pause` / `Resume`.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let c = self.container(id)?;
        let mut procs = c.lock();
        if paused {
            c.runtime.pause(id)?;
            procs.paused = true;
            self.publish(Event::Paused(TaskPaused {
                container_id: id.into(),
                ..Default::default()
            }));
        } else {
            c.runtime.resume(id)?;
            procs.paused = false;
            self.publish(Event::Resumed(TaskResumed {
                container_id: id.into(),
                ..Default::default()
            }));
        }
        Ok(())
    }

    /// `CloseIO`.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.container(id)?;
        let procs = c.lock();
        if let Some(io) = &procs.get(id, exec_id)?.io {
            io.close_stdin();
        }
        Ok(())
    }

    /// `ResizePty`.
    pub fn resize_terminal(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let c = self.container(id)?;
        let procs = c.lock();
        match &procs.get(id, exec_id)?.io {
            Some(io) => io.resize(width, height),
            None => Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} has no terminal"
            ))),
        }
    }

    /// The container's pid (`Connect`), 0 when unknown.
    pub fn task_pid(&self, id: &str) -> u32 {
        self.container(id).map_or(0, |c| c.lock().init.pid)
    }

    /// `Shutdown`: ends the shim once it serves no container.
    pub fn shutdown_if_idle(&self) {
        if self.containers().is_empty() {
            tracing::info!("no containers left: shutting down");
            self.inner.exit_signal.signal();
        }
    }
}

fn ok<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::debug!(error = %e, "request failed");
        e.into()
    })
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = ok(self.create_task(&req))?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = ok(self.start_process(&req.id, &req.exec_id))?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        ok(self.add_exec(&req))?;
        Ok(api::Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        ok(self.kill_process(&req.id, &req.exec_id, req.signal, req.all))?;
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        ok(self.delete_process(&req.id, &req.exec_id))
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (status, at) = ok(self.wait_process(&req.id, &req.exec_id))?;
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        ok(self.process_state(&req.id, &req.exec_id))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Ok(api::PidsResponse {
            processes: ok(self.list_pids(&req.id))?,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        ok(self.set_paused(&req.id, true))?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        ok(self.set_paused(&req.id, false))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            ok(self.close_stdin(&req.id, &req.exec_id))?;
        }
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        ok(self.resize_terminal(&req.id, &req.exec_id, req.width, req.height))?;
        Ok(api::Empty::new())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.task_pid(&req.id),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.shutdown_if_idle();
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        // What the container's cgroup in its VM says (the runtime's `events --stats`),
        // as the cgroup v2 metrics a runc shim sends: containerd's CRI reads them.
        let c = self.container(&req.id).map_err(ttrpc::Error::from)?;
        let stats = c.runtime.stats(&req.id).map_err(ttrpc::Error::from)?;
        Ok(api::StatsResponse {
            stats: Some(metrics_any(&stats)).into(),
            ..Default::default()
        })
    }
}

/// The type URL containerd registers its cgroup v2 metrics under.
const CGROUPS_V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";

/// `stats` as containerd's cgroup v2 `Metrics`, packed in an `Any`.
fn metrics_any(stats: &crate::runtime::RuntimeStats) -> Any {
    use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
    let stat = |name: &str| stats.memory.raw.get(name).copied().unwrap_or(0);
    let metrics = Metrics {
        cpu: Some(CPUStat {
            usage_usec: stats.cpu.usage.total / 1000,
            user_usec: stats.cpu.usage.user / 1000,
            system_usec: stats.cpu.usage.kernel / 1000,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: stats.memory.usage.usage,
            usage_limit: stats.memory.usage.limit,
            anon: stat("anon"),
            file: stat("file"),
            inactive_file: stat("inactive_file"),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    Any {
        type_url: CGROUPS_V2_METRICS.into(),
        value: metrics.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::cgroups_v2::metrics::Metrics;

    use super::*;

    /// What containerd's CRI decodes: cgroup v2 metrics under their type URL, in µs.
    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let stats: crate::runtime::RuntimeStats = serde_json::from_value(serde_json::json!({
            "cpu": {"usage": {"total": 1_500_000, "user": 1_000_000, "kernel": 500_000}},
            "memory": {"usage": {"usage": 4096, "limit": 8192}, "raw": {"anon": 1024, "inactive_file": 512}},
            "pids": {"current": 3, "limit": 64},
        }))
        .unwrap();
        let any = metrics_any(&stats);
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (1500, 1000, 500)
        );
        assert_eq!((m.memory.usage, m.memory.usage_limit), (4096, 8192));
        assert_eq!(
            (m.memory.anon, m.memory.inactive_file, m.memory.file),
            (1024, 512, 0)
        );
        assert_eq!((m.pids.current, m.pids.limit), (3, 64));
    }
}
