//! `forkvm run`: runs a command from an OCI image in a new VM, the way `podman run`
//! runs it in a container.
//!
//! The image's root filesystem (a read-only ext4 file from the image store, built once
//! per image) becomes the VM's first disk; the container guest's agent (PID 1) lays a
//! private writable overlay over it. This process is the VMM: it boots the VM, waits
//! for the agent, asks it to start the process and relays stdin, stdout and stderr over
//! vsock. Signals this process gets (Ctrl-C) go to the container's process; its exit
//! code becomes ours. The agent powers the VM off when the process exits. The VM is on
//! forkvm's own network unless `--network none` ([`network`]).

mod network;

use std::path::Path;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::client::{self, ExecError};
use forkvm_agent_proto::{ProcessSpec, User};
use forkvm_image::{ImageConfig, Store};
use forkvm_oci::term::{ForwardedSignals, SignalRelay};
use forkvm_oci::vm::{self, Outcome};
use forkvm_registry::{ProcessIdentity, VmHome};

use crate::cli::RunArgs;

/// The PATH a process gets when neither the image nor `-e` sets one (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit code when forkvm itself fails before the process ran (as `podman run` does).
pub const EXIT_RUNTIME_ERROR: i32 = 125;

/// Parses `--memory`: a number with a unit (`b`, `k`, `m`, `g`, case-insensitive,
/// optionally followed by `b`/`ib`), in MiB. At least 64 MiB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    let n: u64 = num
        .parse()
        .with_context(|| format!("--memory {s:?}: expected a size such as 512m or 2g"))?;
    let unit = unit.trim_end_matches("ib").trim_end_matches('b');
    let bytes = match unit {
        "" if lower.ends_with('b') => n,
        "" => bail!("--memory {s:?}: give a unit (512m, 2g); a bare number would be bytes"),
        "k" => n << 10,
        "m" => n << 20,
        "g" => n << 30,
        other => bail!("--memory {s:?}: unknown unit {other:?} (use b, k, m or g)"),
    };
    let mib = bytes >> 20;
    if mib < 64 {
        bail!("--memory {s:?}: a VM needs at least 64m");
    }
    Ok(mib)
}

/// Parses `--cpus` (a positive number; fractions round up to whole vCPUs).
pub fn parse_cpus(s: &str) -> Result<u8> {
    let f: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("--cpus {s:?}: expected a number such as 2 or 1.5"))?;
    if !(f > 0.0 && f <= 254.0) {
        bail!("--cpus {s:?}: must be more than 0 and at most 254");
    }
    Ok(f.ceil() as u8)
}

/// Parses `-v HOST_DIR:CONTAINER_DIR[:ro|:rw]`: the host directory must exist (its
/// symlinks are resolved here) and both paths be absolute.
pub fn parse_volume(spec: &str) -> Result<vm::Volume> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, target, read_only) = match parts[..] {
        [host, target] => (host, target, false),
        [host, target, "ro"] => (host, target, true),
        [host, target, "rw"] => (host, target, false),
        [_, _, other] => bail!("-v {spec:?}: unknown option {other:?} (use ro or rw)"),
        _ => bail!("-v {spec:?}: expected HOST_DIR:CONTAINER_DIR[:ro]"),
    };
    vm::Volume::new(std::path::Path::new(host), target, read_only).map_err(|e| match e {
        vm::VolumeError::RelativeHost => anyhow::anyhow!(
            "-v {spec:?}: the host path must be absolute (forkvm run has no named volumes)"
        ),
        vm::VolumeError::Unresolvable(io) => {
            anyhow::Error::new(io).context(format!("-v {spec:?}: host path {host}"))
        }
        vm::VolumeError::RelativeTarget => {
            anyhow::anyhow!("-v {spec:?}: the container path must be absolute")
        }
        other => anyhow::anyhow!("-v {spec:?}: host path {host}: {other}"),
    })
}

/// Splits a shell-free `--entrypoint` value the way Docker does: one program, no
/// arguments; an empty string clears the entrypoint.
fn entrypoint(image: &ImageConfig, flag: Option<&str>) -> Vec<String> {
    match flag {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_owned()],
        None => image.entrypoint.clone(),
    }
}

