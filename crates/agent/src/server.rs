//! The agent's request handling, independent of how it was started: the vsock
//! listener, one thread per connection, JSON requests dispatched to their actions, and
//! the hand-over of an `exec` connection to [`crate::session`]. The binary runs it on
//! vsock; tests run it in-process over a `UnixStream::pair()` with the root `/`.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use forkvm_agent_proto::{
    check_container_id, forward, ContainerRoot, PidNamespace, MAX_CONTAINERS,
};

use crate::containers::Container;
use crate::identity;
use crate::protocol::{
    parse_request, to_line, ProcessSpec, Request, Response, MAX_LINE, PROTOCOL_VERSION,
};
use crate::reaper::Reaper;
use crate::session;
use crate::spawn::{self, Spawned};

/// How the agent was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A daemon started by another init (the default guest's busybox): no init
    /// processes, no shutdown.
    Daemon,
    /// The guest's PID 1: init processes and shutdown power the VM off.
    Init,
}

/// How an [`Agent`] runs processes.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Root directory of started processes (`/rootfs` with a container rootfs, else `/`).
    pub root: PathBuf,
    /// Daemon or PID 1.
    pub mode: Mode,
    /// Where app containers ([`Request::CreateContainer`]) are assembled
    /// ([`crate::containers::CONTAINERS`] in the guest).
    pub containers: PathBuf,
}

impl AgentConfig {
    /// `mode`, processes in `root`, app containers where the guest has them.
    pub fn new(root: impl Into<PathBuf>, mode: Mode) -> Self {
        Self {
            root: root.into(),
            mode,
            containers: crate::containers::CONTAINERS.into(),
        }
    }
}

/// Why a signal could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Not a running process of this agent.
    #[error("pid {0} is not a running process started by this agent")]
    UnknownPid(i32),
    /// A running process of another container.
    #[error("pid {pid} is not a running process of container {container:?}")]
    OtherContainer {
        /// Target.
        pid: i32,
        /// The container the request named.
        container: String,
    },
    /// `kill(2)` failed.
    #[error("kill {pid} with signal {signal}: {source}")]
    Kill {
        /// Target.
        pid: i32,
        /// Signal number.
        signal: i32,
        /// Why.
        source: io::Error,
    },
}

/// Why PID-1 mode ends the VM, or starts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOffReason {
    /// The init process exited: every other process is killed at once, before its last
    /// output is read, so that none holds its exit back (as the kernel kills a PID
    /// namespace whose init exited); [`PowerOffReason::InitExited`] follows once the
    /// exit frame is delivered. The VM keeps running until then.
    InitEnding,
    /// The init process exited and its exit frame was delivered.
    InitExited,
    /// The host sent [`Request::Shutdown`].
    Shutdown,
}

/// What ends the VM: [`crate::power::power_off`] in the guest, a recorder in tests.
pub type PowerOff = Box<dyn Fn(&Reaper, PowerOffReason) + Send + Sync>;

/// The guest's power-off: SIGKILL everything at once after an init exit, SIGTERM with
/// a grace period for a shutdown.
fn real_power_off(reaper: &Reaper, reason: PowerOffReason) {
    match reason {
        PowerOffReason::InitEnding => crate::power::kill_others(),
        PowerOffReason::InitExited => crate::power::power_off(reaper, None),
        PowerOffReason::Shutdown => {
            crate::power::power_off(reaper, Some(crate::power::SHUTDOWN_GRACE))
        }
    }
}

/// The agent: configuration, the VM's containers and the processes it started.
pub struct Agent {
    config: AgentConfig,
    reaper: &'static Reaper,
    /// The container the VM booted with.
    boot: Arc<Container>,
    /// The app containers made since, and the ids being made or destroyed.
    containers: Mutex<Containers>,
    /// The processes started and not seen exit yet, each with its container.
    live: Mutex<HashMap<libc::pid_t, Arc<Container>>>,
    /// The [`Request::Forward`] connections being carried.
    forwards: forward::Slots,
    power_off: PowerOff,
}

