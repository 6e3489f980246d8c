//! `forkvm bench net`: the network a forkvm VM gets against the one a runc container
//! gets, on the same host, side by side.
//!
//! Both run the same image (the busybox fixture plus the host's `iperf3` and the shared
//! libraries it loads) and serve the same things: an `iperf3` server and busybox
//! `httpd` with a 3-byte file. Both sit on forkvm's bridge (`forkvm0`): the VM through
//! `forkvm run` (a TAP on the bridge, virtio-net), the runc container in a network
//! namespace of its own joined to the bridge by a veth pair, with an address leased the
//! same way. From the host, in alternating order round by round (ABBA), the benchmark
//! measures TCP throughput host→guest and guest→host (`iperf3 -c`, `-R`, JSON output)
//! and request/response latency: HTTP GETs of the file, each on a new connection, as a
//! web client would make them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_registry::{Lease, Leases, ProcessIdentity};
use serde::Serialize;

use super::host;
use super::stats::Summary;
use crate::cli::{BenchFormat, BenchNetArgs};

/// The image both sides run.
const IMAGE: &str = "forkvm-bench-net:1";
/// What both sides run: the servers, then `ready` on stdout.
const SERVE: &str = "mkdir -p /www && echo ok > /www/index.html && iperf3 -s -D && \
    echo ready && exec httpd -f -p 80 -h /www";
/// forkvm's network (the one `forkvm run` uses).
const BRIDGE: &str = "forkvm0";
/// The runc container's network namespace and veth ends.
const NETNS: &str = "fkbench-runc";
const VETH_HOST: &str = "fkbench-h";
const VETH_CONTAINER: &str = "fkbench-c";
/// How long a side has to boot and serve.
const START_LIMIT: Duration = Duration::from_secs(180);

/// One side's measurements.
#[derive(Debug, Default, Serialize)]
struct Side {
    /// host→guest throughput per round, Gbit/s.
    to_guest_gbps: Vec<f64>,
    /// guest→host throughput per round, Gbit/s.
    from_guest_gbps: Vec<f64>,
    /// Each GET's time, ms.
    get_ms: Vec<f64>,
}

/// The report.
#[derive(Debug, Serialize)]
struct Report {
    environment: super::report::Environment,
    rounds: usize,
    seconds: u64,
    requests: usize,
    forkvm: Side,
    runc: Side,
}

/// Runs `forkvm bench net`.
pub fn run(args: BenchNetArgs) -> Result<i32> {
    if args.rounds == 0 || args.seconds == 0 || args.requests == 0 {
        bail!("--rounds, --seconds and --requests must be at least 1");
    }
    host::require("net", &["iperf3", "runc", "ip"])?;
    let (exe, dir, _scratch) = super::bench_setup("net")?;
    let env = [
        ("FORKVM_STORE", dir.join("store")),
        ("FORKVM_ROOT", dir.join("root")),
    ];

    let layers = host::image_layers(&["iperf3"], &[])?;
    host::load_image(&exe, &env, &dir, IMAGE, &layers)?;

    eprintln!("bench net: starting the forkvm VM and the runc container");
    let mut vm = Server::start(
        Command::new(&exe)
            .args([
                "run",
                "--rm",
                "--name",
                "bench-net",
                IMAGE,
                "sh",
                "-c",
                SERVE,
            ])
            .envs(env.iter().map(|(k, v)| (k, v))),
    )?;
    let vm_ip = vm_address(&exe, &env)?;
    let container = RuncContainer::start(&dir, &layers)?;
    let runc_ip = container.lease.addr;

    let mut report = Report {
        environment: super::host_environment(),
        rounds: args.rounds,
        seconds: args.seconds,
        requests: args.requests,
        forkvm: Side::default(),
        runc: Side::default(),
    };
    for round in 0..args.rounds {
        // ABBA: forkvm first on even rounds, runc first on odd ones.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for forkvm in order {
            let (ip, side, name) = if forkvm {
                (vm_ip, &mut report.forkvm, "forkvm")
            } else {
                (runc_ip, &mut report.runc, "runc")
            };
            eprintln!("bench net: round {} {name}", round + 1);
            side.to_guest_gbps.push(iperf(ip, args.seconds, false)?);
            side.from_guest_gbps.push(iperf(ip, args.seconds, true)?);
            for _ in 0..args.requests / args.rounds.max(1) {
                side.get_ms.push(get_ms(ip)?);
            }
        }
    }
    vm.stop();
    drop(container);

    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        BenchFormat::Table => print_table(&report),
    }
    Ok(0)
}

/// A serving side: its process, which printed `ready`.
struct Server(Child);

