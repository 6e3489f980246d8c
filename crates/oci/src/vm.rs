//! One container, one VM: the container guest (the agent as PID 1) booted over a root
//! filesystem image, with vsock for the agent, run in this process. Shared by
//! `forkvm run` and the runtime's monitor.
//!
//! [`run`] starts the VM in a VM process of its own (`forkvm-vmm`, which serves its
//! forkvm API, so `forkvm ps`, `pause` and `fork` reach it), then hands a [`Session`] to
//! a thread that talks to the agent while this thread waits for the VM process. When
//! the session ends the agent powers the VM off (the container's process exited); if it
//! does not within [`POWEROFF_GRACE`], or the process never ran, the VM is stopped.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_guest_kernel::GuestImage;
use forkvm_jail::JailSpec;
use forkvm_registry::{Ending, VmHome};
use forkvm_vmm::config::DEFAULT_CMDLINE;
use forkvm_vmm::launch::{ConsoleSpec, HomeSpec, Launch, ProcessOptions, Start, VmProcess};
use forkvm_vmm::{BlockConfig, VmConfig, VsockConfig};

/// How long the guest has to boot and answer: generous, as a nested, emulated host
/// boots a kernel in seconds, not milliseconds.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(180);

/// How long the agent has to power the VM off after the container's process exited.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// The guest CID of every container VM (each VM has its own vsock device).
pub const GUEST_CID: u64 = 3;

/// The file name of a container VM's vsock socket inside its VM home.
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// The container guest's kernel and initramfs (the agent as `/init`), prepared once.
pub fn container_guest() -> Result<GuestImage> {
    let agent = forkvm_guest_kernel::find_agent().context(
        "the guest agent is not built (run `cargo xtask prepare-guest`, or set FORKVM_AGENT)",
    )?;
    forkvm_guest_kernel::container_guest(&agent)
        .context("cannot prepare the container guest kernel and initramfs")
}

/// Checks a hostname for the kernel command line: 1-64 of letters, digits, `-`, `.`.
pub fn check_hostname(hostname: &str) -> Result<()> {
    forkvm_vmm::config::check_hostname(hostname).map_err(anyhow::Error::msg)
}

/// The tag of the share that is a container's root directory ([`Root::Shared`]).
pub const ROOT_TAG: &str = "forkvm-root";
/// The tag of the read-only share holding the host files a container binds in, when its
/// root is shared (copies, as `ContainerPlan::files` says).
pub const FILES_TAG: &str = "forkvm-files";

/// A container VM's root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// An image file, the VM's read-only `vda`: the agent lays a private writable overlay
    /// in guest memory over it, so writes stay in the VM (and its fork children get
    /// copies of them).
    Disk(PathBuf),
    /// A host directory shared by virtio-fs ([`ROOT_TAG`]) and mounted as the root:
    /// writes reach that directory, as a runc container's do its bundle's rootfs. With
    /// `files`, the directory of copied host files shared read-only as [`FILES_TAG`].
    Shared {
        /// The root directory.
        dir: PathBuf,
        /// The copies of the files the container binds in.
        files: Option<PathBuf>,
    },
    /// None of its own: the agent serves from its initramfs, and every container it
    /// makes brings its root (a pod template's VM: [`crate::pod`]).
    None,
}

