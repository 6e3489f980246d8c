//! `forkvm run`'s network: by default the VM is on forkvm's own bridge network (the way
//! `podman run` puts a container on podman's), with an address leased for as long as
//! this process runs, NAT to the outside, the host's nameservers, and `-p` ports relayed
//! to it; `--network none` gives it only its loopback.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::Request;
use forkvm_net::bridge::BridgeNetwork;
use forkvm_net::publish::{self, PortSpec, Published};
use forkvm_registry::{Lease, Leases, ProcessIdentity};
use forkvm_vmm::config::{GuestIp, NetConfig};

/// What `--network` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// forkvm's bridge network (the default).
    Bridge,
    /// No network: only the guest's loopback.
    None,
}

impl Mode {
    /// Parses `--network`: `bridge` (or forkvm's network's name), `none`; not given,
    /// `bridge` for root (making a bridge and TAPs takes `CAP_NET_ADMIN`), else `none`.
    pub fn parse(s: Option<&str>, ports: &[String]) -> Result<Self> {
        let s = s.unwrap_or_else(|| {
            // SAFETY: geteuid(2) takes no arguments and cannot fail.
            if unsafe { libc::geteuid() } == 0 || !ports.is_empty() {
                "bridge"
            } else {
                "none"
            }
        });
        let mode = match s {
            "bridge" | "forkvm" => Mode::Bridge,
            "none" => Mode::None,
            "host" => bail!(
                "--network host: a VM has its own kernel and cannot share the host's network \
                 stack (use the default network with -p to publish ports)"
            ),
            other => bail!("--network {other:?}: expected bridge or none"),
        };
        if mode == Mode::None && !ports.is_empty() {
            bail!("-p publishes nothing with --network none");
        }
        Ok(mode)
    }
}

/// The network of a VM about to boot: its NIC, its lease, what its guest must take, and
/// the published ports (relayed while this process runs).
pub struct RunNetwork {
    /// The VM's NIC.
    pub nic: NetConfig,
    lease: Option<Lease>,
    network: Request,
    dns_relay: Option<(IpAddr, forkvm_net::dns::Relay)>,
    _published: Vec<Published>,
}

impl RunNetwork {
    /// Sets forkvm's network up (when it is not yet), leases an address (held by this
    /// process) and publishes `ports` to it; the VM's TAP is `tap` and its vsock socket
    /// `uds` (for the DNS relay). On failure nothing is left held.
    pub fn up(tap: String, uds: &Path, ports: &[String]) -> Result<Self> {
        let ports: Vec<PortSpec> = ports
            .iter()
            .map(|p| p.parse().map_err(anyhow::Error::new))
            .collect::<Result<_>>()?;
        let net = BridgeNetwork::default();
        net.ensure()
            .context("cannot set up forkvm's network (--network none runs without one)")?;
        let lease = Leases::of_bridge(&net.bridge, net.subnet, net.gateway)
            .acquire(ProcessIdentity::current())
            .context("cannot lease an address on forkvm's network")?;
        let guest_ip = GuestIp {
            address: format!("{}/{}", lease.addr, net.subnet.prefix),
            gateway: net.gateway.to_string(),
        };
        let made = (|| {
            let mac = forkvm_vmm::config::random_mac().context("cannot make a MAC")?;
            let published = ports
                .iter()
                .map(|p| publish::publish(*p, IpAddr::V4(lease.addr)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let nameservers = host_nameservers();
            // A loopback resolver (systemd-resolved's 127.0.0.53) is this host's own: the
            // guest's agent answers on that address and relays to it from here.
            let dns_relay = match nameservers.iter().find(|ip| ip.is_loopback()) {
                Some(&upstream) => Some((
                    upstream,
                    forkvm_net::dns::Relay::start(
                        &forkvm_oci::vm::dns_relay_socket(uds),
                        Path::new("/proc/self/ns/net"),
                        upstream,
                    )
                    .context("cannot start the DNS relay")?,
                )),
                None => None,
            };
            let network = forkvm_vmm::bridged::network_request(
                0,
                &mac,
                &guest_ip,
                nameservers.iter().map(ToString::to_string).collect(),
            );
            let nic = NetConfig {
                tap,
                mac: Some(mac),
                bridge: Some(net.bridge.clone()),
                guest_ip: Some(guest_ip),
            };
            Ok::<_, anyhow::Error>((nic, network, dns_relay, published))
        })();
        match made {
            Ok((nic, network, dns_relay, published)) => Ok(Self {
                nic,
                lease: Some(lease),
                network,
                dns_relay,
                _published: published,
            }),
            Err(e) => {
                lease.release();
                Err(e)
            }
        }
    }

    /// The guest's address, `address/prefix`.
    pub fn address(&self) -> &str {
        self.nic
            .guest_ip
            .as_ref()
            .map_or("", |ip| ip.address.as_str())
    }

    /// The agent requests that make the guest take its network (and relay DNS).
    pub fn guest_requests(&self) -> [(&'static str, Option<Request>); 2] {
        [
            ("its network", Some(self.network.clone())),
            (
                "its DNS relay",
                self.dns_relay.as_ref().map(|(ip, _)| Request::DnsRelay {
                    addresses: vec![ip.to_string()],
                }),
            ),
        ]
    }
}

impl Drop for RunNetwork {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

/// The nameservers of the host's `/etc/resolv.conf` (read up to 64 KiB; none if it
/// cannot be read: the guest keeps the image's).
fn host_nameservers() -> Vec<IpAddr> {
    let mut text = String::new();
    let read = std::fs::File::open("/etc/resolv.conf")
        .and_then(|f| f.take(64 * 1024).read_to_string(&mut text));
    if let Err(e) = read {
        tracing::warn!("cannot read /etc/resolv.conf: {e}");
        return Vec::new();
    }
    // The C library reads three.
    forkvm_net::dns::nameservers(&text)
        .into_iter()
        .take(3)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes() {
        assert_eq!(Mode::parse(Some("bridge"), &[]).unwrap(), Mode::Bridge);
        assert_eq!(Mode::parse(Some("none"), &[]).unwrap(), Mode::None);
        let e = Mode::parse(Some("host"), &[]).unwrap_err().to_string();
        assert!(e.contains("cannot share the host's network"), "{e}");
        let e = Mode::parse(Some("none"), &["80:80".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("-p publishes nothing"), "{e}");
        assert!(Mode::parse(Some("weird"), &[]).is_err());
    }
}
