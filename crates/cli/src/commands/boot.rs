//! `forkvm boot`: boot a guest in a VM process with its console on stdout (and in the
//! VM's console log), registered under the state root and serving its API; `-d` runs
//! it in the background.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use forkvm_oci::vm;
use forkvm_registry::{ProcessIdentity, VmHome};
use forkvm_vmm::config::DEFAULT_CMDLINE;
use forkvm_vmm::launch::{ConsoleSpec, ProcessOptions};
use forkvm_vmm::{BlockConfig, NetConfig, VmConfig, VsockConfig};

use crate::cli::BootArgs;

/// Parses `FILE[,ro]`.
pub fn parse_disk(spec: &str) -> Result<BlockConfig> {
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
    Ok(BlockConfig {
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
    forkvm_vmm::config::parse_mac(s).map_err(anyhow::Error::msg)
}

/// Parses `tap=NAME[,mac=MAC][,bridge=BRIDGE]`.
pub fn parse_net(spec: &str) -> Result<NetConfig> {
    let mut tap = None;
    let mut mac = None;
    let mut bridge = None;
    for (k, v) in key_values("--net", spec)? {
        match k {
            "tap" => tap = Some(v.to_owned()),
            "mac" => mac = Some(parse_mac(v)?),
            "bridge" if !v.is_empty() && v.len() <= 15 => bridge = Some(v.to_owned()),
            "bridge" => bail!("--net {spec:?}: a bridge name has 1 to 15 characters"),
            other => {
                bail!("--net {spec:?}: unknown key {other:?} (expected tap, mac or bridge)")
            }
        }
    }
    let tap = tap.with_context(|| format!("--net {spec:?}: tap=NAME is required"))?;
    if tap.is_empty() || tap.len() > 15 {
        bail!("--net {spec:?}: a TAP name has 1 to 15 characters");
    }
    Ok(NetConfig {
        tap,
        mac,
        bridge,
        guest_ip: None,
    })
}

/// Parses `cid=N[,uds=PATH]`; the socket defaults to `/tmp/forkvm-<cid>.vsock`.
pub fn parse_vsock(spec: &str) -> Result<VsockConfig> {
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
    Ok(VsockConfig { cid, uds })
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
    cfg.fork_pool = args.fork_pool;
    Ok(cfg)
}

/// Records `cfg` as the launch of VM `id` beside state root `root`, where no VM process
/// reaches, for `template save` to check the VM's saved state against; warns if it
/// cannot (`template save` then refuses the VM without `--trust-vm-config`).
pub fn record_launch(root: &Path, id: &str, cfg: &forkvm_vmm::VmConfig) {
    if let Err(e) = forkvm_vmm::template::launched::record(root, id, cfg) {
        eprintln!(
            "forkvm: warning: the launch of VM {id} is not recorded ({e}): `template save` \
             refuses it unless given --trust-vm-config"
        );
    }
}

/// Runs `forkvm boot`; returns the process exit code.
///
/// The VM is registered under `root` (ID, name, state directory) and runs in a VM
/// process of its own (`forkvm-vmm`), which serves its API on its socket. In the
/// foreground, the console is this terminal and this process waits for the VM to end;
/// with `-d`, the VM process runs in a new session with its console in the VM's
/// `console.log`, and this process prints the ID once its API answers.
pub fn run(args: BootArgs, root: &Path) -> Result<i32> {
    let root =
        std::path::absolute(root).with_context(|| format!("bad state root {}", root.display()))?;
    let cfg = config(&args)?;
    let home =
        VmHome::create(&root, args.name.as_deref(), None).context("cannot register the VM")?;
    // What `template save` checks a template of this VM against, out of its VM
    // process's reach.
    record_launch(&root, home.id(), &cfg);
    let started = (|| {
        // The VM process records itself once it starts; until then, this process owns it.
        home.record_process(ProcessIdentity::current())
            .context("cannot record the VMM process")?;
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        let jail = crate::cli::jail(args.no_jail);
        if args.detach {
            let log = home.console_writer()?;
            let log2 = log
                .try_clone()
                .context("cannot duplicate the console log")?;
            let opts = ProcessOptions {
                stdio: [None, Some(log.into()), Some(log2.into())],
                ..ProcessOptions::daemon()
            };
            vm::start(&home, &cfg, jail, ConsoleSpec::Log, opts)
        } else {
            vm::start(
                &home,
                &cfg,
                jail,
                ConsoleSpec::LogAndStdout,
                ProcessOptions::foreground(),
            )
        }
    })();
    let mut process = match started {
        Ok(p) => p,
        Err(e) => {
            let _ = home.remove();
            return Err(e);
        }
    };
    if args.detach {
        println!("{}", home.id());
        return Ok(0);
    }
    let status = process.wait().context("cannot wait for the VM process")?;
    let exit = home.state().ok().and_then(|s| s.exit);
    if args.rm {
        let _ = home.remove();
    }
    match exit {
        Some(x) if x.code == 0 => Ok(0),
        Some(x) => match x.reason {
            forkvm_registry::Ending::Failed(why) => bail!("the guest stopped abnormally: {why}"),
            other => bail!("the guest stopped abnormally: {other}"),
        },
        None => bail!("the VM process ended ({status}) without recording how the VM ended"),
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
        assert_eq!(n.bridge, None);
        let n = parse_net("tap=t,bridge=br0").unwrap();
        assert_eq!(n.bridge.as_deref(), Some("br0"));
        assert!(parse_net("tap=t,bridge=")
            .unwrap_err()
            .to_string()
            .contains("bridge name"));
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
