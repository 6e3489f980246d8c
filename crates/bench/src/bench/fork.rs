//! `forkvm bench fork`: how fast and how cheap a fork is, beside a cold boot.
//!
//! The benchmark boots the default guest (agent included) in this process as the
//! parent, with its VMM loop on a thread, and waits until the guest agent answers. Then,
//! for each child count, it forks the running parent (which keeps running) and records
//! per child:
//!
//! - **T1**: fork request until the child reported its vCPUs running
//!   (`ChildInfo::running_after_us`, measured by the parent VMM);
//! - **T2**: fork request until the child's guest agent first answers a ping over the
//!   child's own vsock socket with the child's identity (hostname `fork-...`), polled
//!   by one thread per child, started before the fork;
//! - the **parent pause** of the fork (`ForkOutcome::parent_pause_us`);
//! - after the children idled `--idle-ms`: the child's private memory in its guest-RAM
//!   mapping (Private_Clean + Private_Dirty of the `/memfd:forkvm-guest-ram*` mappings
//!   in `/proc/PID/smaps`: the guest pages the child wrote, its copy-on-write cost), the
//!   whole VMM process's private memory and its Pss (`/proc/PID/smaps_rollup`).
//!
//! The children are killed (SIGKILL, reaped by the parent VMM) before the next fork.
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
use forkvm_vmm::{VmConfig, Vmm, VsockSpec};
use serde::Serialize;

use super::report::{self, Environment, Guest};
use super::stats::percentile;
use crate::cli::BenchForkArgs;

/// Name prefix of the memfd(s) holding guest RAM (base and fork overlays).
pub const GUEST_RAM_MEMFD: &str = "/memfd:forkvm-guest-ram";

/// What the guest runs after its init is ready: nothing, for a long time.
const GUEST_COMMAND: &str = "sleep 1000000";

/// The devices the benchmarked guest has.
const DEVICES: &str = "ttyS0 (16550 UART), i8042 (reset only), ACPI power-off port, \
in-kernel PIC/IOAPIC/PIT, virtio-mmio vsock, virtio-mmio rng; guest agent on vsock port 1024";

/// How long one agent ping may wait for an answer before it is retried.
const PING_TIMEOUT: Duration = Duration::from_millis(250);

/// Private memory of a process's guest-RAM mappings, from `/proc/PID/smaps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestRamMem {
    /// Private_Clean + Private_Dirty of the guest-RAM mappings, KiB.
    pub private_kib: u64,
    /// Private_Dirty alone, KiB.
    pub private_dirty_kib: u64,
    /// Rss of the guest-RAM mappings (shared pages included), KiB.
    pub rss_kib: u64,
    /// How many guest-RAM mappings were found.
    pub mappings: usize,
}

/// A whole process's memory, from `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rollup {
    /// Rss, KiB.
    pub rss_kib: u64,
    /// Pss (shared pages divided among the processes mapping them), KiB.
    pub pss_kib: u64,
    /// Private_Clean + Private_Dirty (+ Private_Hugetlb), KiB.
    pub private_kib: u64,
}

/// One process's memory at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemSample {
    /// Its guest-RAM mappings.
    pub guest_ram: GuestRamMem,
    /// The whole process.
    pub process: Rollup,
}

/// The `N kB` value of a `Key:   N kB` line.
fn kib(rest: &str) -> u64 {
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether an smaps line starts a mapping (`start-end perms offset dev inode [path]`),
/// and if so its path (empty for anonymous memory).
fn mapping_header(line: &str) -> Option<&str> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let (a, b) = range.split_once('-')?;
    if a.is_empty() || b.is_empty() || !a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // perms, offset, dev, inode; then the (padded) path.
    for _ in 0..4 {
        it.next()?;
    }
    Some(it.next().unwrap_or("").trim())
}

