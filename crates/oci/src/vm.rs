//! One container, one VM: the container guest (the agent as PID 1) booted over a root
//! filesystem image, with vsock for the agent, run in this process. Shared by
//! `forkvm run` and the runtime's monitor.
//!
//! [`run`] boots the VM and serves its forkvm API (so `forkvm ps`, `pause` and `fork`
//! reach it), then hands a [`Session`] to a thread that talks to the agent while this
//! thread runs the vCPUs. When the session ends the agent powers the VM off (the
//! container's process exited); if it does not within [`POWEROFF_GRACE`], or the process
//! never ran, the VM is stopped.
//!
//! [`fork_child`] is the other way a VM runs in a process: a child of a fork, in the
//! process the forking VMM starts as `<its own executable> __fork-child` (`forkvm` and
//! `forkvm-runtime` both have that verb, since either may be the VMM that forks).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_api::{ProcessIdentity, VmHome};
use forkvm_guest_kernel::GuestImage;
use forkvm_vmm::config::DEFAULT_CMDLINE;
use forkvm_vmm::{BlockSpec, ExitReason, VmConfig, Vmm, VsockSpec};

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
    if hostname.is_empty()
        || hostname.len() > 64
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        bail!("hostname {hostname:?}: use 1 to 64 letters, digits, '-' and '.'");
    }
    Ok(())
}

/// The VM: container guest, `rootfs` as a read-only vda (the agent lays a private
/// writable overlay over it), vsock for the agent at `uds`.
pub fn config(
    guest: &GuestImage,
    rootfs: &Path,
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
    cfg.cmdline = format!("{DEFAULT_CMDLINE} forkvm.rootfs=/dev/vda forkvm.hostname={hostname}");
    cfg.disks = vec![BlockSpec {
        path: rootfs.to_owned(),
        read_only: true,
    }];
    cfg.vsock = Some(VsockSpec {
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
        forkvm_agent::client::wait_for_agent_unless(&self.uds, deadline, &|| self.vm_stopped())
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
    session: forkvm_agent::client::ExecSession,
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

/// Boots `cfg` with its console in `home`'s log, serves the VM's API, runs `session`
/// on its own thread and the vCPUs on this one; returns the session's exit code once
/// the VM is gone.
pub fn run<F>(home: VmHome, cfg: &VmConfig, session: F) -> Result<i32>
where
    F: FnOnce(&Session) -> Result<Outcome> + Send + 'static,
{
    let uds = cfg
        .vsock
        .as_ref()
        .map(|v| v.uds.clone())
        .context("a container VM needs vsock")?;
    let console = home.console_writer()?;
    let console_path = home.console_path();
    let mut vmm = Vmm::boot(cfg, Box::new(console)).context("cannot boot the VM")?;
    let server =
        forkvm_api::serve(home, vmm.control_handle()).context("cannot serve the VM's API")?;
    let control = vmm.control_handle();
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
                Ok(Outcome::Exited(_)) => POWEROFF_GRACE,
                _ => Duration::ZERO,
            };
            let deadline = Instant::now() + grace;
            while !ctx.vm_stopped() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !ctx.vm_stopped() {
                let _ = control.call(forkvm_vmm::control::Request::Stop);
            }
            code.map(Outcome::code)
        })
        .context("cannot start the session thread")?;
    let exit = vmm.run();
    vm_done.store(true, Ordering::SeqCst);
    server.finish_run(&exit);
    let code = thread
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the session thread panicked")));
    match (code, exit.context("the VM failed while running")?) {
        (Ok(code), _) => Ok(code),
        (Err(e), ExitReason::Failed(why)) => Err(e.context(format!("the guest failed: {why}"))),
        (Err(e), how) => {
            let how = match how {
                ExitReason::PowerOff => "the guest powered off",
                ExitReason::Reset => "the guest reset (a reboot, or a triple fault)",
                _ => "the VM was stopped",
            };
            Err(e.context(format!(
                "{how}; its console:\n{}",
                forkvm_api::home::tail(&console_path, 20)
            )))
        }
    }
}

/// Runs a fork child: restores the VM its parent sent on fd 3, registers it as a VM of
/// its own (parent recorded) and serves its API, like a booted VM; returns the exit code.
pub fn fork_child() -> Result<i32> {
    use forkvm_vmm::fork::ReceivedChild;
    use std::io::Write;
    crate::term::ForwardedSignals::unblock_inherited().context("cannot unblock signals")?;
    let child = ReceivedChild::receive().context("cannot receive the fork")?;
    let registered = (|| -> Result<(VmHome, Box<dyn Write + Send>)> {
        let home = VmHome::create_fork_child(None).context("cannot register the fork child")?;
        home.record_process(ProcessIdentity::current())
            .context("cannot record the VMM process")?;
        let cfg = child.config();
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        // From here on this daemon's own messages go to its console log.
        let log = home.console_writer()?;
        forkvm_vmm::fork::redirect_stderr(&log).context("cannot log to the console file")?;
        let console: Box<dyn Write + Send> =
            match child.console_path() {
                Some(path) => Box::new(std::fs::File::create(path).with_context(|| {
                    format!("cannot create the console file {}", path.display())
                })?),
                None => Box::new(log),
            };
        Ok((home, console))
    })();
    let (home, console) = match registered {
        Ok(r) => r,
        Err(e) => {
            child.fail(&format!("{e:#}"));
            return Err(e);
        }
    };
    // Grandchildren record this VM as their parent (set before any thread starts).
    std::env::set_var(forkvm_api::ENV_ID, home.id());
    let mut vmm = child
        .start(console)
        .context("cannot restore the forked VM")?;
    let server =
        forkvm_api::serve(home, vmm.control_handle()).context("cannot serve the VM's API")?;
    let exit = vmm.run();
    server.finish_run(&exit);
    match exit.context("the forked VM failed while running")? {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(0),
        ExitReason::Failed(why) => bail!("the forked guest stopped abnormally: {why}"),
    }
}
