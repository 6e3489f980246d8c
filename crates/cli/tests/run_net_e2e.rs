//! End to end, in a KVM host: `forkvm run` puts its VM on forkvm's own network, as
//! `podman run` puts a container on podman's: an address on the `forkvm0` bridge, a
//! default route through the host, the host's nameservers, `-p` published ports; and a
//! fork of a serving VM is a child with an address of its own that serves too while its
//! parent keeps serving. Bad input (a taken port, `--network host`) is a clear error
//! that leaves nothing behind.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{warm_container_guest, Finished, Forkvm};
use forkvm_image::fixtures;

/// Limit for one short `forkvm` command.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Limit for the serving VM, which runs through most of the session.
const SERVE_TIMEOUT: Duration = Duration::from_secs(400);
/// The published host port and the port of the host's own HTTP server.
const PUBLISHED: u16 = 18080;
const HOST_SERVER: u16 = 18081;

/// The serving VM's process: busybox httpd with a CGI script that answers with the
/// guest's hostname (a fork child answers with its own).
const SERVE: &str = "mkdir -p /www/cgi-bin && \
    printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhostname\\n' > /www/cgi-bin/h && \
    chmod +x /www/cgi-bin/h && echo serving && exec httpd -f -p 80 -h /www";

fn forkvm(env: &[(&str, &std::ffi::OsStr)], args: &[&str]) -> Finished {
    Forkvm::spawn_with(args, RUN_TIMEOUT, env, None).finish()
}

/// The body of `GET path` from `addr` (HTTP/1.0), or why not.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    // busybox httpd passes a CGI script's bare "\n\n" through.
    let split = reply
        .split_once("\r\n\r\n")
        .or_else(|| reply.split_once("\n\n"));
    match split {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(format!("{addr}{path} answered {reply:?}")),
    }
}

