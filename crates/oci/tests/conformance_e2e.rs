//! End to end, in a KVM host: the OCI runtime-tools validation suite (vendored in
//! `third_party/runtime-tools`, built by `cargo xtask prepare-conformance`) run against
//! `forkvm-runtime`, held to what runc did with the same programs in the virtual test
//! host.
//!
//! runc's results are a baseline kept beside this file ([`BASELINE`],
//! `runc-baseline.txt`): the same in every run of the suite here, so the CI does not
//! spend a third of the suite's time taking them again (`runc_still_gives_its_baseline`,
//! ignored, checks them against runc on demand). Where runc is clean (it exits 0, passes
//! at least one check that is not a skip and fails none), the same program runs against
//! forkvm, which must be clean too on at least as many checks, except for the tests in
//! [`KNOWN_GAPS`], each with what forkvm does not do yet. A known gap that passes fails
//! the test as well, so the list only shrinks. Those programs run in [`SHARDS`]
//! virtual-host sessions (one test each); each prints its table and keeps each program's
//! TAP output in its directory for a failure's diagnosis.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNTIME: &str = env!("CARGO_BIN_EXE_forkvm-runtime");

/// The suite's build directory under the target directory (`cargo xtask
/// prepare-conformance`; the name is the vendored archive's).
const SUITE: &str = "runtime-tools/runtime-tools-5e63903";

/// The longest one validation program may take (some create several containers; each
/// boots a VM: seconds in the virtual host).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);

/// The programs runc is clean on run in this many virtual-host sessions, each every
/// `SHARDS`th of them in name order (so the heavy `linux_*` programs spread over all):
/// all of them take ~15 minutes in the virtual host, and a nested, emulated host stalls
/// now and then; a stalled session is run again, which costs a shard's minutes, not the
/// suite's.
const SHARDS: usize = 4;

/// The longest one shard may take in the virtual host (it takes 2 to 6 minutes; the
/// session's own limit is 20).
const SESSION_BUDGET: Duration = Duration::from_secs(900);

/// Tests runc is clean on that forkvm is not yet, each with the reason.
const KNOWN_GAPS: &[(&str, &str)] = &[];

/// runc's results on every validation program in the virtual test host: one line per
/// program, `name ok skip not-ok exit` (`exit` a number or `killed`); `#` comments.
const BASELINE: &str = include_str!("runc-baseline.txt");

/// The first line of `runc --version` of the runc that gave [`BASELINE`]: another runc
/// may give other results, so the test refuses to compare with it.
const BASELINE_RUNC: &str = "runc version 1.1.5+ds1";

/// The first line of this host's `runc --version`.
fn runc_version() -> String {
    let out = Command::new("runc")
        .arg("--version")
        .output()
        .expect("cannot run runc --version");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// What one validation program reported: its checks and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Its exit code (`None`: killed, or past [`PROGRAM_TIMEOUT`]).
    exit: Option<i32>,
    /// `ok` lines that are not skips.
    passed: usize,
    /// `ok ... # SKIP` lines.
    skipped: usize,
    /// `not ok` lines.
    failed: usize,
}

impl Counts {
    fn clean(&self) -> bool {
        self.exit == Some(0) && self.passed > 0 && self.failed == 0
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exit = self.exit.map_or("killed".to_owned(), |c| c.to_string());
        write!(
            f,
            "{:>4} ok {:>3} skip {:>3} not ok, exit {exit:<6}",
            self.passed, self.skipped, self.failed
        )
    }
}

/// A run of one validation program: what it reported and how long it took.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    counts: Counts,
    took: Duration,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:>6.1} s", self.counts, self.took.as_secs_f64())
    }
}

/// [`BASELINE`] by program name.
fn baseline() -> BTreeMap<String, Counts> {
    parse_baseline(BASELINE).unwrap_or_else(|e| panic!("runc-baseline.txt: {e}"))
}

