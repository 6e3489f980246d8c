//! Network namespaces for tests, named as podman and CNI name theirs (`ip netns add`,
//! so their path is `/var/run/netns/NAME`): commands run inside them, and threads that
//! join them. Setting them up goes through `ip`, as an engine's tools would; the code
//! under test uses netlink.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// A named network namespace, deleted on drop.
pub struct Netns(String);

impl Netns {
    /// Creates the namespace `name`.
    pub fn new(name: &str) -> Self {
        ip(&["netns", "add", name]);
        Netns(name.to_owned())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Its path, as an engine hands it to a runtime.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }

    /// `ip ARGS` inside the namespace; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip -j ARGS` inside the namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let text = self.ip(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {text}"))
    }

    /// `PROGRAM ARGS` inside the namespace; panics unless it succeeds.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.0.as_str(), program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that has joined the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(self.path()).expect("the namespace's file");
        std::thread::spawn(move || {
            // SAFETY: setns(2) on an open namespace descriptor, for this thread only.
            let joined = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ip ARGS`; panics unless it succeeds. Returns its output.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip is installed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The container end's address of [`give_eth0`].
pub const CONTAINER_ADDR: &str = "10.99.0.2";
/// The outside end's address of [`give_eth0`], the container's gateway.
pub const OUTSIDE_ADDR: &str = "10.99.0.1";

/// Gives `container` an `eth0` as podman and CNI do: one end of a veth pair, MTU 1400,
/// [`CONTAINER_ADDR`]/24, up, with a default route via [`OUTSIDE_ADDR`]. The other end,
/// `peer`, is up with [`OUTSIDE_ADDR`]/24 in `outside` (the caller's namespace when
/// `None`).
pub fn give_eth0(container: &Netns, outside: Option<&Netns>, peer: &str) {
    let out = |args: &[&str]| match outside {
        Some(ns) => ns.ip(args),
        None => ip(args),
    };
    out(&[
        "link",
        "add",
        peer,
        "mtu",
        "1400",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "mtu",
        "1400",
        "netns",
        container.name(),
    ]);
    out(&["addr", "add", &format!("{OUTSIDE_ADDR}/24"), "dev", peer]);
    out(&["link", "set", peer, "up"]);
    container.ip(&[
        "addr",
        "add",
        &format!("{CONTAINER_ADDR}/24"),
        "dev",
        "eth0",
    ]);
    container.ip(&["link", "set", "eth0", "up"]);
    container.ip(&["link", "set", "lo", "up"]);
    container.ip(&["route", "add", "default", "via", OUTSIDE_ADDR]);
}
