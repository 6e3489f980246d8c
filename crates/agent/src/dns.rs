//! [`forkvm_agent_proto::Request::DnsRelay`] inside the guest: answers DNS on loopback
//! addresses that only the container's network namespace serves (Docker's `127.0.0.11`)
//! by relaying each query to the host over vsock, where the container's monitor asks
//! the resolver in that namespace (framing: [`forkvm_agent_proto::dns`]).
//!
//! One thread per address takes one query at a time: a container's resolver library
//! asks few and retries on its own, and a relay that is slow or gone delays only DNS.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use forkvm_agent_proto::dns::{read_frame, write_frame, DNS_PORT, DNS_RELAY_PORT, MAX_MESSAGE};

/// Most addresses one request may name.
pub const MAX_ADDRESSES: usize = 8;
/// How long the relay waits for the host's answer to one query (the host waits 5 s for
/// the resolver; clients retry after about as long).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(6);

/// Binds UDP port 53 on each of `addresses` and starts relaying; an address that is not
/// loopback, or cannot be bound, is an error naming it (nothing is started then).
pub fn start(addresses: &[String]) -> Result<(), String> {
    if addresses.len() > MAX_ADDRESSES {
        return Err(format!(
            "at most {MAX_ADDRESSES} DNS relay addresses, got {}",
            addresses.len()
        ));
    }
    let mut sockets = Vec::new();
    for a in addresses {
        let ip: IpAddr = a
            .parse()
            .map_err(|_| format!("DNS relay address {a:?} is not an IP address"))?;
        if !ip.is_loopback() {
            return Err(format!("DNS relay address {ip} is not a loopback address"));
        }
        let socket = UdpSocket::bind(SocketAddr::new(ip, DNS_PORT))
            .map_err(|e| format!("DNS relay: cannot bind {ip}:{DNS_PORT}: {e}"))?;
        sockets.push(socket);
    }
    for socket in sockets {
        std::thread::Builder::new()
            .name("dns-relay".into())
            .spawn(move || serve(socket, connect_host))
            .map_err(|e| format!("DNS relay: cannot start its thread: {e}"))?;
    }
    Ok(())
}

/// Answers queries on `socket` forever, relaying each over a connection `connect` makes
/// (again after one fails).
fn serve(socket: UdpSocket, connect: fn() -> io::Result<UnixStream>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut host: Option<UnixStream> = None;
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(answer) = relay(&mut host, connect, &buf[..n]) {
            let _ = socket.send_to(&answer, client);
        }
    }
}

/// One query through `host` (made or re-made with `connect`): the answer, or `None`
/// when there is none to give (the client retries).
fn relay(
    host: &mut Option<UnixStream>,
    connect: fn() -> io::Result<UnixStream>,
    query: &[u8],
) -> Option<Vec<u8>> {
    // A connection that broke since the last query is re-made once.
    for _ in 0..2 {
        let conn = match host {
            Some(c) => c,
            None => host.insert(connect().ok()?),
        };
        match write_frame(conn, query).and_then(|()| read_frame(conn)) {
            Ok(answer) if answer.is_empty() => return None,
            Ok(answer) => return Some(answer),
            Err(_) => *host = None,
        }
    }
    None
}

/// A vsock stream to the host's relay port, with a deadline on every answer.
fn connect_host() -> io::Result<UnixStream> {
    let (sock, addr) = crate::server::vsock_socket(libc::VMADDR_CID_HOST, DNS_RELAY_PORT)?;
    // SAFETY: `addr` is a valid sockaddr_vm of the size we pass, `sock` a socket we own.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // A connected vsock stream reads and writes like any stream socket.
    let stream = UnixStream::from(sock);
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_loopback_and_few() {
        let e = start(&["10.0.0.1".into()]).unwrap_err();
        assert_eq!(e, "DNS relay address 10.0.0.1 is not a loopback address");
        let e = start(&["not-an-ip".into()]).unwrap_err();
        assert!(e.contains("\"not-an-ip\" is not an IP address"), "{e}");
        let many = vec!["127.0.0.11".to_string(); MAX_ADDRESSES + 1];
        assert!(start(&many).unwrap_err().contains("at most 8"));
    }

    thread_local! {
        static PEER: std::cell::RefCell<Option<UnixStream>> = const { std::cell::RefCell::new(None) };
    }

    /// Hands out the stream the test parked.
    fn parked() -> io::Result<UnixStream> {
        PEER.with(|p| p.borrow_mut().take())
            .ok_or_else(|| io::Error::other("no host"))
    }

    #[test]
    fn a_query_is_relayed_and_a_broken_connection_remade() {
        // A host that answers one query, then hangs up.
        let serve_one = || {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let t = std::thread::spawn(move || {
                let mut theirs = theirs;
                let q = read_frame(&mut theirs).unwrap();
                let mut a = q.clone();
                a.extend_from_slice(b"-answer");
                write_frame(&mut theirs, &a).unwrap();
            });
            (ours, t)
        };
        let mut host = None;
        let (ours, t) = serve_one();
        PEER.with(|p| *p.borrow_mut() = Some(ours));
        assert_eq!(relay(&mut host, parked, b"q1").unwrap(), b"q1-answer");
        t.join().unwrap();
        // The first host is gone: the relay connects again and still answers.
        let (ours, t) = serve_one();
        PEER.with(|p| *p.borrow_mut() = Some(ours));
        assert_eq!(relay(&mut host, parked, b"q2").unwrap(), b"q2-answer");
        t.join().unwrap();
        // No host at all: no answer, the client retries.
        assert!(relay(&mut host, parked, b"q3").is_none());
    }

    #[test]
    fn an_empty_answer_means_none() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            read_frame(&mut theirs).unwrap();
            write_frame(&mut theirs, b"").unwrap();
        });
        let mut host = Some(ours);
        assert!(relay(&mut host, parked, b"q").is_none());
        t.join().unwrap();
    }
}
