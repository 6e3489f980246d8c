//! Owns the report on a virtual host that stopped writing its heartbeat: what its QEMU
//! was doing (each thread's state and CPU use; the vCPU's registers and local APIC
//! through QEMU's monitor, QMP).
//!
//! With one vCPU nothing in the frozen guest can report a soft lockup or an RCU stall
//! (the only CPU is the stuck one), so the report is taken from outside. The freezes
//! seen so far had the local APIC's timer interrupt pending in IRR on a vCPU with
//! interrupts enabled, halted or running a process of the virtual host, and an NMI
//! (`inject-nmi`) did not wake them either: QEMU 7.2's TCG no longer delivering
//! interrupts to the vCPU, which nothing from outside undoes short of a restart.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// One line per thread of process `pid`: its id, name, state, kernel wait channel and
/// the CPU time it used over two seconds (a TCG vCPU thread at 100% with a silent
/// guest spins; at 0% it waits).
pub(crate) fn qemu_threads(pid: u32) -> String {
    // (thread id, "name: state wchan", CPU ticks)
    let sample = || -> Vec<(String, String, u64)> {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let mut out: Vec<_> = tasks
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let stat = fs::read_to_string(dir.join("stat")).ok()?;
                // `pid (comm) state ...`: the fields after the last ')' have no spaces.
                let (head, rest) = stat.rsplit_once(')')?;
                let comm = head.split_once('(')?.1.to_owned();
                let f: Vec<&str> = rest.split_whitespace().collect();
                // state is field 3, utime and stime 14 and 15 (1-based, whole line).
                let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                let wchan = fs::read_to_string(dir.join("wchan")).unwrap_or_default();
                let tid = dir.file_name()?.to_string_lossy().into_owned();
                Some((tid, format!("{comm}: {} wchan={wchan}", f.first()?), ticks))
            })
            .collect();
        out.sort();
        out
    };
    let before = sample();
    thread::sleep(Duration::from_secs(2));
    let after = sample();
    // SAFETY: sysconf has no memory effects.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    after
        .iter()
        .map(|(tid, what, ticks)| {
            let was = before
                .iter()
                .find(|(t, _, _)| t == tid)
                .map_or(*ticks, |b| b.2);
            // Percent of one CPU over the two seconds.
            let pct = ticks.saturating_sub(was) * 100 / (2 * hz);
            format!("  {tid} {what} cpu {pct}%\n")
        })
        .collect()
}

/// A QMP connection to one QEMU.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket at `path` and leaves capabilities negotiation.
    pub(crate) fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(QMP_TIMEOUT))?;
        stream.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        // The greeting: {"QMP": {...}}.
        qmp.message()?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The next message that is not an event.
    fn message(&mut self) -> io::Result<Value> {
        // A message is one line; QEMU's are small, but a guest cannot make them grow
        // without bound either: `info` output of one vCPU.
        for _ in 0..64 {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "QMP sent only events",
        ))
    }

    /// Runs `command` and returns its `return` value, or its `error` as an error.
    pub(crate) fn execute(&mut self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let reply = self.message()?;
        match (reply.get("return"), reply.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(io::Error::other(format!("QMP {command}: {e}"))),
            (None, None) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("QMP {command}: {reply}"),
            )),
        }
    }

    /// Runs a human monitor command (`info registers`) and returns its text.
    pub(crate) fn hmp(&mut self, command_line: &str) -> io::Result<String> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_owned())
    }
}

/// What QEMU's monitor says of the frozen vCPU (or why it could not be asked: a
/// monitor that does not answer means QEMU's main loop is stuck, not the guest).
pub(crate) fn cpu_report(qmp: Option<&mut Qmp>) -> String {
    let Some(qmp) = qmp else {
        return "  (no QMP connection)\n".into();
    };
    let mut out = String::new();
    for command in ["info registers", "info lapic"] {
        out += &format!("  > {command}\n");
        match qmp.hmp(command) {
            Ok(text) => {
                // The general, segment and control registers; not the FPU's and SSE's.
                let shown = text.lines().filter(|l| {
                    !["FPR", "YMM", "XMM", "FCW"]
                        .iter()
                        .any(|p| l.starts_with(p))
                });
                for line in shown.take(40) {
                    out += &format!("  {line}\n");
                }
            }
            Err(e) => out += &format!("  (QMP did not answer: {e})\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_of_this_process_are_listed_with_their_cpu_use() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // A thread that spins through the two seconds of sampling uses CPU (however
        // loaded the machine); one that waits uses none.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let spinner = thread::Builder::new()
            .name("spinner".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = thread::Builder::new()
            .name("waiter".into())
            .spawn(move || rx.recv())
            .unwrap();
        let report = qemu_threads(std::process::id());
        stop.store(true, Ordering::Relaxed);
        drop(tx);
        spinner.join().unwrap();
        let _ = waiter.join().unwrap();
        let pct = |name: &str| -> u64 {
            report
                .lines()
                .find(|l| l.contains(&format!(" {name}: ")))
                .and_then(|l| l.rsplit_once("cpu "))
                .and_then(|(_, p)| p.trim_end_matches('%').parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{report}"))
        };
        assert!(pct("spinner") > 0, "{report}");
        assert_eq!(pct("waiter"), 0, "{report}");
        assert!(report.contains(" waiter: S "), "{report}");
    }
}
