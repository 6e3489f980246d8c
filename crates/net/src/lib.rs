//! Joins a VM to a network namespace: the host side of a container VM's network.
//!
//! A container engine hands its runtime a network namespace with interfaces in it (the
//! container's end of a veth pair from Docker, podman/netavark or a CNI plugin), their
//! addresses and routes set. A VM cannot use those interfaces itself. For each one,
//! [`plumb`] creates a TAP in the same namespace, gives it the interface's MTU, and ties
//! the two together with traffic-control redirects in both directions (an ingress qdisc
//! on each, and a `u32` filter that matches every frame with a `mirred egress redirect`
//! to the other: the model Kata Containers calls tcfilter). Every frame that reaches the
//! interface leaves through the TAP to the guest, and every frame the guest sends leaves
//! through the interface. The guest's NIC takes the interface's MAC, and the guest its
//! addresses and routes ([`Network`]), so what the engine shows (`docker inspect`) is what
//! the VM has.
//!
//! Everything is done over netlink (`rtnetlink`), from a thread that has joined the
//! namespace; the TAP is made persistent so that the VM process, which joins the same
//! namespace, opens it by name. A failure half-way removes what was made.
//!
//! [`dns`] relays the guest's DNS queries for resolvers only the namespace serves
//! (Docker's `127.0.0.11`). [`loopback`] carries a pod's port-forwards, dialled on the
//! namespace's loopback, to the guest's. [`bridge`] is forkvm's own network for VMs no engine puts on
//! one (`forkvm run`), and [`publish`] relays its published ports.

pub mod bridge;
pub mod dns;
pub mod loopback;
pub mod publish;

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use forkvm_devices::virtio::net::format_mac;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

/// Prefix of the TAPs forkvm makes in a namespace (never taken for a container's own).
pub const TAP_PREFIX: &str = "fktap";

/// `ETH_P_ALL` in the byte order a traffic-control filter's protocol is given in.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// Why a namespace could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace path cannot be opened.
    #[error("cannot open the network namespace {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a network namespace.
    #[error("{path} is not a network namespace")]
    NotNetns {
        /// The path.
        path: PathBuf,
        /// What `setns` said.
        #[source]
        source: std::io::Error,
    },
    /// A thread or a runtime for netlink could not be started.
    #[error("cannot start the netlink worker")]
    Worker(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("{what}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The TAP could not be made.
    #[error("cannot make the TAP {name}")]
    Tap {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An interface went away while it was being tied to its TAP.
    #[error("the interface {0} vanished from the namespace")]
    Vanished(String),
    /// A host setting or program failed.
    #[error("{what}: {detail}")]
    Host {
        /// What was done.
        what: String,
        /// What went wrong.
        detail: String,
    },
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// An address with its prefix length, e.g. `172.17.0.2/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One interface of the namespace, as the guest takes it over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name in the namespace (the guest names its NIC the same).
    pub name: String,
    /// Its index in the namespace.
    pub index: u32,
    /// Its MAC, which the guest NIC takes.
    pub mac: [u8; 6],
    /// Its MTU, which the TAP and the guest NIC take.
    pub mtu: u32,
    /// Its addresses (link-local IPv6 ones aside: the guest makes its own).
    pub addresses: Vec<IpNet>,
    /// The TAP tied to it, which the VM opens.
    pub tap: String,
}

/// A route of the namespace through one of its interfaces (the routes the kernel makes
/// for an address aside: the guest's kernel makes them too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The destination; `None` for a default route.
    pub destination: Option<IpNet>,
    /// The gateway, if any.
    pub gateway: Option<IpAddr>,
    /// The interface it leaves through.
    pub interface: String,
}

/// What a VM joined to a namespace must take over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The interfaces, each tied to its TAP.
    pub interfaces: Vec<Interface>,
    /// Their routes.
    pub routes: Vec<Route>,
}