/// The environment: the image's, then PATH/HOSTNAME/TERM defaults, then `-e` (which
/// replaces a variable of the same name). `-e K` takes K from this process.
fn environment(
    image: &ImageConfig,
    flags: &[String],
    hostname: &str,
    tty: bool,
) -> Result<Vec<String>> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or_default().to_owned();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    set(format!("PATH={DEFAULT_PATH}"));
    for kv in &image.env {
        set(kv.clone());
    }
    set(format!("HOSTNAME={hostname}"));
    if tty {
        set("TERM=xterm".to_owned());
    }
    for f in flags {
        match f.split_once('=') {
            Some(("", _)) => bail!("-e {f:?}: the variable has no name"),
            Some(_) => set(f.clone()),
            None if f.is_empty() => bail!("-e: empty variable name"),
            None => {
                if let Ok(v) = std::env::var(f) {
                    set(format!("{f}={v}"));
                }
            }
        }
    }
    Ok(env)
}

/// `UID`, `UID:GID` become numeric ids; anything else is a name the agent resolves in
/// the image's /etc/passwd and /etc/group.
fn user(spec: &str) -> User {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    match (u.parse::<u32>(), g.map(str::parse::<u32>)) {
        (Ok(uid), None) => User {
            uid,
            gid: uid,
            additional_gids: Vec::new(),
            name: Some(spec.to_owned()),
        },
        (Ok(uid), Some(Ok(gid))) => User {
            uid,
            gid,
            additional_gids: Vec::new(),
            name: None,
        },
        _ => User {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            name: Some(spec.to_owned()),
        },
    }
}

/// The container's main process from the image config and the command line.
pub fn process_spec(image: &ImageConfig, args: &RunArgs, hostname: &str) -> Result<ProcessSpec> {
    let mut argv = entrypoint(image, args.entrypoint.as_deref());
    if args.command.is_empty() {
        argv.extend(image.cmd.iter().cloned());
    } else {
        argv.extend(args.command.iter().cloned());
    }
    if argv.is_empty() {
        bail!(
            "no command given and image {:?} has no Cmd or Entrypoint",
            args.image
        );
    }
    let cwd = args
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        bail!("working directory {cwd:?} is not absolute");
    }
    let user_spec = args
        .user
        .clone()
        .or_else(|| Some(image.user.clone()).filter(|u| !u.is_empty()));
    Ok(ProcessSpec {
        args: argv,
        env: environment(image, &args.env, hostname, args.tty)?,
        cwd,
        user: user_spec.as_deref().map(user).unwrap_or_default(),
        tty: args.tty,
        stdin: args.interactive,
        rlimits: Vec::new(),
        init: true,
        console_size: None,
        // The VM is the container's boundary: its root keeps every capability, as
        // `podman run --privileged` (engines pass their own sets).
        capabilities: None,
        no_new_privileges: false,
        oom_score_adj: None,
        umask: None,
        // The guest's PID namespace: `forkvm run` passes SIGTERM and Ctrl-C on, and a
        // process without handlers must end on them, which a PID namespace's init does
        // not (engines' containers, whose `stop` escalates to SIGKILL, get one).
        pid_namespace: None,
    })
}

