//! End to end, in a KVM host: containerd 1.6's CRI, driven over its socket as kubelet
//! drives it (Kubernetes' CRI v1 protos, `k8s-cri`, over gRPC), runs a pod with the
//! runtime handler `runc` (the baseline), then with `forkvm`
//! (`io.containerd.forkvm.v1`: one VM for the pod, its containers inside), then with
//! `forkvm-fork` (the same runtime, its `ConfigPath` file naming a pod template made by
//! `forkvm-runtime pod-template`: the pod's VM is forked from it, not booted).
//!
//! One virtual-host session: a private containerd (root, state and sockets in a temporary
//! directory; the CRI plugin with the `native` snapshotter, as the virtual host has no
//! overlayfs; the CNI reference plugins of Debian's `containernetworking-plugins`, a
//! bridge with host-local addresses and loopback); the busybox fixture and a pause image
//! built from it imported into CRI's namespace. For each handler:
//! - RunPodSandbox gets the pod an address on the bridge (PodSandboxStatus);
//! - two containers: a server answering on the pod's loopback and a client that reaches
//!   it there (ExecSync: its output), the test reaching it at the pod's address and
//!   through the CRI's PortForward (containerd dials the pod namespace's loopback, which
//!   for forkvm is relayed to the guest's), ExecSync's exit code and stderr;
//! - the server's output in the CRI log file at the path the pod's config gives;
//! - ContainerStats answers for a running container, PodSandboxStats for the pod and
//!   each of its containers;
//! - the CRI's streaming Exec (containerd's streaming server, over a WebSocket, as
//!   `kubectl exec` uses it) gives a command's output, error output and exit code;
//!   with a terminal (`kubectl exec -it`) the command has a pty and reads what is sent;
//!   Attach (`kubectl attach -i`) reaches a container's main process's stdin and stdout;
//! - stopping and removing the containers and the pod leaves no sandbox, shim, VM or
//!   network namespace.
//!
//! For `forkvm-fork`, the pod's VM is a child of the template (its console has no boot)
//! and the pod has the address CNI gave it, as the booted pod does. The
//! time from RunPodSandbox to the first container started is printed per handler.
//!
//! And bad input: an unknown runtime handler, a container whose sandbox is gone, a
//! handler whose pod template is not one (clear CRI errors, nothing left behind).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerStatsRequest, CpuUsage,
    CreateContainerRequest, ExecRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, MemoryUsage, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatsRequest, PodSandboxStatusRequest, PortForwardRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-forkvm-v1");
const IMAGE: &str = "docker.io/library/fixture:latest";
const PAUSE: &str = "docker.io/library/pause:fixture";
/// CRI's containerd namespace.
const K8S: &str = "k8s.io";
/// The pods' network (a bridge, host-local addresses).
const SUBNET_PREFIX: &str = "10.88.77.";
/// Limit for one CRI call (a forkvm pod boots a VM: seconds in the virtual host).
const CALL_TIMEOUT: Duration = Duration::from_secs(240);
/// The pod template's directory in the session's directory.
const POD_TEMPLATE: &str = "pod-template";

mod common;
use common::Containerd;

/// A private containerd with its CRI plugin: runc's handler (the default) and forkvm's,
/// the pause image, the native snapshotter and a CNI bridge; forkvm's installed copy (the
/// shim and the runtime) first on its PATH, runc's shim and runc from the system's.
fn start_containerd() -> Containerd {
    let cri = format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.forkvm]
      runtime_type = "io.containerd.forkvm.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.forkvm-fork]
      runtime_type = "io.containerd.forkvm.v1"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.forkvm-fork.options]
        ConfigPath = "{{dir}}/forkvm-fork.json"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.forkvm-nottemplate]
      runtime_type = "io.containerd.forkvm.v1"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.forkvm-nottemplate.options]
        ConfigPath = "{{dir}}/forkvm-nottemplate.json"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{{dir}}/cni"
