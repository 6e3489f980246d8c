//! `forkvm boot`: boot a guest in this process with its console on stdout (and in the
//! VM's console log), registered under the state root and serving its API; `-d` runs
//! it in the background.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_api::{Client, ExitRecord, ProcessIdentity, VmHome};
use forkvm_vmm::config::DEFAULT_CMDLINE;
use forkvm_vmm::{BlockSpec, ExitReason, NetSpec, VmConfig, Vmm, VsockSpec};

use crate::cli::BootArgs;

/// Parses `FILE[,ro]`.
pub fn parse_disk(spec: &str) -> Result<BlockSpec> {
    let (path, opts) = match spec.split_once(',') {
        Some((p, o)) => (p, Some(o)),
        None => (spec, None),
    };
    if path.is_empty() {
        bail!("--disk {spec:?}: no file given");
    }
    let read_only = match opts {
        None => false,
        Some("ro") => true,
        Some("rw") => false,
        Some(other) => bail!("--disk {spec:?}: unknown option {other:?} (expected ro or rw)"),
    };
    Ok(BlockSpec {
        path: PathBuf::from(path),
        read_only,
    })
}

fn key_values<'a>(flag: &str, spec: &'a str) -> Result<Vec<(&'a str, &'a str)>> {
    spec.split(',')
        .map(|kv| {
            kv.split_once('=')
                .with_context(|| format!("{flag} {spec:?}: expected key=value, got {kv:?}"))
        })
        .collect()
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("{s:?} is not a MAC address (expected six hex bytes separated by ':')");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("{s:?} is not a MAC address"))?;
    }
    if mac[0] & 1 != 0 {
        bail!("{s:?} is a multicast address; a NIC needs a unicast MAC");
    }
    Ok(mac)
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(spec: &str) -> Result<NetSpec> {
    let mut tap = None;
    let mut mac = None;
    for (k, v) in key_values("--net", spec)? {
        match k {
            "tap" => tap = Some(v.to_owned()),
            "mac" => mac = Some(parse_mac(v)?),
            other => bail!("--net {spec:?}: unknown key {other:?} (expected tap or mac)"),
        }
    }
    let tap = tap.with_context(|| format!("--net {spec:?}: tap=NAME is required"))?;
    if tap.is_empty() || tap.len() > 15 {
        bail!("--net {spec:?}: a TAP name has 1 to 15 characters");
    }
    Ok(NetSpec { tap, mac })
}

/// Parses `cid=N[,uds=PATH]`; the socket defaults to `/tmp/forkvm-<cid>.vsock`.
pub fn parse_vsock(spec: &str) -> Result<VsockSpec> {
    let mut cid = None;
    let mut uds = None;
    for (k, v) in key_values("--vsock", spec)? {
        match k {
            "cid" => {
                cid = Some(
                    v.parse::<u64>()
                        .with_context(|| format!("--vsock {spec:?}: cid {v:?} is not a number"))?,
                )
            }
            "uds" => uds = Some(PathBuf::from(v)),
            other => bail!("--vsock {spec:?}: unknown key {other:?} (expected cid or uds)"),
        }
    }
    let cid = cid.with_context(|| format!("--vsock {spec:?}: cid=N is required"))?;
    if cid < 3 || cid > u64::from(u32::MAX - 1) {
        bail!(
            "--vsock {spec:?}: cid must be between 3 and {} (0-2 are reserved)",
            u32::MAX - 1
        );
    }
    let uds = uds.unwrap_or_else(|| PathBuf::from(format!("/tmp/forkvm-{cid}.vsock")));
    Ok(VsockSpec { cid, uds })
}

/// Builds the VM configuration from the command line.
pub fn config(args: &BootArgs) -> Result<VmConfig> {
    let (kernel, initrd) = match &args.kernel {
        Some(k) => (k.clone(), args.initrd.clone()),
        None => {
            let guest = forkvm_guest_kernel::default_guest()
                .context("cannot prepare the default guest kernel and initramfs")?;
            (
                guest.kernel,
                Some(args.initrd.clone().unwrap_or(guest.initrd)),
            )
        }
    };
    let mut cfg = VmConfig::new(kernel);
    cfg.initrd = initrd;
    cfg.vcpus = args.vcpus;
    cfg.mem_mib = args.mem;
    cfg.cmdline = args
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
    cfg.disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<_>>()?;
    cfg.nets = args
        .nets
        .iter()
        .map(|n| parse_net(n))
        .collect::<Result<_>>()?;
    cfg.vsock = args.vsock.as_deref().map(parse_vsock).transpose()?;
    cfg.rng = !args.no_rng;
    Ok(cfg)
}

/// Set in a detached VMM's environment to the ID its `forkvm boot -d` parent registered.
const DETACHED_ENV: &str = "FORKVM_DETACHED_ID";