impl Server {
    fn start(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a side")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        let mut server = Self(child);
        match rx.recv_timeout(START_LIMIT) {
            Ok(()) => Ok(server),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                server.stop();
                bail!("a side ended before it served (its errors are above)")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                server.stop();
                bail!("a side did not start serving within {START_LIMIT:?}")
            }
        }
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) with the pid of our own child; no memory is involved.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The VM's address, from `forkvm inspect`.
fn vm_address(exe: &Path, env: &[(&str, PathBuf)]) -> Result<Ipv4Addr> {
    let out = Command::new(exe)
        .args(["inspect", "bench-net"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("forkvm inspect: {}", String::from_utf8_lossy(&out.stderr)))?;
    let addr = v["addresses"][0]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("the VM has no address on forkvm's network")?;
    Ok(addr.parse()?)
}

/// The runc container: its network namespace on the bridge, its lease, its process.
struct RuncContainer {
    lease: Lease,
    server: Option<Server>,
    bundle: PathBuf,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl RuncContainer {
    fn start(dir: &Path, layers: &[Vec<u8>]) -> Result<Self> {
        host::ensure_cgroups()?;
        let net = forkvm_net::bridge::BridgeNetwork::default();
        net.ensure()?;
        let lease = Leases::of_bridge(BRIDGE, net.subnet, net.gateway)
            .acquire(ProcessIdentity::current())?;
        let bundle = dir.join("bundle");
        let mut c = Self {
            lease,
            server: None,
            bundle: bundle.clone(),
        };
        // What a killed run may have left.
        let _ = Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(Stdio::null())
            .status();
        let addr = format!("{}/{}", c.lease.addr, net.subnet.prefix);
        let gw = net.gateway.to_string();
        ip(&["netns", "add", NETNS])?;
        ip(&[
            "link",
            "add",
            VETH_HOST,
            "type",
            "veth",
            "peer",
            "name",
            VETH_CONTAINER,
        ])?;
        ip(&["link", "set", VETH_HOST, "master", BRIDGE, "up"])?;
        ip(&["link", "set", VETH_CONTAINER, "netns", NETNS])?;
        ip(&["-n", NETNS, "addr", "add", &addr, "dev", VETH_CONTAINER])?;
        ip(&["-n", NETNS, "link", "set", VETH_CONTAINER, "up"])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&["-n", NETNS, "route", "add", "default", "via", &gw])?;

        host::runc_bundle(&bundle, layers, &["sh", "-c", SERVE], |config| {
            let namespaces = config["linux"]["namespaces"]
                .as_array_mut()
                .context("runc spec without namespaces")?;
            for ns in namespaces.iter_mut() {
                if ns["type"] == "network" {
                    *ns = serde_json::json!({"type": "network", "path": format!("/var/run/netns/{NETNS}")});
                }
            }
            Ok(())
        })?;
        c.server = Some(Server::start(
            Command::new("runc")
                .args(["run", "-b"])
                .arg(&bundle)
                .arg(NETNS),
        )?);
        Ok(c)
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = Command::new("runc").args(["kill", NETNS, "KILL"]).status();
            s.stop();
        }
        let _ = Command::new("runc")
            .args(["delete", "-f", NETNS])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["link", "del", VETH_HOST]).status();
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// `iperf3 -c ip -t seconds` (`-R`: the guest sends): the receiver's Gbit/s.
fn iperf(ip: Ipv4Addr, seconds: u64, reverse: bool) -> Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", &ip.to_string(), "-t", &seconds.to_string(), "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().context("cannot run iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 to {ip}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?;
    Ok(bps / 1e9)
}

/// One `GET /index.html` on a new connection to `ip:80`: milliseconds to the whole
/// answer.
fn get_ms(ip: Ipv4Addr) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !reply.starts_with(b"HTTP/1.") || !reply.ends_with(b"ok\n") {
        bail!("{ip}:80 answered {:?}", String::from_utf8_lossy(&reply));
    }
    Ok(ms)
}

fn print_table(r: &Report) {
    r.environment.print_title("net");
    println!(
        "{} rounds (ABBA) of iperf3 {} s each way and {} GETs per side, new connection each",
        r.rounds, r.seconds, r.requests
    );
    println!();
    println!("| metric | forkvm (VM, virtio-net on a TAP) | runc (veth) | forkvm / runc |");
    println!("|---|---|---|---|");
    let row = |name: &str, a: &[f64], b: &[f64], pick: fn(&Summary) -> f64, unit: &str| match (
        Summary::of(a),
        Summary::of(b),
    ) {
        (Some(a), Some(b)) => println!(
            "| {name} | {:.3} {unit} | {:.3} {unit} | {:.2}x |",
            pick(&a),
            pick(&b),
            pick(&a) / pick(&b)
        ),
        _ => println!("| {name} | - | - | - |"),
    };
    row(
        "host → guest TCP, median",
        &r.forkvm.to_guest_gbps,
        &r.runc.to_guest_gbps,
        |s| s.median,
        "Gbit/s",
    );
    row(
        "guest → host TCP, median",
        &r.forkvm.from_guest_gbps,
        &r.runc.from_guest_gbps,
        |s| s.median,
        "Gbit/s",
    );
    row(
        "HTTP GET, new connection, p50",
        &r.forkvm.get_ms,
        &r.runc.get_ms,
        |s| s.median,
        "ms",
    );
    row(
        "HTTP GET, new connection, p90",
        &r.forkvm.get_ms,
        &r.runc.get_ms,
        |s| s.p90,
        "ms",
    );
}