"#
    );
    Containerd::start("cri", &[], &cri, |d| {
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        std::fs::write(
            cni.join("10-forkvm-e2e.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "forkvm-e2e", "plugins": [
  {{"type": "bridge", "bridge": "cri-e2e0", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{SUBNET_PREFIX}0/24"}}]],
             "dataDir": "{ipam}"}}}}]}}"#,
                ipam = d.join("ipam").display()
            ),
        )
        .unwrap();
        // The pod template is made in the session (`pod_template`); the other handler's
        // names a directory that holds none.
        for (name, template) in [("fork", POD_TEMPLATE), ("nottemplate", "cni")] {
            std::fs::write(
                d.join(format!("forkvm-{name}.json")),
                format!(r#"{{"PodTemplate": "{}"}}"#, d.join(template).display()),
            )
            .unwrap();
        }
        let target = Path::new(SHIM).parent().unwrap();
        let prefix = forkvm_test_support::install_forkvm(target, d, &d.join("vms"));
        (prefix.join("bin"), Vec::new())
    })
}

impl Containerd {
    /// The VMs forkvm's runtime registered (their homes).
    fn vms(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect()
    }

    /// `ctr -n k8s.io ARGS`, which must succeed.
    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", K8S])
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", "native")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A CRI client on containerd's socket.
struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    fn connect(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = socket.to_owned();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]:0")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(socket).await?,
                            ))
                        }
                    })),
            )
            .expect("cannot connect to containerd's CRI");
        Self {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    /// Runs one call, within [`CALL_TIMEOUT`].
    fn call<T, F>(
        &mut self,
        what: &str,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, Box<tonic::Status>>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let client = self.client.clone();
        // The timer is made inside the runtime.
        let answer = self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, f(client)).await });
        let out = match answer {
            Ok(answer) => answer.map(tonic::Response::into_inner).map_err(Box::new),
            Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                "{what}: no answer within {CALL_TIMEOUT:?}"
            )))),
        };
        println!(
            "CRI {what}: {} in {:.1?}",
            if out.is_ok() { "ok" } else { "error" },
            started.elapsed()
        );
        out
    }

    fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.call("ExecSync", |mut c| async move { c.exec_sync(req).await })
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
    }
}

/// A pod's configuration, for `handler`'s pod.
fn pod_config(handler: &str, logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("pod-{handler}"),
            uid: format!("uid-{handler}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("pod-{handler}"),
        log_directory: logs.to_str().unwrap().into(),
        linux: Some(LinuxPodSandboxConfig {
            // As kubelet gives one (cgroupfs): the pod's cgroup, whose use
            // PodSandboxStats reports.
            cgroup_parent: format!("/{}/pod-{handler}", pods_cgroup()),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(kubelets_namespaces()),
                ..Default::default()
            }),
            // As kubelet gives them: the sum of the pod's containers' limits, which
            // containerd passes on as annotations and which size a booted pod's VM.
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: pod_memory_mib(handler) << 20,
                cpu_quota: 100_000,
                cpu_period: 100_000,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod's memory limit (all its containers'): a booted pod's VM has this and forkvm's
/// 128 MiB for the guest itself (more than the 512 MiB a sandbox gets without); a
/// forked pod's, within its template's 512 MiB, has the template's size.
fn pod_memory_mib(handler: &str) -> i64 {
    match handler {
        "forkvm" => 768,
        _ => 256,
    }
}

/// The namespace options kubelet gives a pod and its containers by default: the pod's
/// network and IPC, a PID namespace of each container's own.
fn kubelets_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

#[test]
fn containerds_cri_runs_pods_with_runc_and_with_forkvm() {
    if !forkvm_testhost::in_test_host() {
        // The guest kernel cache is read-only inside the virtual host: prepare it here.
        let agent = forkvm_guest_kernel::find_agent()
            .expect("the guest agent is not built: run `cargo xtask prepare-guest`");
        forkvm_guest_kernel::container_guest(&agent).expect("cannot prepare the container guest");
    }
    forkvm_testhost::on_kvm_host_with(
        forkvm_testhost::test_path!(),
        Duration::from_secs(900),
        Some(6144),
        body,
    );
}

fn body() {
    let session = Instant::now();
    common::mount_cgroup2();
    // CNI keeps its cached results there, read-only in the virtual host.
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs", "/var/lib/cni"])
        .status()
        .unwrap();
    assert!(status.success(), "cannot mount a tmpfs on /var/lib/cni");
    let ctd = start_containerd();
    // The images, as `docker save` writes them: busybox, and a pause image of it.
    let d = ctd.dir.path();
    let fixture = d.join("fixture.tar");
    forkvm_image::fixtures::write_docker_archive(&fixture, "fixture:latest").unwrap();
    let pause = d.join("pause.tar");
    let pause_config = forkvm_image::ImageConfig {
        entrypoint: vec!["sleep".into(), "2147483647".into()],
        cmd: Vec::new(),
        ..forkvm_image::fixtures::config()
    };
    forkvm_image::fixtures::write_docker_archive_with(
        &pause,
        Some("pause:fixture"),
        &forkvm_image::fixtures::busybox_layer_tars().unwrap(),
        &pause_config,
    )
    .unwrap();
    for archive in [&fixture, &pause] {
        ctd.ctr(&["images", "import", archive.to_str().unwrap()]);
    }
    let mut cri = Cri::connect(&ctd.socket());
    pod_template(&ctd);

    for handler in ["runc", "forkvm", "forkvm-fork"] {
        pod_lifecycle(&ctd, &mut cri, handler);
    }
    bad_input(&ctd, &mut cri);
    // The pods' cgroups, empty now (on a host with hardware KVM the test runs on the
    // host itself).
    let pods = Path::new("/sys/fs/cgroup").join(pods_cgroup());
    for pod in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
        let _ = std::fs::remove_dir(pod.path());
    }
    let _ = std::fs::remove_dir(&pods);
    println!("session took {:.1?}", session.elapsed());
}

