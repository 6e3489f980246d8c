//! End to end, in a KVM host: real podman (Debian's podman 4.3 → conmon) drives
//! `forkvm-runtime` as it drives runc, registered both ways podman offers: by name in
//! a containers.conf (`[engine.runtimes] forkvm = [PATH]`, chosen with
//! `--runtime forkvm`) and by path (`--runtime PATH`).
//!
//! One virtual-host session: podman with its storage, run root and temporary files on
//! the session's scratch space (`CONTAINERS_CONF` holding the rest), the fixture image
//! imported from an OCI layout with `podman pull oci:DIR` (no registry), then the
//! cases: output and exit codes, stdin (`-i`), a terminal (`-t`), a detached container
//! that traps signals (`podman logs`, `exec`, `kill -s USR1`, `stop`, `rm`), `rm -f` of
//! a running container, podman's default network (CNI) with `-p`, a user-defined
//! network, and nothing left behind. A failing case prints the runtime's
//! and the VMs' logs and the session goes on, so one run shows every failure.
//!
//! `FORKVM_TEST_RUNTIME=/usr/sbin/runc` runs the same cases with runc, to tell engine
//! set-up problems from runtime bugs.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::engines::{self, require, runtime, tmpfs_on, Engine, Kind};
use forkvm_image::fixtures;

/// The fixture image's name once tagged.
const IMAGE: &str = "localhost/fixture:1";
/// The runtime's name in containers.conf.
const RUNTIME: &str = "forkvm";

/// podman on the session's scratch space, with the session's installed forkvm as a
/// runtime in containers.conf. conmon passes the runtime only a fixed set of variables
/// (PATH, HOME, `CONTAINERS_CONF`, ...): the installed runtime needs none of forkvm's,
/// its `forkvm.toml` says where its VMs register.
fn podman() -> Engine {
    let cli = require("podman", "podman");
    require("conmon", "conmon");
    if forkvm_testhost::in_test_host() {
        // CNI's host-local IPAM keeps its leases there, read-only in the virtual host.
        tmpfs_on("/var/lib/cni");
    }
    // Lower case only: `podman pull oci:DIR` names the image after DIR's path.
    let scratch = tempfile::Builder::new()
        .prefix(&format!("podman-e2e-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir_in("/tmp")
        .expect("cannot make the scratch directory");
    let s = scratch.path().to_owned();
    for d in ["vms", "net", "tmp", "vartmp"] {
        std::fs::create_dir(s.join(d)).unwrap();
    }
    let vms = s.join("vms");
    let rt = runtime(&s, &vms);
    let conf = format!(
        "[containers]\n\
         # No journald here: podman logs reads the k8s-file log.\n\
         log_driver = \"k8s-file\"\n\
         \n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         \n\
         [engine.runtimes]\n\
         {RUNTIME} = [{:?}]\n\
         \n\
         [network]\n\
         network_config_dir = {:?}\n",
        rt.display().to_string(),
        s.join("net").display().to_string(),
    );
    let conf_path = s.join("containers.conf");
    std::fs::write(&conf_path, &conf).unwrap();
    println!("containers.conf:\n{conf}");
    let p = |name: &str| s.join(name).into_os_string();
    let global: Vec<OsString> = vec![
        "--root".into(),
        p("root"),
        "--runroot".into(),
        p("runroot"),
        "--tmpdir".into(),
        p("tmp"),
        "--storage-driver".into(),
        "vfs".into(),
        // The runtime's own log, for the diagnostics (conmon passes no --log).
        "--runtime-flag".into(),
        format!("log={}", s.join("runtime.log").display()).into(),
    ];
    let env: Vec<(OsString, OsString)> = vec![
        ("CONTAINERS_CONF".into(), conf_path.into()),
        // Image copies go to TMPDIR (else /var/tmp, read-only in the virtual host).
        ("TMPDIR".into(), p("vartmp")),
    ];
    let mut podman = Engine::new(Kind::Podman, cli, global, env, scratch);
    podman.runtime_name = RUNTIME.into();
    podman.runtime = rt;
    podman.image = IMAGE.into();
    // Where the VMs would go if the installed forkvm.toml were not read: the default.
    podman.set_vm_roots(vec![vms, forkvm_registry::default_root()]);
    // The runtime's state (podman passes no --root: runc's default under /run).
    podman.log_dirs = vec![PathBuf::from(forkvm_oci::state::DEFAULT_ROOT)];
    podman
}

#[test]
fn podman_drives_forkvm_runtime() {
    engines::session(forkvm_testhost::test_path!(), || {
        let podman = podman();
        podman.required("podman pull oci:DIR of the fixture image", || {
            let layout = podman.scratch.path().join("fixture");
            fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
            let reference = format!("oci:{}:fixture:1", layout.display());
            let id = podman.ok(&["pull", "-q", &reference]);
            let id = id.trim();
            assert_eq!(id.len(), 64, "an image id: {id:?}");
            podman.ok(&["tag", id, IMAGE]);
        });
        podman.required("podman info", || {
            let info = podman.ok(&[
                "info",
                "--format",
                "{{.Host.CgroupsVersion}} {{.Store.GraphDriverName}}",
            ]);
            println!("podman info: {}", info.trim());
        });
        cases(&podman);
        podman.finish();
    });
}

fn cases(podman: &Engine) {
    engines::core_cases(podman);

    podman.case("run --runtime PATH (no containers.conf entry)", || {
        let rt = podman.runtime.display().to_string();
        let out = podman.expect(
            &podman.run_args_via(&rt, &[], &["echo", "via-path"]),
            None,
            0,
        );
        assert_eq!(out.stdout, "via-path\n", "{out}");
    });

    engines::network_cases(
        podman,
        &engines::NetworkNames {
            default_network: "podman",
            names_resolve: false,
        },
    );

    engines::nothing_left_case(podman);
}
