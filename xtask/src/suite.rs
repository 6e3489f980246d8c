//! `cargo xtask test`: the whole test suite, as CI runs it. The host tests (unit tests,
//! the test targets not named `*_e2e`, doc tests) run as `cargo test` runs them. The
//! end-to-end tests (`*_e2e` targets) each start a virtual KVM host of their own where
//! this machine has no hardware KVM; there they run one process per test, as many at
//! once as the machine has virtual-host slots (plus one waiting for the next free
//! slot), the longest first, so that no slot idles while tests of another target wait
//! (`cargo test` runs one target after another: a target with one test left a slot
//! idle for its whole run). Each test's output is printed whole when it ends; every
//! test runs even after one fails, and a table of all of them ends the run.
//!
//! Why not cargo-nextest, which schedules the same way: on a clean CI machine it would
//! be compiled from source on every run (minutes of the time it saves; its prebuilt
//! binaries are not reachable from here).
//!
//! Where tests run directly on this machine (hardware KVM), each end-to-end target runs
//! whole, one after another, as before: their tests were written to share one host
//! only with the tests of their own target.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forkvm_testhost::{decide_mode, HostChoice, Mode};

/// End-to-end targets whose tests take longest (in the virtual host in a local CI run,
/// 2026-12-07: each test of `engines_e2e` 410-440 s, `cri_e2e` ~265 s, of
/// `conformance_e2e` 145-235 s, `runtime_e2e` up to ~200 s, `run_e2e` up to ~150 s;
/// the rest under 120 s but `run_net_e2e`'s ~80 s). They start first so that the run
/// does not end on one of them with a slot idle. Only an order: a target missing here
/// runs after them.
const LONGEST_FIRST: &[&str] = &[
    "engines_e2e",
    "cri_e2e",
    "conformance_e2e",
    "runtime_e2e",
    "run_e2e",
];

/// One test target of the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    package: String,
    name: String,
}

impl Target {
    fn is_end_to_end(&self) -> bool {
        self.name.ends_with("_e2e")
    }

    /// `cargo test` of this target alone; test arguments follow.
    fn cargo_test(&self, root: &Path) -> Command {
        let mut cmd = cargo();
        cmd.current_dir(root)
            .args(["test", "--locked", "--package", &self.package])
            .args(["--test", &self.name]);
        cmd
    }
}

/// One end-to-end test to run in a process of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    target: Target,
    test: String,
}

/// How a test process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Passed,
    Ignored,
    Failed,
    /// It exited 0 but ran no test (a listed name that no longer matches).
    RanNothing,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Passed => "ok",
            Verdict::Ignored => "ignored",
            Verdict::Failed => "FAILED",
            Verdict::RanNothing => "RAN NO TEST",
        }
    }

    fn is_failure(self) -> bool {
        matches!(self, Verdict::Failed | Verdict::RanNothing)
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace's test targets, from `cargo metadata`.
fn test_targets(root: &Path) -> anyhow::Result<Vec<Target>> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1", "--locked"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading cargo metadata's output")?;
    let mut targets = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let pname = package["name"]
            .as_str()
            .context("a package without a name")?;
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
            if is_test {
                targets.push(Target {
                    package: pname.to_owned(),
                    name: target["name"]
                        .as_str()
                        .context("a target without a name")?
                        .to_owned(),
                });
            }
        }
    }
    targets.sort_by(|a, b| (&a.package, &a.name).cmp(&(&b.package, &b.name)));
    Ok(targets)
}

/// The names in the output of `TEST --list --format terse` (`name: test` lines).
fn listed_tests(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// What a `cargo test ... -- --exact NAME` run says of its one test.
fn verdict(status: ExitStatus, output: &str) -> Verdict {
    if !status.success() {
        return Verdict::Failed;
    }
    let summary = output
        .lines()
        .rev()
        .find(|l| l.starts_with("test result: "))
        .unwrap_or("");
    if summary.contains(" 1 passed;") {
        Verdict::Passed
    } else if summary.contains(" 1 ignored;") {
        Verdict::Ignored
    } else {
        Verdict::RanNothing
    }
}

/// The jobs in the order they start: the targets of [`LONGEST_FIRST`] in its order,
/// then the others in name order; each target's tests in listed order.
fn order(mut jobs: Vec<Job>) -> Vec<Job> {
    let rank = |j: &Job| {
        LONGEST_FIRST
            .iter()
            .position(|n| *n == j.target.name)
            .unwrap_or(LONGEST_FIRST.len())
    };
    // Stable: the listed order within a target stays.
    jobs.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| a.target.name.cmp(&b.target.name))
    });
    jobs
}

