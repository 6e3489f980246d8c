//! `forkvm bench fork`: how fast and how cheap a fork is, beside a cold boot.
//!
//! The benchmark boots the default guest (agent included) in this process as the
//! parent, with its VMM loop on a thread, and waits until the guest agent answers. Then,
//! for each child count, it forks the running parent (which keeps running) and records
//! per child:
//!
//! - **T1**: fork request until the child reported its vCPUs running
//!   (`ChildInfo::running_after_us`, measured by the parent VMM);
//! - **T2**: fork request until the child's guest agent confirmed the child's own
//!   identity (`--t2 identity`, the default: the wall-clock time the child records in its
//!   home, read after the fork; nothing connects to the child), or until its guest
//!   agent first answers a ping over the child's own vsock socket with the child's
//!   identity (`--t2 ping`: hostname `fork-...`, polled by one thread per child,
//!   started before the fork; the connection costs the child's guest memory);
//! - the **parent pause** of the fork (`ForkOutcome::parent_pause_us`);
//! - after the children idled `--idle-ms`: the guest pages the child copied
//!   (`Anonymous` of the `/memfd:forkvm-guest-ram*` mappings in `/proc/PID/smaps`: the
//!   pages it wrote, its copy-on-write cost), the VMM process's own dirty pages outside
//!   guest RAM (`Private_Dirty` of `/proc/PID/smaps_rollup` less that of the guest-RAM
//!   mappings: what a child still shares with its pool's zygote is not its own) and its
//!   Pss. `Private_*` is not used for guest RAM: it also counts pages of the shared
//!   memory file that only this process maps (measured: 1512 KiB "private" for 1196 KiB
//!   of copies in a child, 2248 KiB for 524 KiB in its parent).
//!
//! The children are killed (SIGKILL) before the next fork.
//! Finally the parent stops and the same guest is cold-booted with `forkvm boot` in
//! a new process, recording spawn until the ready marker on its console, spawn until its
//! agent answers, and the same memory figures after the same idle time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use forkvm_vmm::config::DEFAULT_CMDLINE;
use forkvm_vmm::control::{ChildSpec, ControlHandle, ForkOutcome, ForkRequest, Request, Response};
use forkvm_vmm::launch::ChildHomes;
use forkvm_vmm::{VmConfig, Vmm, VsockConfig};
use serde::Serialize;

use super::report::{self, Environment, Guest};
use super::stats::percentile;
use crate::cli::{BenchForkArgs, JailMode, T2Mode};

/// Name prefix of the memfd(s) holding guest RAM (base and fork overlays).
pub const GUEST_RAM_MEMFD: &str = "/memfd:forkvm-guest-ram";

/// What the guest runs after its init is ready: nothing, for a long time.
const GUEST_COMMAND: &str = "sleep 1000000";

/// The devices the benchmarked guest has.
const DEVICES: &str = "ttyS0 (16550 UART), i8042 (reset only), ACPI power-off port, \
in-kernel PIC/IOAPIC/PIT, virtio-mmio vsock, virtio-mmio rng, ttyS1 (16550 UART: the identity port); \
guest agent on vsock port 1024 and ttyS1";

/// How long a booted VM's agent may take to accept a ping's connection before it is
/// made again.
const PING_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a ping on an accepted connection waits for its answer.
const PING_ANSWER: Duration = Duration::from_secs(2);

mod mem;
mod pages;
mod plot;
mod summary;

pub use mem::*;
pub use pages::PageTypes;
pub use summary::*;

/// Fork children that must not outlive the benchmark.
#[derive(Default)]
struct Kids(Vec<u32>);

