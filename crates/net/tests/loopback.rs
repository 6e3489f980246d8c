//! The loopback relay in a real network namespace: every TCP connection to 127.0.0.1
//! there, whatever its port, reaches the dialer with that port, and carries bytes both
//! ways; the namespace the relay is not in keeps its own loopback. Needs root (a
//! namespace, a BPF program), as the runtime does.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

use forkvm_net::loopback::LoopbackRelay;
use forkvm_test_support::netns::Netns;

/// A stand-in for the guest: each dialled port gets a stream whose far end says which
/// port it is and then answers what it read, uppercased, once the client half-closed.
fn guest(port: u16) -> std::io::Result<UnixStream> {
    let (near, mut far) = UnixStream::pair()?;
    std::thread::spawn(move || {
        far.write_all(format!("port {port}\n").as_bytes()).unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).unwrap();
        far.write_all(&got.to_ascii_uppercase()).unwrap();
    });
    Ok(near)
}

fn ask(port: u16, what: &str) -> String {
    try_ask(port, what).expect("an answer")
}

fn try_ask(port: u16, what: &str) -> std::io::Result<String> {
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    conn.write_all(what.as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn every_loopback_port_of_the_namespace_reaches_the_dialer() {
    let ns = Netns::new(&format!("fkvm-test-{}-lo", std::process::id()));
    ns.ip(&["link", "set", "lo", "up"]);
    let relay = ns.run(|| LoopbackRelay::start(Box::new(guest)).expect("the relay starts"));
    let answers = ns.run(|| {
        (
            ask(8080, "hello"),
            ask(9, "second port"),
            ask(8080, "again"),
        )
    });
    assert_eq!(answers.0, "port 8080\nHELLO");
    assert_eq!(answers.1, "port 9\nSECOND PORT");
    assert_eq!(answers.2, "port 8080\nAGAIN");

    // Outside the namespace nothing is steered: a port nobody listens on there is
    // refused.
    let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = TcpStream::connect((Ipv4Addr::LOCALHOST, free)).expect_err("nothing listens");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

    // A dialer that fails resets the client's connection (the nearest an accepted
    // connection comes to "refused"): its write or its read fails.
    let ns2 = Netns::new(&format!("fkvm-test-{}-lo2", std::process::id()));
    ns2.ip(&["link", "set", "lo", "up"]);
    let refusing = ns2.run(|| {
        LoopbackRelay::start(Box::new(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no guest",
            ))
        }))
        .expect("the relay starts")
    });
    let e = ns2
        .run(|| try_ask(8080, "anyone?"))
        .expect_err("a reset, not an answer");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{e}"
    );
    drop((relay, refusing));
}
