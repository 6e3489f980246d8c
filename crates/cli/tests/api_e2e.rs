//! End to end, in a KVM host: named, detached VMs and their control plane. One session
//! boots a counting guest with `boot -d`, lists it with `ps`, drives every documented
//! API request through `curl --unix-socket`, checks bad requests get 4xx while the VM
//! keeps running, pauses and resumes the counter, reads `logs`, stops it and removes
//! it; then a second VM's VMM is killed with SIGKILL, `ps` calls it dead and `rm`
//! cleans it up.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const FORKVM: &str = env!("CARGO_BIN_EXE_forkvm");

const COUNTER: &str = "console=ttyS0 quiet reboot=k panic=-1 pci=off -- sh -c \"i=0; while true; do echo count=$i; i=$((i+1)); sleep 1; done\"";

fn forkvm(root: &Path, args: &[&str]) -> Output {
    Command::new(FORKVM)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("cannot run forkvm")
}

/// Runs forkvm, requires success, returns stdout.
fn ok(root: &Path, args: &[&str]) -> String {
    let out = forkvm(root, args);
    assert!(
        out.status.success(),
        "forkvm {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ps(root: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(root, &["ps", "--format", "json"])).expect("ps JSON")
}

/// (status, body) of a curl request on the VM's socket.
fn curl(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "30",
        "--unix-socket",
    ])
    .arg(sock)
    .args(["-X", method]);
    let tmp;
    if let Some(b) = body {
        tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b).unwrap();
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", tmp.path().display()));
    }
    let out = cmd.arg(format!("http://vm{path}")).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl -w output");
    (code.parse().unwrap_or(0), body.to_owned())
}

fn json_error(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON error ({e}): {body}"));
    assert!(v["message"].is_string(), "{body}");
    v["error"].as_str().expect("error kind").to_owned()
}

fn last_count(root: &Path, vm: &str) -> Option<u64> {
    common::whole_lines(&ok(root, &["logs", vm]))
        .rev()
        .find_map(|l| l.trim().strip_prefix("count=")?.parse().ok())
}

