//! The host client's vsock handshake and retries against a stand-in for the VMM's
//! vsock Unix socket (`CONNECT <port>\n` → `OK <port>\n`, then the agent).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_agent::server::{Agent, AgentConfig, Mode};
use forkvm_agent::{ProcessSpec, Request, Response, AGENT_PORT};
use forkvm_agent_proto::client;

fn socket_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("forkvm-agent-{tag}-{}.vsock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Serves `uds` like the VMM's vsock device: `answer` decides the handshake reply for
/// the n-th connection (`None`: hang up), after an OK the agent serves the stream.
fn fake_vsock(uds: &Path, answer: impl Fn(usize) -> Option<&'static str> + Send + 'static) {
    let listener = UnixListener::bind(uds).unwrap();
    let agent = Agent::new(AgentConfig::new("/", Mode::Daemon));
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            assert_eq!(line, format!("CONNECT {AGENT_PORT}\n"));
            match answer(n) {
                None => drop(conn),
                Some(reply) => {
                    (&conn).write_all(reply.as_bytes()).unwrap();
                    if reply.starts_with("OK ") {
                        let agent = agent.clone();
                        std::thread::spawn(move || agent.serve(conn));
                    }
                }
            }
        }
    });
}

#[test]
fn wait_for_agent_retries_until_the_agent_answers() {
    let uds = socket_path("wait");
    let late = uds.clone();
    // Nothing listens for 300 ms, then two refused handshakes, then the agent.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        fake_vsock(&late, |n| match n {
            0 => None,
            1 => Some("FAILED\n"),
            _ => Some("OK 1073741824\n"),
        });
    });
    let start = Instant::now();
    let mut conn = client::wait_for_agent(&uds, start + Duration::from_secs(10)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    // The returned connection is ready for the next request.
    assert!(matches!(
        client::call(&mut conn, &Request::Ping).unwrap(),
        Response::Pong { .. }
    ));
    let session = client::exec(conn, &ProcessSpec::new(["true"])).unwrap();
    assert_eq!(
        session
            .pump(None, Box::new(std::io::sink()), Box::new(std::io::sink()))
            .unwrap(),
        0
    );
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn a_refused_handshake_is_an_error_and_the_deadline_holds() {
    let uds = socket_path("refused");
    fake_vsock(&uds, |_| Some("NO\n"));
    let e = client::connect_vsock(&uds, AGENT_PORT, Duration::from_secs(2)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(e.to_string().contains("did not accept"), "{e}");

    let start = Instant::now();
    let e = client::wait_for_agent(&uds, start + Duration::from_millis(300)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(2));
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn connect_vsock_times_out_on_a_silent_device() {
    let uds = socket_path("silent");
    let listener = UnixListener::bind(&uds).unwrap();
    let hold = std::thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        drop(c);
    });
    let start = Instant::now();
    assert!(client::connect_vsock(&uds, AGENT_PORT, Duration::from_millis(200)).is_err());
    assert!(start.elapsed() < Duration::from_millis(700));
    hold.join().unwrap();
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn a_forward_carries_a_tcp_connection_and_a_closed_port_is_an_error_by_name() {
    let uds = socket_path("forward");
    fake_vsock(&uds, |_| Some("OK 1073741824\n"));
    // A server on the loopback (the guest's, here the test's): it answers what it read,
    // uppercased, once the client half-closed.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut got).unwrap();
        s.write_all(&got.to_ascii_uppercase()).unwrap();
    });
    let mut conn = forkvm_agent_proto::forward::connect(&uds, port, Duration::from_secs(5))
        .expect("forwarded connection");
    conn.write_all(b"through the agent").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).unwrap();
    assert_eq!(answer, "THROUGH THE AGENT");

    // A port nobody listens on: refused, naming the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = forkvm_agent_proto::forward::connect(&uds, closed, Duration::from_secs(5))
        .expect_err("nothing listens there");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{closed}")),
        "{e}"
    );
    let _ = std::fs::remove_file(&uds);
}