/// Moves the calling thread into the network namespace at `netns`; threads it starts
/// afterwards are in it too (this crate's netlink and DNS relay threads work there).
pub fn join(netns: &Path) -> Result<(), NetError> {
    let ns = File::open(netns).map_err(|source| NetError::Open {
        path: netns.to_owned(),
        source,
    })?;
    // SAFETY: setns(2) on an open descriptor changes only the calling thread's network
    // namespace; no memory is involved.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetError::NotNetns {
            path: netns.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `netns` is the network namespace this process runs in (an engine's "host"
/// network hands the host's own namespace over by path: Docker's `--network host`
/// names `/var/run/docker/netns/default`). Tying TAPs to the host's interfaces would
/// hand the host's traffic to the VM.
pub fn is_own_netns(netns: &Path) -> Result<bool, NetError> {
    use std::os::unix::fs::MetadataExt;
    let open = |path: &Path| {
        std::fs::metadata(path).map_err(|source| NetError::Open {
            path: path.to_owned(),
            source,
        })
    };
    let (given, own) = (open(netns)?, open(Path::new("/proc/self/ns/net"))?);
    Ok(given.dev() == own.dev() && given.ino() == own.ino())
}

impl Network {
    /// The guest agent's request that makes the guest take this network over.
    pub fn agent_request(&self) -> forkvm_agent_proto::Request {
        forkvm_agent_proto::Request::Network {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| forkvm_agent_proto::NetInterface {
                    mac: format_mac(&i.mac),
                    name: i.name.clone(),
                    mtu: i.mtu,
                    addresses: i.addresses.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| forkvm_agent_proto::NetRoute {
                    destination: r.destination.map(|d| d.to_string()),
                    gateway: r.gateway.map(|g| g.to_string()),
                    interface: r.interface.clone(),
                })
                .collect(),
            nameservers: Vec::new(),
        }
    }
}

/// Runs `work` with a netlink handle inside the network namespace `netns`, on a thread of
/// its own (a thread's namespace is its own to change).
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    let path = netns.to_owned();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            // This thread ends with the work, and its namespace with it.
            join(&path)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(NetError::Worker)?;
            rt.block_on(async move {
                // The socket is made here, after setns: it talks to this namespace.
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(NetError::Worker)?;
                tokio::spawn(connection);
                work(handle).await
            })
        })
        .map_err(NetError::Worker)?
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Worker(std::io::Error::other(
                "the netlink worker panicked",
            )))
        })
}

/// Reads the namespace at `netns` and ties a TAP to each of its Ethernet interfaces (see
/// the module documentation). Returns what the guest must take over. On failure nothing
/// made is left behind.
pub fn plumb(netns: &Path) -> Result<Network, NetError> {
    in_netns(netns, |handle| async move {
        let mut network = read(&handle).await?;
        let mut tied: Vec<&Interface> = Vec::new();
        for iface in &network.interfaces {
            match tie(&handle, iface).await {
                Ok(()) => tied.push(iface),
                Err(e) => {
                    // A TAP that could not be made is not ours to remove: its name may
                    // be another link's.
                    let half_done = (!matches!(e, NetError::Tap { .. })).then_some(iface);
                    for done in tied.iter().copied().chain(half_done) {
                        untie(&handle, done).await;
                    }
                    return Err(e);
                }
            }
        }
        network.routes.retain(|r| !r.interface.is_empty());
        Ok(network)
    })
}

/// The interfaces of `network` (as [`plumb`] found them in `netns`) that are no longer
/// there: the engine removed them after the VM took them over.
pub fn vanished(netns: &Path, network: &Network) -> Result<Vec<String>, NetError> {
    let network = network.clone();
    in_netns(netns, |handle| async move {
        let now = links(&handle).await?;
        Ok(network
            .interfaces
            .iter()
            .filter(|i| {
                !now.iter()
                    .any(|l| l.header.index == i.index && link_name(l) == Some(i.name.as_str()))
            })
            .map(|i| i.name.clone())
            .collect())
    })
}