/// [`http_get`] until it succeeds or `limit` passes.
fn http_get_within(addr: &str, path: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        match http_get(addr, path) {
            Ok(body) => return body,
            Err(e) if Instant::now() >= deadline => panic!("no answer within {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `forkvm inspect VM` as JSON.
fn inspect(env: &[(&str, &std::ffi::OsStr)], vm: &str) -> serde_json::Value {
    let out = forkvm(env, &["inspect", vm]);
    assert_eq!(out.status.code(), Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{out}"))
}

/// The VM's address on forkvm's network (without the prefix), once it has one.
fn address_within(env: &[(&str, &std::ffi::OsStr)], vm: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let info = inspect(env, vm);
        if let Some(a) = info["addresses"][0].as_str() {
            return a.split('/').next().unwrap().to_owned();
        }
        if Instant::now() >= deadline {
            let console = info["console_log"]
                .as_str()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{vm} has no address after {limit:?}: {info:#}\nits console:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The live leases of forkvm0's network.
fn leases() -> Vec<String> {
    let dir = Path::new(forkvm_registry::leases::LEASE_ROOT).join("forkvm0");
    let mut held: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<forkvm_registry::ProcessIdentity>(&b).ok())
                .is_some_and(|p| p.is_alive())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    held.sort();
    held
}

#[test]
fn run_has_a_network_publishes_ports_and_forks_get_their_own_address() {
    warm_container_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let tmp = tempfile::tempdir().unwrap();
        let (store, root, layout) = (
            tmp.path().join("store"),
            tmp.path().join("root"),
            tmp.path().join("layout"),
        );
        let env = [
            ("FORKVM_STORE", store.as_os_str()),
            ("FORKVM_ROOT", root.as_os_str()),
        ];
        fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
        let out = forkvm(&env, &["load", "-i", layout.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{out}");

        // The host serves a file; the VM fetches it through its gateway.
        let host = TcpListener::bind(("0.0.0.0", HOST_SERVER)).unwrap();
        std::thread::spawn(move || {
            for mut c in host.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let _ =
                    c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nfrom-the-host\n");
            }
        });
        let out = forkvm(
            &env,
            &[
                "run",
                "--rm",
                "fixture:1",
                "sh",
                "-c",
                &format!(
                    "ip -4 addr show eth0; ip route; cat /etc/resolv.conf; \
                     wget -qO- http://10.77.0.1:{HOST_SERVER}/"
                ),
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{out}");
        assert!(
            out.stdout.contains("inet 10.77."),
            "an address on forkvm0\n{out}"
        );
        assert!(out.stdout.contains("default via 10.77.0.1"), "{out}");
        assert!(
            out.stdout.contains("from-the-host"),
            "fetched from the host\n{out}"
        );
        let host_ns = forkvm_net::dns::nameservers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        );
        if let Some(ns) = host_ns.first() {
            assert!(
                out.stdout.contains(&format!("nameserver {ns}")),
                "the host's nameservers\n{out}"
            );
        }
        assert!(
            leases().is_empty(),
            "the run gave its address back: {:?}",
            leases()
        );

        // `--network none`: only the loopback.
        let out = forkvm(
            &env,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "fixture:1",
                "sh",
                "-c",
                "ls /sys/class/net",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{out}");
        assert_eq!(out.stdout.trim(), "lo", "{out}");

        // A VM serving on a published port.
        let mut web = Forkvm::spawn_with(
            &[
                "run",
                "--name",
                "web",
                "--hostname",
                "web1",
                "-p",
                &format!("{PUBLISHED}:80"),
                "fixture:1",
                "sh",
                "-c",
                SERVE,
            ],
            SERVE_TIMEOUT,
            &env,
            None,
        );
        web.wait_for_stdout("serving");
        let published = format!("127.0.0.1:{PUBLISHED}");
        let body = http_get_within(&published, "/cgi-bin/h", Duration::from_secs(60));
        assert_eq!(body.trim(), "web1", "through the published port");
        let parent_ip = address_within(&env, "web", Duration::from_secs(5));
        assert!(parent_ip.starts_with("10.77."), "{parent_ip}");
        let body = http_get_within(
            &format!("{parent_ip}:80"),
            "/cgi-bin/h",
            Duration::from_secs(10),
        );
        assert_eq!(body.trim(), "web1", "at its own address");
        assert_eq!(leases(), std::slice::from_ref(&parent_ip));

        // Bad input while it serves: its port is taken; host networking is refused.
        // Neither leaves a VM or an address behind.
        let out = forkvm(
            &env,
            &[
                "run",
                "--rm",
                "-p",
                &format!("{PUBLISHED}:80"),
                "fixture:1",
                "true",
            ],
        );
        assert_eq!(out.status.code(), Some(125), "{out}");
        assert!(
            out.stderr
                .contains(&format!("cannot publish 0.0.0.0:{PUBLISHED}")),
            "{out}"
        );
        let out = forkvm(
            &env,
            &["run", "--rm", "--network", "host", "fixture:1", "true"],
        );
        assert_eq!(out.status.code(), Some(125), "{out}");
        assert!(out.stderr.contains("--network host"), "{out}");
        assert_eq!(
            leases(),
            std::slice::from_ref(&parent_ip),
            "no address left held"
        );
        let out = forkvm(&env, &["ps", "-q"]);
        assert_eq!(
            out.stdout.lines().count(),
            1,
            "only web is registered\n{out}"
        );

        // A fork child: its own address, serving with its own hostname; the parent
        // keeps serving at its address and published port.
        let out = forkvm(&env, &["fork", "web", "-n", "1"]);
        assert_eq!(out.status.code(), Some(0), "{out}");
        let info = inspect(&env, "web");
        let child = info["children"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no child: {info:#}"))
            .to_owned();
        let child_ip = address_within(&env, &child, Duration::from_secs(120));
        assert_ne!(child_ip, parent_ip, "the child has an address of its own");
        assert!(child_ip.starts_with("10.77."), "{child_ip}");
        let body = http_get_within(
            &format!("{child_ip}:80"),
            "/cgi-bin/h",
            Duration::from_secs(30),
        );
        assert!(
            body.trim().starts_with("fork-"),
            "the child answers itself: {body:?}"
        );
        let body = http_get_within(&published, "/cgi-bin/h", Duration::from_secs(10));
        assert_eq!(
            body.trim(),
            "web1",
            "the parent still serves its published port"
        );
        let body = http_get_within(
            &format!("{parent_ip}:80"),
            "/cgi-bin/h",
            Duration::from_secs(10),
        );
        assert_eq!(body.trim(), "web1", "and its own address");
        let mut both = vec![parent_ip.clone(), child_ip.clone()];
        both.sort();
        assert_eq!(leases(), both);

        let out = forkvm(&env, &["stop", "-t", "1", &child]);
        assert_eq!(out.status.code(), Some(0), "{out}");
        // SAFETY: kill(2) only sends a signal to the forkvm process.
        unsafe { libc::kill(web.pid() as i32, libc::SIGTERM) };
        let out = web.finish();
        assert!(out.status.code().is_some(), "{out}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !leases().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(leases().is_empty(), "addresses given back: {:?}", leases());
    });
}
