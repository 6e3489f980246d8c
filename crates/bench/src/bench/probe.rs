//! One measured boot: spawn a VMM with the guest console on a pipe, timestamp the ready
//! marker, sample the VMM's RSS at that moment, and wait for the VMM to exit by itself.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_guest_kernel::READY_MARKER;
use serde::Serialize;

/// How many console lines a failure report shows.
const TAIL_LINES: usize = 30;

/// The VMMs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// This project.
    Forkvm,
    /// QEMU's `microvm` machine.
    Qemu,
}

impl VmmKind {
    /// The short name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forkvm => "forkvm",
            Self::Qemu => "qemu",
        }
    }
}

/// A VMM command line that boots the guest once.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Which VMM.
    pub kind: VmmKind,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl Launch {
    /// The command line, shell-quoted for display.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:+@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What one boot measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Which VMM.
    pub vmm: VmmKind,
    /// Spawn to the ready marker on the console, host wall clock, ms.
    pub boot_to_init_ms: f64,
    /// The guest's `/proc/uptime` printed in the marker, ms.
    pub guest_uptime_ms: f64,
    /// Spawn to the VMM's exit, ms.
    pub total_ms: f64,
    /// The VMM's `VmRSS` when the marker appeared, KiB (`None` if it could not be read).
    pub rss_kib: Option<u64>,
    /// The VMM's `VmHWM` (peak RSS) when the marker appeared, KiB.
    pub hwm_kib: Option<u64>,
}

/// A finished boot: its measurements and its console.
#[derive(Clone, Debug)]
pub struct Run {
    /// The measurements.
    pub sample: Sample,
    /// Every console line with the host time since spawn, ms.
    pub console: Vec<(f64, String)>,
}

/// The console as text, each line prefixed with `[host +<ms>]`.
pub fn console_text(console: &[(f64, String)]) -> String {
    console
        .iter()
        .map(|(ms, l)| format!("[host +{ms:9.1} ms] {l}\n"))
        .collect()
}

/// Extracts the guest uptime in seconds from a console line holding the ready marker.
pub fn parse_marker(line: &str) -> Option<f64> {
    let rest = &line[line.find(READY_MARKER)? + READY_MARKER.len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Reads a `kB` field (`VmRSS`, `VmHWM`, ...) from `/proc/<pid>/status` text.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k != field {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

fn read_memory(pid: u32) -> (Option<u64>, Option<u64>) {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => (parse_status_kib(&s, "VmRSS"), parse_status_kib(&s, "VmHWM")),
        Err(e) => {
            tracing::warn!(pid, "cannot read /proc/{pid}/status: {e}");
            (None, None)
        }
    }
}

struct Marker {
    at: Instant,
    uptime_s: f64,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
}

/// Kills and reaps the child unless it was reaped already.
struct Reaper {
    child: Child,
    reaped: bool,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.child.id();
        tracing::debug!(pid, "killing the leftover VMM");
        let _ = self.child.kill();
        // Bounded: a VMM stuck in the kernel (KVM_RUN) may not die at once.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) | Err(_) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            pid,
            "the VMM did not die within 10 s of SIGKILL; leaving it"
        );
    }
}

type Tail = Arc<Mutex<VecDeque<String>>>;

fn push_tail(tail: &Tail, line: String) {
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() == TAIL_LINES {
        t.pop_front();
    }
    t.push_back(line);
}

fn tail_text(tail: &Tail) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    t.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
}