/// A file name for a job's log.
fn log_name(job: &Job) -> String {
    let test: String = job
        .test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{}--{}.log", job.target.name, test)
}

fn run_streamed(cmd: &mut Command, what: &str) -> anyhow::Result<bool> {
    println!("== {what}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    Ok(status.success())
}

/// Runs the suite, or only the test targets named in `only`; `Ok(false)` when a test
/// failed.
pub fn run(root: &Path, target_dir: &Path, only: &[String]) -> anyhow::Result<bool> {
    let start = Instant::now();
    let mut targets = test_targets(root)?;
    if let Some(unknown) = only.iter().find(|n| !targets.iter().any(|t| t.name == **n)) {
        bail!("no test target is named {unknown}");
    }
    if !only.is_empty() {
        targets.retain(|t| only.contains(&t.name));
    }
    let (e2e, host): (Vec<Target>, Vec<Target>) =
        targets.into_iter().partition(Target::is_end_to_end);

    let everything = only.is_empty();
    let mut ok = true;
    if everything || !host.is_empty() {
        ok &= host_tests(root, &host, everything)?;
    }
    if decide_mode(HostChoice::Auto) == Mode::Direct {
        for t in &e2e {
            ok &= run_streamed(
                t.cargo_test(root).args(["--", "--nocapture"]),
                &format!("cargo test: {} ({})", t.name, t.package),
            )?;
        }
    } else {
        ok &= run_in_lanes(root, target_dir, &e2e)?;
    }
    println!(
        "== the test suite {} in {:.0?}",
        if ok { "passed" } else { "FAILED" },
        start.elapsed()
    );
    Ok(ok)
}

/// The host test targets; with `units`, the unit and doc tests too.
fn host_tests(root: &Path, host: &[Target], units: bool) -> anyhow::Result<bool> {
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    if units {
        cmd.args(["--lib", "--bins"]);
    }
    for t in host {
        cmd.args(["--test", &t.name]);
    }
    cmd.args(["--", "--nocapture"]);
    let mut ok = run_streamed(&mut cmd, "cargo test: unit tests and host test targets")?;
    if units {
        ok &= run_streamed(
            cargo()
                .current_dir(root)
                .args(["test", "--workspace", "--locked", "--doc"]),
            "cargo test: doc tests",
        )?;
    }
    Ok(ok)
}

/// A job that runs, with its log.
struct Running {
    job: Job,
    child: Child,
    log: PathBuf,
    started: Instant,
}

/// Lists each end-to-end target's tests and runs them, one process per test, as many
/// at once as there are virtual-host slots plus one.
fn run_in_lanes(root: &Path, target_dir: &Path, e2e: &[Target]) -> anyhow::Result<bool> {
    let mut jobs = Vec::new();
    for t in e2e {
        let out = t
            .cargo_test(root)
            .args(["--", "--list", "--format", "terse"])
            .output()
            .with_context(|| format!("listing the tests of {}", t.name))?;
        if !out.status.success() {
            bail!(
                "listing the tests of {} failed ({}):\n{}",
                t.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tests = listed_tests(&String::from_utf8_lossy(&out.stdout));
        if tests.is_empty() {
            bail!("{} ({}) lists no test", t.name, t.package);
        }
        jobs.extend(tests.into_iter().map(|test| Job {
            target: t.clone(),
            test,
        }));
    }
    let slots = forkvm_testhost::virtual_host_slots();
    let lanes = slots + 1;
    let logs = target_dir.join("xtask-test");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    println!(
        "== end-to-end tests: {} in {} targets, {lanes} at a time ({slots} virtual-host slots); logs in {}",
        jobs.len(),
        e2e.len(),
        logs.display()
    );

    let phase = Instant::now();
    let mut queue: VecDeque<Job> = order(jobs).into();
    let mut running: Vec<Running> = Vec::new();
    // Each test with how it ended and when it started and ended in the phase.
    let mut done: Vec<(Job, Verdict, Duration, Duration)> = Vec::new();
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < lanes {
            let Some(job) = queue.pop_front() else { break };
            running.push(start_job(root, &logs, job)?);
        }
        thread::sleep(Duration::from_millis(200));
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].child.try_wait().context("waiting for a test")? else {
                i += 1;
                continue;
            };
            let r = running.swap_remove(i);
            let took = r.started.elapsed();
            let mut output = String::new();
            File::open(&r.log)
                .and_then(|mut f| f.read_to_string(&mut output))
                .with_context(|| format!("reading {}", r.log.display()))?;
            let v = verdict(status, &output);
            println!("== {} ({}): its output", r.job.test, r.job.target.name);
            print!("{output}");
            println!(
                "== {} ({}): {} in {:.0?} ({status})",
                r.job.test,
                r.job.target.name,
                v.word(),
                took
            );
            std::io::stdout().flush().ok();
            let ended = phase.elapsed();
            done.push((r.job, v, ended.saturating_sub(took), ended));
        }
    }

    // A test's time includes its wait for a virtual-host slot (and a second run after
    // a stalled host: its output says).
    println!("== end-to-end tests, in the order they ended (seconds into the phase)");
    println!("| target | test | result | started | ended |");
    println!("|---|---|---|---|---|");
    for (job, v, start, end) in &done {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} |",
            job.target.name,
            job.test,
            v.word(),
            start.as_secs_f64(),
            end.as_secs_f64()
        );
    }
    let failed = done.iter().filter(|(_, v, _, _)| v.is_failure()).count();
    println!("{} tests, {failed} failed", done.len());
    Ok(failed == 0)
}

