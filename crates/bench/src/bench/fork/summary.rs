//! The fork benchmark's samples, their summaries and the table it prints.

#[allow(unused_imports)]
use super::*;

/// One child of one fork.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChildSample {
    /// Its VMM process.
    pub pid: u32,
    /// Fork request until it reported running (T1), us.
    pub t1_us: u64,
    /// Whether it started in a warm process of the parent's fork pool.
    pub warm: bool,
    /// Fork request until its guest took its identity (T2: see `--t2`), us; `None` when
    /// it did not within the time limit.
    pub t2_us: Option<u64>,
    /// Its memory after idling; `None` when it could not be read.
    pub mem: Option<MemSample>,
    /// Its copied guest pages by the guest's use of them (`--page-types`, first child
    /// of a fork only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_types: Option<PageTypes>,
    /// What it logged of its start before it reported running (each step and its µs,
    /// in order: [`parse_steps`]); empty unless its log has the line (`RUST_LOG` with
    /// `forkvm_vmm=info`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<(String, u64)>,
}

/// The steps of a fork child's start as its VM process logs them (`fork child running
/// after register 812 us, console 40 us, ...`), in order; empty when `log` has no such
/// line. A count among them (`extents mapped 250`, no unit) is named with
/// [`COUNT`] appended.
pub fn parse_steps(log: &str) -> Vec<(String, u64)> {
    const MARK: &str = "fork child running after ";
    let Some(line) = log.lines().rev().find(|l| l.contains(MARK)) else {
        return Vec::new();
    };
    let after = &line[line.find(MARK).expect("found") + MARK.len()..];
    after
        .split(", ")
        .filter_map(|part| {
            // The last step is followed by the line's fields (` warm=true`).
            let (part, count) = match part.find(" us") {
                Some(end) => (&part[..end], false),
                None => (part.split(" warm=").next().unwrap_or(part), true),
            };
            let (name, n) = part.trim().rsplit_once(' ')?;
            let name = if count {
                format!("{name}{COUNT}")
            } else {
                name.to_owned()
            };
            Some((name, n.parse().ok()?))
        })
        .collect()
}

/// What marks a count among a start's steps ([`parse_steps`]).
pub const COUNT: &str = " (count)";

/// Where the children's starts went, per series: each step's p50 and max over the
/// children that logged it, ms; `None` when none did.
pub fn steps_table(rounds: &[ForkRound]) -> Option<String> {
    let mut series: Vec<(bool, u32, u32)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for r in rounds {
        for c in &r.children {
            for (name, _) in &c.steps {
                if !names.contains(name) {
                    names.push(name.clone());
                }
                if !series.contains(&(r.jailed, r.pool, r.count)) {
                    series.push((r.jailed, r.pool, r.count));
                }
            }
        }
    }
    if names.is_empty() {
        return None;
    }
    let mut header = vec!["series".to_owned(), "children".to_owned()];
    header.extend(names.iter().map(|n| match n.strip_suffix(COUNT) {
        Some(n) => format!("{n} p50 / max"),
        None => format!("{n} p50 / max ms"),
    }));
    let mut rows = vec![header];
    for (jailed, pool, count) in series {
        let kids: Vec<&ChildSample> = rounds
            .iter()
            .filter(|r| (r.jailed, r.pool, r.count) == (jailed, pool, count))
            .flat_map(|r| &r.children)
            .filter(|c| !c.steps.is_empty())
            .collect();
        let mut row = vec![
            format!("fork x{count}, pool {pool}, {}", jail_label(jailed)),
            kids.len().to_string(),
        ];
        for name in &names {
            let per = if name.ends_with(COUNT) { 1.0 } else { 1000.0 };
            let d = dist_by(&kids, |c| {
                c.steps
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| *v as f64 / per)
            });
            row.push(format!("{} / {}", cell(d, |d| d.p50), cell(d, |d| d.max)));
        }
        rows.push(row);
    }
    Some(format!(
        "\nEach child's start, as its VM process logged it (from the launch's arrival to its report):\n{}",
        aligned(&rows)
    ))
}