impl Kids {
    /// SIGKILLs every child and waits (up to 10 s each) until the parent VMM's reaper
    /// thread has reaped it.
    fn kill_all(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for pid in self.0.drain(..) {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Kids {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A spawned `forkvm boot`, killed and reaped on drop.
struct ColdVmm(Child);

impl Drop for ColdVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pings the agent behind `uds` until it answers with a hostname `accept`s, or until
/// `deadline` or `stop`; returns when it answered. The pings go over one connection,
/// made again when it breaks (a fork child's guest forgets the connections it had when
/// it handles its transport reset). A connection's handshake may take `handshake`
/// ([`forkvm_vmm::fork::FRESH_CHILD_HANDSHAKE`] for a fork child, [`PING_TIMEOUT`] for
/// a booted VM), twice as long after each one that ran out, as the child's own identity
/// thread does: a guest starved of CPU is not flooded with connections.
fn wait_agent(
    uds: &Path,
    handshake: Duration,
    accept: impl Fn(&str) -> bool,
    poll: Duration,
    deadline: Instant,
    stop: &AtomicBool,
) -> Option<Instant> {
    use forkvm_agent_proto::{client, Request, Response, AGENT_PORT};
    let mut handshake = handshake;
    let mut conn = None;
    loop {
        if conn.is_none() {
            let attempt = Instant::now();
            match client::connect_vsock(uds, AGENT_PORT, handshake) {
                Ok(c) => conn = Some(c),
                Err(_) if attempt.elapsed() >= handshake => {
                    handshake = (handshake * 2).min(Duration::from_secs(4));
                }
                Err(_) => {}
            }
        }
        if let Some(c) = conn.as_mut() {
            // An accepted connection's answer is waited on longer: cutting it would
            // only make the guest accept another.
            match client::call_within(c, &Request::Ping, PING_ANSWER) {
                Ok(Response::Pong { hostname, .. }) if accept(&hostname) => {
                    return Some(Instant::now())
                }
                Ok(Response::Pong { .. }) => {}
                _ => conn = None,
            }
        }
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            return None;
        }
        std::thread::sleep(poll);
    }
}

/// Each child's T2 as its home records it: from `t0_us` (Unix microseconds, the fork
/// request) until its guest confirmed its identity; `None` for a child that had not
/// when its process ended or `deadline` passed.
fn wait_identities(
    root: &Path,
    pids: &[Option<u32>],
    t0_us: u64,
    deadline: Instant,
) -> Vec<Option<u64>> {
    let mut t2 = vec![None; pids.len()];
    let mut done = vec![false; pids.len()];
    loop {
        let homes = Bench::homes_by_pid(root);
        for (i, pid) in pids.iter().enumerate() {
            let Some(pid) = pid.filter(|_| !done[i]) else {
                done[i] = true;
                continue;
            };
            let taken = homes
                .get(&pid)
                .and_then(|h| h.state().ok())
                .and_then(|s| s.identity);
            if let Some(taken) = taken {
                t2[i] = Some(taken.at_us.saturating_sub(t0_us));
                done[i] = true;
                // Why the port was not used, or needed a second interrupt: the child's
                // log says.
                let log = homes
                    .get(&pid)
                    .and_then(|h| std::fs::read_to_string(h.console_path()).ok())
                    .unwrap_or_default();
                let why: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("identity port"))
                    .collect();
                if taken.via != "identity-port" || !why.is_empty() {
                    eprintln!(
                        "child {pid} took its identity over {}: {}",
                        taken.via,
                        why.join(" | ")
                    );
                }
            } else if !Path::new(&format!("/proc/{pid}")).exists() {
                done[i] = true;
            }
        }
        if done.iter().all(|d| *d) || Instant::now() >= deadline {
            return t2;
        }
        // The time is the child's own record: how often it is read does not change it.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One thread per child socket, each waiting for its start time, then pinging until
/// the child answers, the time limit passes or its stop flag is raised.
struct Pollers {
    start: Vec<mpsc::Sender<Instant>>,
    threads: Vec<JoinHandle<Option<u64>>>,
    stop: Vec<Arc<AtomicBool>>,
}

impl Pollers {
    fn new(socks: &[PathBuf], poll: Duration, limit: Duration) -> Result<Self> {
        let mut stops = Vec::new();
        let mut start = Vec::new();
        let mut threads = Vec::new();
        for (i, uds) in socks.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Instant>();
            let uds = uds.clone();
            let stop = Arc::new(AtomicBool::new(false));
            stops.push(stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("ping-{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    let t0 = rx.recv().ok()?;
                    let at = wait_agent(
                        &uds,
                        forkvm_vmm::fork::FRESH_CHILD_HANDSHAKE,
                        |h| h.starts_with("fork-"),
                        poll,
                        t0 + limit,
                        &stop,
                    )?;
                    Some(at.duration_since(t0).as_micros() as u64)
                })
                .context("cannot start a ping thread")?;
            start.push(tx);
            threads.push(t);
        }
        Ok(Self {
            start,
            threads,
            stop: stops,
        })
    }

    fn go(&mut self, t0: Instant) {
        for tx in self.start.drain(..) {
            let _ = tx.send(t0);
        }
    }

    fn abandon(self) {
        for s in &self.stop {
            s.store(true, Ordering::Relaxed);
        }
        drop(self.start);
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Waits for every poller; one whose child process (`pids[i]`, when known) is gone
    /// stops at once instead of pinging a dead socket until the time limit.
    fn join(self, pids: &[Option<u32>]) -> Vec<Option<u64>> {
        while self.threads.iter().any(|t| !t.is_finished()) {
            for (i, t) in self.threads.iter().enumerate() {
                let gone = pids
                    .get(i)
                    .copied()
                    .flatten()
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if !t.is_finished() && gone {
                    self.stop[i].store(true, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.threads
            .into_iter()
            .map(|t| t.join().ok().flatten())
            .collect()
    }
}

struct Bench<'a> {
    args: &'a BenchForkArgs,
    exe: PathBuf,
    dir: PathBuf,
    /// Where children and cold boots register.
    root: PathBuf,
    seq: usize,
}

/// Waits until the parent's fork pool holds `size` warm processes (after its boot and
/// after each fork), so that every measured fork starts with a full pool.
fn wait_pool_full(handle: &ControlHandle, size: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = match handle.call(Request::Info) {
            Ok(Response::Info(i)) => i.fork_pool.len(),
            other => bail!("the parent did not report its fork pool: {other:?}"),
        };
        if ready >= size as usize {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the parent's fork pool has {ready} of {size} warm processes after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Bench<'_> {
    /// Boots a parent configured as `cfg` in this process, waits for its agent, runs the
    /// warm-up and measured forks (appended to `rounds`) and stops it; returns how long
    /// its agent took to answer after boot, ms.
    fn with_parent(&mut self, mut cfg: VmConfig, rounds: &mut Vec<ForkRound>) -> Result<f64> {
        let args = self.args;
        let pool = cfg.fork_pool;
        let parent_uds = self.dir.join(format!("parent-{pool}.vsock"));
        cfg.vsock = Some(VsockConfig {
            cid: 3,
            uds: parent_uds.clone(),
        });
        let console_path = match &args.console_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                d.join(format!("parent-pool{pool}.log"))
            }
            None => self.dir.join(format!("parent-{pool}.console")),
        };
        let console = std::fs::File::create(&console_path)
            .context("cannot create the parent's console file")?;
        let root = self.root.clone();
        let booted = Instant::now();
        let (tx, rx) = mpsc::channel();
        let vmm_thread = std::thread::Builder::new()
            .name("parent-vmm".into())
            .spawn(move || -> Result<()> {
                let mut vmm =
                    Vmm::boot(&cfg, Box::new(console)).context("cannot boot the parent")?;
                vmm.set_child_homes(ChildHomes { root, parent: None });
                vmm.fill_fork_pool();
                let _ = tx.send(vmm.control_handle());
                vmm.run().context("the parent VM failed")?;
                Ok(())
            })
            .context("cannot start the parent VMM thread")?;
        let Ok(handle) = rx.recv() else {
            return Err(vmm_thread
                .join()
                .map_err(|_| anyhow!("the parent VMM thread panicked"))?
                .err()
                .unwrap_or_else(|| anyhow!("the parent VMM ended at once")));
        };
        let never = AtomicBool::new(false);
        let measured = (|| -> Result<f64> {
            let parent_ready = wait_agent(
                &parent_uds,
                PING_TIMEOUT,
                |_| true,
                Duration::from_millis(5),
                booted + Duration::from_secs(args.timeout),
                &never,
            )
            .ok_or_else(|| {
                let console = std::fs::read_to_string(&console_path).unwrap_or_default();
                anyhow!(
                    "the parent's agent did not answer within {} s; its console:\n{console}",
                    args.timeout
                )
            })?;
            let ready_ms = parent_ready.duration_since(booted).as_secs_f64() * 1000.0;
            eprintln!(
                "parent (fork pool {pool}) ready: agent answered {ready_ms:.0} ms after boot"
            );
            let full = || wait_pool_full(&handle, pool, Duration::from_secs(args.timeout));
            for w in 0..args.warmup {
                full()?;
                let r = self.fork(&handle, pool, 1, w)?;
                eprintln!(
                    "{:>26}  pause {} us, T1 {} us, T2 {:?} us",
                    format!("pool {pool} warm-up {}/{}", w + 1, args.warmup),
                    r.parent_pause_us,
                    r.children[0].t1_us,
                    r.children[0].t2_us
                );
            }
            for &count in &args.children {
                let n = rounds_for(count, args.rounds);
                for i in 0..n {
                    full()?;
                    let r = self.fork(&handle, pool, count, i)?;
                    let s = &summarise(std::slice::from_ref(&r))[0];
                    eprintln!(
                        "{:>26}  pause {} us, {} warm, T1 p50 {} ms, last {} ms, T2 p50 {} ms ({} no answer), guest-RAM own p50 {} KiB",
                        format!("pool {pool} fork x{count} {}/{n}", i + 1),
                        r.parent_pause_us,
                        s.warm,
                        ms(s.t1_ms),
                        ms(s.last_t1_ms),
                        ms(s.t2_ms),
                        s.t2_missing,
                        s.guest_own_kib.map_or(0.0, |d| d.p50),
                    );
                    rounds.push(r);
                }
            }
            Ok(ready_ms)
        })();
        let _ = handle.call(Request::Stop);
        match vmm_thread.join() {
            Ok(Err(e)) => tracing::warn!("parent VMM: {e:#}"),
            Err(_) => tracing::warn!("the parent VMM thread panicked"),
            Ok(Ok(())) => {}
        }
        measured
    }

    /// One fork of `count` children of the parent behind `handle` (whose fork pool has
    /// `pool` processes): timings, idle, memory, kill.
    fn fork(
        &mut self,
        handle: &ControlHandle,
        pool: u32,
        count: u32,
        round: usize,
    ) -> Result<ForkRound> {
        self.seq += 1;
        let socks: Vec<PathBuf> = (0..count)
            .map(|i| self.dir.join(format!("f{}-{i}.vsock", self.seq)))
            .collect();
        let pinged = if self.args.t2 == T2Mode::Ping {
            &socks[..]
        } else {
            &[]
        };
        let mut pollers = Pollers::new(
            pinged,
            Duration::from_micros(self.args.poll_us),
            Duration::from_secs(self.args.timeout),
        )?;
        let req = ForkRequest {
            count,
            freeze: false,
            children: socks
                .iter()
                .enumerate()
                .map(|(i, s)| ChildSpec {
                    vsock_uds: Some(s.clone()),
                    console: self
                        .args
                        .console_dir
                        .as_ref()
                        .map(|d| d.join(format!("fork{}-{i}.log", self.seq))),
                    ..ChildSpec::default()
                })
                .collect(),
        };
        let t0_us = forkvm_vmm::snapshot::realtime_ns() / 1000;
        let t0 = Instant::now();
        pollers.go(t0);
        let answer = handle.call(Request::Fork(req));
        let call_us = t0.elapsed().as_micros() as u64;
        let out: ForkOutcome = match answer {
            Ok(Response::Forked(out)) => out,
            other => {
                pollers.abandon();
                bail!("the fork of {count} children failed: {other:?}");
            }
        };
        let mut kids = Kids(out.children.iter().map(|c| c.pid).collect());
        let pids: Vec<Option<u32>> = socks
            .iter()
            .map(|s| {
                out.children
                    .iter()
                    .find(|c| c.vsock_uds.as_ref() == Some(s))
                    .map(|c| c.pid)
            })
            .collect();
        let t2 = match self.args.t2 {
            T2Mode::Ping => pollers.join(&pids),
            T2Mode::Identity => {
                pollers.abandon();
                let deadline = t0 + Duration::from_secs(self.args.timeout);
                wait_identities(&self.root, &pids, t0_us, deadline)
            }
        };
        std::thread::sleep(Duration::from_millis(self.args.idle_ms));
        let homes = Self::homes_by_pid(&self.root);
        let mut children: Vec<ChildSample> = out
            .children
            .iter()
            .map(|c| {
                let i = c
                    .vsock_uds
                    .as_ref()
                    .and_then(|u| socks.iter().position(|s| s == u));
                ChildSample {
                    pid: c.pid,
                    t1_us: c.running_after_us,
                    warm: c.warm,
                    t2_us: i.and_then(|i| t2[i]),
                    mem: read_mem(c.pid)
                        .map_err(|e| tracing::warn!("child {}: {e:#}", c.pid))
                        .ok(),
                    page_types: None,
                    steps: homes.get(&c.pid).map(Self::child_steps).unwrap_or_default(),
                }
            })
            .collect();
        // After every child's memory figures: the guest's reading of its flags writes
        // pages of that child.
        if let (true, Some(first), Some(sample)) = (
            self.args.page_types,
            out.children.first(),
            children.first_mut(),
        ) {
            if let Some(uds) = &first.vsock_uds {
                sample.page_types = pages::page_types(first.pid, uds, self.args.mem << 20)
                    .map_err(|e| tracing::warn!("child {}: page types: {e:#}", first.pid))
                    .ok();
            }
        }
        let parent_mem = read_mem(std::process::id()).ok();
        kids.kill_all();
        for s in &socks {
            let _ = std::fs::remove_file(s);
        }
        Ok(ForkRound {
            jailed: forkvm_jail::enabled(),
            pool,
            count,
            round,
            parent_pause_us: out.parent_pause_us,
            call_us,
            parent_mem,
            children,
        })
    }

    /// The homes under `root` by the pid of their VM process, the newest where a pid
    /// was used again (a killed child's home stays until the bench ends), read once for
    /// a fork's children.
    fn homes_by_pid(root: &Path) -> std::collections::HashMap<u32, forkvm_registry::VmHome> {
        // Oldest first: a newer home with the same pid replaces an older one.
        forkvm_registry::list(root)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| {
                let pid = e.state.as_ref().ok()?.process.as_ref()?.pid;
                Some((pid, forkvm_registry::VmHome::open(root, &e.id).ok()?))
            })
            .collect()
    }

    /// The start steps a fork child logged in its home's console log
    /// ([`summary::parse_steps`]).
    fn child_steps(home: &forkvm_registry::VmHome) -> Vec<(String, u64)> {
        std::fs::read_to_string(home.console_path())
            .map(|log| summary::parse_steps(&log))
            .unwrap_or_default()
    }

    /// The cold-boot command's arguments.
    fn cold_args(&self, uds: &Path) -> Vec<String> {
        vec![
            "--root".into(),
            self.dir.join("root").display().to_string(),
            "boot".into(),
            "--vcpus".into(),
            self.args.vcpus.to_string(),
            "--mem".into(),
            self.args.mem.to_string(),
            "--vsock".into(),
            format!("cid=3,uds={}", uds.display()),
            // No warm processes starting beside the boot being measured.
            "--fork-pool".into(),
            "0".into(),
            "--cmdline".into(),
            guest_cmdline(self.args.cmdline.as_deref()),
        ]
    }

    /// One cold boot of the same guest with `forkvm boot`.
    fn cold(&self, run: usize) -> Result<ColdSample> {
        let uds = self.dir.join(format!("cold-{run}.vsock"));
        let err_log = self.dir.join(format!("cold-{run}.stderr"));
        let t0 = Instant::now();
        let child = Command::new(&self.exe)
            .args(self.cold_args(&uds))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_log).context("cannot create a log file")?)
            .spawn()
            .context("cannot start forkvm boot")?;
        let mut vmm = ColdVmm(child);
        let pid = vmm.0.id();
        let stdout = vmm.0.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                if !sent
                    && String::from_utf8_lossy(&line).contains(forkvm_guest_kernel::READY_MARKER)
                {
                    let _ = tx.send(Instant::now());
                    sent = true;
                }
            }
        });
        let deadline = t0 + Duration::from_secs(self.args.timeout);
        let never = AtomicBool::new(false);
        let agent = wait_agent(
            &uds,
            PING_TIMEOUT,
            |_| true,
            Duration::from_micros(self.args.poll_us),
            deadline,
            &never,
        );
        let ready = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok();
        if agent.is_none() {
            // Recorded as a boot without answer (the summary counts what answered);
            // one hung boot should not cost the whole benchmark.
            let log = std::fs::read_to_string(&err_log).unwrap_or_default();
            eprintln!(
                "cold boot {run}: the agent did not answer within {} s; forkvm boot's stderr:\n{log}",
                self.args.timeout
            );
            let us = |t: Option<Instant>| t.map(|t| t.duration_since(t0).as_micros() as u64);
            return Ok(ColdSample {
                run,
                pid,
                ready_us: us(ready),
                agent_us: None,
                mem: None,
            });
        }
        std::thread::sleep(Duration::from_millis(self.args.idle_ms));
        let mem = read_mem(super::vm_process(pid)).ok();
        drop(vmm);
        let _ = std::fs::remove_file(&uds);
        let us = |t: Option<Instant>| t.map(|t| t.duration_since(t0).as_micros() as u64);
        Ok(ColdSample {
            run,
            pid,
            ready_us: us(ready),
            agent_us: us(agent),
            mem,
        })
    }
}

/// The guest's command line: `base` (forkvm's default unless given), then a command
/// that idles.
fn guest_cmdline(base: Option<&str>) -> String {
    format!(
        "{} -- {GUEST_COMMAND}",
        base.unwrap_or(DEFAULT_CMDLINE).trim()
    )
}

fn ms(d: Option<Dist>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}", d.p50))
}

