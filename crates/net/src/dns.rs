//! The host end of the guest's DNS relay ([`forkvm_agent_proto::dns`]): resolvers that
//! only a container's network namespace serves, such as Docker's embedded one at
//! `127.0.0.11` (a DNAT rule in the namespace to a socket dockerd holds there), are the
//! guest's own loopback inside the VM. The guest agent answers on that address and
//! relays each query here; [`Relay`] asks the resolver from a socket made inside the
//! namespace and hands back its answer.
//!
//! Guest-fed, so bounded: at most [`MAX_CONNECTIONS`] relay connections at a time,
//! one query in flight per connection, [`UPSTREAM_TIMEOUT`] per query, [`IDLE_TIMEOUT`]
//! per idle connection, and one log line for all the connections it refuses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_agent_proto::dns::{read_frame, write_frame, DNS_PORT, MAX_MESSAGE};

/// Most relay connections served at once (the agent makes one per address).
pub const MAX_CONNECTIONS: usize = 16;
/// How long one query waits for the resolver's answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends no query for this long is closed (the agent makes a new one
/// for its next query).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `nameserver` addresses of a `resolv.conf`, in order (malformed lines skipped).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .collect()
}

/// The loopback nameservers of a `resolv.conf`: those the guest cannot reach itself.
pub fn loopback_nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    nameservers(resolv_conf)
        .into_iter()
        .filter(IpAddr::is_loopback)
        .collect()
}

/// A relay listening on a Unix socket (the VM's `<vsock uds>_53`), asking `upstream`
/// inside a network namespace. It serves until the process ends; dropping it removes the
/// socket file.
pub struct Relay {
    path: PathBuf,
}

impl Relay {
    /// Listens on `socket` and serves each connection on a thread of its own, asking
    /// `upstream` (port 53) from sockets made in the namespace at `netns`.
    pub fn start(socket: &Path, netns: &Path, upstream: IpAddr) -> io::Result<Self> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let netns = netns.to_owned();
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("dns-relay".into())
            .spawn(move || {
                // A guest can knock again and again: what is refused is said once.
                let mut warned = false;
                let mut warn_once = |msg: String| {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!("DNS relay: {msg} (said once)");
                    }
                };
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                        warn_once(format!("more than {MAX_CONNECTIONS} connections refused"));
                        continue;
                    }
                    let upstream_socket = match socket_in(&netns, upstream) {
                        Ok(s) => s,
                        Err(e) => {
                            warn_once(format!("no socket in {}: {e}", netns.display()));
                            continue;
                        }
                    };
                    if conn.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let spawned = std::thread::Builder::new().name("dns-conn".into()).spawn({
                        let active = active.clone();
                        move || {
                            serve(conn, &upstream_socket, SocketAddr::new(upstream, DNS_PORT));
                            active.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })?;
        Ok(Self {
            path: socket.to_owned(),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A UDP socket made inside the namespace at `netns` (a socket belongs to the namespace
/// it was made in), of `upstream`'s family.
fn socket_in(netns: &Path, upstream: IpAddr) -> io::Result<UdpSocket> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        crate::join(&netns).map_err(io::Error::other)?;
        let any: IpAddr = match upstream {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        UdpSocket::bind(SocketAddr::new(any, 0))
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
}

/// Relays the queries of one connection until it closes.
fn serve(mut conn: UnixStream, socket: &UdpSocket, upstream: SocketAddr) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    while let Ok(query) = read_frame(&mut conn) {
        let answer = ask(socket, upstream, &query, &mut buf).unwrap_or_default();
        if write_frame(&mut conn, &answer).is_err() {
            break;
        }
    }
}

/// Sends `query` to `upstream` and waits (at most [`UPSTREAM_TIMEOUT`]) for the answer
/// with the query's id from it; `None` when none came.
fn ask(socket: &UdpSocket, upstream: SocketAddr, query: &[u8], buf: &mut [u8]) -> Option<Vec<u8>> {
    if query.len() < 2 {
        return None;
    }
    socket.send_to(query, upstream).ok()?;
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let (n, from) = socket.recv_from(buf).ok()?;
        // Only the resolver's answer to this query: a late answer to an earlier one,
        // or anything from elsewhere, is dropped.
        if from == upstream && n >= 2 && buf[..2] == query[..2] {
            return Some(buf[..n].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_nameservers_are_relayed() {
        let conf = "# Generated by Docker\nsearch example.org\nnameserver 127.0.0.11\n\
                    nameserver 10.0.0.2\nnameserver ::1\nnameserver bogus\noptions ndots:0\n";
        assert_eq!(
            loopback_nameservers(conf),
            vec![
                IpAddr::from(Ipv4Addr::new(127, 0, 0, 11)),
                IpAddr::from(Ipv6Addr::LOCALHOST)
            ]
        );
        assert!(loopback_nameservers("nameserver 8.8.8.8\n").is_empty());
        assert_eq!(
            nameservers(conf).len(),
            3,
            "every well-formed nameserver, in order"
        );
        assert_eq!(
            nameservers(conf)[1],
            IpAddr::from(Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    #[test]
    fn answers_come_back_by_query_id_and_silence_is_an_empty_answer() {
        // A resolver on this host's loopback that answers only queries starting "ok".
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = resolver.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = resolver.recv_from(&mut buf) {
                if buf[2..n].starts_with(b"ok") {
                    // A stale answer with another id first, then the real one.
                    resolver.send_to(b"\xff\xffstale", from).unwrap();
                    let mut a = buf[..n].to_vec();
                    a.extend_from_slice(b"+answer");
                    resolver.send_to(&a, from).unwrap();
                }
            }
        });
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        assert_eq!(
            ask(&socket, upstream, b"\x01\x02ok?", &mut buf).unwrap(),
            b"\x01\x02ok?+answer"
        );
        let started = Instant::now();
        assert!(ask(&socket, upstream, b"\x01\x03no", &mut buf).is_none());
        assert!(started.elapsed() >= UPSTREAM_TIMEOUT);
        assert!(
            ask(&socket, upstream, b"\x01", &mut buf).is_none(),
            "too short"
        );
    }

    #[test]
    fn a_connection_is_served_query_after_query() {
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = resolver.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = resolver.recv_from(&mut buf) {
                resolver.send_to(&buf[..n], from).unwrap();
            }
        });
        let (mut guest, host) = UnixStream::pair().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = std::thread::spawn(move || serve(host, &socket, upstream));
        for q in [&b"\x00\x01first"[..], b"\x00\x02second"] {
            write_frame(&mut guest, q).unwrap();
            assert_eq!(read_frame(&mut guest).unwrap(), q);
        }
        drop(guest);
        t.join().unwrap();
    }
}
