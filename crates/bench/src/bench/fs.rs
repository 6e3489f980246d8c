//! `forkvm bench fs`: file I/O on a host directory shared into a forkvm VM (virtio-fs),
//! against the same directory bind-mounted into a runc container, and the VM's own
//! root, side by side on one host.
//!
//! All three run one script from one image (the busybox fixture plus the host's GNU
//! `date`, for nanosecond timestamps): write a file sequentially (`dd bs=1M
//! conv=fsync`), drop the page cache where the side may (the guest can; a runc
//! container's `/proc/sys` is read-only, so its reads may come from the host's cache,
//! which the VM's share reads through too), read it back, then create, check (`[ -e ]`,
//! a stat) and delete N empty files, all from the shell without starting processes.
//! The sides take turns, the order rotating round by round.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::host;
use super::stats::Summary;
use crate::cli::{BenchFormat, BenchFsArgs};

/// The image every side runs.
const IMAGE: &str = "forkvm-bench-fs:1";
/// The script, at this path in the image: `sh SCRIPT DIR MIB FILES`.
const SCRIPT_PATH: &str = "bench-fs.sh";
const SCRIPT: &str = r#"set -e
D=$1; MIB=$2; N=$3
now() { @DATE@ +%s%N; }
mkdir -p "$D"; cd "$D"; rm -rf seq many
a=$(now); dd if=/dev/zero of=seq bs=1M count=$MIB conv=fsync 2>/dev/null; b=$(now)
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
c=$(now); dd if=seq of=/dev/null bs=1M 2>/dev/null; d=$(now)
rm -f seq; mkdir many
e=$(now); i=0; while [ $i -lt $N ]; do : > many/f$i; i=$((i+1)); done; f=$(now)
i=0; while [ $i -lt $N ]; do [ -e many/f$i ]; i=$((i+1)); done; g=$(now)
rm -r many; h=$(now)
echo "result write_ns=$((b-a)) read_ns=$((d-c)) create_ns=$((f-e)) stat_ns=$((g-f)) delete_ns=$((h-g))"
"#;
/// How long one side's run may take.
const RUN_LIMIT: Duration = Duration::from_secs(1800);

/// One run's timings, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
struct Timings {
    write_ns: u64,
    read_ns: u64,
    create_ns: u64,
    stat_ns: u64,
    delete_ns: u64,
}

/// The sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SideKind {
    Share,
    Runc,
    Root,
}

impl SideKind {
    const ALL: [SideKind; 3] = [SideKind::Share, SideKind::Runc, SideKind::Root];

    fn name(self) -> &'static str {
        match self {
            SideKind::Share => "forkvm VM, virtio-fs share",
            SideKind::Runc => "runc, bind mount",
            SideKind::Root => "forkvm VM, its own root",
        }
    }
}

/// The report.
#[derive(Debug, Serialize)]
struct Report {
    environment: super::report::Environment,
    rounds: usize,
    mib: u32,
    files: u32,
    share: Vec<Timings>,
    runc: Vec<Timings>,
    root: Vec<Timings>,
}

/// Runs `forkvm bench fs`.
pub fn run(args: BenchFsArgs) -> Result<i32> {
    if args.rounds == 0 || args.mib == 0 || args.files == 0 {
        bail!("--rounds, --mib and --files must be at least 1");
    }
    host::require("fs", &["runc", "date"])?;
    let (exe, dir, _scratch) = super::bench_setup("fs")?;
    let env = [
        ("FORKVM_STORE", dir.join("store")),
        ("FORKVM_ROOT", dir.join("root")),
    ];
    // The host's GNU date goes into the image at the path it has here.
    let date = host::which("date")?;
    let script_text = SCRIPT.replace("@DATE@", &date.display().to_string());
    let layers = host::image_layers(&["date"], &[(SCRIPT_PATH, 0o755, script_text.as_bytes())])?;
    host::load_image(&exe, &env, &dir, IMAGE, &layers)?;
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    host::ensure_cgroups()?;
    let bundle = dir.join("bundle");
    let (mib, files) = (args.mib.to_string(), args.files.to_string());
    let script = format!("/{SCRIPT_PATH}");
    host::runc_bundle(
        &bundle,
        &layers,
        &["sh", &script, "/share", &mib, &files],
        |config| {
            let mounts = config["mounts"]
                .as_array_mut()
                .context("runc spec without mounts")?;
            mounts.push(serde_json::json!({
                "destination": "/share", "type": "bind",
                "source": share, "options": ["rbind", "rw"],
            }));
            Ok(())
        },
    )?;

    let mut report = Report {
        environment: super::host_environment(),
        rounds: args.rounds,
        mib: args.mib,
        files: args.files,
        share: Vec::new(),
        runc: Vec::new(),
        root: Vec::new(),
    };
    let volume = format!("{}:/share", share.display());
    let runc_id = format!("forkvm-bench-fs-{}", std::process::id());
    for round in 0..args.rounds {
        for i in 0..SideKind::ALL.len() {
            let side = SideKind::ALL[(round + i) % SideKind::ALL.len()];
            eprintln!("bench fs: round {} {}", round + 1, side.name());
            let mut cmd = match side {
                SideKind::Share | SideKind::Root => {
                    let mut cmd = Command::new(&exe);
                    cmd.args(["run", "--rm", "--network", "none"]);
                    let target = if side == SideKind::Share {
                        cmd.args(["-v", &volume]);
                        "/share"
                    } else {
                        "/var/bench"
                    };
                    cmd.args([IMAGE, "sh", &script, target, &mib, &files])
                        .envs(env.iter().map(|(k, v)| (k, v)));
                    cmd
                }
                SideKind::Runc => {
                    let mut cmd = Command::new("runc");
                    cmd.args(["run", "-b"]).arg(&bundle).arg(&runc_id);
                    cmd
                }
            };
            let timings = run_side(&mut cmd, side).inspect_err(|_| {
                if side == SideKind::Runc {
                    // A runc run that was killed leaves its container.
                    let _ = Command::new("runc")
                        .args(["delete", "-f", &runc_id])
                        .stderr(Stdio::null())
                        .status();
                }
            })?;
            match side {
                SideKind::Share => report.share.push(timings),
                SideKind::Runc => report.runc.push(timings),
                SideKind::Root => report.root.push(timings),
            }
        }
    }
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        BenchFormat::Table => print_table(&report),
    }
    Ok(0)
}