/// The VM: container guest over `root`, vsock for the agent at `uds`; the volumes'
/// shares are the caller's to add.
pub fn config(
    guest: &GuestImage,
    root: &Root,
    vcpus: u8,
    mem_mib: u64,
    hostname: &str,
    uds: &Path,
) -> Result<VmConfig> {
    check_hostname(hostname)?;
    let mut cfg = VmConfig::new(&guest.kernel);
    cfg.initrd = Some(guest.initrd.clone());
    cfg.vcpus = vcpus;
    cfg.mem_mib = mem_mib;
    let root_arg = match root {
        Root::Disk(image) => {
            cfg.disks = vec![BlockConfig {
                path: image.clone(),
                read_only: true,
            }];
            "forkvm.rootfs=/dev/vda".to_owned()
        }
        Root::Shared { dir, files } => {
            cfg.shares.push(forkvm_vmm::FsConfig {
                tag: ROOT_TAG.to_owned(),
                host_path: dir.clone(),
                read_only: false,
            });
            if let Some(files) = files {
                cfg.shares.push(forkvm_vmm::FsConfig {
                    tag: FILES_TAG.to_owned(),
                    host_path: files.clone(),
                    read_only: true,
                });
            }
            format!("forkvm.rootfs={ROOT_TAG} forkvm.rootfstype=virtiofs")
        }
        Root::None => String::new(),
    };
    cfg.cmdline = match root_arg.is_empty() {
        true => format!("{DEFAULT_CMDLINE} forkvm.hostname={hostname}"),
        false => format!("{DEFAULT_CMDLINE} {root_arg} forkvm.hostname={hostname}"),
    };
    cfg.vsock = Some(VsockConfig {
        cid: GUEST_CID,
        uds: uds.to_owned(),
    });
    cfg.rng = true;
    // stdin is the container process's, relayed over vsock.
    cfg.console_input = false;
    Ok(cfg)
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The process ran and exited with this code.
    Exited(i32),
    /// The process never ran (exec failed, or the container was stopped first): this
    /// exit code.
    NotStarted(i32),
}

impl Outcome {
    /// The exit code.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Exited(c) | Outcome::NotStarted(c) => c,
        }
    }
}

/// What a session thread gets: the agent's socket and whether the VM still runs.
pub struct Session {
    uds: PathBuf,
    vm_done: Arc<AtomicBool>,
}

impl Session {
    /// Waits until the agent answers (or the VM stops, or [`AGENT_DEADLINE`] passes).
    pub fn connect_agent(&self) -> Result<UnixStream> {
        let deadline = Instant::now() + AGENT_DEADLINE;
        forkvm_agent_proto::client::wait_for_agent_unless(&self.uds, deadline, &|| {
            self.vm_stopped()
        })
        .map_err(|e| {
            if self.vm_stopped() {
                anyhow::anyhow!("the VM stopped before its agent answered")
            } else {
                anyhow::anyhow!("the guest agent did not answer within {AGENT_DEADLINE:?}: {e}")
            }
        })
    }

    /// Whether the VM has stopped.
    pub fn vm_stopped(&self) -> bool {
        self.vm_done.load(Ordering::SeqCst)
    }
}

/// Relays a started process's stdio through this process's own stdin, stdout and
/// stderr until it exits, and returns its exit code. With `tty`, stdin's terminal is put
/// in raw mode (and its size sent); signals taken by `relay` go to the process from now
/// on, the first one that came before included. `stdin` false closes the process's
/// stdin at once. `ready` runs once all that is in place, before stdio flows.
pub fn relay_stdio(
    session: forkvm_agent_proto::client::ExecSession,
    relay: &crate::term::SignalRelay,
    tty: bool,
    stdin: bool,
    ready: impl FnOnce(),
) -> std::io::Result<i32> {
    let controller = session.controller();
    let _raw = if tty {
        crate::term::RawTerminal::enter(&controller)
    } else {
        None
    };
    if let Some(sig) = relay.early() {
        let _ = controller.signal(sig);
    }
    relay.attach(controller.clone());
    if tty {
        // A resize between entering raw mode and attaching found nobody to tell.
        if let Some((rows, cols)) = crate::term::terminal_size(std::io::stdin()) {
            let _ = controller.resize(rows, cols);
        }
    }
    ready();
    let input: Option<Box<dyn std::io::Read + Send>> = if stdin {
        Some(Box::new(std::io::stdin()))
    } else {
        None
    };
    let code = session.pump(
        input,
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    code
}

/// Where the VM process connects the guest's DNS relay: `<vsock uds>_53`.
pub fn dns_relay_socket(uds: &Path) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{}", forkvm_agent_proto::dns::DNS_RELAY_PORT));
    PathBuf::from(p)
}

