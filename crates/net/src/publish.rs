//! Published ports (`forkvm run -p HOST:CONTAINER`): a TCP listener on the host port
//! relays each connection to the guest's address on forkvm's network, the way Docker's
//! userland proxy does. It serves loopback and outside clients alike and needs no NAT
//! rule; the guest sees connections come from the gateway, not from the client.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] relayed connections at a time (more are closed
//! at once), and [`CONNECT_TIMEOUT`] to reach the guest.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most connections one published port relays at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a relayed connection waits for the guest to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One `-p [IP:]HOST:CONTAINER[/tcp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// The host address listened on (all of them by default).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The guest's port.
    pub container_port: u16,
}

/// Why a `-p` value is refused.
#[derive(Debug, thiserror::Error)]
#[error("-p {spec:?}: {why}")]
pub struct BadPortSpec {
    spec: String,
    why: String,
}

impl std::str::FromStr for PortSpec {
    type Err = BadPortSpec;

    fn from_str(spec: &str) -> Result<Self, BadPortSpec> {
        let bad = |why: &str| BadPortSpec {
            spec: spec.to_owned(),
            why: why.to_owned(),
        };
        let (ports, proto) = match spec.rsplit_once('/') {
            Some((p, proto)) => (p, proto),
            None => (spec, "tcp"),
        };
        if proto != "tcp" {
            return Err(bad("only TCP ports are published (give PORT or PORT/tcp)"));
        }
        let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
        let port = |s: &str| -> Result<u16, BadPortSpec> {
            match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad(&format!("{s:?} is not a port (1-65535)"))),
            }
        };
        let (host_ip, host_port, container_port) = match parts.as_slice() {
            [c, h] => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), port(h)?, port(c)?),
            [c, h, ip] => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?;
                (ip, port(h)?, port(c)?)
            }
            _ => return Err(bad("expected [IP:]HOST_PORT:CONTAINER_PORT")),
        };
        Ok(Self {
            host_ip,
            host_port,
            container_port,
        })
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}->{}/tcp",
            SocketAddr::new(self.host_ip, self.host_port),
            self.container_port
        )
    }
}

/// A published port: its listener serves on a thread until the process ends.
#[derive(Debug)]
pub struct Published {
    /// What is published.
    pub spec: PortSpec,
}

/// Listens on `spec`'s host address and port and relays each connection to `guest` at
/// the container port. Fails at once when the port cannot be listened on.
pub fn publish(spec: PortSpec, guest: IpAddr) -> io::Result<Published> {
    let listener =
        TcpListener::bind(SocketAddr::new(spec.host_ip, spec.host_port)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot publish {}: {e}",
                    SocketAddr::new(spec.host_ip, spec.host_port)
                ),
            )
        })?;
    let target = SocketAddr::new(guest, spec.container_port);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(format!("publish-{}", spec.host_port))
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    tracing::warn!(port = spec.host_port, "too many connections; one refused");
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let active = active.clone();
                let spawned = std::thread::Builder::new()
                    .name("publish-conn".into())
                    .spawn(move || {
                        if let Err(e) = relay(client, target) {
                            tracing::debug!(%target, "relayed connection ended: {e}");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a relay thread; one connection refused");
                }
            }
        })?;
    Ok(Published { spec })
}

/// Copies both ways between `client` and a new connection to `target` until both
/// directions end.
fn relay(client: TcpStream, target: SocketAddr) -> io::Result<()> {
    let guest = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    forkvm_agent_proto::forward::splice(client, guest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;

    #[test]
    fn port_specs_parse_and_bad_ones_say_why() {
        let p: PortSpec = "18080:80".parse().unwrap();
        assert_eq!((p.host_port, p.container_port), (18080, 80));
        assert!(p.host_ip.is_unspecified());
        let p: PortSpec = "127.0.0.1:8080:80/tcp".parse().unwrap();
        assert_eq!(p.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(p.to_string(), "127.0.0.1:8080->80/tcp");
        let p: PortSpec = "[::1]:8080:80".parse().unwrap();
        assert!(p.host_ip.is_ipv6());
        for (bad, why) in [
            ("80", "expected"),
            ("8080:80/udp", "only TCP"),
            ("0:80", "not a port"),
            ("x:80", "not a port"),
            ("8080:99999", "not a port"),
            ("host:8080:80", "not an IP"),
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_published_port_relays_both_ways_and_a_taken_port_is_an_error() {
        let guest = TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_port = guest.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = guest.accept().unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
        });
        // Any free host port.
        let host_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec: PortSpec = format!("127.0.0.1:{host_port}:{guest_port}")
            .parse()
            .unwrap();
        let _p = publish(spec, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "PING");
        server.join().unwrap();
        let e = publish(spec, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("cannot publish 127.0.0.1:{host_port}")),
            "{e}"
        );
    }
}