fn start_job(root: &Path, logs: &Path, job: Job) -> anyhow::Result<Running> {
    let log = logs.join(log_name(&job));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("sharing a log file")?;
    println!("== started {} ({})", job.test, job.target.name);
    let child = job
        .target
        .cargo_test(root)
        .args(["--", "--exact", &job.test])
        .arg("--nocapture")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", job.test))?;
    Ok(Running {
        job,
        child,
        log,
        started: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn job(target: &str, test: &str) -> Job {
        Job {
            target: Target {
                package: "p".into(),
                name: target.into(),
            },
            test: test.into(),
        }
    }

    #[test]
    fn the_longest_targets_start_first_and_each_keeps_its_test_order() {
        let jobs = vec![
            job("a_e2e", "one"),
            job("run_e2e", "r1"),
            job("engines_e2e", "docker"),
            job("a_e2e", "two"),
            job("run_e2e", "r0"),
            job("engines_e2e", "podman"),
        ];
        let names: Vec<String> = order(jobs)
            .into_iter()
            .map(|j| format!("{}/{}", j.target.name, j.test))
            .collect();
        assert_eq!(
            names,
            [
                "engines_e2e/docker",
                "engines_e2e/podman",
                "run_e2e/r1",
                "run_e2e/r0",
                "a_e2e/one",
                "a_e2e/two"
            ]
        );
    }

    #[test]
    fn a_run_passes_only_when_it_ran_its_one_test() {
        let ok = ExitStatus::from_raw(0);
        let failed = ExitStatus::from_raw(101 << 8);
        let passed = "running 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1.00s\n";
        assert_eq!(verdict(ok, passed), Verdict::Passed);
        assert_eq!(verdict(failed, passed), Verdict::Failed);
        let nothing = "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out; finished in 0.00s\n";
        assert_eq!(verdict(ok, nothing), Verdict::RanNothing);
        assert!(Verdict::RanNothing.is_failure());
        let ignored = "test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.00s\n";
        assert_eq!(verdict(ok, ignored), Verdict::Ignored);
        assert!(!Verdict::Ignored.is_failure());
        // The outer process's summary comes last; a virtual host's inner one before it.
        let nested = format!("{passed}{nothing}");
        assert_eq!(verdict(ok, &nested), Verdict::RanNothing);
        assert_eq!(verdict(ok, ""), Verdict::RanNothing);
    }

    #[test]
    fn listed_names_are_the_test_lines_only() {
        let list = "a::b: test\nc: test\nbench_x: bench\n\n2 tests, 1 benchmark\n";
        assert_eq!(listed_tests(list), ["a::b", "c"]);
    }

    #[test]
    fn log_names_keep_to_plain_characters() {
        assert_eq!(
            log_name(&job("fork_e2e", "fork::a_child")),
            "fork_e2e--fork--a_child.log"
        );
    }
}