/// Sums the guest-RAM mappings (path starting with [`GUEST_RAM_MEMFD`]) of an smaps text.
pub fn parse_smaps(text: &str) -> GuestRamMem {
    let mut m = GuestRamMem::default();
    let mut in_guest = false;
    for line in text.lines() {
        if let Some(path) = mapping_header(line) {
            in_guest = path.starts_with(GUEST_RAM_MEMFD);
            if in_guest {
                m.mappings += 1;
            }
            continue;
        }
        if !in_guest {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Rss" => m.rss_kib += kib(rest),
            "Private_Clean" => m.private_kib += kib(rest),
            "Private_Dirty" => {
                let v = kib(rest);
                m.private_kib += v;
                m.private_dirty_kib += v;
            }
            _ => {}
        }
    }
    m
}

/// Parses `/proc/PID/smaps_rollup`.
pub fn parse_rollup(text: &str) -> Rollup {
    let mut r = Rollup::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Rss" => r.rss_kib += kib(rest),
            "Pss" => r.pss_kib += kib(rest),
            "Private_Clean" | "Private_Dirty" | "Private_Hugetlb" => r.private_kib += kib(rest),
            _ => {}
        }
    }
    r
}

/// Reads process `pid`'s memory figures.
fn read_mem(pid: u32) -> Result<MemSample> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    Ok(MemSample {
        guest_ram: parse_smaps(&smaps),
        process: parse_rollup(&rollup),
    })
}

/// One child of one fork.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChildSample {
    /// Its VMM process.
    pub pid: u32,
    /// Fork request until it reported running (T1), us.
    pub t1_us: u64,
    /// Fork request until its agent answered with its identity (T2), us; `None` when
    /// it did not within the time limit.
    pub t2_us: Option<u64>,
    /// Its memory after idling; `None` when it could not be read.
    pub mem: Option<MemSample>,
}

/// One fork.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForkRound {
    /// Children it made.
    pub count: u32,
    /// Which fork of this count (from 0).
    pub round: usize,
    /// How long the parent's vCPUs were paused, us.
    pub parent_pause_us: u64,
    /// Fork request until the fork call returned (all children running), us.
    pub call_us: u64,
    /// The parent VMM (this process) after the children idled.
    pub parent_mem: Option<MemSample>,
    /// Its children.
    pub children: Vec<ChildSample>,
}

/// One cold boot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColdSample {
    /// Which boot (from 0).
    pub run: usize,
    /// Its VMM process.
    pub pid: u32,
    /// Spawn until the ready marker on its console, us.
    pub ready_us: Option<u64>,
    /// Spawn until its agent answered, us.
    pub agent_us: Option<u64>,
    /// Its memory after idling.
    pub mem: Option<MemSample>,
}

