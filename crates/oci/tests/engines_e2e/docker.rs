//! End to end, in a KVM host: real Docker (Debian's dockerd 20.10 → containerd →
//! containerd-shim-runc-v2) drives `forkvm-runtime` as it drives runc, registered both
//! ways Docker offers (`/etc/docker/daemon.json`'s `runtimes`, here `--config-file`, and
//! `dockerd --add-runtime`) and chosen with `docker run --runtime`.
//!
//! One virtual-host session: dockerd on the session's scratch space, the fixture image
//! loaded with `docker load` (no registry), then the cases: output and exit codes, stdin
//! (`-i`), a terminal (`-t`), a detached container that traps signals (`docker logs`,
//! `exec`, `kill -s USR1`, `stop`, `rm`), `rm -f` of a running container, and nothing
//! left behind. A failing case prints the daemon's, the runtime's and the VMs' logs and
//! the session goes on, so one run shows every failure.
//!
//! `FORKVM_TEST_RUNTIME=/usr/sbin/runc` runs the same cases with runc, to tell engine
//! set-up problems from runtime bugs.

use std::ffi::OsString;
use std::time::Duration;

use crate::engines::{self, require, runtime, tmpfs_on, Daemon, Engine, Kind};
use forkvm_image::fixtures;

/// The fixture image, as `docker load` names it.
const IMAGE: &str = "fixture:latest";
/// The runtime's name in daemon.json.
const RUNTIME: &str = "forkvm";
/// The runtime's name given with `dockerd --add-runtime`.
const RUNTIME_FLAG: &str = "forkvm-flag";

/// The Docker CLI that matches Debian's dockerd (another, newer CLI may come first in
/// `PATH`).
const DOCKER_CLI: &str = "/usr/bin/docker";

/// dockerd on the session's scratch space: its own data root, exec root (with its own
/// containerd), socket and pid file, its default networking (the `docker0` bridge,
/// iptables NAT and the userland proxy for `-p`; IPv4 only), the vfs storage driver (the virtual host's
/// kernel has overlayfs only as a module it does not load), and the runtime registered
/// twice: in a daemon.json (`runtimes`) and with `--add-runtime`. The daemon's
/// runtime is the session's installed forkvm, whose `forkvm.toml` says where its VMs
/// register: nothing in the daemon's environment is forkvm's.
fn start_docker() -> Engine {
    let dockerd = require("dockerd", "docker.io");
    let cli = require(DOCKER_CLI, "docker.io");
    require("containerd", "containerd");
    require("containerd-shim-runc-v2", "containerd");
    if forkvm_testhost::in_test_host() {
        // dockerd writes its key.json in /etc/docker, the host's (read-only) there.
        tmpfs_on("/etc/docker");
    }
    let scratch = tempfile::Builder::new()
        .prefix("docker-e2e")
        .tempdir_in("/tmp")
        .expect("cannot make the scratch directory");
    let s = scratch.path().to_owned();
    let vms = s.join("vms");
    std::fs::create_dir(&vms).unwrap();
    let rt = runtime(&s, &vms);
    let config = s.join("daemon.json");
    let daemon_json = serde_json::json!({
        "runtimes": { RUNTIME: { "path": rt } }
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&daemon_json).unwrap()).unwrap();
    println!(
        "daemon.json:\n{}",
        serde_json::to_string_pretty(&daemon_json).unwrap()
    );
    let socket = format!("unix://{}", s.join("docker.sock").display());
    let p = |name: &str| s.join(name).into_os_string();
    let args: Vec<OsString> = vec![
        "--config-file".into(),
        config.into_os_string(),
        "--add-runtime".into(),
        format!("{RUNTIME_FLAG}={}", rt.display()).into(),
        "--data-root".into(),
        p("data"),
        "--exec-root".into(),
        p("exec"),
        "--pidfile".into(),
        p("docker.pid"),
        "-H".into(),
        socket.clone().into(),
        "--ip6tables=false".into(),
        "--storage-driver".into(),
        "vfs".into(),
    ];
    let daemon = Daemon::start(&dockerd, &args, &[], s.join("dockerd.log"));
    let mut docker = Engine::new(
        Kind::Docker,
        cli,
        vec!["-H".into(), socket.into()],
        Vec::new(),
        scratch,
    );
    docker.runtime_name = RUNTIME.into();
    docker.runtime = rt;
    docker.image = IMAGE.into();
    docker.set_vm_roots(vec![vms]);
    docker.set_daemon(daemon);
    docker
}

/// Waits for dockerd to answer and checks both registrations of the runtime.
fn wait_for_dockerd(docker: &Engine) {
    let mut exited = None;
    let up = engines::poll(Duration::from_secs(120), || {
        exited = docker.daemon_exited();
        if exited.is_some() {
            return Some(false);
        }
        let out = docker.cmd_with(&["version"], None, Duration::from_secs(20));
        (out.code == Some(0)).then_some(true)
    });
    assert!(
        up == Some(true),
        "dockerd did not come up (exited: {exited:?})"
    );
    let runtimes = docker.ok(&["info", "--format", "{{json .Runtimes}}"]);
    let rt = docker.runtime.display().to_string();
    for name in [RUNTIME, RUNTIME_FLAG] {
        let v: serde_json::Value = serde_json::from_str(runtimes.trim()).unwrap();
        assert_eq!(
            v[name]["path"].as_str(),
            Some(rt.as_str()),
            "runtime {name} is not registered as {rt}: {runtimes}"
        );
    }
}

#[test]
fn docker_drives_forkvm_runtime() {
    engines::session(forkvm_testhost::test_path!(), || {
        let docker = start_docker();
        docker.required("dockerd starts with the runtime registered", || {
            wait_for_dockerd(&docker)
        });
        docker.required("docker load of the fixture image", || {
            let archive = docker.scratch.path().join("fixture.tar");
            fixtures::write_docker_archive(&archive, IMAGE).unwrap();
            let out = docker.ok(&["load", "-i", archive.to_str().unwrap()]);
            assert!(out.contains(&format!("Loaded image: {IMAGE}")), "{out}");
        });
        cases(&docker);
        docker.finish();
    });
}

fn cases(docker: &Engine) {
    engines::core_cases(docker);

    docker.case(
        "run with the runtime registered by dockerd --add-runtime",
        || {
            let args = docker.run_args_via(RUNTIME_FLAG, &[], &["echo", "via-add-runtime"]);
            let out = docker.expect(&args, None, 0);
            assert_eq!(out.stdout, "via-add-runtime\n", "{out}");
        },
    );

    engines::network_cases(
        docker,
        &engines::NetworkNames {
            default_network: "bridge",
            names_resolve: true,
        },
    );

    engines::nothing_left_case(docker);
}