/// Removes what [`plumb`] made in `netns`: the TAPs (their filters go with them) and the
/// interfaces' ingress qdiscs. What is already gone is not an error.
pub fn unplumb(netns: &Path, network: &Network) -> Result<(), NetError> {
    // Nothing was made: no thread, runtime and netlink socket to learn that.
    if network.interfaces.is_empty() {
        return Ok(());
    }
    let network = network.clone();
    in_netns(netns, |handle| async move {
        for iface in &network.interfaces {
            untie(&handle, iface).await;
        }
        Ok(())
    })
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("cannot list the namespace's interfaces"))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The namespace's Ethernet interfaces with their addresses, and their routes.
async fn read(handle: &Handle) -> Result<Network, NetError> {
    let mut interfaces = Vec::new();
    for link in links(handle).await? {
        let Some(name) = link_name(&link) else {
            continue;
        };
        if link.header.link_layer_type != LinkLayerType::Ether || name.starts_with(TAP_PREFIX) {
            continue;
        }
        let mut mac = None;
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                    mac = bytes.as_slice().try_into().ok();
                }
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let Some(mac) = mac else { continue };
        let index = link.header.index;
        interfaces.push(Interface {
            name: name.to_owned(),
            index,
            mac,
            mtu,
            addresses: Vec::new(),
            tap: format!("{TAP_PREFIX}{index}"),
        });
    }
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("cannot list the namespace's addresses"))?;
    for msg in addresses {
        let Some(iface) = interfaces.iter_mut().find(|i| i.index == msg.header.index) else {
            continue;
        };
        // IFA_ADDRESS is the peer on point-to-point links and IFA_LOCAL the interface's
        // own; on Ethernet both are the same, and IFA_LOCAL is absent for IPv6.
        let addr = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
        let Some(addr) = addr else { continue };
        if matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        iface.addresses.push(IpNet {
            addr,
            prefix: msg.header.prefix_len,
        });
    }
    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let found: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("cannot list the namespace's routes"))?;
        routes.extend(found.iter().filter_map(|r| route(r, &interfaces)));
    }
    Ok(Network { interfaces, routes })
}

/// A route the guest must be given: a unicast route of the main table through one of the
/// interfaces, not one the kernel made for an address.
fn route(msg: &RouteMessage, interfaces: &[Interface]) -> Option<Route> {
    let h = &msg.header;
    if h.table != RouteHeader::RT_TABLE_MAIN
        || h.kind != RouteType::Unicast
        || h.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => destination = ip(d),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let interface = interfaces.iter().find(|i| Some(i.index) == oif)?;
    Some(Route {
        destination: destination.map(|addr| IpNet {
            addr,
            prefix: h.destination_prefix_length,
        }),
        gateway,
        interface: interface.name.clone(),
    })
}

/// Makes `iface`'s TAP and ties the two together both ways.
async fn tie(handle: &Handle, iface: &Interface) -> Result<(), NetError> {
    make_persistent_tap(&iface.tap)?;
    let tap_index = links(handle)
        .await?
        .iter()
        .find(|l| link_name(l) == Some(iface.tap.as_str()))
        .map(|l| l.header.index)
        .ok_or_else(|| NetError::Vanished(iface.tap.clone()))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(iface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("cannot bring up {}", iface.tap)))?;
    for (from, to, name) in [
        (iface.index, tap_index, &iface.name),
        (tap_index, iface.index, &iface.tap),
    ] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink(format!("cannot add an ingress qdisc to {name}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(netlink(format!("cannot build the redirect from {name}")))?
            .execute()
            .await
            .map_err(netlink(format!("cannot redirect {name}'s frames")))?;
    }
    Ok(())
}

/// Removes `iface`'s TAP and its ingress qdisc, as far as they exist.
async fn untie(handle: &Handle, iface: &Interface) {
    if let Ok(links) = links(handle).await {
        if let Some(tap) = links
            .iter()
            .find(|l| link_name(l) == Some(iface.tap.as_str()))
        {
            if let Err(e) = handle.link().del(tap.header.index).execute().await {
                tracing::warn!(tap = %iface.tap, "cannot remove the TAP: {e}");
            }
        }
    }
    let mut del = handle.qdisc().del(iface.index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    let _ = del.execute().await;
}

/// Creates the TAP `name` in this thread's namespace, persistent, so that it outlives
/// this descriptor and the VM process opens it by name.
fn make_persistent_tap(name: &str) -> Result<(), NetError> {
    let tap_err = |source| NetError::Tap {
        name: name.to_owned(),
        source,
    };
    let (file, _) = forkvm_devices::virtio::net::open_tap(name)
        .map_err(|e| tap_err(std::io::Error::other(e)))?;
    forkvm_devices::virtio::net::set_tap_persistent(&file, true).map_err(tap_err)
}
