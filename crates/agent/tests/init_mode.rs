//! PID-1 mode's process rules in-process, with power-off recorded instead of done:
//! one init process, the VM ends after its exit frame, `shutdown` ends it too.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_agent::frame::Frame;
use forkvm_agent::server::{Agent, AgentConfig, Mode, PowerOffReason};
use forkvm_agent::{ProcessSpec, Request, Response};
use forkvm_agent_proto::client;

fn init_agent() -> (Arc<Agent>, mpsc::Receiver<PowerOffReason>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let agent = Agent::with_power_off(
        AgentConfig::new("/", Mode::Init),
        Box::new(move |_, reason| {
            let _ = tx.lock().unwrap().send(reason);
        }),
    );
    (agent, rx)
}

fn connect(agent: &Arc<Agent>) -> UnixStream {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = agent.clone();
    std::thread::spawn(move || agent.serve(guest));
    host
}

fn init_spec(script: &str) -> ProcessSpec {
    let mut spec = ProcessSpec::new(["sh", "-c", script]);
    spec.env = vec!["PATH=/usr/bin:/bin".into()];
    spec.init = true;
    spec
}

#[test]
fn the_vm_ends_once_the_init_process_exit_was_delivered() {
    let (agent, powered_off) = init_agent();
    let session = client::exec(connect(&agent), &init_spec("echo main; exit 5")).unwrap();
    let mut other = connect(&agent);
    match client::call(
        &mut other,
        &Request::Exec {
            process: init_spec("true"),
        },
    )
    .unwrap()
    {
        Response::Error { message } => assert_eq!(message, "an init process was already started"),
        resp => panic!("{resp:?}"),
    }
    let out = forkvm_test_support::Captured::default();
    // At most the kill of the other processes comes before the exit frame.
    match powered_off.try_recv() {
        Err(_) | Ok(PowerOffReason::InitEnding) => {}
        Ok(other) => panic!("{other:?} before the exit frame"),
    }
    let code = session
        .pump(None, Box::new(out.clone()), Box::new(std::io::sink()))
        .unwrap();
    assert_eq!(code, 5);
    assert_eq!(out.bytes(), b"main\n");
    // pump closed the connection: no need to wait out the linger.
    assert_eq!(
        after_init_ending(&powered_off, Duration::from_millis(900)),
        PowerOffReason::InitExited
    );
}

/// The next reason after [`PowerOffReason::InitEnding`] (which must come first, if it
/// was not taken already), waiting at most `timeout` for each.
fn after_init_ending(rx: &mpsc::Receiver<PowerOffReason>, timeout: Duration) -> PowerOffReason {
    match rx.recv_timeout(timeout).unwrap() {
        PowerOffReason::InitEnding => rx.recv_timeout(timeout).unwrap(),
        other => other,
    }
}

#[test]
fn a_host_that_keeps_the_connection_open_delays_power_off_by_at_most_a_second() {
    let (agent, powered_off) = init_agent();
    let mut conn = connect(&agent);
    let resp = client::call(
        &mut conn,
        &Request::Exec {
            process: init_spec("exit 0"),
        },
    )
    .unwrap();
    assert!(matches!(resp, Response::Started { .. }), "{resp:?}");
    let mut frames = Vec::new();
    loop {
        match Frame::read_from(&mut conn).unwrap() {
            Some(Frame::Exit(code)) => {
                frames.push(code);
                break;
            }
            Some(_) => {}
            None => panic!("no exit frame"),
        }
    }
    let exit_seen = Instant::now();
    assert_eq!(frames, [0]);
    // The agent closes its side after the exit frame.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(
        after_init_ending(&powered_off, Duration::from_secs(5)),
        PowerOffReason::InitExited
    );
    let waited = exit_seen.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    drop(conn);
}

#[test]
fn shutdown_is_answered_then_powers_off() {
    let (agent, powered_off) = init_agent();
    let mut conn = connect(&agent);
    assert_eq!(
        client::call(&mut conn, &Request::Shutdown).unwrap(),
        Response::Ok
    );
    assert_eq!(
        powered_off.recv_timeout(Duration::from_secs(5)).unwrap(),
        PowerOffReason::Shutdown
    );
}

#[test]
fn the_init_exit_kills_the_rest_before_its_output_is_drained() {
    let (agent, powered_off) = init_agent();
    let mut conn = connect(&agent);
    // A background writer that would keep the output busy forever.
    let resp = client::call(
        &mut conn,
        &Request::Exec {
            process: init_spec("(while :; do echo tick; sleep 0.05; done) & sleep 0.3; exit 3"),
        },
    )
    .unwrap();
    assert!(matches!(resp, Response::Started { .. }), "{resp:?}");
    // The recorder stands for the kill: once it is asked for, the writer is killed by
    // hand (the real one kills every process but the agent, which a test cannot).
    assert_eq!(
        powered_off.recv_timeout(Duration::from_secs(10)).unwrap(),
        PowerOffReason::InitEnding
    );
    // Not with pkill: the agent's reaper (in this process) may collect that child
    // before std waits for it (ECHILD).
    assert!(
        kill_matching("while :; do echo tick") > 0,
        "no writer to kill"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        assert!(Instant::now() < deadline, "no exit frame");
        match Frame::read_from(&mut conn).unwrap() {
            Some(Frame::Exit(code)) => break code,
            Some(_) => {}
            None => panic!("no exit frame"),
        }
    };
    assert_eq!(code, 3);
    assert_eq!(
        powered_off.recv_timeout(Duration::from_secs(5)).unwrap(),
        PowerOffReason::InitExited
    );
}

/// SIGKILLs every process whose command line contains `pattern`; how many.
fn kill_matching(pattern: &str) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(pattern) {
            // SAFETY: kill(2) of a process this test started (its command line says so).
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}