/// Has the guest agent on `stream` take each of `requests` (what it gives the guest, and
/// the request, if any) before anything runs; the first one refused is the error.
pub fn configure_guest<const N: usize>(
    stream: &mut UnixStream,
    requests: [(&str, Option<forkvm_agent_proto::Request>); N],
) -> Result<()> {
    use forkvm_agent_proto::Response;
    for (what, req) in requests {
        let Some(req) = req else { continue };
        match forkvm_agent_proto::client::call_within(
            stream,
            &req,
            forkvm_agent_proto::client::CALL_TIMEOUT,
        )
        .with_context(|| format!("cannot give the guest {what}"))?
        {
            Response::Ok => {}
            Response::Error { message } => bail!("the guest could not take {what}: {message}"),
            other => bail!("the guest agent answered the request for {what} with {other:?}"),
        }
    }
    Ok(())
}

/// One request to the guest agent behind the VM's vsock socket `uds`, on a connection of
/// its own, connected and answered within `timeout` each.
pub fn agent_call(
    uds: &Path,
    request: &forkvm_agent_proto::Request,
    timeout: Duration,
) -> Result<forkvm_agent_proto::Response> {
    use forkvm_agent_proto::client;
    let mut conn = client::connect_vsock(uds, forkvm_agent_proto::AGENT_PORT, timeout)?;
    Ok(client::call_within(&mut conn, request, timeout)?)
}

/// Fails unless the agent on `stream` speaks protocol `min` or later: an older one
/// ignores the optional fields that newer versions added, and `what` (a field the host
/// relies on) would silently not apply.
pub fn require_agent_version(stream: &mut UnixStream, min: u32, what: &str) -> Result<()> {
    use forkvm_agent_proto::{Request, Response};
    match forkvm_agent_proto::client::call_within(
        stream,
        &Request::Ping,
        forkvm_agent_proto::client::CALL_TIMEOUT,
    )
    .context("cannot ask the guest agent its version")?
    {
        Response::Pong { version, .. } if version >= min => Ok(()),
        Response::Pong { version, .. } => bail!(
            "the guest agent speaks protocol {version}; {what} needs {min} or later \
             (rebuild the guest image: `cargo xtask prepare-guest`)"
        ),
        other => bail!("the guest agent answered a ping with {other:?}"),
    }
}

/// Most directory volumes one container's VM takes: each is a virtio-fs device with an
/// interrupt line of its own, and a VM has 19 for all its devices (the root disk or the
/// root's share with the share of its bound files, vsock, rng and the NICs take the
/// rest).
pub const MAX_VOLUMES: usize = 11;

/// Why a host directory cannot be a [`Volume`].
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The host path is relative.
    #[error("the host path is not absolute")]
    RelativeHost,
    /// The container path is relative.
    #[error("the container path is not absolute")]
    RelativeTarget,
    /// The host path cannot be resolved (missing, unreadable).
    #[error("the host path cannot be resolved")]
    Unresolvable(#[source] std::io::Error),
    /// The host path is not a directory.
    #[error("the host path is not a directory (VMs share directories only)")]
    NotADirectory,
}

impl Volume {
    /// The host directory `host` (absolute; its symlinks resolved here, once) at the
    /// absolute container path `target`.
    pub fn new(host: &Path, target: &str, read_only: bool) -> Result<Self, VolumeError> {
        if !host.is_absolute() {
            return Err(VolumeError::RelativeHost);
        }
        if !target.starts_with('/') {
            return Err(VolumeError::RelativeTarget);
        }
        let host = std::fs::canonicalize(host).map_err(VolumeError::Unresolvable)?;
        if !host.is_dir() {
            return Err(VolumeError::NotADirectory);
        }
        Ok(Self {
            host,
            target: target.to_owned(),
            read_only,
        })
    }
}