/// The cgroup (under the hierarchy's root) the session's pods' cgroups are made in,
/// as kubelet makes `kubepods`: one of this run's own, so that a pod's stats are its own.
fn pods_cgroup() -> String {
    format!("forkvm-cri-e2e-{}", std::process::id())
}

/// `forkvm-runtime pod-template` makes the template `forkvm-fork`'s pods fork from: a
/// pod VM of the size forkvm's booted pods have (1 vCPU, the default memory).
fn pod_template(ctd: &Containerd) {
    let d = ctd.dir.path();
    let started = Instant::now();
    let out = Command::new(d.join("prefix/bin/forkvm-runtime"))
        .args(["pod-template", "--vcpus", "1"])
        .arg(d.join(POD_TEMPLATE))
        .stdin(Stdio::null())
        .output()
        .expect("cannot run forkvm-runtime");
    assert!(
        out.status.success(),
        "forkvm-runtime pod-template: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{} (in {:.1?})",
        String::from_utf8_lossy(&out.stdout).trim(),
        started.elapsed()
    );
    assert!(
        ctd.vms().is_empty(),
        "the template's VM is gone: {:?}",
        ctd.vms()
    );
}

/// One pod with `handler`, from RunPodSandbox to RemovePodSandbox.
fn pod_lifecycle(ctd: &Containerd, cri: &mut Cri, handler: &str) {
    println!("--- handler {handler}");
    let logs = ctd.dir.path().join("logs").join(handler);
    std::fs::create_dir_all(&logs).unwrap();
    let config = pod_config(handler, &logs);
    let req = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: handler.into(),
    };
    let pod_start = Instant::now();
    let pod = cri
        .call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", ctd.log()))
        .pod_sandbox_id;
    let req = PodSandboxStatusRequest {
        pod_sandbox_id: pod.clone(),
        verbose: false,
    };
    let status = cri
        .call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(req).await
        })
        .unwrap()
        .status
        .expect("a status");
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        ip.starts_with(SUBNET_PREFIX),
        "{handler}: pod address {ip:?}: {status:?}"
    );
    let forkvm = handler.starts_with("forkvm");
    if forkvm {
        let vms = ctd.vms();
        assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
        // Forked from the template, or booted: a booted guest's agent says it is ready
        // on the console as it boots; a fork child's guest booted in its template (and
        // said so there), so its console never does.
        let log = std::fs::read_to_string(vms[0].join("console.log")).unwrap_or_default();
        let forked = handler == "forkvm-fork";
        assert_eq!(
            log.contains("forkvm-init: ready uptime="),
            !forked,
            "{handler}: the pod VM's console:\n{log}"
        );
    }

    // A server on the pod's loopback, and a client beside it.
    let server = create_and_start(
        ctd,
        cri,
        &pod,
        &config,
        container_config(
            "server",
            &[
                "sh",
                "-c",
                "echo started; while true; do echo pong | nc -l -p 8080; done",
            ],
        ),
    );
    println!(
        "{handler}: pod start (RunPodSandbox to the first container started) {:.2?}",
        pod_start.elapsed()
    );
    let client = create_and_start(
        ctd,
        cri,
        &pod,
        &config,
        container_config("client", &["sleep", "100000"]),
    );
    if forkvm {
        assert_eq!(
            ctd.vms().len(),
            1,
            "the containers are in the pod's VM: {:?}",
            ctd.vms()
        );
        // The VM's size: the pod's limits and the guest's own 128 MiB where it booted
        // (not the 512 MiB a sandbox's spec alone gives), its template's where forked.
        let out = cri.exec_sync(&client, &["grep", "MemTotal", "/proc/meminfo"]);
        let kib: u64 = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{handler}: no MemTotal: {out:?}"));
        let vm_mib = if handler == "forkvm" {
            pod_memory_mib(handler) as u64 + 128
        } else {
            512
        };
        assert!(
            kib <= vm_mib << 10 && kib > (vm_mib - 96) << 10,
            "{handler}: the guest has {kib} KiB, not about a VM of {vm_mib} MiB"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cri.exec_sync(&client, &["sh", "-c", "nc 127.0.0.1 8080 </dev/null"]);
        if String::from_utf8_lossy(&out.stdout).contains("pong") {
            assert_eq!(out.exit_code, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: the client never reached the server on localhost: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // From the host, through CNI's bridge, at the pod's address: the pod's network is
    // the VM's (its NIC took the pod's interface over).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = ask(&ip, 8080);
        if answer.as_deref().is_ok_and(|a| a.contains("pong")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: the server never answered at the pod's address {ip}: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // `kubectl port-forward`: containerd dials the port on the loopback of the pod's
    // network namespace on the host, which for forkvm is the guest's. The server
    // answers one connection per `nc -l`: one that comes while its loop starts the
    // next (the check above just took one) is refused, so it is tried again, as above.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (data, error) = port_forward(cri, &pod, 8080);
        if data.contains("pong") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: port-forward to 8080 got {data:?} (error channel: {error:?})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = cri.exec_sync(&client, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(
        (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()),
        (3, &b"out\n"[..], &b"err\n"[..]),
        "{handler}: {out:?}"
    );
    // These containers' namespace options are the CRI's default, `POD` for PID (as
    // `shareProcessNamespace: true`): they are in the sandbox's PID namespace, whose
    // PID 1 is the sandbox's process, and see each other's processes.
    assert_eq!(
        pid_view(cri, &client),
        "sleep 2147483647 \n1\n",
        "{handler}: the client's PID namespace"
    );
    // The server's output, in the CRI log format (`TIME STREAM TAG TEXT`).
    let log = logs.join("server.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| {
            let f: Vec<&str> = l.splitn(4, ' ').collect();
            f.len() == 4 && f[1] == "stdout" && f[2] == "F" && f[3] == "started"
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: no `stdout F started` line in {}: {text:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let req = ContainerStatsRequest {
        container_id: server.clone(),
    };
    let stats = cri
        .call("ContainerStats", |mut c| async move {
            c.container_stats(req).await
        })
        .unwrap_or_else(|e| panic!("{handler}: ContainerStats: {e}"))
        .stats
        .expect("stats");
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(server.as_str())
    );
    // The server's own use (its cgroup's, in the pod's VM for forkvm): some CPU time
    // and memory, not the VM's or the host's.
    let (cpu_ns, working_set) = usage(stats.cpu.as_ref(), stats.memory.as_ref());
    println!("{handler}: server's stats: {cpu_ns} ns of CPU, working set {working_set} bytes");
    assert!(cpu_ns > 0, "{handler}: no CPU time: {stats:?}");
    assert!(
        working_set > 0 && working_set < 256 << 20,
        "{handler}: working set {working_set}: {stats:?}"
    );
    // The same command through the CRI's streaming Exec (`kubectl exec` without a
    // terminal): containerd's streaming server, over a WebSocket.
    let (stdout, stderr, status) = exec_streaming(
        cri,
        &client,
        &["sh", "-c", "echo out; hostname; echo err >&2; exit 3"],
    );
    assert_eq!(
        (stdout.as_str(), stderr.as_str()),
        (format!("out\npod-{handler}\n").as_str(), "err\n"),
        "{handler}: streaming Exec (status {status})"
    );
    assert!(
        status.contains("NonZeroExitCode") && status.contains("\"message\":\"3\""),
        "{handler}: streaming Exec's status: {status}"
    );
    // The pod's own use, as `kubectl top pod` reads it: CPU and memory, and each of its
    // containers'.
    let req = PodSandboxStatsRequest {
        pod_sandbox_id: pod.clone(),
    };
    let stats = cri
        .call("PodSandboxStats", |mut c| async move {
            c.pod_sandbox_stats(req).await
        })
        .unwrap_or_else(|e| panic!("{handler}: PodSandboxStats: {e}"))
        .stats
        .expect("stats");
    let linux = stats.linux.expect("the pod's Linux stats");
    let (pod_cpu_ns, pod_working_set) = usage(linux.cpu.as_ref(), linux.memory.as_ref());
    let mut names: Vec<String> = linux
        .containers
        .iter()
        .filter_map(|c| Some(c.attributes.as_ref()?.metadata.as_ref()?.name.clone()))
        .collect();
    names.sort();
    println!(
        "{handler}: pod's stats: {pod_cpu_ns} ns of CPU, working set {pod_working_set} bytes, \
         containers {names:?}"
    );
    assert!(
        pod_cpu_ns > 0,
        "{handler}: no CPU time for the pod: {linux:?}"
    );
    assert!(
        pod_working_set > 0,
        "{handler}: no memory for the pod: {linux:?}"
    );
    assert_eq!(names, ["client", "server"], "{handler}: {linux:?}");
    // `kubectl exec -it`: a terminal, and stdin through it.
    let (out, status) = exec_tty(
        cri,
        &client,
        &["sh", "-c", "tty; read x; echo got $x; exit 3"],
        b"hello\n",
    );
    assert!(
        out.contains("/dev/pts/") && out.contains("got hello"),
        "{handler}: Exec with a terminal gave {out:?} (status {status})"
    );
    assert!(
        status.contains("NonZeroExitCode") && status.contains("\"message\":\"3\""),
        "{handler}: Exec with a terminal's status: {status}"
    );
    // `kubectl attach -i`: a container made with stdin open reads what is sent to it.
    let reader = create_and_start(
        ctd,
        cri,
        &pod,
        &config,
        ContainerConfig {
            stdin: true,
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(kubelets_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..container_config(
                "reader",
                &["sh", "-c", "while read l; do echo attached $l; done"],
            )
        },
    );
    // With PID namespace `CONTAINER` (Kubernetes' default), PID 1 of its own, which
    // sees no other container's processes.
    assert_eq!(
        pid_view(cri, &reader),
        "sh -c while read l; do echo attached $l; done \n0\n",
        "{handler}: the reader's PID namespace"
    );
    let out = attach(cri, &reader, b"one\n", "attached one");
    assert!(
        out.contains("attached one"),
        "{handler}: Attach gave {out:?}"
    );
    if handler == "forkvm-fork" {
        second_forked_pod(ctd, cri, &logs);
    }

    for id in [&server, &client, &reader] {
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: 5,
        };
        cri.call("StopContainer", |mut c| async move {
            c.stop_container(req).await
        })
        .unwrap_or_else(|e| panic!("{handler}: StopContainer: {e}"));
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        cri.call("RemoveContainer", |mut c| async move {
            c.remove_container(req).await
        })
        .unwrap_or_else(|e| panic!("{handler}: RemoveContainer: {e}"));
    }
    remove_pod(ctd, cri, &pod);
    assert_nothing_left(ctd, cri, handler);
}

/// What container `id` sees of PID namespaces: PID 1's command line (its arguments
/// joined by spaces, each followed by one), then how many of its processes are the
/// pod's server's (`nc -l -p 8080`).
fn pid_view(cri: &mut Cri, id: &str) -> String {
    let out = cri.exec_sync(
        id,
        &[
            "sh",
            "-c",
            "tr '\\0' ' ' < /proc/1/cmdline; echo; \
             cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -c 'nc -l -p 808[0]' || true",
        ],
    );
    assert_eq!(out.exit_code, 0, "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (CPU time in ns, memory working set in bytes) of CRI stats; 0 for what is missing.
fn usage(cpu: Option<&CpuUsage>, memory: Option<&MemoryUsage>) -> (u64, u64) {
    (
        cpu.and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value),
        memory
            .and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value),
    )
}

/// Runs `cmd` in container `id` as `kubectl exec` does without a terminal: the CRI's
/// Exec gives a URL of containerd's streaming server, which runs it over a WebSocket
/// in Kubernetes' `v4.channel.k8s.io` framing (each message's first byte its stream:
/// 1 stdout, 2 stderr, 3 the status). Returns (stdout, stderr, the status's JSON).
fn exec_streaming(cri: &mut Cri, id: &str, cmd: &[&str]) -> (String, String, String) {
    let url = exec_url(cri, id, cmd, false);
    let [_, out, err, status, _] = channels(&url, &[], |_| false);
    let [out, err, status] = [out, err, status].map(|s| String::from_utf8_lossy(&s).into_owned());
    (out, err, status)
}

/// Runs `cmd` in container `id` as `kubectl exec -it` does: with a terminal, `input` on
/// its stdin (channel 0). Returns (the terminal's output, the status's JSON).
fn exec_tty(cri: &mut Cri, id: &str, cmd: &[&str], input: &[u8]) -> (String, String) {
    let url = exec_url(cri, id, cmd, true);
    let [_, out, _, status, _] = channels(&url, &[(0, input)], |_| false);
    let [out, status] = [out, status].map(|s| String::from_utf8_lossy(&s).into_owned());
    (out, status)
}

/// The streaming URL the CRI's Exec gives for `cmd` in container `id`: with `tty`, a
/// terminal and stdin (its output on stdout alone); without, stdout and stderr apart.
fn exec_url(cri: &mut Cri, id: &str, cmd: &[&str], tty: bool) -> String {
    let req = ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: tty,
        stdout: true,
        stderr: !tty,
    };
    cri.call("Exec", |mut c| async move { c.exec(req).await })
        .unwrap_or_else(|e| panic!("Exec {cmd:?} (terminal: {tty}) in {id}: {e}"))
        .url
}

/// `kubectl attach -i` to container `id` (made with `stdin: true`): sends `input` to
/// its main process's stdin and reads its stdout until it holds `expect` (or the
/// server closes, or 30 s pass). Returns that stdout.
fn attach(cri: &mut Cri, id: &str, input: &[u8], expect: &str) -> String {
    let req = AttachRequest {
        container_id: id.into(),
        stdin: true,
        tty: false,
        stdout: true,
        stderr: true,
    };
    let url = cri
        .call("Attach", |mut c| async move { c.attach(req).await })
        .unwrap_or_else(|e| panic!("Attach to {id}: {e}"))
        .url;
    let [_, out, ..] = channels(&url, &[(0, input)], |c| {
        String::from_utf8_lossy(&c[1]).contains(expect)
    });
    String::from_utf8_lossy(&out).into_owned()
}

/// Talks to a URL of containerd's streaming server over its WebSocket
/// ([`websocket`]): sends each of `inputs` on its channel, then collects what comes on
/// channels 0 to 4 (each message's first byte its channel) until the server closes,
/// `done` holds of what came, or 30 s pass without a message.
fn channels(
    url: &str,
    inputs: &[(u8, &[u8])],
    done: impl Fn(&[Vec<u8>; 5]) -> bool,
) -> [Vec<u8>; 5] {
    let mut socket = websocket(url);
    socket
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for (channel, bytes) in inputs {
        let mut message = vec![*channel];
        message.extend_from_slice(bytes);
        socket
            .send(tungstenite::Message::Binary(message))
            .unwrap_or_else(|e| panic!("cannot send on {url}: {e}"));
    }
    let mut got: [Vec<u8>; 5] = Default::default();
    while !done(&got) {
        match socket.read() {
            Ok(tungstenite::Message::Binary(data)) => {
                if let Some(&n @ 0..=4) = data.first() {
                    got[n as usize].extend_from_slice(&data[1..]);
                }
            }
            Ok(tungstenite::Message::Close(_))
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                break
            }
            Ok(_) => {}
            Err(e) => panic!("over {url}, having got {got:?}: {e}"),
        }
    }
    let _ = socket.close(None);
    got
}

/// A WebSocket to a URL of containerd's streaming server, in Kubernetes'
/// `v4.channel.k8s.io` framing (each message's first byte its channel), connected and
/// read within limits, the handshake too.
fn websocket(url: &str) -> tungstenite::WebSocket<std::net::TcpStream> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap_or_else(|e| panic!("the URL {url}: {e}"));
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static("v4.channel.k8s.io"),
    );
    let uri = request.uri();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(
        uri.host().expect("a host in the URL"),
        uri.port_u16().expect("a port in the URL"),
    ))
    .unwrap()
    .next()
    .unwrap();
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tcp.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    let (socket, _) =
        tungstenite::client(request, tcp).unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"));
    socket
}

/// What `kubectl port-forward` gets from `port` of `pod` when it sends nothing: the
/// CRI's PortForward gives a URL of containerd's streaming server; over its WebSocket,
/// channel 0 carries the port's data and channel 1 its errors, each starting with the
/// port (2 bytes, little-endian). Reads until the data holds a line, the server
/// closes, or 30 s pass without a message. Returns (data, errors).
fn port_forward(cri: &mut Cri, pod: &str, port: u16) -> (String, String) {
    let req = PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: vec![port.into()],
    };
    let url = cri
        .call(
            "PortForward",
            |mut c| async move { c.port_forward(req).await },
        )
        .unwrap_or_else(|e| panic!("PortForward {port} of {pod}: {e}"))
        .url;
    let [data, errors, ..] = channels(&url, &[], |c| c[0].ends_with(b"\n"));
    let prefix = port.to_le_bytes();
    let [data, errors] = [data, errors].map(|bytes| {
        let text = bytes.strip_prefix(&prefix[..]).unwrap_or(&bytes[..]);
        String::from_utf8_lossy(text).into_owned()
    });
    (data, errors)
}