fn parse_baseline(text: &str) -> Result<BTreeMap<String, Counts>, String> {
    let mut programs = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: `{line}` is not `name ok skip not-ok exit`", n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, passed, skipped, failed, exit] = fields[..] else {
            return Err(bad());
        };
        let number = |f: &str| f.parse::<usize>().map_err(|_| bad());
        let counts = Counts {
            exit: match exit {
                "killed" => None,
                code => Some(code.parse().map_err(|_| bad())?),
            },
            passed: number(passed)?,
            skipped: number(skipped)?,
            failed: number(failed)?,
        };
        if programs.insert(name.to_owned(), counts).is_some() {
            return Err(format!("line {}: {name} is listed twice", n + 1));
        }
    }
    Ok(programs)
}

/// The programs runc is clean on, by the baseline, in name order.
fn runc_clean(baseline: &BTreeMap<String, Counts>) -> Vec<String> {
    baseline
        .iter()
        .filter(|(_, c)| c.clean())
        .map(|(n, _)| n.clone())
        .collect()
}

/// The built suite: next to this test program's target directory.
fn suite_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<this test>
    let target = exe.ancestors().nth(3).unwrap();
    let suite = target.join(SUITE);
    assert!(
        suite.join(".built").is_file(),
        "the runtime-tools suite is not built in {}: run `cargo xtask prepare-conformance`",
        suite.display()
    );
    suite
}

