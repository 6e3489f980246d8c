//! forkvm's own network, the one `forkvm run` puts a VM on when no engine gives it one
//! (podman's default network, done the same way): a host bridge with the gateway
//! address, IPv4 forwarding, and NAT for what leaves the subnet. Each VM's TAP is a port
//! of the bridge (its VM process attaches it, see `forkvm_devices::virtio::net`), each
//! guest has an address leased from the subnet (`forkvm_registry::Leases`), and published
//! ports are relayed by [`crate::publish`].
//!
//! The bridge and address are made over netlink. The NAT and forwarding rules are
//! iptables rules, made with the `iptables` program as Docker and podman's CNI plugins
//! make theirs (whichever backend, legacy or nf_tables, the host's `iptables` speaks);
//! each is checked first (`-C`), so setting up again adds nothing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::{LinkBridge, LinkUnspec};

use crate::{in_netns, link_name, links, netlink, NetError};

/// forkvm's default network: a bridge and its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeNetwork {
    /// The bridge's name.
    pub bridge: String,
    /// The subnet the guests' addresses come from.
    pub subnet: forkvm_registry::Subnet,
    /// The host's address on the bridge: the guests' gateway.
    pub gateway: Ipv4Addr,
}

impl Default for BridgeNetwork {
    /// `forkvm0`, 10.77.0.0/16, gateway 10.77.0.1 (clear of Docker's 172.17-31 and
    /// podman's 10.88).
    fn default() -> Self {
        Self {
            bridge: "forkvm0".into(),
            subnet: forkvm_registry::Subnet {
                network: Ipv4Addr::new(10, 77, 0, 0),
                prefix: 16,
            },
            gateway: Ipv4Addr::new(10, 77, 0, 1),
        }
    }
}

impl BridgeNetwork {
    /// Makes the network ready in this process's namespace: the bridge up with the
    /// gateway address, forwarding on, NAT and forwarding rules in place. Safe to run
    /// again and from several processes at once.
    pub fn ensure(&self) -> Result<(), NetError> {
        let me = self.clone();
        in_netns(Path::new("/proc/self/ns/net"), move |handle| async move {
            let find = |links: &[rtnetlink::packet_route::link::LinkMessage]| {
                links
                    .iter()
                    .find(|l| link_name(l) == Some(me.bridge.as_str()))
                    .map(|l| (l.header.index, l.header.flags.contains(LinkFlags::Up)))
            };
            let found = find(&links(&handle).await?);
            let (index, up) = match found {
                Some(f) => f,
                None => {
                    let added = handle
                        .link()
                        .add(LinkBridge::new(&me.bridge).build())
                        .execute()
                        .await;
                    // Another process may have made it meanwhile.
                    if let Err(e) = added {
                        if find(&links(&handle).await?).is_none() {
                            return Err(NetError::Netlink {
                                what: format!("cannot make the bridge {}", me.bridge),
                                source: e,
                            });
                        }
                    }
                    find(&links(&handle).await?)
                        .ok_or_else(|| NetError::Vanished(me.bridge.clone()))?
                }
            };
            if !up {
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(netlink(format!("cannot bring up {}", me.bridge)))?;
            }
            let has_gateway = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect::<Vec<_>>()
                .await
                .map_err(netlink(format!("cannot list {}'s addresses", me.bridge)))?
                .iter()
                .any(|m| {
                    m.attributes
                        .iter()
                        .any(|a| matches!(a, AddressAttribute::Local(ip) if *ip == IpAddr::V4(me.gateway)))
                });
            if !has_gateway {
                let added = handle
                    .address()
                    .add(index, IpAddr::V4(me.gateway), me.subnet.prefix)
                    .execute()
                    .await;
                match added {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                    r => r.map_err(netlink(format!(
                        "cannot give {} the address {}/{}",
                        me.bridge, me.gateway, me.subnet.prefix
                    )))?,
                }
            }
            Ok(())
        })?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(|e| NetError::Host {
            what: "cannot turn on IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)".into(),
            detail: e.to_string(),
        })?;
        for rule in self.rules() {
            ensure_rule(&rule)?;
        }
        Ok(())
    }

    /// The iptables rules: NAT for what leaves the subnet through another interface,
    /// and forwarding to and from the bridge allowed ahead of other rules (Docker's
    /// FORWARD policy is DROP, and with `br_netfilter` even frames between two ports of
    /// the bridge pass FORWARD).
    fn rules(&self) -> Vec<Rule> {
        let subnet = self.subnet.to_string();
        let br = self.bridge.as_str();
        vec![
            Rule {
                table: "nat",
                chain: "POSTROUTING",
                spec: vec!["-s", &subnet, "!", "-o", br, "-j", "MASQUERADE"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                insert: false,
            },
            Rule {
                table: "filter",
                chain: "FORWARD",
                spec: ["-i", br, "-j", "ACCEPT"].map(String::from).to_vec(),
                insert: true,
            },
            Rule {
                table: "filter",
                chain: "FORWARD",
                spec: ["-o", br, "-j", "ACCEPT"].map(String::from).to_vec(),
                insert: true,
            },
        ]
    }
}

/// One iptables rule, appended or inserted first.
struct Rule {
    table: &'static str,
    chain: &'static str,
    spec: Vec<String>,
    insert: bool,
}

/// Adds `rule` unless `iptables -C` finds it.
fn ensure_rule(rule: &Rule) -> Result<(), NetError> {
    let run = |op: &str, position: Option<&str>| {
        let mut cmd = Command::new("iptables");
        cmd.args(["-w", "-t", rule.table, op, rule.chain]);
        cmd.args(position);
        cmd.args(&rule.spec);
        cmd.output()
    };
    let what = || {
        format!(
            "iptables -t {} {} {}",
            rule.table,
            rule.chain,
            rule.spec.join(" ")
        )
    };
    let checked = run("-C", None).map_err(|e| NetError::Host {
        what: format!("cannot run iptables for `{}`", what()),
        detail: format!("{e} (install iptables, or use --network none)"),
    })?;
    if checked.status.success() {
        return Ok(());
    }
    let added = if rule.insert {
        run("-I", Some("1"))
    } else {
        run("-A", None)
    }
    .map_err(|e| NetError::Host {
        what: format!("cannot run `{}`", what()),
        detail: e.to_string(),
    })?;
    if !added.status.success() {
        return Err(NetError::Host {
            what: format!("`{}` failed", what()),
            detail: String::from_utf8_lossy(&added.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_network_and_its_rules() {
        let n = BridgeNetwork::default();
        assert!(n.subnet.contains(n.gateway));
        let rules = n.rules();
        let nat = &rules[0];
        assert_eq!(
            (nat.table, nat.chain, nat.insert),
            ("nat", "POSTROUTING", false)
        );
        assert_eq!(
            nat.spec.join(" "),
            "-s 10.77.0.0/16 ! -o forkvm0 -j MASQUERADE"
        );
        assert!(rules[1..]
            .iter()
            .all(|r| r.table == "filter" && r.chain == "FORWARD" && r.insert));
    }
}
