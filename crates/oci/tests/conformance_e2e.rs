//! End to end, in a KVM host: the OCI runtime-tools validation suite (vendored in
//! `third_party/runtime-tools`, built by `cargo xtask prepare-conformance`) run against
//! runc and against `forkvm-runtime` in the same session, side by side.
//!
//! Every validation program runs against runc first. Where runc is clean (it exits 0,
//! passes at least one check that is not a skip and fails none), the same program runs
//! against forkvm, which must be clean too on at least as many checks, except for the
//! tests in [`KNOWN_GAPS`], each with what forkvm does not do yet. A known gap that
//! passes fails the test as well, so the list only shrinks. The suite runs in
//! [`SHARDS`] virtual-host sessions (one test each); each prints its table of both
//! runtimes' results and keeps each program's TAP output in its directory for a
//! failure's diagnosis.

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

/// The suite runs in this many virtual-host sessions, each every `SHARDS`th program in
/// name order (so the heavy `linux_*` programs spread over all): one session of the
/// whole suite takes 20 to 30 minutes in the virtual host, and a nested, emulated
/// host stalls now and then; a stalled session is run again, which costs a shard's
/// minutes, not the suite's.
const SHARDS: usize = 4;

/// The longest one shard may take in the virtual host (it takes 5 to 8 minutes; the
/// session's own limit is 20).
const SESSION_BUDGET: Duration = Duration::from_secs(900);

/// Tests runc is clean on that forkvm is not yet, each with the reason.
const KNOWN_GAPS: &[(&str, &str)] = &[];

/// What one validation program reported.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Its exit code (`None`: killed, or past [`PROGRAM_TIMEOUT`]).
    exit: Option<i32>,
    /// `ok` lines that are not skips.
    passed: usize,
    /// `ok ... # SKIP` lines.
    skipped: usize,
    /// `not ok` lines.
    failed: usize,
    took: Duration,
}

impl Outcome {
    fn clean(&self) -> bool {
        self.exit == Some(0) && self.passed > 0 && self.failed == 0
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exit = self.exit.map_or("killed".to_owned(), |c| c.to_string());
        write!(
            f,
            "{:>4} ok {:>3} skip {:>3} not ok, exit {exit:<6} {:>6.1} s",
            self.passed,
            self.skipped,
            self.failed,
            self.took.as_secs_f64()
        )
    }
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
        exit,
        passed,
        skipped,
        failed,
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
    // runc's and forkvm's containers of two shards would meet on one host.
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

/// Every program is in exactly one shard, and each shard has some.
#[test]
fn shards_cover_the_suite_once() {
    let names: Vec<String> = (0..58).map(|i| format!("p{i:02}")).collect();
    let mut seen: Vec<&String> = (0..SHARDS).flat_map(|k| shard_of(&names, k)).collect();
    assert!((0..SHARDS).all(|k| shard_of(&names, k).len() >= 58 / SHARDS));
    seen.sort();
    assert_eq!(seen, names.iter().collect::<Vec<_>>());
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
    let runc = PathBuf::from("runc");

    let all = programs(suite);
    assert!(
        all.len() > 50,
        "only {} validation programs in {}",
        all.len(),
        suite.display()
    );
    let names = shard_of(&all, shard);
    let mut results: BTreeMap<&str, (Outcome, Option<Outcome>)> = BTreeMap::new();
    let session = Instant::now();
    for name in names.iter().copied() {
        assert!(
            session.elapsed() < SESSION_BUDGET,
            "shard {} has run {:?}, past its {SESSION_BUDGET:?}, before {name}",
            shard + 1,
            session.elapsed()
        );
        let with_runc = run(suite, name, &runc, "runc", out);
        let with_forkvm = with_runc
            .clean()
            .then(|| run(suite, name, &forkvm, "forkvm", out));
        println!(
            "{name:<32} runc: {with_runc}   forkvm: {}",
            with_forkvm.map_or("(not run: runc is not clean)".to_owned(), |o| o.to_string())
        );
        results.insert(name, (with_runc, with_forkvm));
    }

    // The table, for the log.
    let runc_clean: Vec<&str> = results
        .iter()
        .filter(|(_, (r, _))| r.clean())
        .map(|(n, _)| *n)
        .collect();
    let forkvm_clean: Vec<&str> = results
        .iter()
        .filter(|(_, (_, f))| f.is_some_and(|f| f.clean()))
        .map(|(n, _)| *n)
        .collect();
    let (runc_ok, runc_not_ok) = results
        .values()
        .fold((0, 0), |(a, b), (r, _)| (a + r.passed, b + r.failed));
    let (fvm_ok, fvm_not_ok) = results
        .values()
        .filter_map(|(_, f)| *f)
        .fold((0, 0), |(a, b), f| (a + f.passed, b + f.failed));
    println!(
        "shard {} of {SHARDS}: runc clean on {} of {} programs ({runc_ok} checks passed, \
         {runc_not_ok} failed); forkvm clean on {} of those {} ({fvm_ok} passed, {fvm_not_ok} \
         failed)",
        shard + 1,
        runc_clean.len(),
        names.len(),
        forkvm_clean.len(),
        runc_clean.len()
    );
    // The baseline itself must work, or the comparison means nothing: runc is clean on
    // `default` and on some programs of every shard.
    let has_default = names.iter().any(|n| *n == "default");
    assert!(
        !runc_clean.is_empty() && (!has_default || runc_clean.contains(&"default")),
        "runc is clean on {runc_clean:?} of shard {}: the suite or the host is broken\n{}",
        shard + 1,
        diagnosis(out, "runc", if has_default { "default" } else { names[0] })
    );

    let mut problems = Vec::new();
    for name in &runc_clean {
        let (with_runc, with_forkvm) = results[name];
        // Clean, and on as many checks as runc (not clean by skipping them).
        let clean = with_forkvm.is_some_and(|f| f.clean() && f.passed >= with_runc.passed);
        let gap = KNOWN_GAPS.iter().find(|(n, _)| n == name);
        match (clean, gap) {
            (true, None) | (false, Some(_)) => {}
            (false, None) => problems.push(format!(
                "{name}: runc is clean, forkvm is not\n{}",
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