/// Runs one side to the end; its `result` line. One that runs past [`RUN_LIMIT`] is
/// killed (the benchmark fails).
fn run_side(cmd: &mut Command, side: SideKind) -> Result<Timings> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", side.name()))?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = super::host::wait_within(
        &mut child,
        side.name(),
        RUN_LIMIT,
        Duration::from_millis(100),
    )?;
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match stdout.lines().find_map(parse_result) {
        Some(t) if status.success() => Ok(t),
        _ => bail!(
            "{} failed ({status}): {}{}",
            side.name(),
            stdout.trim(),
            stderr.trim()
        ),
    }
}

/// The timings of a `result k=v ...` line.
fn parse_result(line: &str) -> Option<Timings> {
    let rest = line.trim().strip_prefix("result ")?;
    let mut t = Timings::default();
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "write_ns" => t.write_ns = v,
            "read_ns" => t.read_ns = v,
            "create_ns" => t.create_ns = v,
            "stat_ns" => t.stat_ns = v,
            "delete_ns" => t.delete_ns = v,
            _ => return None,
        }
    }
    Some(t)
}

/// Per-second rates of `count` things done in each run's `ns`.
fn rates(runs: &[Timings], count: f64, ns: fn(&Timings) -> u64) -> Vec<f64> {
    runs.iter()
        .map(|t| count / (ns(t).max(1) as f64 / 1e9))
        .collect()
}

fn print_table(r: &Report) {
    r.environment.print_title("fs");
    println!(
        "{} rounds; {} MiB written (fsync) and read back; {} empty files created, checked, deleted; medians",
        r.rounds, r.mib, r.files
    );
    println!();
    println!(
        "| metric | {} | {} | {} | share / runc |",
        SideKind::Share.name(),
        SideKind::Runc.name(),
        SideKind::Root.name()
    );
    println!("|---|---|---|---|---|");
    let mib = f64::from(r.mib);
    let files = f64::from(r.files);
    type Pick = fn(&Timings) -> u64;
    let rows: [(&str, f64, Pick, &str); 5] = [
        ("sequential write", mib, |t| t.write_ns, "MiB/s"),
        ("sequential read", mib, |t| t.read_ns, "MiB/s"),
        ("create", files, |t| t.create_ns, "files/s"),
        ("stat", files, |t| t.stat_ns, "files/s"),
        ("delete", files, |t| t.delete_ns, "files/s"),
    ];
    for (name, count, ns, unit) in rows {
        let med = |runs: &[Timings]| Summary::of(&rates(runs, count, ns)).map(|s| s.median);
        match (med(&r.share), med(&r.runc), med(&r.root)) {
            (Some(share), Some(runc), Some(root)) => println!(
                "| {name} | {share:.1} {unit} | {runc:.1} {unit} | {root:.1} {unit} | {:.2}x |",
                share / runc
            ),
            _ => println!("| {name} | - | - | - | - |"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        let t = parse_result("result write_ns=10 read_ns=20 create_ns=30 stat_ns=40 delete_ns=50")
            .unwrap();
        assert_eq!(
            t,
            Timings {
                write_ns: 10,
                read_ns: 20,
                create_ns: 30,
                stat_ns: 40,
                delete_ns: 50
            }
        );
        assert!(parse_result("result write_ns=x").is_none());
        assert!(parse_result("hello").is_none());
        assert!(parse_result("result bogus=1").is_none());
        let per_s = rates(&[t], 100.0, |t| t.stat_ns);
        assert_eq!(per_s, [100.0 / 40e-9]);
    }
}