/// p50, p99, min and max of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Dist {
    /// Number of values.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (linear interpolation between ranks).
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Dist {
    /// The distribution of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let v = super::stats::sorted_finite(values)?;
        Some(Self {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// All forks of one child count, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CountSummary {
    /// Children per fork.
    pub count: u32,
    /// Forks measured.
    pub forks: usize,
    /// T1 per child, ms.
    pub t1_ms: Option<Dist>,
    /// T2 per child, ms.
    pub t2_ms: Option<Dist>,
    /// Children whose agent never answered.
    pub t2_missing: usize,
    /// Parent pause per fork, us.
    pub pause_us: Option<Dist>,
    /// Private guest-RAM memory per idle child, KiB.
    pub guest_private_kib: Option<Dist>,
    /// Private memory of the whole child VMM process, KiB.
    pub process_private_kib: Option<Dist>,
    /// Pss of the child VMM process, KiB.
    pub pss_kib: Option<Dist>,
}

fn dist_by<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<Dist> {
    Dist::of(&items.iter().filter_map(f).collect::<Vec<_>>())
}

/// Summaries per child count, in the order the counts were first measured.
pub fn summarise(rounds: &[ForkRound]) -> Vec<CountSummary> {
    let mut counts: Vec<u32> = Vec::new();
    for r in rounds {
        if !counts.contains(&r.count) {
            counts.push(r.count);
        }
    }
    counts
        .into_iter()
        .map(|count| {
            let forks: Vec<&ForkRound> = rounds.iter().filter(|r| r.count == count).collect();
            let kids: Vec<&ChildSample> = forks.iter().flat_map(|r| &r.children).collect();
            CountSummary {
                count,
                forks: forks.len(),
                t1_ms: dist_by(&kids, |c| Some(c.t1_us as f64 / 1000.0)),
                t2_ms: dist_by(&kids, |c| c.t2_us.map(|t| t as f64 / 1000.0)),
                t2_missing: kids.iter().filter(|c| c.t2_us.is_none()).count(),
                pause_us: dist_by(&forks, |r| Some(r.parent_pause_us as f64)),
                guest_private_kib: dist_by(&kids, |c| {
                    c.mem.map(|m| m.guest_ram.private_kib as f64)
                }),
                process_private_kib: dist_by(&kids, |c| {
                    c.mem.map(|m| m.process.private_kib as f64)
                }),
                pss_kib: dist_by(&kids, |c| c.mem.map(|m| m.process.pss_kib as f64)),
            }
        })
        .collect()
}

/// The cold boots, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColdSummary {
    /// Boots measured.
    pub boots: usize,
    /// Spawn to ready marker, ms.
    pub ready_ms: Option<Dist>,
    /// Spawn to agent answer, ms.
    pub agent_ms: Option<Dist>,
    /// Private guest-RAM memory of the idle VMM, KiB.
    pub guest_private_kib: Option<Dist>,
    /// Private memory of the whole VMM process, KiB.
    pub process_private_kib: Option<Dist>,
    /// Pss of the VMM process, KiB.
    pub pss_kib: Option<Dist>,
}

/// Summarises the cold boots; `None` when there were none.
pub fn summarise_cold(cold: &[ColdSample]) -> Option<ColdSummary> {
    if cold.is_empty() {
        return None;
    }
    Some(ColdSummary {
        boots: cold.len(),
        ready_ms: dist_by(cold, |c| c.ready_us.map(|t| t as f64 / 1000.0)),
        agent_ms: dist_by(cold, |c| c.agent_us.map(|t| t as f64 / 1000.0)),
        guest_private_kib: dist_by(cold, |c| c.mem.map(|m| m.guest_ram.private_kib as f64)),
        process_private_kib: dist_by(cold, |c| c.mem.map(|m| m.process.private_kib as f64)),
        pss_kib: dist_by(cold, |c| c.mem.map(|m| m.process.pss_kib as f64)),
    })
}

/// Fork versus cold boot for one child count: ratios of medians.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Versus {
    /// Children per fork.
    pub count: u32,
    /// T1 p50 / cold spawn-to-ready-marker p50.
    pub t1_vs_ready: f64,
    /// T2 p50 / cold spawn-to-agent p50.
    pub t2_vs_agent: f64,
    /// Child guest-RAM private p50 / cold guest-RAM private p50.
    pub guest_private: f64,
    /// Child process private p50 / cold process private p50.
    pub process_private: f64,
}

fn p50_ratio(a: Option<Dist>, b: Option<Dist>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) if b.p50 != 0.0 => a.p50 / b.p50,
        _ => f64::NAN,
    }
}

/// Fork/cold ratios for every count.
pub fn versus(counts: &[CountSummary], cold: &ColdSummary) -> Vec<Versus> {
    counts
        .iter()
        .map(|s| Versus {
            count: s.count,
            t1_vs_ready: p50_ratio(s.t1_ms, cold.ready_ms),
            t2_vs_agent: p50_ratio(s.t2_ms, cold.agent_ms),
            guest_private: p50_ratio(s.guest_private_kib, cold.guest_private_kib),
            process_private: p50_ratio(s.process_private_kib, cold.process_private_kib),
        })
        .collect()
}

/// The whole result.
#[derive(Clone, Debug, Serialize)]
pub struct ForkReport {
    /// When it ran (UTC).
    pub date_utc: String,
    /// The host.
    pub environment: Environment,
    /// The guest (parent and cold boots alike).
    pub guest: Guest,
    /// Its devices.
    pub devices: String,
    /// The parent: boot until its agent answered, ms.
    pub parent_ready_ms: f64,
    /// How long children idled before their memory was read, ms.
    pub idle_ms: u64,
    /// Unmeasured warm-up forks.
    pub warmup: usize,
    /// The cold-boot command line.
    pub cold_command: String,
    /// Every measured fork.
    pub rounds: Vec<ForkRound>,
    /// Every cold boot.
    pub cold: Vec<ColdSample>,
    /// Per child count.
    pub summaries: Vec<CountSummary>,
    /// The cold boots.
    pub cold_summary: Option<ColdSummary>,
    /// Fork / cold boot per child count.
    pub versus: Vec<Versus>,
}

