//! `forkvm bench runtime`: one OCI bundle run by runc and by `forkvm-runtime` with each
//! root filesystem mode (the bundle's directory shared by virtio-fs, the default; an
//! ext4 root disk, `io.forkvm.rootfs: disk`), side by side on one host.
//!
//! The bundle is the busybox fixture plus the host's GNU `date` (nanosecond timestamps)
//! and a file of `--mib` MiB, so that a root disk has something to copy. Each side runs
//! `create` (timed), then `start`, and waits for the container's process to exit (timed);
//! inside, the script starts `--execs` processes (`/bin/true`: each exec looks the
//! program up and maps it from the root) and reads the big file, timing both. The sides
//! take turns, the order rotating round by round.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::host;
use super::stats::Summary;
use crate::cli::{BenchFormat, BenchRuntimeArgs};

/// The script, at this path in the root: `sh SCRIPT EXECS`.
const SCRIPT_PATH: &str = "bench-runtime.sh";
const SCRIPT: &str = r#"set -e
N=$1
now() { @DATE@ +%s%N; }
a=$(now); i=0; while [ $i -lt $N ]; do /bin/true; i=$((i+1)); done; b=$(now)
cat /filler > /dev/null; c=$(now)
echo "result exec_ns=$((b-a)) read_ns=$((c-b))"
"#;
/// The big file in the root.
const FILLER_PATH: &str = "filler";
/// How long one command (a `create`, a process's run) may take.
const STEP_LIMIT: Duration = Duration::from_secs(300);

/// One side of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Side {
    Runc,
    Shared,
    Disk,
}

impl Side {
    const ALL: [Side; 3] = [Side::Runc, Side::Shared, Side::Disk];

    fn name(self) -> &'static str {
        match self {
            Side::Runc => "runc",
            Side::Shared => "forkvm, shared root",
            Side::Disk => "forkvm, root disk",
        }
    }
}

/// One run's timings, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Timings {
    /// `create` to its return.
    create_ns: u64,
    /// `start` to the container's process exiting.
    run_ns: u64,
    /// Inside: the execs.
    exec_ns: u64,
    /// Inside: reading the big file.
    read_ns: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    environment: super::report::Environment,
    rounds: usize,
    mib: u32,
    execs: u32,
    runc: Vec<Timings>,
    shared: Vec<Timings>,
    disk: Vec<Timings>,
}

pub fn run(args: BenchRuntimeArgs) -> Result<i32> {
    if args.rounds == 0 || args.mib == 0 || args.execs == 0 {
        bail!("--rounds, --mib and --execs must be at least 1");
    }
    host::require("runtime", &["runc", "date", "ldd"])?;
    let (_, dir, _scratch) = super::bench_setup("runtime")?;
    let runtime = forkvm_config::find_program("forkvm-runtime")
        .context("cannot locate the forkvm-runtime executable")?;
    let date = host::which("date")?;
    let script = SCRIPT.replace("@DATE@", &date.display().to_string());
    let filler: Vec<u8> = (0..args.mib as usize * (1 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let layers = host::image_layers(
        &["date"],
        &[
            (SCRIPT_PATH, 0o755, script.as_bytes()),
            (FILLER_PATH, 0o644, &filler),
        ],
    )?;
    drop(filler);
    host::ensure_cgroups()?;
    let execs = args.execs.to_string();
    let argv = ["sh", &format!("/{SCRIPT_PATH}"), &execs];
    let mut bundles = Vec::new();
    for side in Side::ALL {
        let bundle = dir.join(format!("bundle-{side:?}").to_lowercase());
        host::runc_bundle(&bundle, &layers, &argv, |config| {
            if side == Side::Disk {
                config["annotations"] = serde_json::json!({"io.forkvm.rootfs": "disk"});
            }
            Ok(())
        })?;
        bundles.push(bundle);
    }
    let mut report = Report {
        environment: super::host_environment(),
        rounds: args.rounds,
        mib: args.mib,
        execs: args.execs,
        runc: Vec::new(),
        shared: Vec::new(),
        disk: Vec::new(),
    };
    for round in 0..args.rounds {
        for i in 0..Side::ALL.len() {
            let k = (round + i) % Side::ALL.len();
            let side = Side::ALL[k];
            eprintln!("bench runtime: round {} {}", round + 1, side.name());
            let program = match side {
                Side::Runc => PathBuf::from("runc"),
                Side::Shared | Side::Disk => runtime.clone(),
            };
            let id = format!("forkvm-bench-rt-{}-{round}-{k}", std::process::id());
            let t = one_run(
                &program,
                &dir.join(format!("state-{k}")),
                &bundles[k],
                &id,
                &dir,
            )
            .with_context(|| format!("{} (round {})", side.name(), round + 1))?;
            match side {
                Side::Runc => report.runc.push(t),
                Side::Shared => report.shared.push(t),
                Side::Disk => report.disk.push(t),
            }
        }
    }
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        BenchFormat::Table => print_table(&report),
    }
    Ok(0)
}

/// `create`, `start`, the process's exit, `delete` of container `id` with `program`
/// (runc's command line) under state root `root`; the timings. A failure deletes what
/// it left.
fn one_run(program: &Path, root: &Path, bundle: &Path, id: &str, dir: &Path) -> Result<Timings> {
    let rt = |args: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.arg("--root").arg(root).args(args);
        // The VM registry of the scratch directory (the runtime's monitor reads it).
        cmd.env("FORKVM_ROOT", dir.join("vms"));
        cmd
    };
    let out_path = dir.join(format!("{id}.out"));
    let pid_file = dir.join(format!("{id}.pid"));
    let result = (|| {
        let started = Instant::now();
        let mut create = rt(&["create", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(dir.join(format!("{id}.err")))?)
            .spawn()
            .context("cannot run create")?;
        let status =
            super::host::wait_within(&mut create, "create", STEP_LIMIT, Duration::from_millis(5))?;
        let create_ns = started.elapsed().as_nanos() as u64;
        if !status.success() {
            bail!(
                "create failed ({status}): {}",
                std::fs::read_to_string(dir.join(format!("{id}.err"))).unwrap_or_default()
            );
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let started = Instant::now();
        // Watched from before `start`: the pid cannot be another process's by the time
        // this looks.
        let process = ProcessFd::open(pid)?;
        let start_err = dir.join(format!("{id}.start.err"));
        let mut start = rt(&["start", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&start_err)?)
            .spawn()
            .context("cannot run start")?;
        let status =
            super::host::wait_within(&mut start, "start", STEP_LIMIT, Duration::from_millis(5))?;
        if !status.success() {
            bail!(
                "start failed ({status}): {}",
                std::fs::read_to_string(&start_err)
                    .unwrap_or_default()
                    .trim()
            );
        }
        process.wait_exit(STEP_LIMIT.saturating_sub(started.elapsed()))?;
        let run_ns = started.elapsed().as_nanos() as u64;
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        let (exec_ns, read_ns) = out
            .lines()
            .find_map(parse_result)
            .with_context(|| format!("no result line in the container's output: {out}"))?;
        Ok(Timings {
            create_ns,
            run_ns,
            exec_ns,
            read_ns,
        })
    })();
    let _ = rt(&["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    result
}

/// A process that is not this one's child, watched through a pidfd.
struct ProcessFd(std::os::fd::OwnedFd);

impl ProcessFd {
    fn open(pid: i32) -> Result<ProcessFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot watch the container's process {pid}"));
        }
        // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
        Ok(ProcessFd(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
        }))
    }

    /// Waits until the process exits (the pidfd reads ready), for at most `limit`.
    fn wait_exit(&self, limit: Duration) -> Result<()> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the length given.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            1 => Ok(()),
            0 => bail!("the container's process ran past {STEP_LIMIT:?}"),
            _ => Err(std::io::Error::last_os_error()).context("cannot wait for the process"),
        }
    }
}