impl Agent {
    /// A new agent; starts the process-wide reaper if it is not running yet.
    pub fn new(config: AgentConfig) -> Arc<Agent> {
        Self::with_power_off(config, Box::new(real_power_off))
    }

    /// [`Agent::new`] with another way to end the VM in [`Mode::Init`] (tests: the real
    /// one signals every process and powers off).
    pub fn with_power_off(config: AgentConfig, power_off: PowerOff) -> Arc<Agent> {
        Arc::new(Agent {
            boot: Arc::new(Container::boot(&config.root)),
            config,
            reaper: Reaper::global(),
            containers: Mutex::new(Containers::default()),
            forwards: forward::Slots::new(forward::MAX_FORWARDS),
            live: Mutex::new(HashMap::new()),
            power_off,
        })
    }

    /// The root directory of the boot container's processes.
    pub fn root(&self) -> &Path {
        self.boot.root()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<libc::pid_t, Arc<Container>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, Containers> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `signal` to `pid` if this agent started it and it has not exited.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<(), SignalError> {
        self.signal_in(None, pid, signal)
    }

    /// [`Agent::signal`], if `pid` is a process of `container` (any container's when
    /// `None`).
    fn signal_in(
        &self,
        container: Option<&Arc<Container>>,
        pid: i32,
        signal: i32,
    ) -> Result<(), SignalError> {
        let live = self.live();
        match (live.get(&pid), container) {
            (None, _) => return Err(SignalError::UnknownPid(pid)),
            (Some(theirs), Some(c)) if !Arc::ptr_eq(theirs, c) => {
                return Err(SignalError::OtherContainer {
                    pid,
                    container: c.id().unwrap_or("").to_owned(),
                })
            }
            _ => {}
        }
        // SAFETY: kill has no memory preconditions; holding `live` keeps the pid from
        // being reported exited (and so reused) while we signal it.
        if unsafe { libc::kill(pid, signal) } < 0 {
            return Err(SignalError::Kill {
                pid,
                signal,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Marks `pid` as exited: no more signals go to it.
    pub(crate) fn forget(&self, pid: libc::pid_t) {
        self.live().remove(&pid);
    }

    /// Accepts connections on `listener` forever, serving each in its own thread.
    /// The identity port is served too, on a thread of its own.
    pub fn serve_listener(self: &Arc<Self>, listener: OwnedFd) -> ! {
        // Best effort: a reseed opens it itself if this could not.
        let _ = identity::random_device();
        crate::identity_port::start(self.clone());
        loop {
            // SAFETY: accept on our listening socket; null address pointers are allowed.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            // SAFETY: accept4 returned a new connected stream socket we own; a vsock
            // stream behaves like any stream socket for reads and writes.
            let conn = unsafe { UnixStream::from_raw_fd(c) };
            let agent = self.clone();
            let spawned = std::thread::Builder::new()
                .name("conn".into())
                .spawn(move || agent.serve(conn));
            if let Err(e) = spawned {
                eprintln!("forkvm-agent: connection thread: {e}");
            }
        }
    }

    /// Serves one connection until the host closes it or it becomes a process's
    /// connection and that process has exited.
    pub fn serve(self: &Arc<Self>, conn: UnixStream) {
        let Ok(read_half) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
                // One answer for an overlong line: drop the rest of it.
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    match (&mut reader).take(64 * 1024).read_until(b'\n', &mut rest) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if rest.last() == Some(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
            }
            let req = match std::str::from_utf8(&line) {
                Ok(text) => parse_request(text),
                Err(_) => Err("bad request: not UTF-8".to_owned()),
            };
            let resp = match req.and_then(|r| self.target(r)) {
                Err(message) => Response::Error { message },
                Ok((container, Request::Exec { process })) => {
                    match self.start(&container, &process) {
                        Ok(spawned) => {
                            let pid = spawned.child.pid();
                            if (&conn)
                                .write_all(to_line(&Response::Started { pid }).as_bytes())
                                .is_err()
                            {
                                // Nobody to talk to: let the process run detached.
                                eprintln!("forkvm-agent: pid {pid}: host left before Started");
                            }
                            let app = container.id().is_some();
                            // A main process takes the rest of its container with it: an
                            // app container's (the VM runs on), or everything but the
                            // agent (the VM ends after its exit frame).
                            let on_exit = process.init.then(|| {
                                let agent = self.clone();
                                Box::new(move || match app {
                                    true => agent.end_container(&container),
                                    false => {
                                        (agent.power_off)(agent.reaper, PowerOffReason::InitEnding)
                                    }
                                }) as Box<dyn FnOnce() + Send>
                            });
                            let end = session::run(
                                self.clone(),
                                conn,
                                reader,
                                spawned,
                                !process.init,
                                on_exit,
                            );
                            if process.init && !app {
                                end.wait_host(session::INIT_LINGER);
                                (self.power_off)(self.reaper, PowerOffReason::InitExited);
                            }
                            return;
                        }
                        Err(resp) => resp,
                    }
                }
                Ok((_, Request::Forward { port })) => match self.forward(port) {
                    Ok((guest, _slot)) => {
                        if (&conn)
                            .write_all(to_line(&Response::Ok).as_bytes())
                            .is_err()
                        {
                            return;
                        }
                        // The host sends nothing before the answer; whatever it did is
                        // the connection's first bytes.
                        let early = reader.buffer().to_vec();
                        if (&guest).write_all(&early).is_err() {
                            return;
                        }
                        let _ = forkvm_agent_proto::forward::splice(conn, guest);
                        return;
                    }
                    Err(message) => Response::Error { message },
                },
                Ok((_, Request::Shutdown)) if self.config.mode == Mode::Init => {
                    let _ = (&conn).write_all(to_line(&Response::Ok).as_bytes());
                    (self.power_off)(self.reaper, PowerOffReason::Shutdown);
                    return;
                }
                Ok((container, req)) => self.handle(&container, req),
            };
            if (&conn).write_all(to_line(&resp).as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Connects to `port` on the guest's loopback for [`Request::Forward`], within
    /// [`forward::MAX_FORWARDS`] (the slot is held while the connection is carried).
    fn forward(&self, port: u16) -> Result<(TcpStream, forward::Slot), String> {
        let slot = self
            .forwards
            .take()
            .ok_or_else(|| format!("more than {} forwarded connections", forward::MAX_FORWARDS))?;
        // IPv4 first, as containerd dials on the host; a server on `::1` alone is
        // reached too.
        let v4 = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let guest = TcpStream::connect_timeout(&v4, forward::CONNECT_TIMEOUT)
            .or_else(|e| match e.kind() {
                io::ErrorKind::ConnectionRefused => {
                    TcpStream::connect_timeout(&v6, forward::CONNECT_TIMEOUT).map_err(|_| e)
                }
                _ => Err(e),
            })
            .map_err(|e| format!("cannot connect to {v4}: {e}"))?;
        Ok((guest, slot))
    }

    /// The container a request is for, and the request to carry out there: the one
    /// [`Request::InContainer`] wraps, in the container it names; any other in the boot
    /// container.
    fn target(&self, req: Request) -> Result<(Arc<Container>, Request), String> {
        let Request::InContainer { id, request } = req else {
            return Ok((self.boot.clone(), req));
        };
        match *request {
            Request::Mount { .. }
            | Request::Cgroup { .. }
            | Request::Filesystems { .. }
            | Request::Container { .. }
            | Request::Hooks { .. }
            | Request::Exec { .. }
            | Request::Signal { .. }
            | Request::Stats => {}
            ref other => {
                let op = serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.get("op")?.as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Err(format!(
                    "{op}: not a request for one container (in_container takes mount, \
                     cgroup, filesystems, container, hooks, exec, signal and stats)"
                ));
            }
        }
        let container = self
            .containers()
            .live
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("no container {id:?} in this VM"))?;
        Ok((container, *request))
    }

    /// Answers a request that came over the identity port ([`crate::identity_port`]):
    /// a fork child's identity, or a ping; any other is refused there.
    pub(crate) fn answer_on_port(&self, req: Request) -> Response {
        match req {
            Request::Identity { .. } | Request::Ping => self.handle(&self.boot, req),
            _ => Response::Error {
                message: "the identity port serves identity and ping requests only".into(),
            },
        }
    }

    /// Answers a request for `container` that does not take over the connection.
    fn handle(&self, container: &Arc<Container>, req: Request) -> Response {
        // Held while the request acts: a destroy waits for it, and one that came first
        // leaves nothing to act on.
        let Some(_alive) = container.lifecycle() else {
            return Response::Error {
                message: destroyed_message(container),
            };
        };
        let pid1 =
            |op: &str| Err::<(), _>(format!("{op} needs the agent to run as the guest's PID 1"));
        let init = self.config.mode == Mode::Init;
        let result = match req {
            Request::Ping => {
                return Response::Pong {
                    version: PROTOCOL_VERSION,
                    hostname: identity::hostname(),
                }
            }
            Request::Identity {
                hostname,
                seed,
                macs,
                time_ns,
            } => identity::apply(&hostname, &seed, &macs, time_ns)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    if init && identity::root_takes_hostname_files(self.boot.root()) {
                        identity::write_hostname_files(self.boot.root(), &hostname)
                            .map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    }
                }),
            Request::Network {
                interfaces,
                routes,
                nameservers,
            } => crate::network::apply(&interfaces, &routes)
                .and_then(|()| {
                    if nameservers.is_empty() {
                        return Ok(());
                    }
                    let root = if init {
                        self.boot.root()
                    } else {
                        Path::new("/")
                    };
                    crate::network::write_resolv_conf(root, &nameservers)
                })
                .map_err(|e| e.to_string()),
            Request::DnsRelay { addresses } => crate::dns::start(&addresses),
            Request::Mount { .. } if !init => pid1("mount"),
            Request::Mount { shares } => crate::shares::mount_all(container.root(), &shares)
                .and_then(|()| container.sync_mounts()),
            Request::Hooks { .. } if !init => pid1("hooks"),
            Request::Hooks { kind, hooks, state } => {
                crate::hooks::run_all(container, &kind, &hooks, &state, self.reaper)
            }
            Request::Cgroup { .. } if !init => pid1("cgroup"),
            Request::Cgroup { limits } => container.set_cgroup(&limits),
            Request::Filesystems { .. } if !init => pid1("filesystems"),
            Request::Filesystems { mounts } => crate::mounts::apply(
                container.root(),
                &mounts,
                Path::new("/dev/pts"),
                container.cgroup_procs(),
            )
            .and_then(|()| container.sync_mounts()),
            Request::Container { .. } if !init => pid1("container"),
            Request::Container {
                devices,
                sysctls,
                masked_paths,
                readonly_paths,
                readonly_root,
                domainname,
                seccomp,
                user_namespace,
            } => crate::container::apply(
                container,
                &crate::container::GuestKernel::own(),
                &crate::container::Settings {
                    devices: &devices,
                    sysctls: &sysctls,
                    masked: &masked_paths,
                    readonly: &readonly_paths,
                    readonly_root,
                    domainname: domainname.as_deref(),
                    seccomp: &seccomp,
                    user_namespace: user_namespace.as_ref(),
                },
                self.reaper,
            )
            .and_then(|()| container.sync_mounts()),
            Request::Unplug => {
                return match crate::network::unplug() {
                    Ok(nics) => Response::Unplugged { nics },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Signal { pid, signal } => {
                // In the boot container's name, any process the agent started.
                let only = container.id().is_some().then_some(container);
                self.signal_in(only, pid, signal).map_err(|e| e.to_string())
            }
            Request::Stats if !init => pid1("stats"),
            Request::Stats => {
                return match container.usage() {
                    Ok(usage) => Response::Stats { usage },
                    Err(message) => Response::Error { message },
                }
            }
            Request::Shutdown => pid1("shutdown"),
            Request::CreateContainer { .. } if !init => pid1("create_container"),
            Request::CreateContainer { id, root } => self.create_container(&id, &root),
            Request::DestroyContainer { .. } if !init => pid1("destroy_container"),
            Request::DestroyContainer { id } => self.destroy_container(&id),
            Request::Exec { .. } | Request::Forward { .. } => {
                unreachable!("exec and forward take over the connection")
            }
            Request::InContainer { .. } => unreachable!("unwrapped by target"),
        };
        match result {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        }
    }

    /// Makes the app container `id` (see [`crate::containers`]).
    fn create_container(&self, id: &str, root: &ContainerRoot) -> Result<(), String> {
        check_container_id(id)?;
        {
            let mut containers = self.containers();
            containers.claim(id)?;
            if containers.live.len() + containers.busy.len() > MAX_CONTAINERS {
                containers.busy.remove(id);
                return Err(format!(
                    "container {id:?}: this VM has {MAX_CONTAINERS} app containers, the most it may have"
                ));
            }
        }
        // Made without holding the list (a slow share must not stall the requests of
        // the other containers), its id held meanwhile.
        let made = Container::create(&self.config.containers, id, root);
        let mut containers = self.containers();
        containers.busy.remove(id);
        let container = made.map_err(|e| format!("container {id:?}: {e}"))?;
        containers.live.insert(id.to_owned(), Arc::new(container));
        Ok(())
    }

    /// Forgets the app container `id`, kills its processes, and takes its root, mounts
    /// and cgroup away; its id is held until that is done.
    fn destroy_container(&self, id: &str) -> Result<(), String> {
        let container =
            {
                let mut containers = self.containers();
                let container = containers.live.remove(id).ok_or_else(|| {
                    match containers.busy.contains(id) {
                        true => format!("container {id:?} is being made or destroyed"),
                        false => format!("no container {id:?} in this VM"),
                    }
                })?;
                containers.busy.insert(id.to_owned());
                container
            };
        self.kill_started(&container);
        let destroyed = container
            .destroy()
            .map_err(|e| format!("container {id:?}: {e}"));
        self.containers().busy.remove(id);
        destroyed
    }

    /// SIGKILL for every process the agent started in `container` that still runs.
    fn kill_started(&self, container: &Arc<Container>) {
        let live = self.live();
        for (&pid, _) in live.iter().filter(|(_, c)| Arc::ptr_eq(c, container)) {
            // SAFETY: kill has no memory preconditions. The pid is in `live` until its
            // session forgets it, a moment after the reaper collected it: the window
            // in which a new process could have its number is that moment.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// An app container's main process exited: the rest of its processes go too (as a
    /// runc container's do with the PID namespace its init ends), unless it was
    /// destroyed meanwhile.
    fn end_container(&self, container: &Arc<Container>) {
        let Some(_alive) = container.lifecycle() else {
            return;
        };
        self.kill_started(container);
        if let Err(e) = container.kill_all() {
            eprintln!(
                "forkvm-agent: container {:?}: {e}",
                container.id().unwrap_or("")
            );
        }
    }

    /// Starts `process` in `container`, or says why not as the response to send.
    fn start(
        &self,
        container: &Arc<Container>,
        process: &ProcessSpec,
    ) -> Result<Spawned, Response> {
        let error = |message: String| Response::Error { message };
        if process.init {
            if self.config.mode != Mode::Init {
                return Err(error(
                    "an init process needs the agent to run as the guest's PID 1".into(),
                ));
            }
            if !container.start_init() {
                return Err(error("an init process was already started".into()));
            }
        }
        // Held across the spawn: a destroy that came first leaves nothing to start in,
        // one that comes later finds the process.
        let Some(_alive) = container.lifecycle() else {
            if process.init {
                container.init_failed();
            }
            return Err(error(destroyed_message(container)));
        };
        // The container whose PID namespace a main process is to share.
        let shared = match (&process.pid_namespace, process.init) {
            (Some(PidNamespace::Sandbox), true) => Some(self.boot.clone()),
            (Some(PidNamespace::Container(id)), true) => {
                let found = self.containers().live.get(id).cloned();
                if found.is_none() {
                    container.init_failed();
                    return Err(error(format!(
                        "pid_namespace: no container {id:?} in this VM"
                    )));
                }
                found
            }
            _ => None,
        };
        // Held across the spawn so a Signal request never sees a started pid missing.
        let mut live = self.live();
        match spawn::spawn(container, process, self.reaper, shared.as_deref()) {
            Ok(spawned) => {
                live.insert(spawned.child.pid(), container.clone());
                Ok(spawned)
            }
            Err(e) => {
                if process.init {
                    container.init_failed();
                }
                Err(match e.exit_code() {
                    Some(exit_code) => Response::ExecFailed {
                        message: e.to_string(),
                        exit_code,
                    },
                    None => error(e.to_string()),
                })
            }
        }
    }
}

/// The app containers of the VM.
#[derive(Default)]
struct Containers {
    /// Made, by id.
    live: BTreeMap<String, Arc<Container>>,
    /// Being made or destroyed: an id in neither set is free. A container's paths and
    /// cgroup are named by its id, so one id never has two containers at once.
    busy: std::collections::BTreeSet<String>,
}

impl Containers {
    /// Holds `id` for a container about to be made.
    fn claim(&mut self, id: &str) -> Result<(), String> {
        if self.live.contains_key(id) {
            return Err(format!("container {id:?} exists already"));
        }
        if !self.busy.insert(id.to_owned()) {
            return Err(format!("container {id:?} is being made or destroyed"));
        }
        Ok(())
    }
}

/// What a request for a container destroyed meanwhile is answered.
fn destroyed_message(container: &Container) -> String {
    format!("container {:?} was destroyed", container.id().unwrap_or(""))
}

/// A vsock stream socket listening on `port` for any CID.
pub fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    let (sock, addr) = vsock_socket(libc::VMADDR_CID_ANY, port)?;
    // SAFETY: `addr` is a valid sockaddr_vm of the size we pass, `sock` a socket we own.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// A new vsock stream socket, and the address of `(cid, port)` to bind or connect it to.
pub(crate) fn vsock_socket(cid: u32, port: u32) -> io::Result<(OwnedFd, libc::sockaddr_vm)> {
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    Ok((sock, addr))
}

impl session::Processes for Agent {
    fn signal(&self, pid: libc::pid_t, signal: i32) -> io::Result<()> {
        Agent::signal(self, pid, signal).map_err(io::Error::other)
    }
    fn forget(&self, pid: libc::pid_t) {
        Agent::forget(self, pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_has_one_container_at_a_time() {
        let mut c = Containers::default();
        c.claim("a").unwrap();
        // Being made: not twice at once.
        assert_eq!(
            c.claim("a").unwrap_err(),
            "container \"a\" is being made or destroyed"
        );
        c.busy.remove("a");
        c.live
            .insert("a".into(), Arc::new(Container::boot(Path::new("/"))));
        assert_eq!(c.claim("a").unwrap_err(), "container \"a\" exists already");
        c.claim("b").unwrap();
    }
}