/// What a TCP server at `ip`:`port` answers a client that sends nothing (read until it
/// closes, or for 5 s).
fn ask(ip: &str, port: u16) -> std::io::Result<String> {
    use std::io::Read;
    let addr: std::net::IpAddr = ip.parse().map_err(std::io::Error::other)?;
    let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(5))?;
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if got.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// StopPodSandbox and RemovePodSandbox of `pod`.
fn remove_pod(ctd: &Containerd, cri: &mut Cri, pod: &str) {
    let req = StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    };
    cri.call("StopPodSandbox", |mut c| async move {
        c.stop_pod_sandbox(req).await
    })
    .unwrap_or_else(|e| panic!("StopPodSandbox {pod}: {e}\n{}", ctd.log()));
    let req = RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    };
    cri.call("RemovePodSandbox", |mut c| async move {
        c.remove_pod_sandbox(req).await
    })
    .unwrap_or_else(|e| panic!("RemovePodSandbox {pod}: {e}\n{}", ctd.log()));
}

/// A second pod forked from the template while the first runs: it takes the checked
/// copy of the template's memory the first one's monitor holds, so both VMs map the
/// same memory file (one copy for the pods of a template, as for fork children).
fn second_forked_pod(ctd: &Containerd, cri: &mut Cri, logs: &Path) {
    let req = RunPodSandboxRequest {
        config: Some(pod_config("fork-2", logs)),
        runtime_handler: "forkvm-fork".into(),
    };
    let started = Instant::now();
    let pod = cri
        .call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .unwrap_or_else(|e| panic!("RunPodSandbox (a second forked pod): {e}\n{}", ctd.log()))
        .pod_sandbox_id;
    println!(
        "forkvm-fork: a second pod's RunPodSandbox, the first one running: {:.2?}",
        started.elapsed()
    );
    let vms = ctd.vms();
    assert_eq!(vms.len(), 2, "{vms:?}");
    // The template memory files each VM process maps, by inode.
    let template_memory = |vm: &Path| -> Vec<String> {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vm.join("state.json")).unwrap()).unwrap();
        let pid = state["process"]["pid"].as_u64().expect("a VM process");
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("/memfd:forkvm-template-memory"))
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .collect()
    };
    let (a, b) = (template_memory(&vms[0]), template_memory(&vms[1]));
    assert!(
        !a.is_empty() && a.iter().any(|i| b.contains(i)),
        "the two pods' VMs map the same template memory: {a:?} {b:?}"
    );
    remove_pod(ctd, cri, &pod);
}

