//! Forking a running VM into child VMs, each in its own VMM process.
//!
//! The parent pauses its vCPUs, captures its state ([`VmSnapshot`]), freezes its memory
//! (see [`crate::memory`]: nothing is copied on a first fork, only pages written since
//! the last fork on later ones) and resumes: that is the whole parent pause, and it does
//! not grow with guest memory. Then it starts each child as `<forkvm> __fork-child` with
//! a socket on fd 3 over which it sends the snapshot, the child's identity and the
//! memory files. The child maps the files copy-on-write, builds a new KVM VM, restores
//! every vCPU and device, resumes and reports that it runs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::control::{error_chain, ChildInfo, ChildSpec, ControlError, ForkOutcome, ForkRequest};
use crate::memory::{GuestRam, MemoryLayout};
use crate::snapshot::{ChildIdentity, VmSnapshot};
use crate::vmm::{Origin, Vmm, VmmError};

/// The hidden CLI verb a fork child runs.
pub const CHILD_VERB: &str = "__fork-child";
/// The descriptor on which a fork child finds its parent's socket.
pub const CHILD_FD: i32 = 3;
/// Most children one fork request may create.
pub const MAX_CHILDREN: u32 = 1024;
/// How long a child may take to report that it runs.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest payload a child accepts.
const MAX_CHILD_PAYLOAD: u64 = 64 << 20;

/// What a fork child receives (its memory files travel beside it).
#[derive(Debug, Serialize, Deserialize)]
struct ChildPayload {
    snapshot: VmSnapshot,
    layout: MemoryLayout,
    identity: ChildIdentity,
    console: Option<PathBuf>,
}

/// Errors in a fork child before its VM runs.
#[derive(Debug, thiserror::Error)]
pub enum ForkChildError {
    /// Receiving the payload failed.
    #[error("cannot receive the fork payload")]
    Transfer(#[from] forkvm_snapshot::TransferError),
    /// The payload is invalid.
    #[error("invalid fork payload")]
    Format(#[from] forkvm_snapshot::FormatError),
    /// No memory file came with the payload.
    #[error("the fork payload carried no guest memory")]
    NoMemory,
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The VM could not be restored.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Resuming or reporting failed.
    #[error("cannot start the restored VM: {0}")]
    Start(String),
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: getrandom writes at most `n - filled` bytes into the buffer's tail.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r > 0 {
            filled += r as usize;
        }
    }
    buf
}

fn random_u32() -> u32 {
    u32::from_le_bytes(random_bytes(4).try_into().expect("4 bytes"))
}

/// A fresh CID: any value from 3 to 2^32-2 (0-2 are reserved, -1 is "any").
fn random_cid() -> u64 {
    3 + u64::from(random_u32()) % (u64::from(u32::MAX) - 4)
}