/// Forks made for `count` children: `rounds` up to 10 children, then about
/// `rounds * 10` children in all, at least one fork.
pub fn rounds_for(count: u32, rounds: usize) -> usize {
    let count = count.max(1) as usize;
    if count <= 10 {
        rounds
    } else {
        (rounds * 10).div_ceil(count).clamp(1, rounds)
    }
}

// ---------------------------------------------------------------------------------
// Rendering.

fn cell(d: Option<Dist>, f: impl Fn(&Dist) -> f64) -> String {
    d.as_ref()
        .map_or_else(|| "-".to_owned(), |d| report::num(f(d)))
}

fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for row in rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&width).enumerate() {
            if i == 0 {
                line.push_str(&format!("{c:<w$}  "));
            } else {
                line.push_str(&format!("{c:>w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (cols - 1)));
            out.push('\n');
        }
    }
    out
}

/// The summary table: one row per child count, one for the cold boot, one ratio row
/// per child count.
pub fn table(counts: &[CountSummary], cold: Option<&ColdSummary>, vs: &[Versus]) -> String {
    let header = [
        "series",
        "VMs",
        "T1 p50 ms",
        "T1 p99 ms",
        "T2 p50 ms",
        "T2 p99 ms",
        "pause p50 us",
        "pause max us",
        "guest-RAM priv p50 KiB",
        "max KiB",
        "process priv p50 KiB",
        "Pss p50 KiB",
    ];
    let mut rows = vec![header.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()];
    for s in counts {
        let missing = if s.t2_missing > 0 {
            format!(" ({} no answer)", s.t2_missing)
        } else {
            String::new()
        };
        rows.push(vec![
            format!("fork x{} ({} forks){missing}", s.count, s.forks),
            s.t1_ms.map_or(0, |d| d.n).to_string(),
            cell(s.t1_ms, |d| d.p50),
            cell(s.t1_ms, |d| d.p99),
            cell(s.t2_ms, |d| d.p50),
            cell(s.t2_ms, |d| d.p99),
            cell(s.pause_us, |d| d.p50),
            cell(s.pause_us, |d| d.max),
            cell(s.guest_private_kib, |d| d.p50),
            cell(s.guest_private_kib, |d| d.max),
            cell(s.process_private_kib, |d| d.p50),
            cell(s.pss_kib, |d| d.p50),
        ]);
    }
    if let Some(c) = cold {
        rows.push(vec![
            "cold boot (T1=ready, T2=agent)".to_owned(),
            c.boots.to_string(),
            cell(c.ready_ms, |d| d.p50),
            cell(c.ready_ms, |d| d.p99),
            cell(c.agent_ms, |d| d.p50),
            cell(c.agent_ms, |d| d.p99),
            "-".into(),
            "-".into(),
            cell(c.guest_private_kib, |d| d.p50),
            cell(c.guest_private_kib, |d| d.max),
            cell(c.process_private_kib, |d| d.p50),
            cell(c.pss_kib, |d| d.p50),
        ]);
    }
    for v in vs {
        rows.push(vec![
            format!("fork x{} / cold (p50)", v.count),
            String::new(),
            report::ratio(v.t1_vs_ready),
            String::new(),
            report::ratio(v.t2_vs_agent),
            String::new(),
            String::new(),
            String::new(),
            report::ratio(v.guest_private),
            String::new(),
            report::ratio(v.process_private),
            String::new(),
        ]);
    }
    aligned(&rows)
}

/// The full text report.
pub fn render(r: &ForkReport) -> String {
    let e = &r.environment;
    let g = &r.guest;
    let mut out = format!(
        "forkvm bench fork: {}; {} warm-up fork(s); memory read after the children idled {:.1} s\n",
        r.date_utc,
        r.warmup,
        r.idle_ms as f64 / 1000.0
    );
    out.push_str(&format!("host:    {} ({})\n", e.kvm, e.kvm_detail));
    out.push_str(&format!(
        "         {}, {} CPU(s), Linux {}, forkvm {}\n",
        e.cpu_model, e.host_cpus, e.host_kernel, e.forkvm_version
    ));
    out.push_str(&format!(
        "guest:   kernel {}, initrd {}, {} MiB, {} vCPU(s); cmdline: {}\n",
        g.kernel_version.as_deref().unwrap_or("unknown version"),
        report::size(g.initrd_bytes),
        g.mem_mib,
        g.vcpus,
        g.cmdline
    ));
    out.push_str(&format!("devices: {}\n", r.devices));
    out.push_str(&format!(
        "parent:  booted in this process; agent answered {:.0} ms after boot\n",
        r.parent_ready_ms
    ));
    out.push_str(&format!("cold:    {}\n\n", r.cold_command));
    out.push_str(&table(&r.summaries, r.cold_summary.as_ref(), &r.versus));
    out.push_str(
        "\nT1: fork request -> child reports its vCPUs running; T2: fork request -> the child's \
         agent answers a ping\nwith the child's hostname; pause: parent vCPUs paused per fork; \
         guest-RAM priv: Private_Clean+Private_Dirty\nof the child's /memfd:forkvm-guest-ram* \
         mappings (/proc/PID/smaps); process priv / Pss: /proc/PID/smaps_rollup.\nCold boot: \
         `forkvm boot` spawn -> ready marker on the console (T1 column), -> agent answer (T2).\n",
    );
    out
}

// ---------------------------------------------------------------------------------
// Running it.

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
/// `deadline` or `stop`; returns when it answered.
fn wait_agent(
    uds: &Path,
    accept: impl Fn(&str) -> bool,
    poll: Duration,
    deadline: Instant,
    stop: &AtomicBool,
) -> Option<Instant> {
    loop {
        if let Ok(forkvm_agent_proto::Response::Pong { hostname, .. }) =
            forkvm_vmm::fork::agent_call_timeout(
                uds,
                &forkvm_agent_proto::Request::Ping,
                PING_TIMEOUT,
            )
        {
            if accept(&hostname) {
                return Some(Instant::now());
            }
        }
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            return None;
        }
        std::thread::sleep(poll);
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
                    let at = wait_agent(&uds, |h| h.starts_with("fork-"), poll, t0 + limit, &stop)?;
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
    handle: ControlHandle,
    exe: PathBuf,
    dir: PathBuf,
    seq: usize,
}

impl Bench<'_> {
    /// One fork of `count` children: timings, idle, memory, kill.
    fn fork(&mut self, count: u32, round: usize) -> Result<ForkRound> {
        self.seq += 1;
        let socks: Vec<PathBuf> = (0..count)
            .map(|i| self.dir.join(format!("f{}-{i}.vsock", self.seq)))
            .collect();
        let mut pollers = Pollers::new(
            &socks,
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
        let t0 = Instant::now();
        pollers.go(t0);
        let answer = self.handle.call(Request::Fork(req));
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
        let t2 = pollers.join(&pids);
        std::thread::sleep(Duration::from_millis(self.args.idle_ms));
        let children = out
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
                    t2_us: i.and_then(|i| t2[i]),
                    mem: read_mem(c.pid)
                        .map_err(|e| tracing::warn!("child {}: {e:#}", c.pid))
                        .ok(),
                }
            })
            .collect();
        let parent_mem = read_mem(std::process::id()).ok();
        kids.kill_all();
        for s in &socks {
            let _ = std::fs::remove_file(s);
        }
        Ok(ForkRound {
            count,
            round,
            parent_pause_us: out.parent_pause_us,
            call_us,
            parent_mem,
            children,
        })
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
            "--cmdline".into(),
            guest_cmdline(),
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