/// CreateContainer and StartContainer of `config` in `pod`; its id.
fn create_and_start(
    ctd: &Containerd,
    cri: &mut Cri,
    pod: &str,
    sandbox: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let name = config.metadata.as_ref().unwrap().name.clone();
    let req = CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(sandbox.clone()),
    };
    let id = cri
        .call("CreateContainer", |mut c| async move {
            c.create_container(req).await
        })
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", ctd.log()))
        .container_id;
    let req = StartContainerRequest {
        container_id: id.clone(),
    };
    cri.call("StartContainer", |mut c| async move {
        c.start_container(req).await
    })
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", ctd.log()));
    id
}

/// The network namespaces CRI made (`/var/run/netns/cni-*`).
fn cri_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .collect()
}

/// No sandbox or container listed, no shim, runtime, VM or pod network namespace left.
fn assert_nothing_left(ctd: &Containerd, cri: &mut Cri, what: &str) {
    let req = ListPodSandboxRequest::default();
    let pods = cri
        .call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(req).await
        })
        .unwrap()
        .items;
    assert!(pods.is_empty(), "{what}: sandboxes left: {pods:?}");
    let req = ListContainersRequest::default();
    let containers = cri
        .call("ListContainers", |mut c| async move {
            c.list_containers(req).await
        })
        .unwrap()
        .containers;
    assert!(
        containers.is_empty(),
        "{what}: containers left: {containers:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = ["containerd-shim", "forkvm-runtime", "forkvm-vmm"]
            .iter()
            .flat_map(|p| forkvm_test_support::processes_matching(p))
            .collect();
        if left.is_empty() && ctd.vms().is_empty() && cri_netns().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still there 30 s after the pod was removed: {left:#?}, VMs {:?}, \
             network namespaces {:?}\n{}",
            ctd.vms(),
            cri_netns(),
            ctd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An unknown handler and a container whose sandbox is gone: errors that name them,
/// nothing left behind.
fn bad_input(ctd: &Containerd, cri: &mut Cri) {
    let logs = ctd.dir.path().join("logs/bad");
    std::fs::create_dir_all(&logs).unwrap();
    let refused = |cri: &mut Cri, handler: &str, what: &str| {
        let req = RunPodSandboxRequest {
            config: Some(pod_config(handler, &logs)),
            runtime_handler: handler.into(),
        };
        cri.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .expect_err(what)
    };
    let e = refused(cri, "nope", "an unknown handler");
    assert!(e.message().contains("nope"), "{e}");
    assert_nothing_left(ctd, cri, "an unknown handler");

    // A handler whose pod template is not one: refused, naming the directory.
    let e = refused(cri, "forkvm-nottemplate", "a pod template that is not one");
    let named = ctd.dir.path().join("cni").display().to_string();
    assert!(
        e.message()
            .contains(&format!("cannot use the pod template in {named}")),
        "{e}"
    );
    assert_nothing_left(ctd, cri, "a pod template that is not one");

    // A pod whose limits ask for more than its template's VM has: refused, naming both.
    let mut config = pod_config("forkvm-fork", &logs);
    if let Some(r) = config.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        r.cpu_quota = 300_000;
    }
    let req = RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: "forkvm-fork".into(),
    };
    let e = cri
        .call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .expect_err("a pod larger than its template");
    assert!(
        e.message().contains("too small for the pod")
            && e.message().contains("ask for 3 vCPUs")
            && e.message().contains("the template has 1"),
        "{e}"
    );
    assert_nothing_left(ctd, cri, "a pod larger than its template");

    let config = pod_config("forkvm", &logs);
    let req = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "forkvm".into(),
    };
    let pod = cri
        .call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()))
        .pod_sandbox_id;
    remove_pod(ctd, cri, &pod);
    let req = CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container_config("orphan", &["true"])),
        sandbox_config: Some(config),
    };
    let e = cri
        .call("CreateContainer", |mut c| async move {
            c.create_container(req).await
        })
        .expect_err("a container whose sandbox is gone");
    assert!(
        e.message().contains(&pod) || e.message().contains("not found"),
        "{e}"
    );
    assert_nothing_left(ctd, cri, "a container whose sandbox is gone");
}