/// A host directory a container mounts: shared into its VM by a virtio-fs device and
/// mounted by the agent at `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// The host directory.
    pub host: PathBuf,
    /// Where it appears in the container (absolute).
    pub target: String,
    /// Whether the container may only read it.
    pub read_only: bool,
}

/// The tag of the share of the `i`th volume.
pub fn share_tag(i: usize) -> String {
    format!("forkvm-{i}")
}

impl Volume {
    /// The name of the volume's directory inside its share when the share is a
    /// directory holding it ([`bind_volume_shares`]): the host directory's own, so that
    /// the guest's mount table names the bind as a host's does. `None` for a directory
    /// without a UTF-8 name (`/`): its share is the directory itself.
    pub fn name_in_share(&self) -> Option<&str> {
        self.host.file_name().and_then(|n| n.to_str())
    }
}

/// The guest agent's source for the `i`th of a container's volumes, as
/// [`bind_volume_shares`] shares them: `forkvm-i/NAME`, the directory NAME of the
/// share, or the whole share `forkvm-i`.
pub fn container_volume_source(i: usize, volume: &Volume) -> String {
    match volume.name_in_share() {
        Some(name) => format!("{}/{name}", share_tag(i)),
        None => share_tag(i),
    }
}

/// Why a volume could not be bound for its share.
#[derive(Debug, thiserror::Error)]
#[error("volume {host} (at {target}): cannot {what} {}", path.display())]
pub struct BindVolumeError {
    /// The host directory.
    host: String,
    /// Where the container has it.
    target: String,
    /// What failed.
    what: &'static str,
    /// On what.
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The VM's shares for a container's `volumes`, each a directory `<dir>/<i>` (itself
/// bound read-only: the guest cannot write beside the volume) holding the volume bound (recursively, [`forkvm_jail::binds::bind_tree`]) as
/// [`Volume::name_in_share`] (read-only throughout where the volume is): the guest agent binds that directory of the share, so that the
/// container's mount table shows the bound directory's name, as runc's does (a share of
/// the directory itself would show `/`). A volume without a name is shared itself.
///
/// The binds are made in the caller's mount namespace, which must be one of its own
/// that does not propagate back (the container's monitor's, a slave of the host's):
/// they are never seen outside it and go with it. `dir` is made (mode 0700) with its
/// directories; nothing in it is ever removed here.
pub fn bind_volume_shares(
    dir: &Path,
    volumes: &[Volume],
) -> Result<Vec<forkvm_vmm::FsConfig>, BindVolumeError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut shares = volume_shares(volumes);
    for (i, (v, share)) in volumes.iter().zip(&mut shares).enumerate() {
        let Some(name) = v.name_in_share() else {
            continue;
        };
        let failed = |what, path: &Path| {
            let path = path.to_owned();
            move |source: std::io::Error| BindVolumeError {
                host: v.host.display().to_string(),
                target: v.target.clone(),
                what,
                path,
                source,
            }
        };
        let wrapper = dir.join(i.to_string());
        let at = wrapper.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&at)
            .map_err(failed("make", &at))?;
        // The share's root is read-only (the guest writes in the volume, not beside it
        // in the runtime's state); the volume is bound in it.
        forkvm_jail::binds::bind_tree_unshared(&wrapper, &wrapper, true)
            .map_err(failed("make read-only", &wrapper))?;
        forkvm_jail::binds::bind_tree_unshared(&v.host, &at, v.read_only)
            .map_err(failed("bind the volume at", &at))?;
        share.host_path = wrapper;
    }
    Ok(shares)
}

/// The VM's shares for `volumes` (tags [`share_tag`]: `forkvm-0`, `forkvm-1`, ...), each
/// the volume's directory itself.
pub fn volume_shares(volumes: &[Volume]) -> Vec<forkvm_vmm::FsConfig> {
    volumes
        .iter()
        .enumerate()
        .map(|(i, v)| forkvm_vmm::FsConfig {
            tag: share_tag(i),
            host_path: v.host.clone(),
            read_only: v.read_only,
        })
        .collect()
}