/// The validation programs, by name, in name order.
fn programs(suite: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(suite.join("validation"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            suite
                .join("validation")
                .join(&name)
                .join(format!("{name}.t"))
                .is_file()
                .then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// Parses a TAP stream: (`ok` lines that are not skips, skips, `not ok` lines).
fn count(tap: &str) -> (usize, usize, usize) {
    let ok: Vec<&str> = tap.lines().filter(|l| l.starts_with("ok ")).collect();
    let skipped = ok.iter().filter(|l| l.contains("# SKIP")).count();
    let failed = tap.lines().filter(|l| l.starts_with("not ok ")).count();
    (ok.len() - skipped, skipped, failed)
}

/// Runs validation program `name` with `runtime` (the suite's `RUNTIME`) from the
/// suite's directory (it reads `runtimetest` and the root filesystem there), its TAP
/// output and errors kept in `out` as `<label>.<name>.{tap,err}`.
fn run(suite: &Path, name: &str, runtime: &Path, label: &str, out: &Path) -> Outcome {
    let tap = out.join(format!("{label}.{name}.tap"));
    let err = out.join(format!("{label}.{name}.err"));
    let started = Instant::now();
    let mut child = Command::new(
        suite
            .join("validation")
            .join(name)
            .join(format!("{name}.t")),
    )
    .current_dir(suite)
    .env("RUNTIME", runtime)
    .env("TMPDIR", out)
    .stdin(Stdio::null())
    .stdout(File::create(&tap).unwrap())
    .stderr(File::create(&err).unwrap())
    // Its own process group: past its time, what it started goes with it.
    .process_group(0)
    .spawn()
    .unwrap();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > PROGRAM_TIMEOUT {
            // SAFETY: kill(2) of the process group the program leads; no memory.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (passed, skipped, failed) = count(&std::fs::read_to_string(&tap).unwrap_or_default());
    Outcome {
        counts: Counts {
            exit,
            passed,
            skipped,
            failed,
        },
        took: started.elapsed(),
    }
}

/// What to show of a program that was not clean: its failed checks (the line and its
/// YAML, shortened) and the end of its errors.
fn diagnosis(out: &Path, label: &str, name: &str) -> String {
    let tap = std::fs::read_to_string(out.join(format!("{label}.{name}.tap"))).unwrap_or_default();
    let err = std::fs::read_to_string(out.join(format!("{label}.{name}.err"))).unwrap_or_default();
    let mut shown = String::new();
    let mut lines = tap.lines().peekable();
    let mut failures = 0;
    while let Some(line) = lines.next() {
        if !line.starts_with("not ok ") {
            continue;
        }
        failures += 1;
        if failures > 5 {
            continue;
        }
        shown.push_str(line);
        shown.push('\n');
        // Its YAML block, up to 12 lines.
        let mut yaml = 0;
        while let Some(next) = lines.peek() {
            if next.starts_with("ok ") || next.starts_with("not ok ") || yaml >= 12 {
                break;
            }
            shown.push_str(&next.chars().take(300).collect::<String>());
            shown.push('\n');
            yaml += 1;
            lines.next();
        }
    }
    if failures > 5 {
        shown.push_str(&format!("... {} more failed checks\n", failures - 5));
    }
    let tail: Vec<&str> = err.lines().rev().take(8).collect();
    for line in tail.into_iter().rev() {
        shown.push_str(&format!(
            "stderr: {}\n",
            line.chars().take(400).collect::<String>()
        ));
    }
    shown
}

/// Runs shard `shard` (of [`SHARDS`]) in the virtual host.
fn validate(shard: usize, test_path: &str) {
    // Two shards' containers would meet on one host.
    let _alone = forkvm_testhost::alone_on_this_host();
    let suite = suite_dir();
    if !forkvm_testhost::in_test_host() {
        forkvm_oci::vm::container_guest().expect("cannot prepare the container guest");
    }
    forkvm_testhost::on_kvm_host_with(test_path, Duration::from_secs(1200), None, || {
        body(&suite, shard)
    });
}

#[test]
fn runtime_tools_shard_1_is_clean_where_runc_is() {
    validate(0, forkvm_testhost::test_path!());
}

#[test]
fn runtime_tools_shard_2_is_clean_where_runc_is() {
    validate(1, forkvm_testhost::test_path!());
}

#[test]
fn runtime_tools_shard_3_is_clean_where_runc_is() {
    validate(2, forkvm_testhost::test_path!());
}

#[test]
fn runtime_tools_shard_4_is_clean_where_runc_is() {
    validate(3, forkvm_testhost::test_path!());
}

/// The baseline parses, names each program once and has programs runc is clean on for
/// every shard; the shards take each of those exactly once.
#[test]
fn shards_cover_the_baseline_once() {
    let baseline = baseline();
    let clean = runc_clean(&baseline);
    assert!(
        baseline.len() > 50 && clean.len() >= SHARDS,
        "runc-baseline.txt lists {} programs, {} of them clean",
        baseline.len(),
        clean.len()
    );
    let mut seen: Vec<&String> = (0..SHARDS).flat_map(|k| shard_of(&clean, k)).collect();
    assert!((0..SHARDS).all(|k| shard_of(&clean, k).len() >= clean.len() / SHARDS));
    seen.sort();
    assert_eq!(seen, clean.iter().collect::<Vec<_>>());

    let sample = "# c\n\nb 1 0 0 0\na 0 0 2 killed\n";
    let parsed = parse_baseline(sample).unwrap();
    assert!(parsed["b"].clean());
    assert_eq!(parsed["a"].exit, None);
    assert_eq!(parsed["a"].failed, 2);
    assert!(parse_baseline("a 1 0 0").unwrap_err().contains("line 1"));
    assert!(parse_baseline("a 1 0 0 0\na 1 0 0 0")
        .unwrap_err()
        .contains("twice"));
}

/// Runs every validation program against runc in the virtual host and compares what it
/// reports with [`BASELINE`]; on a difference, fails with runc's results as they are now
/// (the new baseline).
#[test]
#[ignore = "runs the whole suite against runc (one virtual-host session, ~10 minutes)"]
fn runc_still_gives_its_baseline() {
    let _alone = forkvm_testhost::alone_on_this_host();
    let suite = suite_dir();
    forkvm_testhost::on_kvm_host_with(
        forkvm_testhost::test_path!(),
        Duration::from_secs(1800),
        None,
        || {
            let tmp = tempfile::tempdir().unwrap();
            let baseline = baseline();
            let all = programs(&suite);
            let mut now = String::new();
            let mut differs = Vec::new();
            let version = runc_version();
            if version != BASELINE_RUNC {
                differs.push(format!("runc: baseline {BASELINE_RUNC:?}, now {version:?}"));
            }
            for name in &all {
                let o = run(&suite, name, Path::new("runc"), "runc", tmp.path());
                println!("{name:<32} runc: {o}");
                let c = o.counts;
                let exit = c.exit.map_or("killed".to_owned(), |e| e.to_string());
                now += &format!("{name} {} {} {} {exit}\n", c.passed, c.skipped, c.failed);
                if baseline.get(name) != Some(&c) {
                    differs.push(format!(
                        "{name}: baseline {:?}, now {c}",
                        baseline.get(name)
                    ));
                }
            }
            differs.extend(
                baseline
                    .keys()
                    .filter(|n| !all.contains(n))
                    .map(|n| format!("{n}: in the baseline, not in the suite")),
            );
            assert!(
                differs.is_empty(),
                "runc differs from runc-baseline.txt:\n{}\n\nrunc's results now:\n{now}",
                differs.join("\n")
            );
        },
    );
}

/// The programs of shard `shard`: every [`SHARDS`]th of `names`, from the `shard`th.
fn shard_of(names: &[String], shard: usize) -> Vec<&String> {
    names.iter().skip(shard).step_by(SHARDS).collect()
}

fn body(suite: &Path, shard: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    // `RUNTIME` is one program: this one runs forkvm-runtime with its own state roots.
    let forkvm = out.join("forkvm-runtime");
    std::fs::write(
        &forkvm,
        format!(
            "#!/bin/sh\nexec env FORKVM_ROOT={vms} {RUNTIME} --root {state} --log {log} \
             --log-format json \"$@\"\n",
            vms = out.join("vms").display(),
            state = out.join("state").display(),
            log = out.join("forkvm-runtime.log").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&forkvm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // The baseline must speak of this suite: a program it lacks (or one the suite lost)
    // means the suite changed, and runc's results must be taken again.
    let all = programs(suite);
    let baseline = baseline();
    assert_eq!(
        all,
        baseline.keys().cloned().collect::<Vec<_>>(),
        "the suite in {} and runc-baseline.txt name different programs: take runc's \
         results again (`runc_still_gives_its_baseline`)",
        suite.display()
    );
    assert_eq!(
        runc_version(),
        BASELINE_RUNC,
        "this host's runc is not the one runc-baseline.txt was taken with: take its results \
         again (`runc_still_gives_its_baseline`) and update BASELINE_RUNC"
    );
    let clean = runc_clean(&baseline);
    let names = shard_of(&clean, shard);
    let mut results: BTreeMap<&str, (Counts, Outcome)> = BTreeMap::new();
    let session = Instant::now();
    for name in names.iter().copied() {
        assert!(
            session.elapsed() < SESSION_BUDGET,
            "shard {} has run {:?}, past its {SESSION_BUDGET:?}, before {name}",
            shard + 1,
            session.elapsed()
        );
        let with_runc = baseline[name];
        let with_forkvm = run(suite, name, &forkvm, "forkvm", out);
        println!("{name:<32} runc: {with_runc}   forkvm: {with_forkvm}");
        results.insert(name, (with_runc, with_forkvm));
    }

    let forkvm_clean = results.values().filter(|(_, f)| f.counts.clean()).count();
    let (fvm_ok, fvm_not_ok) = results.values().fold((0, 0), |(a, b), (_, f)| {
        (a + f.counts.passed, b + f.counts.failed)
    });
    println!(
        "shard {} of {SHARDS}: runc is clean on {} of the suite's {} programs, {} of them in \
         this shard; forkvm clean on {forkvm_clean} of those {} ({fvm_ok} checks passed, \
         {fvm_not_ok} failed)",
        shard + 1,
        clean.len(),
        all.len(),
        names.len(),
        names.len()
    );

    let mut problems = Vec::new();
    for (name, (with_runc, with_forkvm)) in &results {
        // Clean, and on as many checks as runc (not clean by skipping them).
        let clean = with_forkvm.counts.clean() && with_forkvm.counts.passed >= with_runc.passed;
        let gap = KNOWN_GAPS.iter().find(|(n, _)| n == name);
        match (clean, gap) {
            (true, None) | (false, Some(_)) => {}
            (false, None) => problems.push(format!(
                "{name}: runc is clean (its baseline), forkvm is not (a host that breaks \
                 runc too shows here as well: `runc_still_gives_its_baseline` tells)\n{}",
                diagnosis(out, "forkvm", name)
            )),
            (true, Some(_)) => problems.push(format!(
                "{name}: forkvm is clean now; take it out of KNOWN_GAPS"
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n\n{}\nforkvm-runtime's log:\n{}",
        problems.len(),
        problems.join("\n"),
        std::fs::read_to_string(out.join("forkvm-runtime.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