/// Runs `forkvm run`; returns the container process's exit code.
pub fn run(args: RunArgs, root: &Path) -> Result<i32> {
    // Signals for the container are taken by one thread with sigwait: block them before
    // any thread exists, so every thread (vCPUs included) inherits the mask.
    let signals = ForwardedSignals::block().context("cannot block signals")?;
    let mode = network::Mode::parse(args.network.as_deref(), &args.publish)?;
    let vcpus = parse_cpus(&args.cpus)?;
    let mem_mib = parse_memory(&args.memory)?;
    let volumes = args
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>>>()?;
    if volumes.len() > vm::MAX_VOLUMES {
        bail!(
            "{} volumes: a VM takes at most {} (one device each)",
            volumes.len(),
            vm::MAX_VOLUMES
        );
    }
    let store = Store::open(&Store::default_root()).context("cannot open the image store")?;
    let image = store.get(&args.image)?;
    let progress = forkvm_image::TermProgress::new();
    let rootfs = store
        .rootfs(&image, &progress)
        .with_context(|| format!("cannot build the root filesystem of {:?}", args.image))?;
    let guest = vm::container_guest()?;

    let home =
        VmHome::create(root, args.name.as_deref(), None).context("cannot register the VM")?;
    // The VM process records itself once it starts; until then, this process owns it.
    home.record_process(ProcessIdentity::current())
        .context("cannot record the VMM process")?;
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| home.id().chars().take(12).collect());
    let dir = home.dir().to_owned();
    let state_root = root;
    let result = (|| {
        let spec = process_spec(&image.config, &args, &hostname)?;
        let uds = dir.join(vm::VSOCK_SOCKET);
        let root = vm::Root::Disk(rootfs.path.clone());
        let mut cfg = vm::config(&guest, &root, vcpus, mem_mib, &hostname, &uds)?;
        cfg.shares = vm::volume_shares(&volumes);
        let mount = vm::mount_request(&volumes);
        // Held until the VM is gone: the lease, the published ports, the DNS relay.
        let net = match mode {
            network::Mode::Bridge => {
                let tap = format!("fkv{}", &home.id()[..12]);
                Some(network::RunNetwork::up(tap, &uds, &args.publish)?)
            }
            network::Mode::None => None,
        };
        if let Some(net) = &net {
            cfg.nets = vec![net.nic.clone()];
            home.update(|s| s.addresses = vec![net.address().to_owned()])?;
        }
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        // What `template save` checks a template of this VM against, out of its VM
        // process's reach (as `forkvm boot` records it).
        crate::commands::boot::record_launch(state_root, home.id(), &cfg);
        let relay = signals
            .spawn(args.tty)
            .context("cannot start the signal thread")?;
        let tty = args.tty;
        let requests = net.as_ref().map(network::RunNetwork::guest_requests);
        vm::run(home, &cfg, crate::cli::jail(args.no_jail), move |s| {
            session(s, spec, mount, requests, relay, tty)
        })
    })();
    if args.rm {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Waits for the agent, mounts the volumes (`mount`), gives the guest its network
/// (`requests`, when it has one), starts the process and relays its stdio until it
/// exits.
fn session(
    s: &vm::Session,
    spec: ProcessSpec,
    mount: Option<forkvm_agent_proto::Request>,
    requests: Option<[(&'static str, Option<forkvm_agent_proto::Request>); 2]>,
    relay: SignalRelay,
    tty: bool,
) -> Result<Outcome> {
    let mut stream = s.connect_agent()?;
    vm::configure_guest(&mut stream, [("its volumes", mount)])?;
    if let Some(requests) = requests {
        vm::configure_guest(&mut stream, requests)?;
    }
    let session = match client::exec(stream, &spec) {
        Ok(s) => s,
        Err(ExecError::ExecFailed { message, exit_code }) => {
            eprintln!("forkvm: {message}");
            return Ok(Outcome::NotStarted(exit_code));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot start the process")),
    };
    let code = vm::relay_stdio(session, &relay, tty, spec.stdin, || ())
        .context("lost the connection to the container's process")?;
    Ok(Outcome::Exited(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["forkvm", "run"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(v).command {
            crate::cli::Command::Run(a) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            working_dir: "/work".into(),
            user: String::new(),
            ..Default::default()
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m").unwrap(), 512);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert_eq!(parse_memory("1gib").unwrap(), 1024);
        assert_eq!(parse_memory("131072k").unwrap(), 128);
        assert!(parse_memory("512")
            .unwrap_err()
            .to_string()
            .contains("unit"));
        assert!(parse_memory("32m").unwrap_err().to_string().contains("64m"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5x").unwrap_err().to_string().contains("unit"));
    }

    #[test]
    fn cpus_round_up() {
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("1.5").unwrap(), 2);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("300").is_err());
        assert!(parse_cpus("two").is_err());
    }

    #[test]
    fn command_line_overrides_image() {
        let a = args(&[
            "-e", "A=2", "-e", "B=3", "-w", "/tmp", "img", "echo", "-n", "hi",
        ]);
        let p = process_spec(&image(), &a, "h1").unwrap();
        assert_eq!(p.args, ["echo", "-n", "hi"]);
        assert_eq!(p.cwd, "/tmp");
        assert!(p.env.contains(&"A=2".to_owned()), "{:?}", p.env);
        assert!(!p.env.contains(&"A=1".to_owned()));
        assert!(p.env.contains(&"B=3".to_owned()));
        assert!(p.env.contains(&"PATH=/bin".to_owned()), "image PATH kept");
        assert!(p.env.contains(&"HOSTNAME=h1".to_owned()));
        assert!(p.init && !p.tty && !p.stdin);
    }

    #[test]
    fn image_defaults_apply() {
        let p = process_spec(&image(), &args(&["-it", "img"]), "h").unwrap();
        assert_eq!(p.args, ["sh"]);
        assert_eq!(p.cwd, "/work");
        assert!(p.tty && p.stdin);
        assert!(p.env.contains(&"TERM=xterm".to_owned()));
        let mut bare = image();
        bare.env.clear();
        bare.working_dir.clear();
        let p = process_spec(&bare, &args(&["img"]), "h").unwrap();
        assert_eq!(p.cwd, "/");
        assert!(p.env.contains(&format!("PATH={DEFAULT_PATH}")));
    }

    #[test]
    fn entrypoint_and_errors() {
        let mut img = image();
        img.entrypoint = vec!["/bin/tini".into(), "--".into()];
        let p = process_spec(&img, &args(&["img", "x"]), "h").unwrap();
        assert_eq!(p.args, ["/bin/tini", "--", "x"]);
        let p = process_spec(&img, &args(&["--entrypoint", "", "img", "x"]), "h").unwrap();
        assert_eq!(p.args, ["x"]);
        img.cmd.clear();
        img.entrypoint.clear();
        let e = process_spec(&img, &args(&["img"]), "h").unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
        let e = process_spec(&image(), &args(&["-w", "rel", "img"]), "h").unwrap_err();
        assert!(e.to_string().contains("not absolute"), "{e}");
        let e = process_spec(&image(), &args(&["-e", "=x", "img"]), "h").unwrap_err();
        assert!(e.to_string().contains("no name"), "{e}");
    }

    #[test]
    fn volumes() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().display().to_string();
        let v = parse_volume(&format!("{host}:/data")).unwrap();
        assert_eq!(v.host, dir.path().canonicalize().unwrap());
        assert_eq!((v.target.as_str(), v.read_only), ("/data", false));
        assert!(parse_volume(&format!("{host}:/data:ro")).unwrap().read_only);
        assert!(!parse_volume(&format!("{host}:/data:rw")).unwrap().read_only);
        let err = |s: String| parse_volume(&s).unwrap_err().to_string();
        assert!(err(format!("{host}:/data:rx")).contains("unknown option \"rx\""));
        assert!(err(host.clone()).contains("HOST_DIR:CONTAINER_DIR"));
        assert!(err("name:/data".into()).contains("no named volumes"));
        assert!(err(format!("{host}:data")).contains("container path must be absolute"));
        let missing = format!("{host}/missing:/data");
        let e = parse_volume(&missing).unwrap_err();
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
        std::fs::write(dir.path().join("f"), "x").unwrap();
        assert!(err(format!("{host}/f:/data")).contains("not a directory"));
    }

    #[test]
    fn users() {
        let u = user("1000:100");
        assert_eq!((u.uid, u.gid, u.name), (1000, 100, None));
        assert_eq!(user("nobody").name.as_deref(), Some("nobody"));
        assert_eq!(user("www:www").name.as_deref(), Some("www:www"));
        // A bare UID still goes through the passwd lookup for its primary group.
        assert_eq!(user("65534").uid, 65534);
    }
}
