//! `Request::Network` applied in a network namespace of the test's own, standing for the
//! guest: a NIC found by its MAC takes the name, MTU, addresses and routes it is given.
//! Needs root (namespaces), as the agent has it in the guest.

use forkvm_agent::network::{apply, NetworkError};
use forkvm_agent_proto::{NetInterface, NetRoute};
use forkvm_test_support::netns::Netns;

/// A namespace standing for the guest, with a NIC of `MAC` (`nic0`, one end of a veth
/// pair whose other end, `peer0`, is up).
struct Guest(Netns);

const MAC: &str = "02:46:8a:00:00:01";

impl Guest {
    fn new(tag: &str) -> Self {
        let ns = Netns::new(&format!("fkvm-agent-{}-{tag}", std::process::id()));
        ns.ip(&[
            "link", "add", "nic0", "address", MAC, "type", "veth", "peer", "name", "peer0",
        ]);
        ns.ip(&["link", "set", "peer0", "up"]);
        Guest(ns)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        self.0.ip_json(args)
    }

    /// Runs `apply` inside the namespace.
    fn apply(
        &self,
        interfaces: Vec<NetInterface>,
        routes: Vec<NetRoute>,
    ) -> Result<(), NetworkError> {
        self.0.run(move || apply(&interfaces, &routes))
    }
}

fn eth7(addresses: &[&str]) -> NetInterface {
    NetInterface {
        mac: MAC.into(),
        name: "eth7".into(),
        mtu: 1400,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
    }
}

#[test]
fn the_nic_with_the_mac_takes_name_mtu_addresses_and_routes() {
    let g = Guest::new("ok");
    g.apply(
        vec![eth7(&["10.98.0.2/24", "fd98::2/64"])],
        vec![
            NetRoute {
                destination: None,
                gateway: Some("10.98.0.1".into()),
                interface: "eth7".into(),
            },
            NetRoute {
                destination: Some("10.50.0.0/16".into()),
                gateway: None,
                interface: "eth7".into(),
            },
        ],
    )
    .expect("apply");

    let link = g.json(&["link", "show", "eth7"]);
    assert_eq!(link[0]["address"], MAC);
    assert_eq!(link[0]["mtu"], 1400);
    assert!(link[0]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "UP"));
    let addrs = g.json(&["addr", "show", "eth7"]);
    let have: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    for want in ["10.98.0.2/24", "fd98::2/64"] {
        assert!(have.iter().any(|h| h == want), "{want} not in {have:?}");
    }
    let routes = g.json(&["route", "show"]);
    let routes = routes.as_array().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.98.0.1" && r["dev"] == "eth7"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "10.50.0.0/16" && r["dev"] == "eth7" && r["scope"] == "link"),
        "{routes:?}"
    );

    // A fork child's identity sent again (its first answer was slow) gives the NIC the
    // MAC it has: the NIC stays up and keeps its routes.
    let mac = forkvm_agent::identity::parse_mac(MAC).unwrap();
    g.0.run(move || forkvm_agent::identity::set_mac("eth7", mac))
        .expect("set_mac");
    let routes = g.json(&["route", "show"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.98.0.1"),
        "the default route went: {routes:?}"
    );
    // Another MAC is taken (down, set, up).
    g.0.run(|| forkvm_agent::identity::set_mac("eth7", [2, 0x46, 0x8a, 0, 0, 9]))
        .expect("set_mac");
    let link = g.json(&["link", "show", "eth7"]);
    assert_eq!(link[0]["address"], "02:46:8a:00:00:09");
}

#[test]
fn bad_requests_are_named_and_change_nothing_they_did_not_reach() {
    let g = Guest::new("bad");
    let err = g
        .apply(
            vec![NetInterface {
                mac: "02:00:00:00:00:99".into(),
                ..eth7(&[])
            }],
            vec![],
        )
        .unwrap_err();
    assert!(matches!(err, NetworkError::NoNic(_)), "{err}");
    assert!(err.to_string().contains("02:00:00:00:00:99"), "{err}");
    // The NIC that was not named kept its name.
    assert_eq!(g.json(&["link", "show", "nic0"])[0]["ifname"], "nic0");

    let err = g.apply(vec![eth7(&["10.98.0.2/33"])], vec![]).unwrap_err();
    assert!(err.to_string().contains("10.98.0.2/33"), "{err}");

    let err = g
        .apply(
            vec![],
            vec![NetRoute {
                destination: None,
                gateway: Some("10.98.0.1".into()),
                interface: "nope0".into(),
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("nope0"), "{err}");
}
