//! `plumb` against real namespaces: a "container" namespace holding one end of a veth
//! pair (as Docker, podman and CNI leave it) and an "outside" namespace holding the
//! other. Frames must pass both ways between the outside and the TAP, and everything
//! must be gone after `unplumb`. Needs root (namespaces, veth, tc), as the runtime does.
//! The namespaces are set up with `ip`, as an engine would; forkvm itself reads and
//! writes them over netlink.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use forkvm_net::{plumb, unplumb, IpNet, NetError};
use forkvm_test_support::netns::{give_eth0, Netns};

/// A namespace named for this test process.
fn netns(tag: &str) -> Netns {
    Netns::new(&format!("fkvm-test-{}-{tag}", std::process::id()))
}

fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let link = ns.ip_json(&["link", "show", dev]);
    let text = link[0]["address"].as_str().unwrap().to_owned();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The container namespace with `eth0` (10.99.0.2/24, MTU 1400, default route via
/// 10.99.0.1) and the outside one with its peer `outer0` (10.99.0.1/24).
fn veth_pair() -> (Netns, Netns) {
    let container = netns("c");
    let outside = netns("o");
    give_eth0(&container, Some(&outside), "outer0");
    (container, outside)
}

/// Opens the persistent TAP `name` in `ns` as the VM process will.
fn open_tap_in(ns: &Netns, name: &str) -> File {
    let name = name.to_owned();
    ns.run(move || forkvm_devices::virtio::net::open_tap(&name).unwrap().0)
}

/// The next frame from the TAP (without its 12-byte virtio-net header) that `want`
/// accepts, within five seconds.
fn frame_from(tap: &mut File, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) if n > 12 && want(&buf[12..n]) => return buf[12..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading the TAP: {e}"),
        }
    }
    panic!("no such frame reached the TAP");
}

const ARP: [u8; 2] = [0x08, 0x06];

fn arp_request_for(frame: &[u8], target: [u8; 4]) -> bool {
    frame.len() >= 42 && frame[12..14] == ARP && frame[20..22] == [0, 1] && frame[38..42] == target
}

#[test]
fn frames_pass_both_ways_between_the_namespace_and_the_tap() {
    let (container, outside) = veth_pair();
    let eth0_mac = mac_of(&container, "eth0");

    let network = plumb(&container.path()).expect("plumb");
    assert_eq!(network.interfaces.len(), 1, "{network:?}");
    let iface = &network.interfaces[0];
    assert_eq!(iface.name, "eth0");
    assert_eq!(iface.mac, eth0_mac);
    assert_eq!(iface.mtu, 1400);
    assert_eq!(
        iface.addresses,
        [IpNet {
            addr: "10.99.0.2".parse().unwrap(),
            prefix: 24
        }]
    );
    assert!(
        network.routes.iter().any(|r| r.destination.is_none()
            && r.gateway == Some("10.99.0.1".parse().unwrap())
            && r.interface == "eth0"),
        "no default route: {:?}",
        network.routes
    );
    // The TAP took the interface's MTU and is up.
    let tap = container.ip_json(&["link", "show", &iface.tap]);
    assert_eq!(tap[0]["mtu"], 1400);
    assert!(tap[0]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "UP"));

    // Outside to guest: the outside's ARP request for 10.99.0.2 comes out of the TAP.
    let mut tap = open_tap_in(&container, &iface.tap);
    // A datagram to 10.99.0.2 makes the outside ask for its MAC.
    let socket = outside.run(|| std::net::UdpSocket::bind("10.99.0.1:0").unwrap());
    socket.send_to(b"hello", "10.99.0.2:9").unwrap();
    let request = frame_from(&mut tap, |f| arp_request_for(f, [10, 99, 0, 2]));
    let asker: [u8; 6] = request[22..28].try_into().unwrap();
    assert_eq!(asker, mac_of(&outside, "outer0"));

    // Guest to outside: an ARP reply written to the TAP leaves through eth0, and the
    // outside learns the guest's MAC from it.
    let mut reply = Vec::with_capacity(12 + 42);
    reply.extend_from_slice(&[0u8; 12]); // virtio-net header: no offloads
    reply.extend_from_slice(&asker);
    reply.extend_from_slice(&eth0_mac);
    reply.extend_from_slice(&ARP);
    reply.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    reply.extend_from_slice(&eth0_mac);
    reply.extend_from_slice(&[10, 99, 0, 2]);
    reply.extend_from_slice(&asker);
    reply.extend_from_slice(&[10, 99, 0, 1]);
    tap.write_all(&reply).expect("write to the TAP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let learned = loop {
        let neigh = outside.ip_json(&["neigh", "show", "10.99.0.2"]);
        if let Some(mac) = neigh[0]["lladdr"].as_str() {
            break mac.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the outside never learned 10.99.0.2"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(learned, forkvm_devices::virtio::net::format_mac(&eth0_mac));
    drop(tap);

    // Unplumbing leaves the namespace as the engine made it.
    unplumb(&container.path(), &network).expect("unplumb");
    let links = container.ip_json(&["link", "show"]);
    let names: Vec<&str> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lo", "eth0"], "the TAP is gone");
    let qdiscs = container.exec("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

#[test]
fn a_bad_namespace_path_is_named() {
    let missing = PathBuf::from("/var/run/netns/fkvm-no-such-namespace");
    let err = plumb(&missing).unwrap_err();
    assert!(matches!(err, NetError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("fkvm-no-such-namespace"), "{err}");

    let not_ns = PathBuf::from("/proc/self/status");
    let err = plumb(&not_ns).unwrap_err();
    assert!(matches!(err, NetError::NotNetns { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("/proc/self/status is not a network namespace"),
        "{err}"
    );
}

#[test]
fn a_namespace_without_interfaces_gives_an_empty_network() {
    let ns = netns("empty");
    let network = plumb(&ns.path()).expect("plumb");
    assert!(network.interfaces.is_empty(), "{network:?}");
    assert!(network.routes.is_empty(), "{network:?}");
}
