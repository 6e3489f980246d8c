//! The agent's serving code in-process (daemon mode, root `/`) over `UnixStream::pair()`,
//! driven by the host client: exec, stdio, env, cwd, signals, tty, users, failures.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_agent::server::{Agent, AgentConfig, Mode};
use forkvm_agent::{Capabilities, ProcessSpec, Request, Response, Rlimit, PROTOCOL_VERSION};
use forkvm_agent_proto::client::{self, ExecError, ExecSession};
use forkvm_test_support::Captured;

/// A host connection to a fresh in-process agent.
fn agent() -> (Arc<Agent>, UnixStream) {
    let agent = Agent::new(AgentConfig::new("/", Mode::Daemon));
    (agent.clone(), connect(&agent))
}

fn connect(agent: &Arc<Agent>) -> UnixStream {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = agent.clone();
    std::thread::spawn(move || agent.serve(guest));
    host
}

/// A `Write` that reports each chunk on a channel.
struct Notify(mpsc::Sender<Vec<u8>>);

impl Write for Notify {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn pump(session: ExecSession, stdin: Option<Vec<u8>>) -> Outcome {
    let (out, err) = (Captured::default(), Captured::default());
    let stdin = stdin.map(|d| Box::new(std::io::Cursor::new(d)) as Box<dyn Read + Send>);
    let code = session
        .pump(stdin, Box::new(out.clone()), Box::new(err.clone()))
        .unwrap();
    Outcome {
        code,
        stdout: out.text(),
        stderr: err.text(),
    }
}

fn run(spec: ProcessSpec) -> Outcome {
    let (_agent, conn) = agent();
    pump(client::exec(conn, &spec).unwrap(), None)
}

fn sh(script: &str) -> ProcessSpec {
    let mut spec = ProcessSpec::new(["sh", "-c", script]);
    spec.env = vec!["PATH=/usr/bin:/bin".into()];
    spec
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "forkvm-agent-exec-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn stdout_stderr_and_exit_code_are_separate() {
    let o = run(sh("echo out; echo err >&2; exit 3"));
    assert_eq!(o.stdout, "out\n");
    assert_eq!(o.stderr, "err\n");
    assert_eq!(o.code, 3);
}

#[test]
fn ping_answers_the_protocol_version() {
    let (_agent, mut conn) = agent();
    match client::call(&mut conn, &Request::Ping).unwrap() {
        Response::Pong { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
    assert_eq!(PROTOCOL_VERSION, 15);
    // The same connection keeps serving JSON requests; garbage is answered, not fatal.
    conn.write_all(b"{\"op\":\"format_disk\"}\n").unwrap();
    // The whole answer line (it lists every request the agent knows).
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        conn.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&line).contains("\"status\":\"error\""));
    assert!(matches!(
        client::call(&mut conn, &Request::Ping).unwrap(),
        Response::Pong { .. }
    ));
    // An overlong line gets one error, then the connection serves the next request.
    let mut long = vec![b'x'; forkvm_agent::protocol::MAX_LINE * 3];
    long.push(b'\n');
    conn.write_all(&long).unwrap();
    match client::call(&mut conn, &Request::Ping).unwrap() {
        Response::Error { message } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("{other:?}"),
    }
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("\"status\":\"pong\""));
}

#[test]
fn env_is_exactly_the_spec_and_cwd_applies() {
    let dir = TempDir::new("cwd");
    let mut spec = sh("pwd; echo $FOO; echo ${HOME-unset}");
    spec.env.push("FOO=bar baz".into());
    spec.cwd = dir.0.to_str().unwrap().into();
    let o = run(spec);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let want = format!(
        "{}\nbar baz\nunset\n",
        dir.0.canonicalize().unwrap().display()
    );
    assert_eq!(o.stdout, want);
}

#[test]
fn path_search_uses_the_spec_path() {
    let dir = TempDir::new("path");
    std::os::unix::fs::symlink("/bin/echo", dir.0.join("my-echo")).unwrap();
    let mut spec = ProcessSpec::new(["my-echo", "found"]);
    spec.env = vec![format!("PATH=/nonexistent:{}", dir.0.display())];
    let o = run(spec);
    assert_eq!((o.code, o.stdout.as_str()), (0, "found\n"));
    // Without PATH in env, the default PATH is searched (not the agent's own).
    let o = run(ProcessSpec::new(["sh", "-c", "echo default"]));
    assert_eq!(o.stdout, "default\n");
}