/// Runs `forkvm boot`; returns the process exit code.
///
/// The VM is registered under `root` (ID, name, state directory) and serves its API on
/// its socket while it runs. With `-d`, this process re-executes itself in a new session
/// with the console going to the VM's `console.log`, waits until the API answers and
/// prints the ID.
pub fn run(args: BootArgs, root: &Path) -> Result<i32> {
    let detached_id = std::env::var(DETACHED_ENV).ok();
    if args.detach && detached_id.is_none() {
        return detach(&args, root);
    }
    let home = match &detached_id {
        Some(id) => VmHome::open(root, id).with_context(|| format!("cannot open VM {id}"))?,
        None => {
            VmHome::create(root, args.name.as_deref(), None).context("cannot register the VM")?
        }
    };
    home.record_process(ProcessIdentity::current())
        .context("cannot record the VMM process")?;
    // Still single-threaded: processes this VMM starts (fork children) inherit where
    // to register and whose children they are.
    std::env::set_var(forkvm_api::ENV_ROOT, absolute(root));
    std::env::set_var(forkvm_api::ENV_ID, home.id());
    std::env::remove_var(DETACHED_ENV);
    run_registered(&args, home, detached_id.is_some())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The console of a foreground VM: the terminal and the VM's console log.
struct Tee {
    out: std::io::Stdout,
    log: std::fs::File,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.log.write_all(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn run_registered(args: &BootArgs, home: VmHome, detached: bool) -> Result<i32> {
    let booted = (|| {
        let cfg = config(args)?;
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        let log = home.console_writer()?;
        let console: Box<dyn Write + Send> = if detached {
            // stdout is the console log already (for our own messages).
            Box::new(log)
        } else {
            Box::new(Tee {
                out: std::io::stdout(),
                log,
            })
        };
        Vmm::boot(&cfg, console).context("cannot boot the VM")
    })();
    let mut vmm = match booted {
        Ok(v) => v,
        Err(e) => {
            // A detached parent reports the failure from the log and removes the home.
            if detached {
                let _ = home.record_exit(ExitRecord::new(1, format!("failed: {e:#}")));
            } else {
                let _ = home.remove();
            }
            return Err(e);
        }
    };
    let dir = home.dir().to_owned();
    let server =
        forkvm_api::serve(home, vmm.control_handle()).context("cannot serve the VM's API")?;
    let exit = vmm.run();
    server.finish_run(&exit);
    if args.rm {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match exit.context("the VM failed while running")? {
        ExitReason::PowerOff => {
            tracing::info!("guest powered off");
            Ok(0)
        }
        ExitReason::Reset => {
            tracing::info!("guest rebooted; the VM is stopped");
            Ok(0)
        }
        ExitReason::Stopped => {
            tracing::info!("stopped by request");
            Ok(0)
        }
        ExitReason::Failed(why) => bail!("the guest stopped abnormally: {why}"),
    }
}

/// The last `n` lines of a file, for error messages.
pub use forkvm_api::home::tail;

/// `forkvm boot -d`: start the VMM in its own session, wait for its API, print the ID.
fn detach(args: &BootArgs, root: &Path) -> Result<i32> {
    let root = absolute(root);
    let home =
        VmHome::create(&root, args.name.as_deref(), None).context("cannot register the VM")?;
    let result = spawn_detached(&root, &home);
    if result.is_err() {
        let _ = home.remove();
    }
    result?;
    println!("{}", home.id());
    Ok(0)
}

fn spawn_detached(root: &Path, home: &VmHome) -> Result<()> {
    let log = home.console_writer()?;
    let log2 = log
        .try_clone()
        .context("cannot duplicate the console log")?;
    let exe = std::env::current_exe().context("cannot find the forkvm executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, home.id())
        .env(forkvm_api::ENV_ROOT, root)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: the closure runs between fork and exec and only calls setsid(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the detached VMM")?;
    let limit = std::env::var("FORKVM_DETACH_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs);
    let deadline = Instant::now() + limit;
    let client = Client::new(home.socket_path()).with_timeout(Duration::from_secs(10));
    loop {
        if let Some(status) = child.try_wait().context("cannot watch the detached VMM")? {
            bail!(
                "the VM stopped ({status}) before its API answered; its output:\n{}",
                tail(&home.console_path(), 20)
            );
        }
        if home.socket_path().exists() && client.info().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM's API did not answer within {limit:?}; its output:\n{}",
                tail(&home.console_path(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert!(parse_disk("a.img,ro").unwrap().read_only);
        assert!(!parse_disk("a.img").unwrap().read_only);
        assert!(parse_disk("a.img,rx")
            .unwrap_err()
            .to_string()
            .contains("rx"));
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn net_specs() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:01")
            .unwrap_err()
            .to_string()
            .contains("multicast"));
        assert!(parse_net("tap=t,mac=zz").is_err());
        assert!(parse_net("tap=waytoolongtapname0").is_err());
    }

    #[test]
    fn vsock_specs() {
        let v = parse_vsock("cid=7").unwrap();
        assert_eq!(v.cid, 7);
        assert_eq!(v.uds, PathBuf::from("/tmp/forkvm-7.vsock"));
        assert_eq!(
            parse_vsock("cid=9,uds=/x").unwrap().uds,
            PathBuf::from("/x")
        );
        assert!(parse_vsock("cid=2").is_err());
        assert!(parse_vsock("cid=x").is_err());
        assert!(parse_vsock("port=3").is_err());
    }
}
