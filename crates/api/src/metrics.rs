//! Prometheus text exposition (format 0.0.4) of a VM's counters.

use std::fmt::Write;

use crate::wire::{RunState, VmInfo};

/// Upper bounds, in seconds, of the fork latency histogram's buckets.
pub const FORK_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// A cumulative histogram of fork latencies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    counts: [u64; FORK_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    /// Adds one observation, in microseconds.
    pub fn observe_us(&mut self, us: u64) {
        let s = us as f64 / 1e6;
        for (c, le) in self.counts.iter_mut().zip(FORK_BUCKETS) {
            if s <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += s;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics of a VM.
pub fn render(info: &VmInfo, forks: &Histogram) -> String {
    let mut o = String::new();
    fn metric(o: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    metric(
        &mut o,
        "forkvm_vm_exits_total",
        "counter",
        "vCPU exits to the VMM by reason, summed over vCPUs.",
    );
    for (reason, n) in &info.exits {
        let _ = writeln!(
            o,
            "forkvm_vm_exits_total{{reason=\"{}\"}} {n}",
            escape_label(reason)
        );
    }
    metric(
        &mut o,
        "forkvm_fork_latency_seconds",
        "histogram",
        "Time from a fork request until a child's vCPUs were running.",
    );
    for (c, le) in forks.counts.iter().zip(FORK_BUCKETS) {
        let _ = writeln!(o, "forkvm_fork_latency_seconds_bucket{{le=\"{le}\"}} {c}");
    }
    let _ = writeln!(
        o,
        "forkvm_fork_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        forks.count
    );
    let _ = writeln!(o, "forkvm_fork_latency_seconds_sum {}", forks.sum_seconds);
    let _ = writeln!(o, "forkvm_fork_latency_seconds_count {}", forks.count);
    metric(
        &mut o,
        "forkvm_resident_memory_bytes",
        "gauge",
        "Resident memory of the VMM process.",
    );
    let _ = writeln!(o, "forkvm_resident_memory_bytes {}", info.rss_bytes);
    metric(
        &mut o,
        "forkvm_private_memory_bytes",
        "gauge",
        "Memory of the VMM process not shared with other processes.",
    );
    let _ = writeln!(o, "forkvm_private_memory_bytes {}", info.private_bytes);
    metric(
        &mut o,
        "forkvm_fork_pool_ready",
        "gauge",
        "Warm VM processes waiting to become fork children.",
    );
    let _ = writeln!(o, "forkvm_fork_pool_ready {}", info.fork_pool.len());
    metric(&mut o, "forkvm_vcpus", "gauge", "Number of vCPUs.");
    let _ = writeln!(o, "forkvm_vcpus {}", info.vcpus);
    metric(
        &mut o,
        "forkvm_guest_memory_bytes",
        "gauge",
        "Guest memory size.",
    );
    let _ = writeln!(
        o,
        "forkvm_guest_memory_bytes {}",
        info.mem_mib * 1024 * 1024
    );
    metric(
        &mut o,
        "forkvm_paused",
        "gauge",
        "1 while the vCPUs are paused.",
    );
    let _ = writeln!(
        o,
        "forkvm_paused {}",
        u8::from(info.state == RunState::Paused)
    );
    metric(
        &mut o,
        "forkvm_uptime_seconds",
        "gauge",
        "Seconds since the VM was created.",
    );
    let _ = writeln!(
        o,
        "forkvm_uptime_seconds {}",
        info.uptime_ms as f64 / 1000.0
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exposition_text() {
        let mut h = Histogram::default();
        h.observe_us(800);
        h.observe_us(30_000);
        let info = VmInfo {
            state: RunState::Running,
            vcpus: 2,
            mem_mib: 256,
            devices: vec![],
            uptime_ms: 1500,
            exits: [("io".to_string(), 7), ("we\"ird".to_string(), 1)].into(),
            rss_bytes: 4096,
            private_bytes: 1024,
            fork_pool: vec![41, 42],
            landlock: None,
        };
        let t = render(&info, &h);
        assert!(
            t.contains("forkvm_vm_exits_total{reason=\"io\"} 7\n"),
            "{t}"
        );
        assert!(t.contains("reason=\"we\\\"ird\""), "{t}");
        assert!(t.contains("forkvm_fork_latency_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(t.contains("forkvm_fork_latency_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(t.contains("forkvm_fork_latency_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(t.contains("forkvm_fork_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("forkvm_fork_latency_seconds_count 2\n"));
        assert!(t.contains("forkvm_resident_memory_bytes 4096\n"));
        assert!(t.contains("forkvm_private_memory_bytes 1024\n"));
        assert!(t.contains("forkvm_fork_pool_ready 2\n"), "{t}");
        assert!(t.contains("forkvm_guest_memory_bytes 268435456\n"));
        // Every sample line belongs to a declared metric family.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(t.contains(&format!("# TYPE {family} ")), "{l}");
        }
    }
}