/// `(exec_ns, read_ns)` of a `result exec_ns=A read_ns=B` line.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("result ")?;
    let (mut exec, mut read) = (None, None);
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "exec_ns" => exec = Some(v),
            "read_ns" => read = Some(v),
            _ => return None,
        }
    }
    Some((exec?, read?))
}

fn print_table(r: &Report) {
    r.environment.print_title("runtime");
    println!(
        "{} rounds; a busybox bundle with a {} MiB file; inside: {} execs of /bin/true, \
         then the file read; medians",
        r.rounds, r.mib, r.execs
    );
    println!();
    println!(
        "| metric | {} | {} | {} | shared / disk |",
        Side::Runc.name(),
        Side::Shared.name(),
        Side::Disk.name()
    );
    println!("|---|---|---|---|---|");
    type Pick = fn(&Timings) -> u64;
    let rows: [(&str, Pick); 4] = [
        ("`create`", |t| t.create_ns),
        ("`start` to exit", |t| t.run_ns),
        ("execs inside", |t| t.exec_ns),
        ("file read inside", |t| t.read_ns),
    ];
    for (name, ns) in rows {
        let med = |runs: &[Timings]| {
            let ms: Vec<f64> = runs.iter().map(|t| ns(t) as f64 / 1e6).collect();
            Summary::of(&ms).map(|s| s.median)
        };
        match (med(&r.runc), med(&r.shared), med(&r.disk)) {
            (Some(runc), Some(shared), Some(disk)) => println!(
                "| {name} | {runc:.0} ms | {shared:.0} ms | {disk:.0} ms | {:.2}x |",
                shared / disk
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
        assert_eq!(parse_result("result exec_ns=10 read_ns=20"), Some((10, 20)));
        assert_eq!(parse_result("result exec_ns=10"), None);
        assert_eq!(parse_result("result exec_ns=x read_ns=1"), None);
        assert_eq!(parse_result("result bogus=1 exec_ns=1 read_ns=2"), None);
        assert_eq!(parse_result("hello"), None);
    }

    #[test]
    fn a_process_is_watched_to_its_exit_with_a_limit() {
        let mut sleeper = Command::new("sleep").arg("0.2").spawn().unwrap();
        let watched = ProcessFd::open(sleeper.id() as i32).unwrap();
        let e = watched.wait_exit(Duration::from_millis(10)).unwrap_err();
        assert!(e.to_string().contains("ran past"), "{e}");
        let started = Instant::now();
        watched.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        sleeper.wait().unwrap();
    }
}
