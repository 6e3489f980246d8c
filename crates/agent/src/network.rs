//! [`crate::Request::Network`] inside the guest: each NIC takes the name, MTU and
//! addresses of the namespace interface whose MAC it has, comes up, and the routes are
//! added; [`crate::Request::Unplug`] takes the NICs down again (a fork child's). Done over rtnetlink (`netlink-packet-route` messages on a blocking
//! `netlink-sys` socket: the agent has no async runtime).

use std::net::IpAddr;

use forkvm_agent_proto::{NetInterface, NetRoute};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Most NICs and routes one request may carry (a guest has a handful).
const MAX_ITEMS: usize = 64;

/// Held by whatever changes NICs ([`apply`], [`unplug`], a fork's new MACs), which
/// requests on different connections can ask at once: a fork child's MAC change takes
/// its NIC down and back up, and must not undo an `unplug` that came meanwhile.
static LINKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`LINKS`] (a panic elsewhere while holding it leaves nothing half-locked).
pub(crate) fn links_lock() -> std::sync::MutexGuard<'static, ()> {
    LINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the network could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A value in the request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No NIC has the MAC the request names.
    #[error("no NIC has the MAC {0}")]
    NoNic(String),
    /// The kernel refused a step.
    #[error("{what}: {source}")]
    Kernel {
        /// The step.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn kernel(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Kernel { what, source }
}

/// `address/prefix`, checked.
fn parse_net(s: &str) -> Result<(IpAddr, u8), NetworkError> {
    let bad = || NetworkError::Invalid(format!("{s:?} is not address/prefix"));
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn family(addr: &IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// A blocking rtnetlink connection.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Self, NetworkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(kernel("netlink socket"))?;
        socket.bind_auto().map_err(kernel("netlink bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(kernel("netlink connect"))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, std::io::Error> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut bytes = vec![0; req.buffer_len()];
        req.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.seq)
    }

    /// The messages of one reply (a dump runs to its `Done`); a netlink error is an
    /// `io::Error` with its errno.
    fn replies(
        &mut self,
        seq: u32,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, std::io::Error> {
        let mut out = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "empty netlink message",
                    ));
                }
                at += len;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(std::io::Error::from_raw_os_error(-code.get())),
                        None => return Ok(out),
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends a change and waits for the kernel's acknowledgement.
    fn change(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), std::io::Error> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        self.replies(seq, false).map(drop)
    }

    /// A dump (`what` names it in errors): the replies `pick` keeps.
    fn dump<T>(
        &mut self,
        req: RouteNetlinkMessage,
        what: &str,
        pick: impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetworkError> {
        let seq = self
            .send(req, NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(kernel(what))?;
        Ok(self
            .replies(seq, true)
            .map_err(kernel(what))?
            .into_iter()
            .filter_map(pick)
            .collect())
    }

    fn links(&mut self) -> Result<Vec<LinkMessage>, NetworkError> {
        self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "listing NICs",
            |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            },
        )
    }

    /// The addresses of the NIC with index `index`.
    fn addresses(&mut self, index: u32) -> Result<Vec<AddressMessage>, NetworkError> {
        self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "listing addresses",
            |m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => Some(a),
                _ => None,
            },
        )
    }

    fn set_link(
        &mut self,
        index: u32,
        attrs: Vec<LinkAttribute>,
        up: Option<bool>,
    ) -> Result<(), std::io::Error> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        if let Some(up) = up {
            link.header.change_mask = LinkFlags::Up;
            if up {
                link.header.flags = LinkFlags::Up;
            }
        }
        link.attributes = attrs;
        self.change(RouteNetlinkMessage::SetLink(link), 0)
    }
}

/// Applies [`crate::Request::Unplug`]: every NIC but the loopback goes down (its
/// addresses stay). Returns their names.
pub fn unplug() -> Result<Vec<String>, NetworkError> {
    let _links = links_lock();
    let mut rtnl = Rtnl::open()?;
    let mut nics = Vec::new();
    for link in rtnl.links()? {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let name = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("#{}", link.header.index));
        rtnl.set_link(link.header.index, Vec::new(), Some(false))
            .map_err(kernel(format!("{name}: down")))?;
        nics.push(name);
    }
    Ok(nics)
}