/// Who child number `seq` of a VM configured as `cfg` is, with `spec`'s overrides.
fn child_identity(
    cfg: &VmConfig,
    seq: u32,
    spec: &ChildSpec,
) -> Result<ChildIdentity, ControlError> {
    let (cid, vsock_uds) = match &cfg.vsock {
        Some(v) => (
            Some(spec.cid.unwrap_or_else(random_cid)),
            Some(spec.vsock_uds.clone().unwrap_or_else(|| {
                PathBuf::from(format!("{}.{}-{seq}", v.uds.display(), std::process::id()))
            })),
        ),
        None => (None, None),
    };
    if let Some(c) = cid {
        if !(3..u64::from(u32::MAX)).contains(&c) {
            return Err(ControlError::Invalid(format!(
                "CID {c} is reserved or out of range"
            )));
        }
    }
    let nics = cfg.nets.len();
    if !spec.taps.is_empty() && spec.taps.len() != nics {
        return Err(ControlError::Invalid(format!(
            "{} TAP names given for {nics} NICs",
            spec.taps.len()
        )));
    }
    let taps = if spec.taps.is_empty() {
        (0..nics)
            .map(|i| format!("fk{}c{seq}n{i}", std::process::id() % 100_000))
            .collect()
    } else {
        spec.taps.clone()
    };
    let macs = (0..nics)
        .map(|_| {
            forkvm_devices::virtio::net::random_mac()
                .map_err(|e| ControlError::Failed(format!("cannot make a MAC: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(ChildIdentity {
        cid,
        vsock_uds,
        taps,
        macs,
        hostname: format!("fork-{:08x}", random_u32()),
        seed: random_bytes(64),
    })
}

/// Checks a fork request against the VM it forks; returns the executable children run.
pub(crate) fn check_request(cfg: &VmConfig, req: &ForkRequest) -> Result<PathBuf, ControlError> {
    if req.count == 0 || req.count > MAX_CHILDREN {
        return Err(ControlError::Invalid(format!(
            "count must be 1 to {MAX_CHILDREN}, got {}",
            req.count
        )));
    }
    if req.children.len() > req.count as usize {
        return Err(ControlError::Invalid(format!(
            "{} child specs for {} children",
            req.children.len(),
            req.count
        )));
    }
    if let Some(d) = cfg.disks.iter().find(|d| !d.read_only) {
        return Err(ControlError::Invalid(format!(
            "the VM has a writable disk ({}); parent and children would write the same image: attach it read-only to fork",
            d.path.display()
        )));
    }
    match &req.child_exe {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe()
            .map_err(|e| ControlError::Failed(format!("cannot find the forkvm executable: {e}"))),
    }
}

/// Identities for every child of `req`, numbered from `*seq + 1`.
pub(crate) fn identities(
    cfg: &VmConfig,
    req: &ForkRequest,
    seq: &mut u32,
) -> Result<Vec<ChildIdentity>, ControlError> {
    (0..req.count as usize)
        .map(|i| {
            *seq += 1;
            child_identity(
                cfg,
                *seq,
                req.children.get(i).unwrap_or(&ChildSpec::default()),
            )
        })
        .collect()
}

/// Starts one child per identity from `snapshot` and the memory `files`, then waits
/// until each reports that it runs; times are measured from `t0`.
pub(crate) fn start_children(
    exe: &std::path::Path,
    snapshot: VmSnapshot,
    layout: &MemoryLayout,
    files: &[File],
    identities: Vec<ChildIdentity>,
    req: &ForkRequest,
    t0: Instant,
) -> Result<Vec<ChildInfo>, ControlError> {
    let mut started = Vec::with_capacity(identities.len());
    let mut payload = ChildPayload {
        snapshot,
        layout: layout.clone(),
        identity: ChildIdentity::default(),
        console: None,
    };
    for (i, identity) in identities.into_iter().enumerate() {
        // One snapshot, encoded with each child's identity.
        payload.identity = identity;
        payload.console = req.children.get(i).and_then(|c| c.console.clone());
        let blob = forkvm_snapshot::encode(&payload).map_err(|e| {
            ControlError::Failed(format!(
                "cannot encode the fork payload: {}",
                error_chain(&e)
            ))
        })?;
        let (pid, sock) = spawn_child(exe, &blob, files)
            .map_err(|e| ControlError::Failed(format!("cannot start fork child {i}: {e}")))?;
        started.push((pid, sock, payload.identity.clone()));
    }
    let mut children = Vec::with_capacity(started.len());
    for (pid, sock, identity) in started {
        wait_running(&sock)
            .map_err(|e| ControlError::Failed(format!("fork child {pid} did not start: {e}")))?;
        children.push(ChildInfo {
            pid,
            cid: identity.cid,
            vsock_uds: identity.vsock_uds,
            running_after_us: t0.elapsed().as_micros() as u64,
        });
    }
    Ok(children)
}

impl Vmm {
    /// Forks this VM into `req.count` children (see the module documentation).
    pub fn fork(&mut self, req: &ForkRequest) -> Result<ForkOutcome, ControlError> {
        let t0 = Instant::now();
        let exe = check_request(&self.cfg, req)?;
        let identities = identities(&self.cfg, req, &mut self.fork_seq)?;

        // The parent pause: pause, capture, freeze memory, resume.
        let was_paused = self.is_paused();
        let pause_start = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        let captured = self.capture().and_then(|snap| {
            let (files, layout) = self.ram.freeze_for_fork().map_err(|e| {
                ControlError::Failed(format!("cannot share guest memory: {}", error_chain(&e)))
            })?;
            let files = files
                .into_iter()
                .map(|f| f.try_clone())
                .collect::<Result<Vec<File>, _>>()
                .map_err(|e| ControlError::Failed(format!("cannot share guest memory: {e}")))?;
            Ok((snap, files, layout))
        });
        let frozen_at = pause_start.elapsed();
        if !was_paused && !req.freeze {
            self.resume()?;
        }
        let parent_pause_us = pause_start.elapsed().as_micros() as u64;
        tracing::debug!(
            ?frozen_at,
            parent_pause_us,
            "parent paused, captured and froze"
        );
        let (snapshot, files, layout) = captured?;
        let children = start_children(&exe, snapshot, &layout, &files, identities, req, t0)?;
        tracing::info!(children = children.len(), parent_pause_us, "forked");
        Ok(ForkOutcome {
            children,
            parent_pause_us,
        })
    }
}

/// Starts `exe __fork-child` with a socket on fd 3 and sends it `blob` and `files`.
fn spawn_child(
    exe: &std::path::Path,
    blob: &[u8],
    files: &[File],
) -> std::io::Result<(u32, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    // A child is a daemon: it must not hold the caller's pipes open (a caller reading
    // `forkvm template fork`'s output to EOF would wait for every child to end). It
    // reports a failure to start on its socket, and logs to its console afterwards.
    cmd.arg(CHILD_VERB)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec: setsid and dup2.
    unsafe {
        cmd.pre_exec(move || {
            // The child is a VM of its own: not in the parent's session or process
            // group, so a Ctrl-C meant for the parent does not kill it.
            libc::setsid();
            if libc::dup2(fd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(theirs);
    let pid = child.id();
    // Reap the child when it ends; its lifetime is its own.
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })?;
    let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    forkvm_snapshot::send_blob(&ours, blob, &raw).map_err(std::io::Error::other)?;
    Ok((pid, ours))
}

/// Sends this process's stderr (its own log messages, a panic) to `file`: a fork child
/// is a daemon started with stderr on /dev/null. Call it before starting threads.
pub fn redirect_stderr(file: &File) -> std::io::Result<()> {
    // SAFETY: dup2 onto fd 2 of a descriptor `file` keeps open for the call.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A child's report on its socket: it runs.
const REPORT_RUNNING: u64 = 1;
/// A child's report on its socket: it failed; a length-prefixed message follows.
const REPORT_FAILED: u64 = 2;

fn wait_running(sock: &UnixStream) -> std::io::Result<()> {
    sock.set_read_timeout(Some(CHILD_START_TIMEOUT))?;
    let mut b = [0u8; 8];
    (&*sock)
        .read_exact(&mut b)
        .map_err(|e| std::io::Error::other(format!("it exited or hung before reporting ({e})")))?;
    match u64::from_le_bytes(b) {
        REPORT_RUNNING => Ok(()),
        REPORT_FAILED => {
            let mut len = [0u8; 4];
            (&*sock).read_exact(&mut len)?;
            let mut msg = vec![0u8; (u32::from_le_bytes(len) as usize).min(64 * 1024)];
            (&*sock).read_exact(&mut msg)?;
            Err(std::io::Error::other(
                String::from_utf8_lossy(&msg).into_owned(),
            ))
        }
        other => Err(std::io::Error::other(format!("unexpected report {other}"))),
    }
}

fn report_failure(sock: &UnixStream, msg: &str) {
    let mut out = REPORT_FAILED.to_le_bytes().to_vec();
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    let _ = (&*sock).write_all(&out);
}

/// A fork child's payload, received from its parent, not yet restored.
pub struct ReceivedChild {
    sock: UnixStream,
    payload: ChildPayload,
    files: Vec<File>,
}

impl ReceivedChild {
    /// Receives the snapshot, identity and memory files on fd 3 (set up by the parent
    /// before exec; see [`spawn_child`]).
    pub fn receive() -> Result<Self, ForkChildError> {
        // SAFETY: the parent set up fd 3 as our end of a Unix stream socket before exec
        // and nothing else in this process uses it.
        let sock = unsafe { UnixStream::from_raw_fd(CHILD_FD) };
        let (blob, files) = forkvm_snapshot::recv_blob(&sock, MAX_CHILD_PAYLOAD)?;
        let mut payload: ChildPayload = forkvm_snapshot::decode(&blob)?;
        if files.is_empty() {
            return Err(ForkChildError::NoMemory);
        }
        // The child's configuration carries its own identity.
        let id = &payload.identity;
        let cfg = &mut payload.snapshot.config;
        if let (Some(v), Some(cid), Some(uds)) = (&mut cfg.vsock, id.cid, &id.vsock_uds) {
            v.cid = cid;
            v.uds = uds.clone();
        }
        for (i, net) in cfg.nets.iter_mut().enumerate() {
            if let Some(tap) = id.taps.get(i) {
                net.tap = tap.clone();
            }
            net.mac = id.macs.get(i).copied();
        }
        Ok(Self {
            sock,
            payload,
            files,
        })
    }

    /// The child's configuration (with its own identity).
    pub fn config(&self) -> &VmConfig {
        &self.payload.snapshot.config
    }

    /// Where the parent asked this child's console to go, if anywhere.
    pub fn console_path(&self) -> Option<&std::path::Path> {
        self.payload.console.as_deref()
    }

    /// Tells the parent this child cannot start, and why (before [`ReceivedChild::start`]).
    pub fn fail(self, why: &str) {
        report_failure(&self.sock, why);
    }

    /// Restores the VM with its console on `console`, resumes it, tells the parent it
    /// runs, and has the guest agent apply the child's identity (in the background).
    /// A failure is reported to the parent as well as returned.
    pub fn start(self, console: Box<dyn Write + Send>) -> Result<Vmm, ForkChildError> {
        let sock = self
            .sock
            .try_clone()
            .map_err(|e| ForkChildError::Start(e.to_string()))?;
        let result = self.start_inner(console);
        if let Err(e) = &result {
            report_failure(&sock, &error_chain(e));
        }
        result
    }

    fn start_inner(self, console: Box<dyn Write + Send>) -> Result<Vmm, ForkChildError> {
        let Self {
            sock,
            payload,
            mut files,
        } = self;
        let base = files.remove(0);
        let ram = GuestRam::from_layers(base, files, &payload.layout)?;
        let mut vmm = Vmm::build(
            &payload.snapshot.config,
            ram,
            console,
            Origin::Restore {
                snapshot: &payload.snapshot,
                identity: &payload.identity,
            },
        )?;
        vmm.resume()
            .map_err(|e| ForkChildError::Start(e.to_string()))?;
        (&sock)
            .write_all(&REPORT_RUNNING.to_le_bytes())
            .map_err(|e| ForkChildError::Start(format!("cannot report to the parent: {e}")))?;
        if let Some(uds) = payload.identity.vsock_uds.clone() {
            let identity = payload.identity.clone();
            std::thread::Builder::new()
                .name("identity".into())
                .spawn(move || match apply_identity(&uds, &identity) {
                    Ok(took) => tracing::info!(?took, "guest agent applied the child identity"),
                    Err(e) => tracing::warn!("guest agent did not apply the child identity: {e}"),
                })
                .map_err(|e| {
                    ForkChildError::Start(format!("cannot start the identity thread: {e}"))
                })?;
        }
        Ok(vmm)
    }
}

/// How long a child keeps trying to reach its guest's agent. Generous: a child that
/// gives up keeps its parent's entropy and hostname, and a loaded host is slow.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects to the guest agent through the vsock device's host socket (the
/// `CONNECT <port>` convention) and sends the child's identity: entropy, hostname, MACs.
pub fn apply_identity(uds: &std::path::Path, id: &ChildIdentity) -> Result<Duration, String> {
    let start = Instant::now();
    let req = forkvm_agent::Request::Identity {
        hostname: id.hostname.clone(),
        seed: id.seed.clone(),
        macs: id
            .macs
            .iter()
            .map(forkvm_devices::virtio::net::format_mac)
            .collect(),
    };
    let mut last_err = String::from("no attempt");
    while start.elapsed() < AGENT_TIMEOUT {
        // A connection made before the guest has taken its new CID is dropped by the
        // guest: give up on an attempt quickly and try again.
        match agent_call_timeout(uds, &req, Duration::from_millis(250)) {
            Ok(forkvm_agent::Response::Ok) => return Ok(start.elapsed()),
            Ok(other) => return Err(format!("agent answered {other:?}")),
            Err(e) => last_err = e,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(last_err)
}

/// One request to the guest agent over the vsock device's host socket.
pub fn agent_call(
    uds: &std::path::Path,
    req: &forkvm_agent::Request,
) -> Result<forkvm_agent::Response, String> {
    agent_call_timeout(uds, req, Duration::from_secs(5))
}

/// [`agent_call`], giving up when the guest takes longer than `timeout` to answer.
pub fn agent_call_timeout(
    uds: &std::path::Path,
    req: &forkvm_agent::Request,
    timeout: Duration,
) -> Result<forkvm_agent::Response, String> {
    use forkvm_agent::client;
    let mut conn = client::connect_vsock(uds, forkvm_agent::AGENT_PORT, timeout)
        .map_err(|e| format!("connect {}: {e}", uds.display()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    client::call(&mut conn, req).map_err(|e| format!("agent call: {e}"))
}