/// Boots the guest once with `launch` and measures it; fails (after killing the VMM) on
/// a spawn error, a non-zero exit, no marker, or when `timeout` passes.
pub fn run_once(launch: &Launch, timeout: Duration) -> Result<Run> {
    let name = launch.kind.name();
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!(command = %launch.display(), "spawning {name}");
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", launch.program.display()))?;
    let mut reaper = Reaper {
        child,
        reaped: false,
    };
    let pid = reaper.child.id();
    let stdout = reaper.child.stdout.take().context("no stdout pipe")?;
    let mut stderr = reaper.child.stderr.take().context("no stderr pipe")?;

    let console: Tail = Arc::default();
    let (tx, rx) = mpsc::channel::<Marker>();
    let reader = {
        let console = console.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            let mut all = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let line = String::from_utf8_lossy(&buf);
                if let Some(uptime_s) = parse_marker(&line) {
                    let (rss_kib, hwm_kib) = read_memory(super::vm_process(pid));
                    let _ = tx.send(Marker {
                        at,
                        uptime_s,
                        rss_kib,
                        hwm_kib,
                    });
                }
                let line = line.trim_end().to_owned();
                all.push(((at - start).as_secs_f64() * 1000.0, line.clone()));
                push_tail(&console, line);
            }
            all
        })
    };
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });

    let deadline = start + timeout;
    let (status, exit_at): (ExitStatus, Instant) = loop {
        if let Some(status) = reaper
            .child
            .try_wait()
            .with_context(|| format!("waiting for {name}"))?
        {
            let at = Instant::now();
            reaper.reaped = true;
            break (status, at);
        }
        if Instant::now() >= deadline {
            drop(reaper);
            // Not joined: a process the VMM started could still hold the pipe.
            drop(reader);
            let seen = rx.try_recv().is_ok();
            let waited = Instant::now();
            while !err_reader.is_finished() && waited.elapsed() < Duration::from_millis(300) {
                thread::sleep(Duration::from_millis(5));
            }
            let stderr = if err_reader.is_finished() {
                err_reader.join().unwrap_or_default()
            } else {
                String::new()
            };
            bail!(
                "{name} did not {} within {timeout:?}; killed it\n\
                 --- console (last lines) ---\n{}\n--- stderr ---\n{}",
                if seen {
                    "exit after the ready marker"
                } else {
                    "print the ready marker"
                },
                tail_text(&console),
                stderr.trim_end()
            );
        }
        thread::sleep(Duration::from_millis(1));
    };
    let all = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let failure = |what: String| {
        anyhow::anyhow!(
            "{name} {what}\ncommand: {}\n--- console (last lines) ---\n{}\n--- stderr ---\n{}",
            launch.display(),
            tail_text(&console),
            stderr.trim_end()
        )
    };
    if !status.success() {
        return Err(failure(format!("failed: {status}")));
    }
    let Ok(marker) = rx.try_recv() else {
        return Err(failure(format!(
            "exited without printing the ready marker {READY_MARKER:?}"
        )));
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Run {
        sample: Sample {
            vmm: launch.kind,
            boot_to_init_ms: ms(marker.at - start),
            guest_uptime_ms: marker.uptime_s * 1000.0,
            total_ms: ms(exit_at - start),
            rss_kib: marker.rss_kib,
            hwm_kib: marker.hwm_kib,
        },
        console: all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lines() {
        assert_eq!(parse_marker("forkvm-init: ready uptime=0.42"), Some(0.42));
        assert_eq!(parse_marker("forkvm-init: ready uptime=7.38\r"), Some(7.38));
        assert_eq!(
            parse_marker("[    1.0] junk forkvm-init: ready uptime=12 rest"),
            Some(12.0)
        );
        assert_eq!(parse_marker("forkvm-init: ready uptime="), None);
        assert_eq!(parse_marker("forkvm-init: exit 0"), None);
        assert_eq!(parse_marker("ready uptime=1.0"), None);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tqemu\nVmHWM:\t  51200 kB\nVmRSS:\t   40960 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(40960));
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(51200));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn quoting_for_display() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(
            shell_quote("console=ttyS0 -- true"),
            "'console=ttyS0 -- true'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_run_that_prints_the_marker_and_exits() {
        let launch = Launch {
            kind: VmmKind::Forkvm,
            program: "sh".into(),
            args: vec![
                "-c".into(),
                format!("echo boot; echo '{READY_MARKER}1.25'; sleep 0.05").into(),
            ],
        };
        let run = run_once(&launch, Duration::from_secs(20)).unwrap();
        assert_eq!(run.console.len(), 2);
        assert_eq!(run.console[0].1, "boot");
        assert!(console_text(&run.console).starts_with("[host +"));
        let s = run.sample;
        assert_eq!(s.guest_uptime_ms, 1250.0);
        assert!(s.total_ms >= s.boot_to_init_ms, "{s:?}");
        assert!(s.total_ms - s.boot_to_init_ms >= 40.0, "{s:?}");
    }

    #[test]
    fn failures_are_reported() {
        let launch = |script: &str| Launch {
            kind: VmmKind::Qemu,
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        };
        let e = run_once(&launch("echo oops; exit 3"), Duration::from_secs(20)).unwrap_err();
        assert!(format!("{e:#}").contains("oops"), "{e:#}");
        let e = run_once(&launch("echo booted"), Duration::from_secs(20)).unwrap_err();
        assert!(format!("{e:#}").contains("without printing"), "{e:#}");
        let t = Instant::now();
        let e = run_once(&launch("sleep 30"), Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e:#}").contains("did not print"), "{e:#}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