#[test]
fn stdin_is_piped_intact() {
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
    let (_agent, conn) = agent();
    let mut spec = ProcessSpec::new(["cat"]);
    spec.stdin = true;
    let session = client::exec(conn, &spec).unwrap();
    let out = Captured::default();
    let code = session
        .pump(
            Some(Box::new(std::io::Cursor::new(data.clone()))),
            Box::new(out.clone()),
            Box::new(std::io::sink()),
        )
        .unwrap();
    assert_eq!(code, 0);
    let got = out.bytes();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "cat echoed different bytes");
}

#[test]
fn without_stdin_the_process_reads_dev_null() {
    // `cat` would wait forever on a pipe the host never closes.
    let (_agent, conn) = agent();
    let mut spec = ProcessSpec::new(["cat"]);
    spec.stdin = false;
    let session = client::exec(conn, &spec).unwrap();
    // Keep stdin open on the host side: a reader that never ends.
    let (_keep, never) = UnixStream::pair().unwrap();
    let out = Captured::default();
    let code = session
        .pump(
            Some(Box::new(never)),
            Box::new(out.clone()),
            Box::new(std::io::sink()),
        )
        .unwrap();
    assert_eq!((code, out.text()), (0, String::new()));
}

#[test]
fn a_trapped_sigterm_runs_the_handler() {
    let (_agent, conn) = agent();
    let session = client::exec(
        conn,
        &sh("trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done"),
    )
    .unwrap();
    let ctl = session.controller();
    let (tx, rx) = mpsc::channel();
    let pumping = std::thread::spawn(move || {
        session.pump(None, Box::new(Notify(tx)), Box::new(std::io::sink()))
    });
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        seen.extend(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    ctl.signal(libc::SIGTERM).unwrap();
    let code = pumping.join().unwrap().unwrap();
    while let Ok(chunk) = rx.try_recv() {
        seen.extend(chunk);
    }
    assert_eq!(code, 7);
    assert!(String::from_utf8_lossy(&seen).contains("got TERM"));
}

#[test]
fn sigkill_gives_137() {
    let (_agent, conn) = agent();
    let session = client::exec(conn, &ProcessSpec::new(["sleep", "30"])).unwrap();
    session.controller().signal(libc::SIGKILL).unwrap();
    let start = Instant::now();
    assert_eq!(pump(session, None).code, 137);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn signal_request_reaches_a_process_from_another_connection() {
    let (agent, conn) = agent();
    let session = client::exec(conn, &ProcessSpec::new(["sleep", "30"])).unwrap();
    let pid = session.pid();
    let mut other = connect(&agent);
    assert_eq!(
        client::call(
            &mut other,
            &Request::Signal {
                pid,
                signal: libc::SIGTERM
            }
        )
        .unwrap(),
        Response::Ok
    );
    assert_eq!(pump(session, None).code, 128 + libc::SIGTERM);
    // Exited, or never ours: refused.
    for pid in [pid, 1] {
        match client::call(&mut other, &Request::Signal { pid, signal: 0 }).unwrap() {
            Response::Error { message } => {
                assert!(message.contains("not a running process"), "{message}")
            }
            resp => panic!("{resp:?}"),
        }
    }
}

#[test]
fn not_found_is_exec_failed_127() {
    let (_agent, conn) = agent();
    let spec = ProcessSpec::new(["nosuchcmd-forkvm"]);
    match client::exec(conn, &spec) {
        Err(ExecError::ExecFailed { message, exit_code }) => {
            assert_eq!(exit_code, 127);
            assert_eq!(
                message,
                "exec \"nosuchcmd-forkvm\": executable file not found in $PATH"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
}

#[test]
fn not_executable_is_exec_failed_126() {
    let dir = TempDir::new("noexec");
    let file = dir.0.join("data.txt");
    std::fs::write(&file, "not a program\n").unwrap();
    let (_agent, conn) = agent();
    match client::exec(conn, &ProcessSpec::new([file.to_str().unwrap()])) {
        Err(ExecError::ExecFailed { exit_code, message }) => {
            assert_eq!(exit_code, 126, "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
}

#[test]
fn a_missing_cwd_is_a_clear_error() {
    let (_agent, conn) = agent();
    let mut spec = ProcessSpec::new(["true"]);
    spec.cwd = "/nonexistent-forkvm-cwd".into();
    match client::exec(conn, &spec) {
        Err(ExecError::Rejected { message }) => {
            assert_eq!(message, "cwd \"/nonexistent-forkvm-cwd\" does not exist")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
}

#[test]
fn bad_specs_are_rejected_and_the_connection_stays_usable() {
    let (_agent, mut conn) = agent();
    let mut spec = ProcessSpec::new(["true"]);
    spec.rlimits.push(Rlimit {
        kind: "RLIMIT_BOGUS".into(),
        soft: 1,
        hard: 1,
    });
    for (spec, want) in [
        (
            ProcessSpec::new(Vec::<String>::new()),
            "process.args is empty",
        ),
        (spec, "unknown rlimit \"RLIMIT_BOGUS\""),
    ] {
        let resp = client::call(&mut conn, &Request::Exec { process: spec }).unwrap();
        assert_eq!(
            resp,
            Response::Error {
                message: want.into()
            }
        );
    }
    let mut init = ProcessSpec::new(["true"]);
    init.init = true;
    match client::call(&mut conn, &Request::Exec { process: init }).unwrap() {
        Response::Error { message } => assert!(message.contains("PID 1"), "{message}"),
        other => panic!("{other:?}"),
    }
    match client::call(&mut conn, &Request::Shutdown).unwrap() {
        Response::Error { message } => assert!(message.contains("PID 1"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rlimits_apply() {
    let mut spec = sh("ulimit -n; ulimit -Hn");
    spec.rlimits.push(Rlimit {
        kind: "RLIMIT_NOFILE".into(),
        soft: 100,
        hard: 200,
    });
    let o = run(spec);
    assert_eq!(o.stdout, "100\n200\n");
}

/// The `Cap*`, `NoNewPrivs` and `Umask` lines of the process's /proc status, and its
/// oom_score_adj, as `spec` starts it.
fn confinement(mut spec: ProcessSpec) -> String {
    spec.args = vec![
        "sh".into(),
        "-c".into(),
        "grep -E '^(Cap|NoNewPrivs|Umask)' /proc/self/status; echo oom=$(cat /proc/self/oom_score_adj)"
            .into(),
    ];
    spec.env = vec!["PATH=/usr/bin:/bin".into()];
    let o = run(spec);
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.stdout
}

fn status_line(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_owned()
}

#[test]
fn capabilities_no_new_privs_umask_and_oom_score_apply() {
    const CHOWN: u64 = 1 << 0;
    const KILL: u64 = 1 << 5;
    const NET_BIND: u64 = 1 << 10;
    let hex = |mask: u64| format!("{mask:016x}");

    // Root with runc's way of three capabilities: exactly those, everywhere.
    let mut spec = ProcessSpec::new(["sh"]);
    spec.capabilities = Some(Capabilities {
        bounding: CHOWN | KILL | NET_BIND,
        effective: CHOWN | KILL,
        permitted: CHOWN | KILL,
        inheritable: 0,
        ambient: 0,
    });
    spec.no_new_privileges = true;
    spec.umask = Some(0o027);
    spec.oom_score_adj = Some(500);
    let s = confinement(spec);
    assert_eq!(
        status_line(&s, "CapBnd:"),
        hex(CHOWN | KILL | NET_BIND),
        "{s}"
    );
    // With no_new_privs, root's exec does not raise them to the bounding set.
    assert_eq!(status_line(&s, "CapPrm:"), hex(CHOWN | KILL), "{s}");
    assert_eq!(status_line(&s, "CapEff:"), hex(CHOWN | KILL), "{s}");
    assert_eq!(status_line(&s, "CapInh:"), hex(0), "{s}");
    assert_eq!(status_line(&s, "CapAmb:"), hex(0), "{s}");
    assert_eq!(status_line(&s, "NoNewPrivs:"), "1", "{s}");
    assert_eq!(status_line(&s, "Umask:"), "0027", "{s}");
    assert!(s.contains("oom=500"), "{s}");

    // Another user keeps what the ambient set carries across the exec.
    let mut spec = ProcessSpec::new(["sh"]);
    spec.user.uid = 1000;
    spec.user.gid = 1000;
    spec.capabilities = Some(Capabilities {
        bounding: CHOWN | KILL,
        effective: KILL,
        permitted: KILL,
        inheritable: KILL,
        ambient: KILL,
    });
    let s = confinement(spec);
    for key in ["CapEff:", "CapPrm:", "CapAmb:", "CapInh:"] {
        assert_eq!(status_line(&s, key), hex(KILL), "{key} {s}");
    }
    assert_eq!(status_line(&s, "CapBnd:"), hex(CHOWN | KILL), "{s}");
    assert_eq!(status_line(&s, "NoNewPrivs:"), "0", "{s}");

    // `runc spec`'s set: ambient ones that are not inheritable cannot be ambient, and
    // are left out, as runc leaves them; the process runs.
    let mut spec = ProcessSpec::new(["sh"]);
    spec.capabilities = Some(Capabilities {
        bounding: CHOWN | KILL,
        effective: CHOWN | KILL,
        permitted: CHOWN | KILL,
        inheritable: 0,
        ambient: CHOWN | KILL,
    });
    let s = confinement(spec);
    assert_eq!(status_line(&s, "CapAmb:"), hex(0), "{s}");
    assert_eq!(status_line(&s, "CapEff:"), hex(CHOWN | KILL), "{s}");

    // Without capabilities in the spec, root keeps the agent's.
    let s = confinement(ProcessSpec::new(["sh"]));
    assert_eq!(status_line(&s, "CapAmb:"), hex(0), "{s}");
    assert_ne!(status_line(&s, "CapEff:"), hex(0), "{s}");
}

#[test]
fn out_of_range_confinement_values_are_refused_naming_the_field() {
    let (_agent, conn) = agent();
    let mut spec = sh("true");
    spec.oom_score_adj = Some(1001);
    let e = client::exec(conn, &spec)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("process.oomScoreAdj") && e.contains("1001"),
        "{e}"
    );
    let (_agent, conn) = agent();
    let mut spec = sh("true");
    spec.umask = Some(0o1777);
    let e = client::exec(conn, &spec)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("process.user.umask"), "{e}");
    // An inheritable capability outside the bounding set: the kernel refuses it, the
    // error names the step.
    let (_agent, conn) = agent();
    let mut spec = sh("true");
    spec.capabilities = Some(Capabilities {
        bounding: 1,
        inheritable: 1 << 21,
        ..Default::default()
    });
    let e = client::exec(conn, &spec)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("capset"), "{e}");
}

#[test]
fn numeric_user_and_groups_apply() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing user needs root");
        return;
    }
    let mut spec = sh("id -u; id -g; id -G");
    spec.user.uid = 1234;
    spec.user.gid = 2345;
    spec.user.additional_gids = vec![3456];
    let o = run(spec);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[..2], ["1234", "2345"]);
    let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
    groups.sort();
    assert_eq!(groups, ["2345", "3456"]);
}

#[test]
fn an_unknown_user_name_is_refused() {
    let (_agent, conn) = agent();
    let mut spec = ProcessSpec::new(["true"]);
    spec.user.name = Some("no-such-user-forkvm".into());
    match client::exec(conn, &spec) {
        Err(ExecError::Rejected { message }) => {
            assert_eq!(message, "user no-such-user-forkvm not found in /etc/passwd")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
}

#[test]
fn tty_mode_gives_a_controlling_terminal() {
    let mut spec = sh("tty; test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; echo to-err >&2");
    spec.tty = true;
    let o = run(spec);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(o.stdout.starts_with("/dev/pts/"), "{:?}", o.stdout);
    assert!(o.stdout.contains("is-a-tty"), "{:?}", o.stdout);
    // The pty merges stderr into the one output stream.
    assert!(o.stdout.contains("to-err"), "{:?}", o.stdout);
    assert_eq!(o.stderr, "");
}

#[test]
fn tty_resize_and_stdin_reach_the_terminal() {
    let (_agent, conn) = agent();
    let mut spec = sh("stty size; read line; stty size; echo \"got $line\"");
    spec.tty = true;
    spec.stdin = true;
    let session = client::exec(conn, &spec).unwrap();
    // Frames are applied in order: the resize lands before the line is typed.
    session.controller().resize(50, 132).unwrap();
    let o = pump(session, Some(b"hello\n".to_vec()));
    assert_eq!(o.code, 0, "{}", o.stdout);
    let lines: Vec<&str> = o.stdout.lines().map(str::trim_end).collect();
    assert!(lines.contains(&"got hello"), "{lines:?}");
    assert!(lines.contains(&"50 132"), "{lines:?}");
}

#[test]
fn a_console_size_applies_before_the_process_starts() {
    let mut spec = sh("stty size");
    spec.tty = true;
    spec.console_size = Some([33, 99]);
    let o = run(spec);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!(o.stdout.trim_end(), "33 99");
    // Without one, the agent's default.
    let mut spec = sh("stty size");
    spec.tty = true;
    assert_eq!(run(spec).stdout.trim_end(), "24 80");
}

#[test]
fn a_background_grandchild_does_not_hold_up_the_exit_frame() {
    let start = Instant::now();
    let o = run(sh("sleep 5 & echo hi; exit 4"));
    assert_eq!((o.code, o.stdout.as_str()), (4, "hi\n"));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn output_written_just_before_exit_is_not_lost() {
    // 4 MiB in one go, then exit: far more than a pipe holds when the process exits.
    let o = run(sh("head -c 4194304 /dev/zero | tr '\\0' x"));
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.len(), 4 << 20);
}

#[test]
fn an_init_process_keeps_running_after_the_host_disconnects() {
    let dir = TempDir::new("detach");
    let marker = dir.0.join("done");
    // Init mode, with a power-off that does nothing: the test process is not a VM.
    let agent = Agent::with_power_off(AgentConfig::new("/", Mode::Init), Box::new(|_, _| {}));
    let conn = connect(&agent);
    let script = format!(
        "i=0; while [ $i -lt 3000 ]; do echo line $i line $i line $i line $i line $i; i=$((i+1)); done; echo ok > {}",
        marker.display()
    );
    let mut spec = sh(&script);
    spec.init = true;
    let session = client::exec(conn, &spec).unwrap();
    drop(session);
    let start = Instant::now();
    while std::fs::read_to_string(&marker).unwrap_or_default() != "ok\n" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the process blocked on output nobody reads"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_exec_process_dies_with_its_host_connection() {
    let dir = TempDir::new("hangup");
    let marker = dir.0.join("late");
    let (agent, conn) = agent();
    let session = client::exec(
        conn,
        &sh(&format!("sleep 3; echo late > {}", marker.display())),
    )
    .unwrap();
    let pid = session.pid();
    // The host side goes away (an engine SIGKILLed the process standing for it).
    drop(session);
    let start = Instant::now();
    let mut other = connect(&agent);
    loop {
        match client::call(&mut other, &Request::Signal { pid, signal: 0 }).unwrap() {
            Response::Error { .. } => break,
            _ => assert!(
                start.elapsed() < Duration::from_secs(2),
                "pid {pid} still runs after its host left"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(4));
    assert!(!marker.exists(), "the process ran on after its host left");
}

#[test]
fn a_container_root_is_chrooted_with_path_and_users_resolved_inside() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: chroot needs root");
        return;
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("skipped: no static busybox to populate a root with");
        return;
    };
    let root = TempDir::new("root");
    for dir in ["bin", "only-here", "etc", "work"] {
        std::fs::create_dir_all(root.0.join(dir)).unwrap();
    }
    // A hard link where possible: a fresh copy could be briefly busy for exec.
    if std::fs::hard_link(&busybox, root.0.join("bin/busybox")).is_err() {
        std::fs::copy(&busybox, root.0.join("bin/busybox")).unwrap();
    }
    // `sh` is found only through PATH inside the new root.
    std::os::unix::fs::symlink("/bin/busybox", root.0.join("only-here/sh")).unwrap();
    std::fs::write(
        root.0.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/work:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.0.join("etc/group"), "app:x:1001:\nextra:x:2000:app\n").unwrap();

    let agent = Agent::new(AgentConfig::new(root.0.clone(), Mode::Daemon));
    let mut spec = ProcessSpec::new([
        "sh",
        "-c",
        "busybox id -u; busybox id -g; busybox id -G; pwd; busybox ls /",
    ]);
    spec.env = vec!["PATH=/only-here:/bin".into()];
    spec.cwd = "/work".into();
    spec.user.name = Some("app".into());
    let o = pump(client::exec(connect(&agent), &spec).unwrap(), None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(
        lines[..4],
        ["1000", "1001", "1001 2000", "/work"],
        "{o:?}",
        o = o.stdout
    );
    let mut listing: Vec<&str> = lines[4..].to_vec();
    listing.sort();
    assert_eq!(listing, ["bin", "etc", "only-here", "work"]);

    // The host's PATH entries do not exist in this root.
    let mut spec = ProcessSpec::new(["true"]);
    spec.env = vec!["PATH=/usr/bin".into()];
    assert!(matches!(
        client::exec(connect(&agent), &spec),
        Err(ExecError::ExecFailed { exit_code: 127, .. })
    ));
    // Names resolve against the root's /etc/passwd, not the host's.
    let mut spec = ProcessSpec::new(["sh", "-c", "true"]);
    spec.env = vec!["PATH=/only-here".into()];
    spec.user.name = Some("nobody".into());
    match client::exec(connect(&agent), &spec) {
        Err(ExecError::Rejected { message }) => {
            assert_eq!(message, "user nobody not found in /etc/passwd")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
}