/// The guest's command line: forkvm's default, then a command that idles.
fn guest_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} -- {GUEST_COMMAND}")
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
    let g = forkvm_guest_kernel::default_guest()
        .context("cannot prepare the default guest kernel and initramfs")?;
    if forkvm_guest_kernel::find_agent().is_none() {
        bail!("the guest agent is not built: run `cargo xtask prepare-guest` first");
    }
    let caps = forkvm_testhost::Capabilities::detect();
    if !caps.hardware_kvm() {
        bail!(
            "forkvm bench needs hardware-accelerated KVM (vmx/svm and a usable /dev/kvm), \
             which this machine lacks:\n{caps}\nRun it in the virtual KVM host: \
             `cargo xtask testhost --mem 8192 -- target/release/forkvm bench fork`"
        );
    }
    let exe =
        forkvm_config::find_program("forkvm").context("cannot locate the forkvm executable")?;
    let dir = std::env::temp_dir().join(format!("forkvm-bench-fork-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir.clone());
    // Children and cold boots register as VMs under a root of their own.
    let root = dir.join("root");

    let guest = Guest {
        kernel_version: super::kernel_version(&g.kernel),
        kernel: g.kernel.display().to_string(),
        initrd_bytes: std::fs::metadata(&g.initrd).map_or(0, |m| m.len()),
        initrd: g.initrd.display().to_string(),
        mem_mib: args.mem,
        vcpus: args.vcpus,
        cmdline: guest_cmdline(),
    };
    let mut cfg = VmConfig::new(&g.kernel);
    cfg.initrd = Some(g.initrd.clone());
    cfg.vcpus = args.vcpus;
    cfg.mem_mib = args.mem;
    cfg.cmdline = guest_cmdline();
    cfg.rng = true;
    let parent_uds = dir.join("parent.vsock");
    cfg.vsock = Some(VsockSpec {
        cid: 3,
        uds: parent_uds.clone(),
    });
    let console_path = match &args.console_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.join("parent.log")
        }
        None => dir.join("parent.console"),
    };
    let console =
        std::fs::File::create(&console_path).context("cannot create the parent's console file")?;

    let booted = Instant::now();
    let (tx, rx) = mpsc::channel();
    let vmm_thread = std::thread::Builder::new()
        .name("parent-vmm".into())
        .spawn(move || -> Result<()> {
            let mut vmm = Vmm::boot(&cfg, Box::new(console)).context("cannot boot the parent")?;
            vmm.set_child_homes(ChildHomes { root, parent: None });
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
    let parent_ready = wait_agent(
        &parent_uds,
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
    let parent_ready_ms = parent_ready.duration_since(booted).as_secs_f64() * 1000.0;
    eprintln!("parent ready: agent answered {parent_ready_ms:.0} ms after boot");

    let mut bench = Bench {
        args: &args,
        handle: handle.clone(),
        exe,
        dir: dir.clone(),
        seq: 0,
    };
    let mut rounds = Vec::new();
    let measured = (|| -> Result<()> {
        for w in 0..args.warmup {
            let r = bench.fork(1, w)?;
            eprintln!(
                "{:>18}  pause {} us, T1 {} us, T2 {:?} us",
                format!("warm-up {}/{}", w + 1, args.warmup),
                r.parent_pause_us,
                r.children[0].t1_us,
                r.children[0].t2_us
            );
        }
        for &count in &args.children {
            let n = rounds_for(count, args.rounds);
            for i in 0..n {
                let r = bench.fork(count, i)?;
                let s = &summarise(std::slice::from_ref(&r))[0];
                eprintln!(
                    "{:>18}  pause {} us, T1 p50 {} ms, T2 p50 {} ms ({} no answer), guest-RAM priv p50 {} KiB",
                    format!("fork x{count} {}/{n}", i + 1),
                    r.parent_pause_us,
                    ms(s.t1_ms),
                    ms(s.t2_ms),
                    s.t2_missing,
                    s.guest_private_kib.map_or(0.0, |d| d.p50),
                );
                rounds.push(r);
            }
        }
        Ok(())
    })();
    let _ = handle.call(Request::Stop);
    match vmm_thread.join() {
        Ok(Err(e)) => tracing::warn!("parent VMM: {e:#}"),
        Err(_) => tracing::warn!("the parent VMM thread panicked"),
        Ok(Ok(())) => {}
    }
    if let Err(e) = measured {
        let partial = summarise(&rounds);
        if !partial.is_empty() {
            eprintln!("forkvm bench fork: a fork failed; the forks measured so far:");
            eprint!("{}", table(&partial, None, &[]));
        }
        return Err(e);
    }

    let mut cold = Vec::new();
    for run in 0..args.cold_runs {
        let c = bench.cold(run)?;
        eprintln!(
            "{:>18}  ready {} ms, agent {} ms, guest-RAM priv {} KiB",
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
        parent_ready_ms,
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
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 00:1f 1234                       /usr/bin/forkvm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
Private_Clean:       100 kB
Private_Dirty:         0 kB
7f0000000000-7f0010000000 rw-p 00000000 00:01 5678                       /memfd:forkvm-guest-ram (deleted)
Size:             262144 kB
KernelPageSize:        4 kB
Rss:               20480 kB
Pss:                1000 kB
Shared_Clean:          0 kB
Shared_Dirty:      20000 kB
Private_Clean:        12 kB
Private_Dirty:       468 kB
Referenced:        20480 kB
VmFlags: rd wr mr mw me ac sd
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                2048 kB
Private_Clean:         0 kB
Private_Dirty:      2048 kB
7f0020000000-7f0020100000 rw-p 00000000 00:01 5679                       /memfd:forkvm-guest-ram-overlay (deleted)
Size:               1024 kB
Rss:                  64 kB
Private_Clean:         4 kB
Private_Dirty:        16 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  16 kB
Private_Dirty:        16 kB
";

    const ROLLUP: &str = "\
55d0c0a00000-7ffd00021000 ---p 00000000 00:00 0                          [rollup]
Rss:               23000 kB
Pss:                3500 kB
Pss_Anon:           2100 kB
Shared_Clean:        800 kB
Shared_Dirty:      20000 kB
Private_Clean:       116 kB
Private_Dirty:      2548 kB
Referenced:        23000 kB
Private_Hugetlb:       0 kB
";

    #[test]
    fn smaps_sums_only_the_guest_ram_mappings() {
        let m = parse_smaps(SMAPS);
        assert_eq!(m.mappings, 2);
        assert_eq!(m.private_kib, 12 + 468 + 4 + 16);
        assert_eq!(m.private_dirty_kib, 468 + 16);
        assert_eq!(m.rss_kib, 20480 + 64);
        assert_eq!(parse_smaps(""), GuestRamMem::default());
        assert_eq!(parse_smaps("garbage\nPrivate_Dirty: 5 kB\n").private_kib, 0);
    }

    #[test]
    fn smaps_headers_are_recognised() {
        assert_eq!(
            mapping_header(
                "7f00-7f10 rw-p 00000000 00:01 5678   /memfd:forkvm-guest-ram (deleted)"
            ),
            Some("/memfd:forkvm-guest-ram (deleted)")
        );
        assert_eq!(mapping_header("7f00-7f10 rw-p 00000000 00:00 0 "), Some(""));
        assert_eq!(mapping_header("Private_Dirty:  1 kB"), None);
        assert_eq!(mapping_header("VmFlags: rd wr"), None);
    }

    #[test]
    fn rollup_private_and_pss() {
        let r = parse_rollup(ROLLUP);
        assert_eq!(r.rss_kib, 23000);
        assert_eq!(r.pss_kib, 3500, "Pss_Anon must not be added");
        assert_eq!(r.private_kib, 116 + 2548);
    }

    fn child(t1: u64, t2: Option<u64>, guest: u64) -> ChildSample {
        ChildSample {
            pid: 1,
            t1_us: t1,
            t2_us: t2,
            mem: Some(MemSample {
                guest_ram: GuestRamMem {
                    private_kib: guest,
                    ..GuestRamMem::default()
                },
                process: Rollup {
                    rss_kib: 0,
                    pss_kib: guest * 2,
                    private_kib: guest + 1000,
                },
            }),
        }
    }

    fn rounds() -> Vec<ForkRound> {
        let round = |count, round, pause, children| ForkRound {
            count,
            round,
            parent_pause_us: pause,
            call_us: 0,
            parent_mem: None,
            children,
        };
        vec![
            round(1, 0, 300, vec![child(1000, Some(3000), 100)]),
            round(1, 1, 500, vec![child(3000, Some(5000), 300)]),
            round(
                2,
                0,
                700,
                vec![child(2000, Some(4000), 200), child(4000, None, 400)],
            ),
        ]
    }

    #[test]
    fn aggregation_per_count() {
        let s = summarise(&rounds());
        assert_eq!(s.len(), 2);
        let one = &s[0];
        assert_eq!((one.count, one.forks), (1, 2));
        let t1 = one.t1_ms.unwrap();
        assert_eq!((t1.n, t1.p50, t1.min, t1.max), (2, 2.0, 1.0, 3.0));
        assert!((t1.p99 - 2.98).abs() < 1e-9, "{t1:?}");
        assert_eq!(one.pause_us.unwrap().max, 500.0);
        assert_eq!(one.guest_private_kib.unwrap().p50, 200.0);
        assert_eq!(one.process_private_kib.unwrap().p50, 1200.0);
        let two = &s[1];
        assert_eq!((two.count, two.forks, two.t2_missing), (2, 1, 1));
        assert_eq!(two.t1_ms.unwrap().n, 2);
        assert_eq!(two.t2_ms.unwrap().n, 1);
        assert_eq!(two.t2_ms.unwrap().p50, 4.0);
        assert_eq!(two.pss_kib.unwrap().max, 800.0);
    }

    #[test]
    fn cold_summary_and_ratios() {
        let cold = vec![
            ColdSample {
                run: 0,
                pid: 9,
                ready_us: Some(100_000),
                agent_us: Some(200_000),
                mem: child(0, None, 20_000).mem,
            },
            ColdSample {
                run: 1,
                pid: 10,
                ready_us: None,
                agent_us: Some(400_000),
                mem: None,
            },
        ];
        let c = summarise_cold(&cold).unwrap();
        assert_eq!(c.boots, 2);
        assert_eq!(c.ready_ms.unwrap().n, 1);
        assert_eq!(c.agent_ms.unwrap().p50, 300.0);
        let v = versus(&summarise(&rounds()), &c);
        assert!((v[0].t1_vs_ready - 2.0 / 100.0).abs() < 1e-12);
        assert!((v[0].t2_vs_agent - 4.0 / 300.0).abs() < 1e-12);
        assert!((v[0].guest_private - 200.0 / 20_000.0).abs() < 1e-12);
        assert!(summarise_cold(&[]).is_none());
        let t = table(&summarise(&rounds()), Some(&c), &v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("series"), "{t}");
        assert!(lines[2].starts_with("fork x1 (2 forks)"), "{t}");
        assert!(lines[3].contains("(1 no answer)"), "{t}");
        assert!(lines[4].starts_with("cold boot"), "{t}");
        assert!(lines[5].contains("0.02x"), "{t}");
        let len = lines[0].len();
        assert!(lines[2..5].iter().all(|l| l.len() == len), "{t}");
    }

    #[test]
    fn fewer_rounds_for_many_children() {
        assert_eq!(rounds_for(1, 5), 5);
        assert_eq!(rounds_for(10, 5), 5);
        assert_eq!(rounds_for(20, 5), 3);
        assert_eq!(rounds_for(50, 5), 1);
        assert_eq!(rounds_for(100, 5), 1);
        assert_eq!(rounds_for(100, 30), 3);
        assert_eq!(rounds_for(0, 2), 2);
    }

    #[test]
    fn distributions() {
        let d = Dist::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((d.n, d.p50, d.min, d.max), (3, 3.0, 1.0, 5.0));
        assert!((d.p99 - 4.96).abs() < 1e-9);
        assert!(Dist::of(&[]).is_none());
    }
}