/// The agent's request that mounts `volumes` (shared by [`volume_shares`]) in the
/// container, for `forkvm run` (a container's volumes are among its filesystems); none
/// without volumes.
pub fn mount_request(volumes: &[Volume]) -> Option<forkvm_agent_proto::Request> {
    let mounts: Vec<_> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| forkvm_agent_proto::ShareMount {
            tag: share_tag(i),
            target: v.target.clone(),
            read_only: v.read_only,
        })
        .collect();
    (!mounts.is_empty()).then_some(forkvm_agent_proto::Request::Mount { shares: mounts })
}

/// How long a VM process has to boot its VM and serve its API before it is given up on.
pub const START_DEADLINE: Duration = Duration::from_secs(120);

/// Starts the VM registered at `home` in a VM process (`forkvm-vmm`) that boots `cfg`
/// (in this process's network namespace; jailed as `jail` says) with its console as
/// `console` says, attached as `opts` say; returns once its API answers. If it does not start, it
/// is gone and the error says why.
pub fn start(
    home: &VmHome,
    cfg: &VmConfig,
    jail: JailSpec,
    console: ConsoleSpec,
    opts: ProcessOptions,
) -> Result<VmProcess> {
    start_from(home, Start::Boot(cfg.clone()), &[], jail, console, opts)
}

/// [`start`] of a VM from `start` (a boot, or a template's child with its `files`:
/// [`forkvm_vmm::template::Template::child_start`]).
pub fn start_from(
    home: &VmHome,
    start: Start,
    files: &[std::fs::File],
    jail: JailSpec,
    console: ConsoleSpec,
    opts: ProcessOptions,
) -> Result<VmProcess> {
    let launch = Launch {
        home: HomeSpec::Registered {
            root: std::path::absolute(home.root())?,
            id: home.id().to_owned(),
        },
        console,
        start,
        jail,
    };
    let mut vm = VmProcess::spawn(&launch, files, opts).context("cannot start the VM process")?;
    if let Err(e) = vm.wait_running(START_DEADLINE) {
        vm.kill_and_reap();
        return Err(anyhow::Error::new(e));
    }
    Ok(vm)
}

/// Boots `cfg` in a VM process of its own (see [`start`]) with its
/// console in `home`'s log, runs `session` on a thread, and returns the session's exit
/// code once the VM is gone. The VM process dies with this one.
pub fn run<F>(home: VmHome, cfg: &VmConfig, jail: JailSpec, session: F) -> Result<i32>
where
    F: FnOnce(&Session) -> Result<Outcome> + Send + 'static,
{
    let uds = cfg
        .vsock
        .as_ref()
        .map(|v| v.uds.clone())
        .context("a container VM needs vsock")?;
    run_from(
        home,
        &uds,
        (Start::Boot(cfg.clone()), Vec::new()),
        jail,
        true,
        session,
    )
}

