//! NICs on forkvm's own network (a [`NetConfig`] with a `bridge`): what the guest is told
//! to take, and how a fork child gets an address of its own.
//!
//! A booted VM's TAP joins the bridge when its device is built, and its launcher
//! (`forkvm run`) leases its address and sends [`network_request`]. A fork child's TAP
//! does not join at restore: its guest still has its parent's MAC and address. Once the
//! guest agent has taken the child's identity (new MACs), [`take_own_addresses`] leases
//! an address per bridged NIC (held by this VM process, so it is free again when the
//! process ends), has the agent replace the parent's address with it, and only then puts
//! the TAP on the bridge: a child never shows up on the network as its parent.

use std::net::Ipv4Addr;
use std::path::Path;

use forkvm_agent_proto::{NetInterface, NetRoute, Request, Response};
use forkvm_devices::virtio::net::{format_mac, GuestIp, NetConfig};
use forkvm_registry::{Leases, ProcessIdentity, Subnet};

/// The MTU of a NIC on forkvm's bridge (the bridge's own).
pub const BRIDGE_MTU: u32 = 1500;

/// The guest's name for NIC number `index` (the order the devices are attached in).
pub fn nic_name(index: usize) -> String {
    format!("eth{index}")
}

/// `address/prefix` of a [`GuestIp`], parsed.
pub fn parse_guest_ip(ip: &GuestIp) -> Result<(Ipv4Addr, u8, Ipv4Addr), String> {
    let bad = || {
        format!(
            "{:?} via {:?} is not an IPv4 address/prefix and gateway",
            ip.address, ip.gateway
        )
    };
    let (addr, prefix) = ip.address.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let gateway: Ipv4Addr = ip.gateway.parse().map_err(|_| bad())?;
    Ok((addr, prefix, gateway))
}

/// The agent request that gives NIC `index` (MAC `mac`) the address `ip` with a default
/// route through its gateway, and the container `nameservers` (none: left as they are).
pub fn network_request(
    index: usize,
    mac: &[u8; 6],
    ip: &GuestIp,
    nameservers: Vec<String>,
) -> Request {
    Request::Network {
        interfaces: vec![NetInterface {
            mac: format_mac(mac),
            name: nic_name(index),
            mtu: BRIDGE_MTU,
            addresses: vec![ip.address.clone()],
        }],
        routes: vec![NetRoute {
            destination: None,
            gateway: Some(ip.gateway.clone()),
            interface: nic_name(index),
        }],
        nameservers,
    }
}

/// For each NIC of `nets` on a bridge (with the MAC the child took, `macs`): leases an
/// address on the bridge's network, has the agent behind `uds` take it, and puts the TAP
/// on the bridge. Returns the addresses taken, as `address/prefix`.
pub(crate) fn take_own_addresses(
    nets: &[NetConfig],
    macs: &[[u8; 6]],
    uds: &Path,
) -> Result<Vec<String>, String> {
    let mut taken = Vec::new();
    for (i, net) in nets.iter().enumerate() {
        let (Some(bridge), Some(ip)) = (&net.bridge, &net.guest_ip) else {
            continue;
        };
        let mac = macs
            .get(i)
            .ok_or_else(|| format!("NIC {i} has no MAC of its own"))?;
        let (parent_addr, prefix, gateway) = parse_guest_ip(ip)?;
        let subnet = Subnet::of(parent_addr, prefix).map_err(|e| e.to_string())?;
        let lease = Leases::of_bridge(bridge, subnet, gateway)
            .acquire(ProcessIdentity::current())
            .map_err(|e| format!("no address for {}: {e}", nic_name(i)))?;
        let own = GuestIp {
            address: format!("{}/{prefix}", lease.addr),
            gateway: ip.gateway.clone(),
        };
        match crate::fork::agent_call(uds, &network_request(i, mac, &own, Vec::new()))? {
            Response::Ok => {}
            other => return Err(format!("the agent answered {other:?} for {}", own.address)),
        }
        // The one call of a running child that needs a capability: raised for it alone.
        forkvm_jail::caps::with_raised(forkvm_jail::caps::Capability::CAP_NET_ADMIN, || {
            forkvm_devices::virtio::net::attach_to_bridge(&net.tap, bridge)
        })
        .map_err(|e| format!("cannot put {} on {bridge}: {e}", net.tap))?;
        taken.push(own.address);
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_replaces_the_address_and_routes_by_the_gateway() {
        let ip = GuestIp {
            address: "10.77.0.9/16".into(),
            gateway: "10.77.0.1".into(),
        };
        assert_eq!(
            parse_guest_ip(&ip).unwrap(),
            (Ipv4Addr::new(10, 77, 0, 9), 16, Ipv4Addr::new(10, 77, 0, 1))
        );
        let Request::Network {
            interfaces,
            routes,
            nameservers,
        } = network_request(1, &[2, 0, 0, 0, 0, 7], &ip, vec!["10.77.0.1".into()])
        else {
            panic!("not a network request")
        };
        assert_eq!(interfaces[0].name, "eth1");
        assert_eq!(interfaces[0].mac, "02:00:00:00:00:07");
        assert_eq!(interfaces[0].addresses, ["10.77.0.9/16"]);
        assert_eq!(routes[0].gateway.as_deref(), Some("10.77.0.1"));
        assert_eq!(routes[0].destination, None);
        assert_eq!(nameservers, ["10.77.0.1"]);
        let bad = GuestIp {
            address: "10.77.0.9".into(),
            gateway: "10.77.0.1".into(),
        };
        assert!(parse_guest_ip(&bad).is_err());
    }
}