fn wait_count(root: &Path, vm: &str, above: Option<u64>, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(n) = last_count(root, vm) {
            if above.is_none_or(|a| n > a) {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the counter did not pass {above:?} within {limit:?}; logs:\n{}",
            ok(root, &["logs", vm])
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A bad request: method, path, body, expected status and error kind.
type BadRequest<'a> = (&'a str, &'a str, Option<&'a [u8]>, u16, &'a str);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn detached_vm_lifecycle_through_the_api() {
    forkvm_guest_kernel::default_guest().expect("default guest");
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let root = root.as_path();
        let t0 = Instant::now();

        // Boot detached: the ID comes back once the API answers.
        let id = ok(
            root,
            &[
                "boot",
                "-d",
                "--name",
                "ctr",
                "--vcpus",
                "2",
                "--mem",
                "192",
                "--cmdline",
                COUNTER,
            ],
        )
        .trim()
        .to_owned();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
        eprintln!("booted {id} in {:?}", t0.elapsed());
        let home = root.join(&id);
        let sock = home.join("api.sock");
        // The state root is root's and the VM families' (each may make homes there,
        // the sticky bit keeps each from another's); the home is the VM's family's.
        let root_meta = std::fs::metadata(root).unwrap();
        assert_eq!(
            (
                root_meta.permissions().mode() & 0o7777,
                root_meta.uid(),
                root_meta.gid()
            ),
            (0o1770, 0, forkvm_jail::uid::FAMILIES_GID)
        );
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&sock), 0o600);
        assert_eq!(mode(&home.join("state.json")), 0o600);

        // ps: running, with its vCPUs and memory; table and JSON.
        let vms = ps(root);
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0]["id"], id.as_str());
        assert_eq!(vms[0]["name"], "ctr");
        assert_eq!(vms[0]["status"], "running");
        assert_eq!(vms[0]["vcpus"], 2);
        assert_eq!(vms[0]["mem_mib"], 192);
        let table = ok(root, &["ps"]);
        assert!(
            table.contains(&id[..12]) && table.contains("ctr") && table.contains("running"),
            "{table}"
        );

        // logs: the guest's serial output (name, and a unique ID prefix, both work).
        let first = wait_count(root, "ctr", None, Duration::from_secs(120));
        assert!(ok(root, &["logs", &id[..6]]).contains("count="));
        eprintln!("counting at {:?}", t0.elapsed());

        // Every documented request through curl.
        let (st, body) = curl(&sock, "GET", "/v1/vm", None);
        assert_eq!(st, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (info["vcpus"].as_u64(), info["mem_mib"].as_u64()),
            (Some(2), Some(192))
        );
        assert_eq!(info["state"], "running");
        assert_eq!(info["name"], "ctr");
        assert!(info["created"].as_str().unwrap().ends_with('Z'));
        let (st, body) = curl(&sock, "GET", "/metrics", None);
        assert_eq!(st, 200);
        for m in [
            "forkvm_vm_exits_total{",
            "forkvm_fork_latency_seconds_bucket",
            "forkvm_resident_memory_bytes",
            "forkvm_private_memory_bytes",
        ] {
            assert!(body.contains(m), "{m} missing from\n{body}");
        }
        let (st, body) = curl(&sock, "GET", "/v1/vm/console", None);
        assert!(st == 200 && body.contains("count="), "{st} {body}");
        let (st, body) = curl(&sock, "POST", "/v1/vm/pause", None);
        assert_eq!((st, body.contains("paused")), (200, true), "{body}");
        let (st, body) = curl(&sock, "POST", "/v1/vm/pause", None);
        assert_eq!((st, json_error(&body).as_str()), (409, "conflict"));
        let (st, body) = curl(&sock, "POST", "/v1/vm/resume", None);
        assert_eq!(st, 200, "{body}");
        let (st, body) = curl(&sock, "POST", "/v1/vm/fork", Some(br#"{"count": 1}"#));
        assert_eq!(st, 200, "{body}");
        let o: serde_json::Value = serde_json::from_str(&body).unwrap();
        // The child is a VM of its own, registered with this VM as its parent.
        let kids: Vec<String> = ps(root)
            .iter()
            .filter(|v| v["parent"].as_str() == Some(id.as_str()))
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kids.len(), 1, "the fork child registers under its parent");
        for c in o["children"].as_array().unwrap() {
            let pid = c["pid"].as_i64().unwrap() as i32;
            // SAFETY: kill(2) with plain integers; the pid is the fork child this test
            // just made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for k in &kids {
            ok(root, &["rm", "-f", k]);
        }
        let (_, m) = curl(&sock, "GET", "/metrics", None);
        assert!(m.contains("forkvm_fork_latency_seconds_count 1"), "{m}");

        // Bad requests: 4xx with a JSON error, and the VM keeps running.
        let big = vec![b'x'; 70_000];
        let bad: [BadRequest; 6] = [
            ("GET", "/v1/nope", None, 404, "not_found"),
            ("DELETE", "/v1/vm", None, 405, "method_not_allowed"),
            (
                "POST",
                "/v1/vm/fork",
                Some(b"{\"count\": "),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                Some(b"{\"count\": 1, \"what\": 2}"),
                400,
                "bad_request",
            ),
            ("POST", "/v1/vm/fork", Some(&big), 413, "payload_too_large"),
            (
                "GET",
                "/v1/vm/console?follow=perhaps",
                None,
                400,
                "bad_request",
            ),
        ];
        for (m, p, b, want, kind) in bad {
            let (st, body) = curl(&sock, m, p, b);
            assert_eq!(st, want, "{m} {p}: {body}");
            assert_eq!(json_error(&body), kind, "{m} {p}");
        }
        assert_eq!(curl(&sock, "GET", "/v1/vm", None).0, 200);
        assert_eq!(ps(root)[0]["status"], "running");

        // pause stops the counter; resume continues it.
        let before = wait_count(root, "ctr", Some(first), Duration::from_secs(60));
        assert_eq!(ok(root, &["pause", "ctr"]).trim(), id);
        assert_eq!(ps(root)[0]["status"], "paused");
        let paused_at = last_count(root, "ctr").unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            last_count(root, "ctr").unwrap(),
            paused_at,
            "the counter ran while paused"
        );
        assert!(paused_at >= before);
        let out = forkvm(root, &["pause", "ctr"]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("already paused")
        );
        ok(root, &["resume", "ctr"]);
        assert_eq!(ps(root)[0]["status"], "running");
        wait_count(root, "ctr", Some(paused_at), Duration::from_secs(60));

        // logs -f follows until the VM stops.
        let follower = Command::new(FORKVM)
            .arg("--root")
            .arg(root)
            .args(["logs", "-f", "ctr"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();

        // stop: the VMM ends and the exit is recorded; inspect shows it.
        assert_eq!(ok(root, &["stop", "-t", "10", "ctr"]).trim(), id);
        let vms = ps(root);
        assert_eq!(vms[0]["status"], "exited");
        assert_eq!(vms[0]["exit"]["reason"], "stopped");
        assert_eq!(vms[0]["exit"]["code"], 0);
        assert!(!sock.exists(), "the socket outlived the VMM");
        let followed = follower.wait_with_output().unwrap();
        assert!(String::from_utf8_lossy(&followed.stdout).contains("count="));
        let insp: serde_json::Value = serde_json::from_str(&ok(root, &["inspect", "ctr"])).unwrap();
        assert_eq!(insp["status"], "exited");
        assert!(
            ok(root, &["logs", "ctr"]).contains("count="),
            "logs after exit"
        );

        // rm removes its state.
        assert_eq!(ok(root, &["rm", "ctr"]).trim(), id);
        assert!(!home.exists());
        let left = ps(root);
        assert!(left.is_empty(), "VMs left after rm: {left:?}");
        eprintln!("first VM done at {:?}", t0.elapsed());

        // A VMM killed with SIGKILL is dead, not running; rm cleans it up.
        let id2 = ok(
            root,
            &["boot", "-d", "--name", "victim", "--cmdline", COUNTER],
        )
        .trim()
        .to_owned();
        let pid = ps(root)[0]["pid"].as_i64().unwrap() as i32;
        let out = forkvm(root, &["rm", "victim"]);
        assert!(!out.status.success(), "rm without -f removed a running VM");
        // SAFETY: kill(2) with plain integers; the pid is the VMM this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ps(root)[0]["status"] != "dead" {
            assert!(
                Instant::now() < deadline,
                "ps never reported the killed VMM dead: {:?}",
                ps(root)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok(root, &["ps"]).contains("dead"));
        let out = forkvm(root, &["pause", "victim"]);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not running")
        );
        assert_eq!(ok(root, &["rm", "victim"]).trim(), id2);
        assert!(ps(root).is_empty());
        assert!(!root.join(&id2).exists());
        eprintln!("done in {:?}", t0.elapsed());
    });
}
