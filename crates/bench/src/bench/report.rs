//! The benchmark report: environment, per-metric summaries and ratios, rendered as a
//! text table or serialised as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::probe::{Sample, VmmKind};
use super::stats::{Ratio, Summary};

/// Where and on what the benchmark ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Environment {
    /// `hardware`, `nested` (under some hypervisor) or `virtual` (forkvm's QEMU/TCG host).
    pub kvm: String,
    /// A sentence describing `kvm`.
    pub kvm_detail: String,
    /// Host CPU model.
    pub cpu_model: String,
    /// CPUs this process may use.
    pub host_cpus: usize,
    /// Host kernel release.
    pub host_kernel: String,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu_version: String,
    /// forkvm's version.
    pub forkvm_version: String,
}

impl Environment {
    /// The first line of `forkvm bench VERB`'s table: where it ran.
    pub fn print_title(&self, verb: &str) {
        println!(
            "forkvm bench {verb}: {} ({}), {} host CPUs",
            self.kvm, self.cpu_model, self.host_cpus
        );
    }
}

/// The guest both VMMs boot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Guest {
    /// Kernel image path.
    pub kernel: String,
    /// Kernel release (bzImage header or `vmlinux-<release>` file name), if found.
    pub kernel_version: Option<String>,
    /// Initramfs path.
    pub initrd: String,
    /// Initramfs size in bytes.
    pub initrd_bytes: u64,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel command line (both VMMs).
    pub cmdline: String,
}

/// One VMM's set-up.
#[derive(Clone, Debug, Serialize)]
pub struct VmmSetup {
    /// Which VMM.
    pub vmm: VmmKind,
    /// The command line of one run.
    pub command: String,
    /// The devices the guest sees.
    pub devices: String,
}

/// One metric, summarised for both VMMs.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// What is measured, with its unit.
    pub name: String,
    /// forkvm's summary.
    pub forkvm: Summary,
    /// QEMU's summary.
    pub qemu: Summary,
    /// forkvm / QEMU, column-wise.
    pub ratio: Ratio,
}

/// The whole benchmark result.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When it ran (UTC, ISO 8601).
    pub date_utc: String,
    /// Measured runs per VMM.
    pub runs: usize,
    /// Warm-up runs per VMM (not measured).
    pub warmup: usize,
    /// Host.
    pub environment: Environment,
    /// Guest.
    pub guest: Guest,
    /// The VMMs.
    pub vmms: Vec<VmmSetup>,
    /// Summaries.
    pub metrics: Vec<Metric>,
    /// Every measured sample, in run order.
    pub samples: Vec<Sample>,
    /// Runs that failed and were retried (`--retries`), with the first line of the error.
    pub retried: Vec<String>,
}

/// The metrics of a sample: name and extractor.
type Extract = fn(&Sample) -> Option<f64>;

const METRICS: &[(&str, Extract)] = &[
    ("boot to init, wall (ms)", |s| Some(s.boot_to_init_ms)),
    ("guest uptime at init (ms)", |s| Some(s.guest_uptime_ms)),
    ("wall - guest uptime (ms)", |s| {
        Some(s.boot_to_init_ms - s.guest_uptime_ms)
    }),
    ("init to exit (ms)", |s| {
        Some(s.total_ms - s.boot_to_init_ms)
    }),
    ("total to exit (ms)", |s| Some(s.total_ms)),
    ("VMM RSS at init (MiB)", |s| {
        s.rss_kib.map(|k| k as f64 / 1024.0)
    }),
    ("VMM peak RSS at init (MiB)", |s| {
        s.hwm_kib.map(|k| k as f64 / 1024.0)
    }),
];