/// One fork.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForkRound {
    /// Whether the children were jailed (seccomp, capabilities, cgroup).
    pub jailed: bool,
    /// Warm processes the parent kept (its fork pool's size).
    pub pool: u32,
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
        let v = crate::bench::stats::sorted_finite(values)?;
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
    /// Whether the children were jailed.
    pub jailed: bool,
    /// The parent's fork pool size.
    pub pool: u32,
    /// Children per fork.
    pub count: u32,
    /// Forks measured.
    pub forks: usize,
    /// Children that started in a warm process.
    pub warm: usize,
    /// T1 per child, ms.
    pub t1_ms: Option<Dist>,
    /// T1 of each fork's last child to run, ms.
    pub last_t1_ms: Option<Dist>,
    /// T2 per child, ms.
    pub t2_ms: Option<Dist>,
    /// Children whose agent never answered.
    pub t2_missing: usize,
    /// Parent pause per fork, us.
    pub pause_us: Option<Dist>,
    /// Guest-RAM pages each idle child copied (wrote since the fork: its Anonymous
    /// guest RAM), KiB.
    pub guest_own_kib: Option<Dist>,
    /// All a child holds on its own, KiB ([`MemSample::child_own_kib`]): its copied
    /// guest pages and its VMM process's private dirty pages.
    pub process_own_kib: Option<Dist>,
    /// Pss of the child VMM process, KiB.
    pub pss_kib: Option<Dist>,
}

pub(crate) fn dist_by<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<Dist> {
    Dist::of(&items.iter().filter_map(f).collect::<Vec<_>>())
}

/// Summaries per pool size and child count, in the order they were first measured.
pub fn summarise(rounds: &[ForkRound]) -> Vec<CountSummary> {
    let mut series: Vec<(bool, u32, u32)> = Vec::new();
    for r in rounds {
        if !series.contains(&(r.jailed, r.pool, r.count)) {
            series.push((r.jailed, r.pool, r.count));
        }
    }
    series
        .into_iter()
        .map(|(jailed, pool, count)| {
            let forks: Vec<&ForkRound> = rounds
                .iter()
                .filter(|r| (r.jailed, r.pool, r.count) == (jailed, pool, count))
                .collect();
            let kids: Vec<&ChildSample> = forks.iter().flat_map(|r| &r.children).collect();
            CountSummary {
                jailed,
                pool,
                count,
                forks: forks.len(),
                warm: kids.iter().filter(|c| c.warm).count(),
                t1_ms: dist_by(&kids, |c| Some(c.t1_us as f64 / 1000.0)),
                last_t1_ms: dist_by(&forks, |r| {
                    r.children
                        .iter()
                        .map(|c| c.t1_us as f64 / 1000.0)
                        .reduce(f64::max)
                }),
                t2_ms: dist_by(&kids, |c| c.t2_us.map(|t| t as f64 / 1000.0)),
                t2_missing: kids.iter().filter(|c| c.t2_us.is_none()).count(),
                pause_us: dist_by(&forks, |r| Some(r.parent_pause_us as f64)),
                guest_own_kib: dist_by(&kids, |c| c.mem.map(|m| m.guest_ram.anon_kib as f64)),
                process_own_kib: dist_by(&kids, |c| c.mem.map(|m| m.child_own_kib() as f64)),
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
    /// Guest RAM of the idle VMM (it maps its memory file alone: all it touched), KiB.
    pub guest_own_kib: Option<Dist>,
    /// Memory of the whole VMM process that no other process shares (its guest RAM
    /// and its private dirty pages outside it), KiB.
    pub process_own_kib: Option<Dist>,
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
        // A cold-booted VM maps its memory file alone: all of it is its own, shared
        // with nobody (file pages, so not Anonymous).
        guest_own_kib: dist_by(cold, |c| c.mem.map(|m| m.guest_ram.private_kib as f64)),
        process_own_kib: dist_by(cold, |c| {
            c.mem
                .map(|m| (m.guest_ram.private_kib + m.vmm_own_kib()) as f64)
        }),
        pss_kib: dist_by(cold, |c| c.mem.map(|m| m.process.pss_kib as f64)),
    })
}

/// Fork versus cold boot for one child count: ratios of medians.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Versus {
    /// Whether the children were jailed.
    pub jailed: bool,
    /// The parent's fork pool size.
    pub pool: u32,
    /// Children per fork.
    pub count: u32,
    /// T1 p50 / cold spawn-to-ready-marker p50.
    pub t1_vs_ready: f64,
    /// T2 p50 / cold spawn-to-agent p50.
    pub t2_vs_agent: f64,
    /// Child guest-RAM own p50 / cold guest-RAM own p50.
    pub guest_own: f64,
    /// Child process own p50 / cold process own p50.
    pub process_own: f64,
}