/// Applies [`crate::Request::Network`].
pub fn apply(interfaces: &[NetInterface], routes: &[NetRoute]) -> Result<(), NetworkError> {
    if interfaces.len() > MAX_ITEMS || routes.len() > MAX_ITEMS {
        return Err(NetworkError::Invalid(format!(
            "at most {MAX_ITEMS} NICs and {MAX_ITEMS} routes"
        )));
    }
    let _links = links_lock();
    let mut rtnl = Rtnl::open()?;
    let links = rtnl.links()?;
    for iface in interfaces {
        let mac = crate::identity::parse_mac(&iface.mac)
            .map_err(|e| NetworkError::Invalid(e.to_string()))?;
        if iface.name.is_empty()
            || iface.name.len() >= libc::IFNAMSIZ
            || iface.name.contains(['/', '\0'])
        {
            return Err(NetworkError::Invalid(format!(
                "{:?} is not a NIC name",
                iface.name
            )));
        }
        let index = links
            .iter()
            .find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Address(b) if b.as_slice() == mac))
            })
            .map(|l| l.header.index)
            .ok_or_else(|| NetworkError::NoNic(iface.mac.clone()))?;
        let name = &iface.name;
        // A NIC is renamed only while down.
        rtnl.set_link(index, Vec::new(), Some(false))
            .map_err(kernel(format!("{name}: down")))?;
        rtnl.set_link(
            index,
            vec![
                LinkAttribute::IfName(name.clone()),
                LinkAttribute::Mtu(iface.mtu),
            ],
            None,
        )
        .map_err(kernel(format!("{name}: name and MTU {}", iface.mtu)))?;
        rtnl.set_link(index, Vec::new(), Some(true))
            .map_err(kernel(format!("{name}: up")))?;
        // The addresses it had go (a fork child's NIC has its parent's); its own IPv6
        // link-local one stays.
        for old in rtnl.addresses(index)? {
            let link_local = old.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(IpAddr::V6(v6)) if v6.segments()[0] & 0xffc0 == 0xfe80)
            });
            if !link_local {
                rtnl.change(RouteNetlinkMessage::DelAddress(old), 0)
                    .map_err(kernel(format!("{name}: removing an old address")))?;
            }
        }
        for a in &iface.addresses {
            let (addr, prefix) = parse_net(a)?;
            let mut msg = AddressMessage::default();
            msg.header.family = family(&addr);
            msg.header.prefix_len = prefix;
            msg.header.index = index;
            msg.attributes.push(AddressAttribute::Address(addr));
            if addr.is_ipv4() {
                msg.attributes.push(AddressAttribute::Local(addr));
            }
            rtnl.change(
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .map_err(kernel(format!("{name}: address {a}")))?;
        }
    }
    let links = rtnl.links()?;
    for r in routes {
        let index = links
            .iter()
            .find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if *n == r.interface))
            })
            .map(|l| l.header.index)
            .ok_or_else(|| {
                NetworkError::Invalid(format!("a route names no NIC {:?}", r.interface))
            })?;
        let destination = r.destination.as_deref().map(parse_net).transpose()?;
        let gateway: Option<IpAddr> = r
            .gateway
            .as_deref()
            .map(|g| {
                g.parse()
                    .map_err(|_| NetworkError::Invalid(format!("{g:?} is not a gateway address")))
            })
            .transpose()?;
        let fam = destination
            .map(|(a, _)| family(&a))
            .or(gateway.as_ref().map(family))
            .ok_or_else(|| {
                NetworkError::Invalid("a route with neither destination nor gateway".into())
            })?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = fam;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some((addr, prefix)) = destination {
            msg.header.destination_prefix_length = prefix;
            msg.attributes
                .push(RouteAttribute::Destination(route_address(addr)));
        }
        if let Some(g) = gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(g)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        let what = format!(
            "route {} via {} dev {}",
            r.destination.as_deref().unwrap_or("default"),
            r.gateway.as_deref().unwrap_or("-"),
            r.interface
        );
        rtnl.change(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(kernel(what))?;
    }
    Ok(())
}

/// Most nameservers a `resolv.conf` is given (the C library reads three).
const MAX_NAMESERVERS: usize = 8;

/// The text of a `resolv.conf` naming `nameservers`, each checked to be an address.
pub fn resolv_conf(nameservers: &[String]) -> Result<String, NetworkError> {
    if nameservers.len() > MAX_NAMESERVERS {
        return Err(NetworkError::Invalid(format!(
            "at most {MAX_NAMESERVERS} nameservers"
        )));
    }
    let mut out = String::from("# written by forkvm\n");
    for ns in nameservers {
        let ip: IpAddr = ns
            .parse()
            .map_err(|_| NetworkError::Invalid(format!("nameserver {ns:?} is not an address")))?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    Ok(out)
}

/// Makes `<root>/etc/resolv.conf` name `nameservers` (a symlink there is replaced, not
/// followed).
pub fn write_resolv_conf(
    root: &std::path::Path,
    nameservers: &[String],
) -> Result<(), NetworkError> {
    let text = resolv_conf(nameservers)?;
    // Inside the root as the container sees it, never through a symlink.
    crate::container::with_writable_root(root, |root| {
        crate::container::replace_in_root(root, "/etc/resolv.conf", text.as_bytes())
    })
    .map_err(kernel("writing /etc/resolv.conf"))
}

#[cfg(test)]
mod resolv_tests {
    use super::*;

    #[test]
    fn resolv_conf_names_checked_nameservers() {
        let text = resolv_conf(&["10.77.0.1".into(), "fd00::1".into()]).unwrap();
        assert!(
            text.contains("nameserver 10.77.0.1\nnameserver fd00::1\n"),
            "{text}"
        );
        assert!(resolv_conf(&["10.0.0.1\nsearch evil".into()]).is_err());
        assert!(resolv_conf(&vec!["1.1.1.1".to_owned(); 9]).is_err());
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", tmp.path().join("etc/resolv.conf")).unwrap();
        write_resolv_conf(tmp.path(), &["10.77.0.1".into()]).unwrap();
        let written = tmp.path().join("etc/resolv.conf");
        assert!(!written.is_symlink());
        assert!(std::fs::read_to_string(written)
            .unwrap()
            .contains("10.77.0.1"));
    }
}