/// Summarises `samples` per metric; metrics missing for one VMM are left out.
pub fn summarise(samples: &[Sample]) -> Vec<Metric> {
    METRICS
        .iter()
        .filter_map(|(name, f)| {
            let of = |kind: VmmKind| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.vmm == kind)
                    .filter_map(f)
                    .collect();
                Summary::of(&v)
            };
            let forkvm = of(VmmKind::Forkvm)?;
            let qemu = of(VmmKind::Qemu)?;
            Some(Metric {
                name: (*name).to_owned(),
                ratio: forkvm.ratio(&qemu),
                forkvm,
                qemu,
            })
        })
        .collect()
}

/// A number for a table: no decimals from 100 up, one below, `-` for NaN.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A ratio for a table, `0.43x`; `-` for NaN.
pub fn ratio(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else {
        format!("{v:.2}x")
    }
}

/// Human-readable byte size.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// The metrics as an aligned text table: for each metric a forkvm row, a qemu row and
/// a forkvm/qemu ratio row.
pub fn metrics_table(metrics: &[Metric]) -> String {
    let mut rows: Vec<[String; 6]> = vec![[
        "metric".into(),
        "vmm".into(),
        "median".into(),
        "p90".into(),
        "min".into(),
        "max".into(),
    ]];
    for m in metrics {
        for (i, (who, s)) in [("forkvm", &m.forkvm), ("qemu", &m.qemu)]
            .into_iter()
            .enumerate()
        {
            rows.push([
                if i == 0 {
                    m.name.clone()
                } else {
                    String::new()
                },
                who.into(),
                num(s.median),
                num(s.p90),
                num(s.min),
                num(s.max),
            ]);
        }
        let r = &m.ratio;
        rows.push([
            String::new(),
            "ratio".into(),
            ratio(r.median),
            ratio(r.p90),
            ratio(r.min),
            ratio(r.max),
        ]);
    }
    let mut width = [0usize; 6];
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(width).enumerate() {
            if i < 2 {
                let _ = write!(line, "{cell:<w$}  ");
            } else {
                let _ = write!(line, "{cell:>w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            let total: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// The full text report.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let e = &report.environment;
    let g = &report.guest;
    let _ = writeln!(
        out,
        "forkvm bench boot: {} runs per VMM, alternating (ABBA order), after {} warm-up run(s) each; {}",
        report.runs, report.warmup, report.date_utc
    );
    let _ = writeln!(out, "host:    {} ({})", e.kvm, e.kvm_detail);
    let _ = writeln!(
        out,
        "         {}, {} CPU(s), Linux {}",
        e.cpu_model, e.host_cpus, e.host_kernel
    );
    let _ = writeln!(
        out,
        "guest:   kernel {} ({}), initrd {} ({}), {} MiB, {} vCPU(s)",
        g.kernel_version.as_deref().unwrap_or("unknown version"),
        g.kernel,
        size(g.initrd_bytes),
        g.initrd,
        g.mem_mib,
        g.vcpus
    );
    let _ = writeln!(out, "cmdline: {}", g.cmdline);
    for v in &report.vmms {
        let label = match v.vmm {
            VmmKind::Forkvm => format!("forkvm {}", e.forkvm_version),
            VmmKind::Qemu => e.qemu_version.clone(),
        };
        let _ = writeln!(out, "{:<7}  {label}; devices: {}", v.vmm.name(), v.devices);
    }
    out.push('\n');
    out.push_str(&metrics_table(&report.metrics));
    if !report.retried.is_empty() {
        let _ = writeln!(out, "\nfailed and retried ({}):", report.retried.len());
        for r in &report.retried {
            let _ = writeln!(out, "  {r}");
        }
    }
    out.push_str(
        "\nboot to init: spawn until the ready marker line reaches the host; guest uptime: \
         /proc/uptime printed by init;\nwall - guest uptime: VMM set-up, kernel load and \
         early boot before the guest clock starts; ratio: forkvm / qemu.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vmm: VmmKind, boot: f64, total: f64, rss: Option<u64>) -> Sample {
        Sample {
            vmm,
            boot_to_init_ms: boot,
            guest_uptime_ms: boot - 100.0,
            total_ms: total,
            rss_kib: rss,
            hwm_kib: rss,
        }
    }

    fn samples() -> Vec<Sample> {
        vec![
            sample(VmmKind::Forkvm, 400.0, 500.0, Some(40 * 1024)),
            sample(VmmKind::Qemu, 800.0, 1000.0, Some(80 * 1024)),
            sample(VmmKind::Qemu, 600.0, 700.0, Some(60 * 1024)),
            sample(VmmKind::Forkvm, 200.0, 300.0, Some(20 * 1024)),
        ]
    }

    #[test]
    fn metrics_per_vmm_and_ratios() {
        let m = summarise(&samples());
        let boot = &m[0];
        assert_eq!(boot.name, "boot to init, wall (ms)");
        assert_eq!(boot.forkvm.median, 300.0);
        assert_eq!(boot.qemu.median, 700.0);
        assert!((boot.ratio.median - 300.0 / 700.0).abs() < 1e-12);
        let wall_minus_uptime = m.iter().find(|m| m.name.starts_with("wall -")).unwrap();
        assert_eq!(wall_minus_uptime.forkvm.median, 100.0);
        let rss = m.iter().find(|m| m.name.starts_with("VMM RSS")).unwrap();
        assert_eq!((rss.forkvm.median, rss.qemu.median), (30.0, 70.0));
    }

    #[test]
    fn metrics_without_values_are_left_out() {
        let s: Vec<Sample> = samples()
            .into_iter()
            .map(|mut s| {
                s.rss_kib = None;
                s.hwm_kib = None;
                s
            })
            .collect();
        assert!(summarise(&s).iter().all(|m| !m.name.contains("RSS")));
    }

    #[test]
    fn table_is_aligned_with_ratio_rows() {
        let t = metrics_table(&summarise(&samples()));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("metric"), "{t}");
        assert!(lines[1].chars().all(|c| c == '-'), "{t}");
        assert!(lines[2].starts_with("boot to init, wall (ms)"), "{t}");
        assert!(lines[3].trim_start().starts_with("qemu"), "{t}");
        assert!(lines[4].trim_start().starts_with("ratio"), "{t}");
        assert!(lines[4].contains("0.43x"), "{t}");
        // Right-aligned numbers: every data row ends at the same column.
        let len = lines[0].len();
        assert!(lines[2..].iter().all(|l| l.len() == len), "{t}");
        assert_eq!(lines[1].len(), len);
    }

    #[test]
    fn number_formatting() {
        assert_eq!(num(1234.56), "1235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(f64::NAN), "-");
        assert_eq!(ratio(0.4285), "0.43x");
        assert_eq!(size(2_643_908), "2.5 MiB");
        assert_eq!(size(2048), "2.0 KiB");
    }

    #[test]
    fn full_report_and_json() {
        let report = Report {
            date_utc: "2026-01-01T00:00:00Z".into(),
            runs: 2,
            warmup: 1,
            environment: Environment {
                kvm: "virtual".into(),
                kvm_detail: "nested".into(),
                qemu_version: "QEMU emulator version 7.2.0".into(),
                ..Environment::default()
            },
            guest: Guest {
                kernel_version: Some("6.1.0".into()),
                mem_mib: 256,
                vcpus: 1,
                ..Guest::default()
            },
            vmms: vec![VmmSetup {
                vmm: VmmKind::Qemu,
                command: "qemu-system-x86_64 -M microvm".into(),
                devices: "isa-serial".into(),
            }],
            metrics: summarise(&samples()),
            samples: samples(),
            retried: vec!["run 3/10 qemu: qemu did not print the ready marker".into()],
        };
        let t = render(&report);
        assert!(t.contains("host:    virtual (nested)"), "{t}");
        assert!(t.contains("kernel 6.1.0"), "{t}");
        assert!(
            t.contains("QEMU emulator version 7.2.0; devices: isa-serial"),
            "{t}"
        );
        let j: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(j["samples"][0]["vmm"], "forkvm");
        assert_eq!(j["metrics"][0]["qemu"]["median"], 700.0);
    }
}