pub(crate) fn p50_ratio(a: Option<Dist>, b: Option<Dist>) -> f64 {
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
            jailed: s.jailed,
            pool: s.pool,
            count: s.count,
            t1_vs_ready: p50_ratio(s.t1_ms, cold.ready_ms),
            t2_vs_agent: p50_ratio(s.t2_ms, cold.agent_ms),
            guest_own: p50_ratio(s.guest_own_kib, cold.guest_own_kib),
            process_own: p50_ratio(s.process_own_kib, cold.process_own_kib),
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
    /// What T2 is the time until.
    pub t2: String,
    /// Each parent (one per pool size): boot until its agent answered, ms.
    pub parent_ready_ms: Vec<f64>,
    /// The fork pool sizes measured, one parent each.
    pub pools: Vec<u32>,
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

pub(crate) fn cell(d: Option<Dist>, f: impl Fn(&Dist) -> f64) -> String {
    d.as_ref()
        .map_or_else(|| "-".to_owned(), |d| report::num(f(d)))
}

pub(crate) fn aligned(rows: &[Vec<String>]) -> String {
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
/// How a series names its jail.
fn jail_label(jailed: bool) -> &'static str {
    if jailed {
        "jailed"
    } else {
        "no jail"
    }
}

pub fn table(counts: &[CountSummary], cold: Option<&ColdSummary>, vs: &[Versus]) -> String {
    let header = [
        "series",
        "VMs",
        "warm",
        "T1 p50 ms",
        "T1 p99 ms",
        "last T1 p50 ms",
        "T2 p50 ms",
        "T2 p99 ms",
        "pause p50 us",
        "pause max us",
        "guest-RAM own p50 KiB",
        "max KiB",
        "process own p50 KiB",
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
            format!(
                "fork x{}, pool {}, {} ({} forks){missing}",
                s.count,
                s.pool,
                jail_label(s.jailed),
                s.forks
            ),
            s.t1_ms.map_or(0, |d| d.n).to_string(),
            s.warm.to_string(),
            cell(s.t1_ms, |d| d.p50),
            cell(s.t1_ms, |d| d.p99),
            cell(s.last_t1_ms, |d| d.p50),
            cell(s.t2_ms, |d| d.p50),
            cell(s.t2_ms, |d| d.p99),
            cell(s.pause_us, |d| d.p50),
            cell(s.pause_us, |d| d.max),
            cell(s.guest_own_kib, |d| d.p50),
            cell(s.guest_own_kib, |d| d.max),
            cell(s.process_own_kib, |d| d.p50),
            cell(s.pss_kib, |d| d.p50),
        ]);
    }
    if let Some(c) = cold {
        rows.push(vec![
            "cold boot (T1=ready, T2=agent)".to_owned(),
            c.boots.to_string(),
            "-".into(),
            cell(c.ready_ms, |d| d.p50),
            cell(c.ready_ms, |d| d.p99),
            "-".into(),
            cell(c.agent_ms, |d| d.p50),
            cell(c.agent_ms, |d| d.p99),
            "-".into(),
            "-".into(),
            cell(c.guest_own_kib, |d| d.p50),
            cell(c.guest_own_kib, |d| d.max),
            cell(c.process_own_kib, |d| d.p50),
            cell(c.pss_kib, |d| d.p50),
        ]);
    }
    for v in vs {
        rows.push(vec![
            format!(
                "fork x{}, pool {}, {} / cold (p50)",
                v.count,
                v.pool,
                jail_label(v.jailed)
            ),
            String::new(),
            String::new(),
            report::ratio(v.t1_vs_ready),
            String::new(),
            String::new(),
            report::ratio(v.t2_vs_agent),
            String::new(),
            String::new(),
            String::new(),
            report::ratio(v.guest_own),
            String::new(),
            report::ratio(v.process_own),
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
        "parent:  booted in this process, one per fork pool size ({}); agent answered {} ms after boot\n",
        r.pools
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        r.parent_ready_ms
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(&format!("cold:    {}\n\n", r.cold_command));
    out.push_str(&table(&r.summaries, r.cold_summary.as_ref(), &r.versus));
    out.push_str(&format!("\nT2: fork request -> {}.", r.t2));
    out.push_str(
        "\nwarm: children started in a warm process of the parent's fork pool (pool: its size; \
         the pool refills between forks).\nT1: fork request -> child reports its vCPUs running; last T1: \
         the fork's last child to run; pause: parent vCPUs paused per fork; \
         guest-RAM own: a child's Anonymous\n/memfd:forkvm-guest-ram* memory \
         (/proc/PID/smaps: the guest pages it copied since the fork; Private_* would also \
         count\npages of the shared memory file that only it maps), a cold boot's Private_* \
         (it maps its memory file alone); process own:\nthat guest RAM plus the process's \
         Private_Dirty outside guest RAM (smaps_rollup - smaps: pages no other process maps; \
         what a\nchild shares copy-on-write with its pool's zygote is not its own); Pss: smaps_rollup.\nCold boot: \
         `forkvm boot` spawn -> ready marker on the console (T1 column), -> agent answer (T2).\n",
    );
    if let Some(t) = steps_table(&r.rounds) {
        out.push_str(&t);
    }
    if let Some(t) = pages::table(&r.rounds) {
        out.push_str(&t);
    }
    out
}

// ---------------------------------------------------------------------------------
// Running it.