/// Runs `forkvm bench fork`; returns the process exit code.
pub fn run(args: BenchForkArgs) -> Result<i32> {
    if args.children.is_empty() || args.rounds == 0 {
        bail!("--children needs at least one count and --rounds at least 1");
    }
    if let Some(c) = args
        .children
        .iter()
        .find(|&&c| c == 0 || c > forkvm_vmm::fork::MAX_CHILDREN)
    {
        bail!(
            "--children: {c} is not between 1 and {}",
            forkvm_vmm::fork::MAX_CHILDREN
        );
    }
    if args.pool.is_empty() {
        bail!("--pool needs at least one size (0: no fork pool)");
    }
    if let Some(p) = args
        .pool
        .iter()
        .find(|&&p| p > forkvm_vmm::pool::MAX_FORK_POOL)
    {
        bail!(
            "--pool: {p} is more than {}",
            forkvm_vmm::pool::MAX_FORK_POOL
        );
    }
    let g = forkvm_guest_kernel::default_guest()
        .context("cannot prepare the default guest kernel and initramfs")?;
    if forkvm_guest_kernel::find_agent().is_none() {
        bail!("the guest agent is not built: run `cargo xtask prepare-guest` first");
    }
    let (exe, dir, scratch) = super::bench_setup("fork")?;
    // Children and cold boots register as VMs under a root of their own.
    let root = dir.join("root");

    let guest = Guest {
        kernel_version: super::kernel_version(&g.kernel),
        kernel: g.kernel.display().to_string(),
        initrd_bytes: std::fs::metadata(&g.initrd).map_or(0, |m| m.len()),
        initrd: g.initrd.display().to_string(),
        mem_mib: args.mem,
        vcpus: args.vcpus,
        cmdline: guest_cmdline(args.cmdline.as_deref()),
    };
    let mut cfg = VmConfig::new(&g.kernel);
    cfg.initrd = Some(g.initrd.clone());
    cfg.vcpus = args.vcpus;
    cfg.mem_mib = args.mem;
    cfg.cmdline = guest_cmdline(args.cmdline.as_deref());
    cfg.rng = true;
    let mut bench = Bench {
        args: &args,
        exe,
        dir: dir.clone(),
        root,
        seq: 0,
    };
    let mut rounds = Vec::new();
    let mut parent_ready_ms = Vec::new();
    // Each jail setting, then each pool size: one parent per pair, its children jailed
    // as the setting says (the jail must not slow a fork).
    let series = args
        .jail
        .iter()
        .flat_map(|&jail| args.pool.iter().map(move |&pool| (jail, pool)));
    for (jail, pool) in series {
        forkvm_jail::set_enabled(jail == JailMode::On);
        let mut cfg = cfg.clone();
        cfg.fork_pool = pool;
        let measured = bench.with_parent(cfg, &mut rounds);
        match measured {
            Ok(ready) => parent_ready_ms.push(ready),
            Err(e) => {
                let partial = summarise(&rounds);
                if !partial.is_empty() {
                    eprintln!("forkvm bench fork: a fork failed; the forks measured so far:");
                    eprint!("{}", table(&partial, None, &[]));
                }
                return Err(e);
            }
        }
    }

    let mut cold = Vec::new();
    for run in 0..args.cold_runs {
        let c = bench.cold(run)?;
        eprintln!(
            "{:>18}  ready {} ms, agent {} ms, guest-RAM own {} KiB",
            format!("cold boot {}/{}", run + 1, args.cold_runs),
            c.ready_us.map_or(f64::NAN, |t| t as f64 / 1000.0),
            c.agent_us.map_or(f64::NAN, |t| t as f64 / 1000.0),
            c.mem.map_or(0, |m| m.guest_ram.private_kib)
        );
        cold.push(c);
    }

    let summaries = summarise(&rounds);
    let cold_summary = summarise_cold(&cold);
    let vs = cold_summary
        .as_ref()
        .map(|c| versus(&summaries, c))
        .unwrap_or_default();
    if let Some(path) = &args.plot {
        let svg = plot::svg(&summaries, cold_summary.as_ref())?;
        std::fs::write(path, svg)
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
        eprintln!("forkvm bench fork: plot written to {}", path.display());
    }
    let cold_command = std::iter::once(bench.exe.display().to_string())
        .chain(
            bench
                .cold_args(&dir.join("cold-N.vsock"))
                .into_iter()
                .map(|a| if a.contains(' ') { format!("'{a}'") } else { a }),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let report = ForkReport {
        date_utc: super::iso8601_utc(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        environment: super::host_environment(),
        guest,
        devices: DEVICES.to_owned(),
        t2: match args.t2 {
            T2Mode::Identity => "the child records that its guest agent confirmed its identity \
                                 (sent over the identity port)"
                .to_owned(),
            T2Mode::Ping => "the child's agent answers a ping with the child's hostname \
                             (over a vsock connection)"
                .to_owned(),
        },
        parent_ready_ms,
        pools: args.pool.clone(),
        idle_ms: args.idle_ms,
        warmup: args.warmup,
        cold_command,
        rounds,
        cold,
        summaries,
        cold_summary,
        versus: vs,
    };
    drop(scratch);
    super::print_report(args.format, &report, render)
}

#[cfg(test)]
mod tests;