/// [`run`] of a VM started from `start` and its files (see [`start_from`]) whose agent
/// answers on the vsock socket `uds`. `powers_off`: whether the agent powers the VM off
/// once the session's process exited (it is the guest's init); otherwise the VM is
/// stopped at once.
pub fn run_from<F>(
    home: VmHome,
    uds: &Path,
    (start, files): (Start, Vec<std::fs::File>),
    jail: JailSpec,
    powers_off: bool,
    session: F,
) -> Result<i32>
where
    F: FnOnce(&Session) -> Result<Outcome> + Send + 'static,
{
    let uds = uds.to_owned();
    let mut vm = start_from(
        &home,
        start,
        &files,
        jail,
        ConsoleSpec::Log,
        ProcessOptions::owned(),
    )?;
    drop(files);
    let api = forkvm_api::Client::new(home.socket_path());
    let vm_done = Arc::new(AtomicBool::new(false));
    let ctx = Session {
        uds,
        vm_done: vm_done.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("container-session".into())
        .spawn(move || {
            let code = session(&ctx);
            // After its init process exits the agent powers the VM off; when the
            // process never started (or the session broke), nothing will: stop it.
            let grace = match code {
                Ok(Outcome::Exited(_)) if powers_off => POWEROFF_GRACE,
                _ => Duration::ZERO,
            };
            let deadline = Instant::now() + grace;
            while !ctx.vm_stopped() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !ctx.vm_stopped() {
                let _ = api.shutdown();
            }
            code.map(Outcome::code)
        })
        .context("cannot start the session thread")?;
    let status = vm.wait();
    vm_done.store(true, Ordering::SeqCst);
    let code = thread
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the session thread panicked")));
    let e = match code {
        Ok(code) => return Ok(code),
        Err(e) => e,
    };
    let exit = home.state().ok().and_then(|s| s.exit);
    let how = match exit.map(|x| x.reason) {
        Some(failed @ Ending::Failed(_)) => return Err(e.context(format!("the guest {failed}"))),
        Some(Ending::PowerOff) => "the guest powered off".to_owned(),
        Some(Ending::Reboot) => "the guest reset (a reboot, or a triple fault)".to_owned(),
        Some(Ending::Stopped | Ending::Killed) => "the VM was stopped".to_owned(),
        None => match status {
            Ok(status) => format!("the VM process ended ({status}) without saying how"),
            Err(w) => format!("the VM process cannot be waited for ({w})"),
        },
    };
    Err(e.context(format!(
        "{how}; its console:\n{}",
        forkvm_registry::tail(&home.console_path(), 20)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each named volume is bound under its own name in a directory of its own, which
    /// is its share (read-only where the volume is); one without a name is shared
    /// itself.
    #[test]
    fn volumes_are_bound_under_their_names_in_their_shares() {
        forkvm_test_support::in_own_mounts(|top| {
            let data = top.join("host/data");
            let ro = top.join("host/ro-src");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(&ro).unwrap();
            std::fs::write(data.join("f"), "data's").unwrap();
            let volumes = [
                Volume::new(&data, "/data", false).unwrap(),
                Volume::new(&ro, "/ro", true).unwrap(),
                Volume {
                    host: "/".into(),
                    target: "/host".into(),
                    read_only: true,
                },
            ];
            let dir = top.join("state/volumes");
            let shares = bind_volume_shares(&dir, &volumes).unwrap();
            let got: Vec<_> = shares
                .iter()
                .map(|s| (s.tag.as_str(), s.host_path.clone(), s.read_only))
                .collect();
            assert_eq!(
                got,
                [
                    ("forkvm-0", dir.join("0"), false),
                    ("forkvm-1", dir.join("1"), true),
                    ("forkvm-2", PathBuf::from("/"), true),
                ]
            );
            let sources: Vec<_> = volumes
                .iter()
                .enumerate()
                .map(|(i, v)| container_volume_source(i, v))
                .collect();
            assert_eq!(sources, ["forkvm-0/data", "forkvm-1/ro-src", "forkvm-2"]);
            // The shares hold the volumes, bound.
            assert_eq!(
                std::fs::read_to_string(dir.join("0/data/f")).unwrap(),
                "data's"
            );
            std::fs::write(dir.join("0/data/g"), "written").unwrap();
            assert_eq!(std::fs::read_to_string(data.join("g")).unwrap(), "written");
            let e = std::fs::write(dir.join("1/ro-src/g"), "refused").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            // Beside a volume, in the share's root, nothing can be written.
            let e = std::fs::write(dir.join("0/beside"), "refused").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            for at in ["0/data", "1/ro-src", "0", "1"] {
                rustix::mount::unmount(dir.join(at), rustix::mount::UnmountFlags::DETACH).unwrap();
            }
        });
    }
}
