use super::*;
use forkvm_agent_proto::PidNamespace;
use serde_json::{json, Value};

/// A config as `runc spec` writes it, trimmed to what the tests touch.
fn runc_config() -> Value {
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore"],
            "readonlyPaths": ["/proc/bus", "/proc/sys"]
        }
    })
}

struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    fn new(config: &Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_vec(config).unwrap(),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn load(&self) -> Result<ContainerPlan, BundleError> {
        load(self.path())
    }
}

fn load_with(edit: impl FnOnce(&mut Value)) -> Result<ContainerPlan, BundleError> {
    let mut config = runc_config();
    edit(&mut config);
    Bundle::new(&config).load()
}

fn err_with(edit: impl FnOnce(&mut Value)) -> String {
    load_with(edit).unwrap_err().to_string()
}

#[test]
fn runc_spec_default_plans() {
    let bundle = Bundle::new(&runc_config());
    let plan = bundle.load().unwrap();
    assert_eq!(
        plan.rootfs,
        bundle.path().canonicalize().unwrap().join("rootfs")
    );
    assert!(plan.rootfs.is_absolute());
    assert!(plan.rootfs_readonly);
    assert_eq!(plan.hostname.as_deref(), Some("runc"));
    assert_eq!(plan.vcpus, 1);
    assert_eq!(plan.mem_mib, DEFAULT_MEM_MIB);
    let p = &plan.process;
    assert_eq!(p.args, ["sh"]);
    assert_eq!(p.env.len(), 2);
    assert_eq!(p.cwd, "/");
    assert!(p.tty && p.stdin && p.init);
    assert_eq!(p.user, User::default());
    assert_eq!(
        p.rlimits,
        [Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            soft: 1024,
            hard: 1024
        }]
    );
    // Default capabilities, standard mounts and the namespaces are silent.
    assert_eq!(plan.warnings, Vec::<String>::new());
    // The monitor's own mount, UTS and IPC namespaces; the engine's network hooks
    // configure a new network namespace; the holder makes the pid and cgroup ones.
    assert_eq!(
        plan.namespaces,
        MonitorNamespaces {
            mount: HostNamespace::New,
            uts: HostNamespace::New,
            ipc: HostNamespace::New,
            pid: None,
            holder: HolderNamespaces {
                pid: true,
                cgroup: true,
                user: None,
            },
        }
    );
    assert_eq!(plan.network, NetworkPlan::New);
}

#[test]
fn monitor_namespaces_follow_the_spec() {
    // Listed without a path: new; with one: joined; not listed: the runtime's own.
    let plan = load_with(|c| {
        c["linux"]["namespaces"] = json!([
            {"type": "network", "path": "/proc/9/ns/net"},
            {"type": "mount"},
            {"type": "uts", "path": "/proc/9/ns/uts"},
            {"type": "pid", "path": "/proc/9/ns/pid_for_children"},
        ])
    })
    .unwrap();
    assert_eq!(
        plan.namespaces,
        MonitorNamespaces {
            mount: HostNamespace::New,
            uts: HostNamespace::Join("/proc/9/ns/uts".into()),
            ipc: HostNamespace::Inherit,
            pid: Some("/proc/9/ns/pid_for_children".into()),
            holder: HolderNamespaces::default(),
        }
    );
    assert!(!plan.namespaces.holder.any());
    assert_eq!(plan.network, NetworkPlan::Join("/proc/9/ns/net".into()));
    // Another container's pid namespace is in another VM: the guest's inside this one.
    assert_eq!(plan.process.pid_namespace, None);
    let plan = load_with(|c| {
        c["linux"]["namespaces"] = json!([
            {"type": "network"},
            {"type": "mount", "path": "/proc/9/ns/mnt"},
            {"type": "pid"},
        ])
    })
    .unwrap();
    assert_eq!(
        plan.namespaces.mount,
        HostNamespace::Join("/proc/9/ns/mnt".into())
    );
    assert_eq!(plan.namespaces.pid, None);
    assert!(plan.namespaces.holder.pid && !plan.namespaces.holder.cgroup);
    // A new one in the guest too, whose PID 1 the container's process is.
    assert_eq!(plan.process.pid_namespace, Some(PidNamespace::New));
    // A user namespace: the holder's has the spec's maps; time is the VM's only.
    let plan = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "user"}, {"type": "time"}]);
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 10}]);
        c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 2000, "size": 5}]);
    })
    .unwrap();
    let user = plan
        .namespaces
        .holder
        .user
        .as_ref()
        .expect("a user namespace");
    assert_eq!(Some(user), plan.user_namespace.as_ref());
    assert_eq!(
        (user.uid_mappings[0].host_id, user.gid_mappings[0].size),
        (1000, 5)
    );
    assert!(!plan.namespaces.holder.pid && !plan.namespaces.holder.cgroup);
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("linux.namespaces (time) are made inside the VM only")),
        "{:?}",
        plan.warnings
    );
    // Both by path: the monitor could not learn its host pid.
    let e = err_with(|c| {
        c["linux"]["namespaces"] = json!([
            {"type": "network"},
            {"type": "mount", "path": "/proc/9/ns/mnt"},
            {"type": "pid", "path": "/proc/9/ns/pid"},
        ])
    });
    assert!(
        e.contains("pid (/proc/9/ns/pid) and mount (/proc/9/ns/mnt) both by path"),
        "{e}"
    );
    // No namespace at all: every one the runtime's, the host's network with a warning.
    let plan = load_with(|c| {
        c["linux"].as_object_mut().unwrap().remove("namespaces");
    })
    .unwrap();
    assert_eq!(plan.namespaces, MonitorNamespaces::default());
    assert_eq!(plan.network, NetworkPlan::Host);
    assert_eq!(plan.process.pid_namespace, None);
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("no network namespace")
                && w.contains("--network host")
                && w.contains("only loopback")),
        "{:?}",
        plan.warnings
    );
    // What the monitor binds lives in a mount namespace it made: volumes and a pod's
    // sandbox need one.
    let volume = |c: &mut Value| {
        c["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind"]}),
        );
    };
    assert_eq!(load_with(volume).unwrap().volumes.len(), 1);
    for namespaces in [
        json!([{"type": "network"}]),
        json!([{"type": "network"}, {"type": "mount", "path": "/proc/9/ns/mnt"}]),
    ] {
        let e = err_with(|c| {
            volume(c);
            c["linux"]["namespaces"] = namespaces.clone();
        });
        assert!(
            e.contains("mounts (bind of a directory)") && e.contains("mount namespace"),
            "{e}"
        );
        let e = err_with(|c| {
            c["annotations"] = json!({CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "abc"});
            c["linux"]["namespaces"] = namespaces.clone();
        });
        assert!(e.contains("pod sandbox"), "{e}");
    }
    // Bad input, named.
    let e = err_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "network"}, {"type": "uts"}, {"type": "uts"}])
    });
    assert!(
        e.contains("linux.namespaces[uts]") && e.contains("only once"),
        "{e}"
    );
    let e = err_with(|c| {
        c["linux"]["namespaces"] = json!([
            {"type": "network"},
            {"type": "pid"},
            {"type": "pid", "path": "/proc/9/ns/pid"},
        ])
    });
    assert!(
        e.contains("linux.namespaces[pid]") && e.contains("only once"),
        "{e}"
    );
    let e = err_with(|c| {
        c["linux"]["namespaces"] =
            json!([{"type": "network"}, {"type": "cgroup"}, {"type": "cgroup"}])
    });
    assert!(
        e.contains("linux.namespaces[cgroup]") && e.contains("only once"),
        "{e}"
    );
    let e = err_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "network"}, {"type": "ipc", "path": "ns/ipc"}])
    });
    assert!(
        e.contains("linux.namespaces[ipc].path (ns/ipc)") && e.contains("absolute"),
        "{e}"
    );
    for kind in ["cgroup", "user"] {
        let e = err_with(|c| {
            c["linux"]["namespaces"] =
                json!([{"type": "network"}, {"type": kind, "path": format!("/proc/9/ns/{kind}")}])
        });
        assert!(
            e.contains(&format!("linux.namespaces[{kind}].path")) && e.contains("inside"),
            "{e}"
        );
    }
}

#[test]
fn user_and_process_fields_map() {
    let plan = load_with(|c| {
        c["process"]["user"] =
            json!({"uid": 1000, "gid": 100, "additionalGids": [10, 20], "umask": 18});
        c["process"]["args"] = json!(["/bin/app", "--flag"]);
        c["process"]["cwd"] = json!("/srv");
        c["process"]["terminal"] = json!(false);
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NPROC", "hard": 20, "soft": 10}]);
        c["process"]["consoleSize"] = json!({"height": 22, "width": 77});
        c["process"]["oomScoreAdj"] = json!(-500);
    })
    .unwrap();
    let p = plan.process;
    assert_eq!(p.umask, Some(18));
    assert_eq!(p.oom_score_adj, Some(-500));
    assert!(p.no_new_privileges, "runc's config asks for it");
    // runc's config: bounding, effective, permitted and ambient, no inheritable set.
    let three = (1 << 29) | (1 << 5) | (1 << 10);
    assert_eq!(
        p.capabilities,
        Some(Capabilities {
            bounding: three,
            effective: three,
            permitted: three,
            inheritable: 0,
            ambient: three,
        })
    );
    assert_eq!(p.console_size, Some([22, 77]));
    assert_eq!(p.args, ["/bin/app", "--flag"]);
    assert_eq!(p.cwd, "/srv");
    assert!(!p.tty);
    assert_eq!(
        p.user,
        User {
            uid: 1000,
            gid: 100,
            additional_gids: vec![10, 20],
            name: None
        }
    );
    assert_eq!(p.rlimits[0].kind, "RLIMIT_NPROC");
    assert_eq!((p.rlimits[0].soft, p.rlimits[0].hard), (10, 20));
    assert!(
        !plan.warnings.iter().any(|w| w.contains("umask")),
        "applied"
    );
}

#[test]
fn absolute_root_path_and_writable_root() {
    let rootfs = tempfile::tempdir().unwrap();
    let abs = rootfs.path().to_str().unwrap().to_owned();
    let plan = load_with(|c| c["root"] = json!({"path": abs})).unwrap();
    assert_eq!(plan.rootfs, rootfs.path().canonicalize().unwrap());
    assert!(!plan.rootfs_readonly);
}

#[test]
fn empty_hostname_is_none() {
    let plan = load_with(|c| c["hostname"] = json!("")).unwrap();
    assert_eq!(plan.hostname, None);
    let plan = load_with(|c| {
        c.as_object_mut()
            .unwrap()
            .remove("hostname")
            .map(drop)
            .unwrap()
    })
    .unwrap();
    assert_eq!(plan.hostname, None);
}

#[test]
fn memory_limit() {
    let mem = |limit: Value| {
        load_with(|c| c["linux"]["resources"]["memory"] = json!({"limit": limit}))
            .unwrap()
            .mem_mib
    };
    assert_eq!(mem(json!(1024 * 1024 * 1024)), 1024);
    assert_eq!(mem(json!(256 * 1024 * 1024 + 1)), 257, "rounds up");
    assert_eq!(mem(json!(64 * 1024 * 1024)), MIN_MEM_MIB);
    assert_eq!(mem(json!(1)), MIN_MEM_MIB);
    assert_eq!(mem(json!(-1)), DEFAULT_MEM_MIB);
    assert_eq!(mem(json!(0)), DEFAULT_MEM_MIB);
    let plan =
        load_with(|c| c["linux"]["resources"]["memory"] = json!({"limit": 1 << 20})).unwrap();
    assert!(plan
        .warnings
        .iter()
        .any(|w| w.contains("minimum of 128 MiB")));
}

#[test]
fn a_pod_sandbox_is_sized_by_the_whole_pods_limits() {
    // containerd's sandbox spec: cpu shares only, and the pod's sums as annotations.
    let sandbox = |annotations: Value| {
        load_with(|c| {
            c["annotations"] = annotations;
            c["annotations"][CRI_CONTAINER_TYPE] = json!("sandbox");
            c["annotations"][CRI_SANDBOX_ID] = json!("abc");
            c["linux"]["resources"]["cpu"] = json!({"shares": 2});
            c["linux"]["cgroupsPath"] = json!("/kubepods/pod-abc/abc");
        })
    };
    let plan = sandbox(json!({
        CRI_SANDBOX_MEMORY: (1000u64 << 20).to_string(),
        CRI_SANDBOX_CPU_QUOTA: "250000",
        CRI_SANDBOX_CPU_PERIOD: "100000",
    }))
    .unwrap();
    assert_eq!((plan.vcpus, plan.mem_mib), (3, 1000 + POD_GUEST_MIB));
    assert_eq!(
        plan.pod_size,
        PodSize {
            vcpus: Some(3),
            mem_mib: Some(1000 + POD_GUEST_MIB)
        }
    );
    // The VM process's host cgroup holds the pod's VM.
    assert_eq!(
        plan.cgroup.unwrap().memory_max,
        Some(
            forkvm_vmm::memory::guest_memory_budget((1000 + POD_GUEST_MIB) << 20)
                + forkvm_jail::cgroup::VMM_OVERHEAD
        )
    );
    // Limits that ask less than the sandbox's default (kubelet counts a container
    // without a limit as 0): the default, never less.
    let plan = sandbox(json!({CRI_SANDBOX_MEMORY: (64u64 << 20).to_string()})).unwrap();
    assert_eq!((plan.vcpus, plan.mem_mib), (1, DEFAULT_MEM_MIB));
    assert_eq!(plan.pod_size.mem_mib, Some(64 + POD_GUEST_MIB));
    // More than a VM can have: refused by name.
    let e = sandbox(json!({CRI_SANDBOX_MEMORY: i64::MAX.to_string()}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("annotations.io.kubernetes.cri.sandbox-memory: the pod's limits need a VM of"),
        "{e}"
    );
    // A pod without limits (kubelet's zeros, or containerd before 1.6.7): the
    // sandbox's own spec, as before.
    for none in [
        json!({CRI_SANDBOX_MEMORY: "0", CRI_SANDBOX_CPU_QUOTA: "0", CRI_SANDBOX_CPU_PERIOD: "100000"}),
        json!({CRI_SANDBOX_CPU_QUOTA: "-1"}),
        json!({}),
    ] {
        let plan = sandbox(none.clone()).unwrap();
        assert_eq!((plan.vcpus, plan.mem_mib), (1, DEFAULT_MEM_MIB), "{none}");
        assert_eq!(plan.pod_size, PodSize::default(), "{none}");
    }
    // Not a number: an error naming the annotation.
    let e = sandbox(json!({CRI_SANDBOX_MEMORY: "lots"}))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with(
            r#"annotations.io.kubernetes.cri.sandbox-memory: "lots" is not a whole number"#
        ),
        "{e}"
    );
    // Only a sandbox is sized so: a pod's container is made in its sandbox's VM, and a
    // container outside a pod keeps its own limits.
    let plan = load_with(|c| {
        c["annotations"] = json!({CRI_SANDBOX_MEMORY: (1u64 << 30).to_string()});
    })
    .unwrap();
    assert_eq!(
        (plan.mem_mib, plan.pod_size),
        (DEFAULT_MEM_MIB, PodSize::default())
    );
    // What a template of a given size lacks for such a pod, in words.
    let size = PodSize {
        vcpus: Some(3),
        mem_mib: Some(428),
    };
    assert_eq!(size.short_of(4, 512), None);
    let short = size.short_of(1, 256).unwrap();
    assert!(
        short.contains("ask for 3 vCPUs")
            && short.contains("the template has 1")
            && short.contains("a VM of 428 MiB")
            && short.contains("the template has 256 MiB"),
        "{short}"
    );
    assert_eq!(PodSize::default().short_of(1, 128), None);
}

#[test]
fn cgroups_path_and_limits_name_the_vm_process_group() {
    let plan = load_with(|c| {
        c["linux"]["cgroupsPath"] = json!("system.slice:docker:abc");
        c["linux"]["resources"]["memory"] = json!({"limit": 512 << 20});
        c["linux"]["resources"]["pids"] = json!({"limit": 64});
    })
    .unwrap();
    let cgroup = plan.cgroup.expect("a cgroup");
    assert_eq!(cgroup.path, Path::new("system.slice/docker-abc.scope"));
    assert_eq!(
        cgroup.memory_max,
        Some(
            forkvm_vmm::memory::guest_memory_budget(512 << 20) + forkvm_jail::cgroup::VMM_OVERHEAD
        ),
        "guest memory and the VMM's"
    );
    assert_eq!(cgroup.pids_max, Some(64));
    // No pids limit (or an unlimited one): forkvm's default; no path: forkvm's own group.
    let plan = load_with(|c| c["linux"]["cgroupsPath"] = json!("/docker/abc")).unwrap();
    assert_eq!(
        plan.cgroup.unwrap().pids_max,
        Some(forkvm_jail::cgroup::DEFAULT_PIDS_MAX)
    );
    let plan = load_with(|c| {
        c["linux"].as_object_mut().unwrap().remove("cgroupsPath");
    })
    .unwrap();
    assert_eq!(plan.cgroup, None);
    // A path out of the hierarchy is refused by name.
    let e = err_with(|c| c["linux"]["cgroupsPath"] = json!("/docker/../../etc"));
    assert!(e.contains("linux.cgroupsPath"), "{e}");
}

#[test]
fn a_bare_linux_section_defaults() {
    // Only the network namespace, without which the container would be on the host's.
    let plan = load_with(|c| c["linux"] = json!({"namespaces": [{"type": "network"}]})).unwrap();
    assert_eq!((plan.vcpus, plan.mem_mib), (1, DEFAULT_MEM_MIB));
    assert!(plan.warnings.is_empty());
}

#[test]
fn vcpus_from_quota_and_cpuset() {
    let vcpus = |cpu: Value| {
        load_with(|c| c["linux"]["resources"]["cpu"] = cpu)
            .unwrap()
            .vcpus
    };
    assert_eq!(vcpus(json!({"quota": 200000, "period": 100000})), 2);
    assert_eq!(
        vcpus(json!({"quota": 150000, "period": 100000})),
        2,
        "rounds up"
    );
    assert_eq!(vcpus(json!({"quota": 50000, "period": 100000})), 1);
    assert_eq!(vcpus(json!({"quota": 300000})), 3, "default period");
    assert_eq!(vcpus(json!({"quota": -1, "cpus": "0-3"})), 4);
    assert_eq!(vcpus(json!({"cpus": "0-3,6,8-9"})), 7);
    assert_eq!(
        vcpus(json!({"cpus": "1,1,1-2"})),
        2,
        "duplicates count once"
    );
    assert_eq!(
        vcpus(json!({"quota": 100000, "period": 100000, "cpus": "0-7"})),
        1,
        "quota wins"
    );
    assert_eq!(vcpus(json!({"shares": 1024})), 1);
    assert_eq!(
        vcpus(json!({"quota": 1000 * 100000, "period": 100000})),
        255
    );
    let e = err_with(|c| c["linux"]["resources"]["cpu"] = json!({"cpus": "0-x"}));
    assert!(e.contains("linux.resources.cpu.cpus"), "{e}");
    let e = err_with(|c| c["linux"]["resources"]["cpu"] = json!({"cpus": "3-1"}));
    assert!(e.contains("backwards"), "{e}");
}

/// The plan's filesystems as (destination, type, source), in order.
fn mount_order(plan: &ContainerPlan) -> Vec<(&str, &str, &str)> {
    plan.filesystems
        .iter()
        .map(|m| {
            (
                m.destination.as_str(),
                m.fs_type.as_str(),
                m.source.as_str(),
            )
        })
        .collect()
}

#[test]
fn mounts() {
    let add = |m: Value| move |c: &mut Value| c["mounts"].as_array_mut().unwrap().push(m);
    // tmpfs anywhere: silent, and mounted by the guest after the spec's others, in the
    // spec's order, with their options.
    let plan = load_with(add(
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}),
    ))
    .unwrap();
    assert_eq!(plan.warnings, Vec::<String>::new());
    assert_eq!(
        mount_order(&plan),
        [
            ("/proc", "proc", "proc"),
            ("/dev", "tmpfs", "tmpfs"),
            ("/dev/pts", "devpts", "devpts"),
            ("/dev/shm", "tmpfs", "shm"),
            ("/dev/mqueue", "mqueue", "mqueue"),
            ("/sys", "sysfs", "sysfs"),
            ("/sys/fs/cgroup", "cgroup", "cgroup"),
            ("/run", "tmpfs", "tmpfs"),
        ]
    );
    assert_eq!(
        plan.filesystems[5].options,
        ["nosuid", "noexec", "nodev", "ro"]
    );
    assert_eq!(plan.filesystems[7].options, ["size=1m"]);
    match plan.filesystems_request() {
        Some(forkvm_agent_proto::Request::Filesystems { mounts }) => {
            assert_eq!(mounts, plan.filesystems)
        }
        other => panic!("{other:?}"),
    }
    // A spec without mounts leaves the guest's own: no request.
    let plan = load_with(|c| c["mounts"] = json!([])).unwrap();
    assert_eq!(plan.filesystems_request(), None);
    // Bound host files (Docker's /etc/hosts and friends): copied in, with a warning.
    let host = tempfile::tempdir().unwrap();
    for file in ["/etc/hosts", "/etc/resolv.conf", "/run/.containerenv"] {
        let source = host.path().join(file.rsplit('/').next().unwrap());
        std::fs::write(&source, "x").unwrap();
        let plan = load_with(add(json!({"destination": file, "type": "bind", "source": source, "options": ["rbind", "rprivate"]}))).unwrap();
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.contains(file) && w.contains("copied into the VM")),
            "{:?}",
            plan.warnings
        );
        assert_eq!(
            plan.files,
            [FileCopy {
                source,
                destination: file.into()
            }]
        );
    }
    // Over a shared root (the default), each is bound by the guest in its place among
    // the spec's mounts, from the share of copies; over a root disk it is in the disk.
    let (hosts, resolv) = (host.path().join("hosts"), host.path().join("resolv.conf"));
    let with_files = |mode: Option<&str>| {
        load_with(|c| {
            c["mounts"] = json!([
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["rbind", "ro"]},
            ]);
            if let Some(mode) = mode {
                c["annotations"] = json!({ROOTFS_ANNOTATION: mode});
            }
        })
        .unwrap()
    };
    let shared = with_files(None);
    assert_eq!(shared.root_mode, RootMode::Shared);
    let named = with_files(Some("shared"));
    assert_eq!(
        (named.root_mode, &named.filesystems),
        (RootMode::Shared, &shared.filesystems)
    );
    assert_eq!(
        mount_order(&shared),
        [
            ("/etc/hosts", "file", "forkvm-files/0"),
            ("/run", "tmpfs", "tmpfs"),
            ("/etc/resolv.conf", "file", "forkvm-files/1"),
        ]
    );
    assert!(shared.filesystems[0].options.is_empty());
    assert_eq!(shared.filesystems[2].options, ["ro"]);
    let disk = with_files(Some("disk"));
    assert_eq!(disk.root_mode, RootMode::Disk);
    assert_eq!(mount_order(&disk), [("/run", "tmpfs", "tmpfs")]);
    assert_eq!(disk.files, shared.files);
    assert_eq!(disk.files.len(), 2);
    // A Kubernetes pod's container is planned as one, its sandbox's namespace paths
    // accepted; without its sandbox's id, or with bind mounts of its own, it is refused
    // by name.
    let member = load_with(|c| {
        c["annotations"] = json!({CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "abc"});
        c["linux"]["namespaces"] = json!([
            {"type": "network", "path": "/proc/7/ns/net"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "pid"}
        ]);
    })
    .unwrap();
    assert_eq!(
        member.pod,
        Some(PodRole::Member {
            sandbox: "abc".into()
        })
    );
    // Its own pid namespace in the pod's VM (Kubernetes' default); its sandbox's when
    // it names that one by path (`shareProcessNamespace`).
    assert_eq!(member.process.pid_namespace, Some(PidNamespace::New));
    let sharing = load_with(|c| {
        c["annotations"] = json!({CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "abc"});
        c["linux"]["namespaces"] = json!([
            {"type": "network", "path": "/proc/7/ns/net"},
            {"type": "pid", "path": "/proc/7/ns/pid"}
        ]);
    })
    .unwrap();
    assert_eq!(sharing.process.pid_namespace, Some(PidNamespace::Sandbox));
    // Its monitor learns whose it is from the path (the sandbox's, or a target's).
    assert_eq!(sharing.pod_pid_path, Some("/proc/7/ns/pid".into()));
    assert_eq!(member.pod_pid_path, None);
    let e = err_with(|c| c["annotations"] = json!({CRI_CONTAINER_TYPE: "container"}));
    assert!(
        e.contains("annotations.io.kubernetes.cri.sandbox-id")
            && e.contains("must name its pod sandbox"),
        "{e}"
    );
    let hosts = tempfile::NamedTempFile::new().unwrap();
    let pod_member = |c: &mut Value| {
        c["annotations"] = json!({CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "abc"});
    };
    let with_hosts = load_with(|c| {
        pod_member(c);
        c["mounts"] = json!([{"destination": "/etc/hosts", "type": "bind",
            "source": hosts.path(), "options": ["rbind", "ro"]}]);
    })
    .unwrap();
    assert_eq!(with_hosts.files.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    // A bound directory is a volume of the pod's container (the runtime binds it into
    // the pod directory).
    let with_volume = load_with(|c| {
        pod_member(c);
        c["mounts"] = json!([{"destination": "/data", "type": "bind",
            "source": dir.path(), "options": ["rbind", "ro"]}]);
    })
    .unwrap();
    assert_eq!(with_volume.volumes.len(), 1);
    assert!(with_volume.volumes[0].read_only);
    let e = err_with(|c| {
        pod_member(c);
        c["annotations"][ROOTFS_ANNOTATION] = json!("disk");
    });
    assert!(e.contains("(disk, of a pod's container)"), "{e}");
    // Outside a pod, a namespace path is the monitor's to join.
    let plan = load_with(|c| {
        c["linux"]["namespaces"] =
            json!([{"type": "network"}, {"type": "ipc", "path": "/proc/7/ns/ipc"}]);
    })
    .unwrap();
    assert_eq!(
        plan.namespaces.ipc,
        HostNamespace::Join("/proc/7/ns/ipc".into())
    );
    let sandbox = load_with(|c| {
        c["annotations"] = json!({CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "abc"})
    })
    .unwrap();
    assert_eq!(sandbox.pod, Some(PodRole::Sandbox));
    assert_eq!(sandbox.annotations[CRI_CONTAINER_TYPE], "sandbox");
    // Any other value is an error naming the annotation.
    let e = err_with(|c| c["annotations"] = json!({ROOTFS_ANNOTATION: "overlay"}));
    assert!(
        e.ends_with(r#"annotations.io.forkvm.rootfs: "overlay" is neither "shared" nor "disk""#),
        "{e}"
    );
    // A file that is not there is not a file to copy.
    let e = err_with(add(
        json!({"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts"}),
    ));
    assert_eq!(
        e,
        "mount /etc/hosts: cannot bind /nonexistent/hosts into the VM: it does not exist"
    );
    // A bind onto a mount the guest makes itself (containerd CRI's sandbox /dev/shm).
    // It becomes the guest's own filesystem there, after the spec's tmpfs.
    let plan = load_with(add(json!({"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandbox/shm", "options": ["rbind", "ro"]}))).unwrap();
    assert!(plan
        .warnings
        .iter()
        .any(|w| w.contains("/dev/shm") && w.contains("guest mounts its own (tmpfs)")));
    let last = plan.filesystems.last().unwrap();
    assert_eq!(
        (last.destination.as_str(), last.fs_type.as_str()),
        ("/dev/shm", "tmpfs")
    );
    assert!(
        last.options.contains(&"mode=1777".to_owned()) && last.options.contains(&"ro".to_owned())
    );
    // Directories, bound as a type or as an option: volumes, in order, `ro` honoured.
    let data = host.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink(&data, host.path().join("data-link")).unwrap();
    let plan = load_with(|c| {
        c["mounts"] = json!([
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rprivate"]},
            {"destination": "/data/cache", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/ro", "type": "none", "source": host.path().join("data-link"), "options": ["rbind", "ro"]},
        ]);
    })
    .unwrap();
    // The guest mounts them in the spec's order, the volumes as the directories of
    // their shares named as the host's (a link resolved): the tmpfs lands on the
    // volume, not under it.
    assert_eq!(
        mount_order(&plan),
        [
            ("/data", "virtiofs", "forkvm-0/data"),
            ("/data/cache", "tmpfs", "tmpfs"),
            ("/ro", "virtiofs", "forkvm-1/data"),
        ]
    );
    assert!(plan.filesystems[0].options.is_empty());
    assert_eq!(plan.filesystems[2].options, ["ro"]);
    let canonical = data.canonicalize().unwrap();
    assert_eq!(
        plan.volumes,
        [
            crate::vm::Volume {
                host: canonical.clone(),
                target: "/data".into(),
                read_only: false
            },
            crate::vm::Volume {
                host: canonical,
                target: "/ro".into(),
                read_only: true
            },
        ]
    );
    // A VM has interrupt lines for so many devices.
    let e = err_with(|c| {
        c["mounts"] = json!((0..=crate::vm::MAX_VOLUMES)
            .map(|i| json!({"destination": format!("/v{i}"), "type": "bind", "source": data}))
            .collect::<Vec<_>>());
    });
    assert!(e.contains("mount /v11") && e.contains("at most 11"), "{e}");
    // A pod's container's volumes are directories of the pod's share, not devices.
    let many = load_with(|c| {
        c["annotations"] = json!({CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "abc"});
        c["mounts"] = json!((0..=crate::vm::MAX_VOLUMES)
            .map(|i| json!({"destination": format!("/v{i}"), "type": "bind", "source": data}))
            .collect::<Vec<_>>());
    })
    .unwrap();
    assert_eq!(many.volumes.len(), crate::vm::MAX_VOLUMES + 1);
    // What cannot be shared or copied: refused, naming the mount and why.
    let e = err_with(add(
        json!({"destination": "/data", "type": "bind", "source": "/nonexistent/data"}),
    ));
    assert_eq!(
        e,
        "mount /data: cannot bind /nonexistent/data into the VM: it does not exist"
    );
    let socket = host.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let e = err_with(add(
        json!({"destination": "/run/docker.sock", "type": "bind", "source": socket}),
    ));
    assert!(
        e.contains("only directories (shared) and regular files (copied)"),
        "{e}"
    );
    let e = err_with(add(
        json!({"destination": "/data", "type": "bind", "source": "relative/dir"}),
    ));
    assert!(e.contains("not an absolute path"), "{e}");
    let e = err_with(add(
        json!({"destination": "/mnt", "type": "nfs", "source": "server:/x"}),
    ));
    assert_eq!(e, r#"mount /mnt: filesystem type "nfs" is not supported"#);
    let e = err_with(add(json!({"destination": "relative", "type": "tmpfs"})));
    assert!(
        e.ends_with("mounts: relative: the destination is not an absolute UTF-8 path"),
        "{e}"
    );
}

#[test]
fn hardening_fields_warn() {
    let plan = load_with(|c| {
        c["process"]["apparmorProfile"] = json!("docker-default");
        c["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0");
        c["process"]["capabilities"]["bounding"] =
            json!(["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"]);
        c["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN"]);
        c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "no_such_call"], "action": "SCMP_ACT_ERRNO"}]});
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    })
    .unwrap();
    let w = plan.warnings.join("\n");
    for needle in ["apparmorProfile", "selinuxLabel"] {
        assert!(w.contains(needle), "{needle} not in {w}");
    }
    // The seccomp profile is compiled for the guest; a name the kernel lacks is named.
    assert_eq!(plan.seccomp.len(), 1);
    assert!(
        w.contains("linux.seccomp: left out, not x86-64 system calls")
            && w.contains("no_such_call (1 names)"),
        "{w}"
    );
    let e = err_with(|c| {
        c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    });
    assert!(
        e.contains("linux.seccomp: defaultAction: SCMP_ACT_NOTIFY"),
        "{e}"
    );
    // Capabilities are applied, not warned about.
    assert!(!w.contains("CAP_"), "{w}");
    let caps = plan.process.capabilities.unwrap();
    assert_eq!(caps.bounding, (1 << 0) | (1 << 21) | (1 << 12));
    assert_eq!(caps.effective, 1 << 21);
}

#[test]
fn sysctls_masked_and_readonly_paths_become_the_agents_request() {
    // runc's config masks and protects paths.
    let plan = load_with(|c| {
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1", "kernel.msgmax": "8192"});
    })
    .unwrap();
    assert!(!plan.warnings.join("\n").contains("sysctl"));
    match plan.container_request() {
        Some(forkvm_agent_proto::Request::Container {
            devices,
            sysctls,
            masked_paths,
            readonly_paths,
            readonly_root,
            domainname,
            seccomp,
            user_namespace,
        }) => {
            assert_eq!(domainname, None);
            assert!(seccomp.is_empty());
            assert_eq!(user_namespace, None);
            assert!(readonly_root, "runc's config has a read-only root");
            assert_eq!(sysctls["net.ipv4.ip_forward"], "1");
            assert_eq!(sysctls.len(), 2);
            assert_eq!(masked_paths, ["/proc/acpi", "/proc/kcore"]);
            assert_eq!(readonly_paths, ["/proc/bus", "/proc/sys"]);
            assert!(devices.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Nothing to apply, no request.
    let plan = load_with(|c| {
        c["linux"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| k != "maskedPaths" && k != "readonlyPaths");
        c["root"]["readonly"] = json!(false);
    })
    .unwrap();
    assert_eq!(plan.container_request(), None);
    // Docker's --device /dev/fuse: the node, for the guest to make.
    let plan = load_with(|c| {
        c["linux"]["devices"] = json!([{"path": "/dev/fuse", "type": "c", "major": 10,
            "minor": 229, "fileMode": 0o20666, "uid": 0, "gid": 0}]);
    })
    .unwrap();
    assert_eq!(
        plan.devices,
        [forkvm_agent_proto::DeviceNode {
            path: "/dev/fuse".into(),
            kind: "c".into(),
            major: 10,
            minor: 229,
            mode: 0o666,
            uid: 0,
            gid: 0,
            host_has: Path::new("/sys/dev/char/10:229").exists(),
        }]
    );
}

#[test]
fn resources_become_the_guest_cgroups_limits() {
    let plan = load_with(|c| {
        c["linux"]["resources"] = json!({
            "memory": {"limit": 268435456},
            "pids": {"limit": 100},
            "cpu": {"quota": 150000, "period": 100000, "shares": 512}
        });
    })
    .unwrap();
    assert_eq!(
        plan.guest_cgroup,
        forkvm_agent_proto::CgroupLimits {
            memory_max: Some(268435456),
            pids_max: Some(100),
            cpu_max: Some((150000, 100000)),
            // runc's conversion: 1 + (512 - 2) * 9999 / 262142.
            cpu_weight: Some(20),
        }
    );
    // Unlimited (-1, 0) and absent limits: none; a quota without a period takes the
    // kernel's 100 ms.
    let plan = load_with(|c| {
        c["linux"]["resources"] =
            json!({"memory": {"limit": -1}, "pids": {"limit": 0}, "cpu": {"quota": 50000}});
    })
    .unwrap();
    assert_eq!(
        plan.guest_cgroup,
        forkvm_agent_proto::CgroupLimits {
            cpu_max: Some((50000, 100000)),
            ..Default::default()
        }
    );
    let e = err_with(|c| {
        c["linux"]["resources"] = json!({"cpu": {"quota": 50000, "period": 10}});
    });
    assert!(e.contains("linux.resources.cpu.period: 10: outside"), "{e}");
}

#[test]
fn unsupported_fields_are_errors() {
    // Hooks in the container's namespaces run inside the VM, by the guest agent: its
    // path and args (args[0] is the path's), env and timeout; checked as the host's.
    let plan = load_with(|c| {
        c["hooks"] = json!({
            "createContainer": [{"path": "/usr/bin/x", "args": ["x", "-a", "b"], "env": ["A=1"], "timeout": 7}],
            "startContainer": [{"path": "/bin/y"}, {"path": "/bin/z"}]
        });
        c["domainname"] = json!("example.org");
    })
    .unwrap();
    assert_eq!(
        plan.guest_hooks.create_container,
        [forkvm_agent_proto::GuestHook {
            path: "/usr/bin/x".into(),
            args: vec!["x".into(), "-a".into(), "b".into()],
            env: vec!["A=1".into()],
            timeout: Some(7),
        }]
    );
    let paths: Vec<&str> = plan
        .guest_hooks
        .start_container
        .iter()
        .map(|h| h.path.as_str())
        .collect();
    assert_eq!(paths, ["/bin/y", "/bin/z"]);
    assert!(plan.hooks.prestart.is_empty());
    assert_eq!(plan.domainname.as_deref(), Some("example.org"));
    match plan.container_request() {
        Some(forkvm_agent_proto::Request::Container { domainname, .. }) => {
            assert_eq!(domainname.as_deref(), Some("example.org"))
        }
        other => panic!("{other:?}"),
    }
    // Around createContainer hooks the request splits as runc orders it: the nodes
    // before (none here), the rest after.
    assert_eq!(plan.devices_request(), None);
    match plan.settings_request() {
        Some(forkvm_agent_proto::Request::Container {
            devices,
            domainname,
            readonly_root,
            masked_paths,
            ..
        }) => {
            assert!(devices.is_empty() && readonly_root);
            assert_eq!(domainname.as_deref(), Some("example.org"));
            assert_eq!(masked_paths, ["/proc/acpi", "/proc/kcore"]);
        }
        other => panic!("{other:?}"),
    }
    let e = err_with(|c| c["hooks"] = json!({"startContainer": [{"path": "bin/y"}]}));
    assert!(
        e.contains("hooks.startContainer[0].path (bin/y)") && e.contains("absolute"),
        "{e}"
    );
    let e = err_with(|c| c["hooks"] = json!({"createContainer": [{"path": "/x", "timeout": -1}]}));
    assert!(e.contains("hooks.createContainer[0].timeout"), "{e}");
    // Host hooks need an absolute path and a positive timeout.
    let e = err_with(|c| c["hooks"] = json!({"poststop": [{"path": "bin/true"}]}));
    assert!(
        e.contains("hooks.poststop[0].path (bin/true)") && e.contains("absolute"),
        "{e}"
    );
    let e = err_with(|c| {
        c["hooks"] =
            json!({"prestart": [{"path": "/bin/true"}, {"path": "/bin/true", "timeout": 0}]})
    });
    assert!(e.contains("hooks.prestart[1].timeout"), "{e}");
    // Empty hook lists are harmless.
    load_with(|c| c["hooks"] = json!({"prestart": []})).unwrap();
    // Docker's network hook and the other host hooks are planned, in order.
    let docker = json!({"path": "/proc/123/exe", "args": ["libnetwork-setkey", "-exec-root=/var/run/docker", "abc", "def"]});
    let plan = load_with(|c| {
        c["hooks"] = json!({
            "prestart": [docker.clone(), {"path": "/usr/bin/other", "timeout": 5}],
            "createRuntime": [{"path": "/usr/bin/cr"}],
            "poststart": [{"path": "/usr/bin/ps1"}],
            "poststop": [{"path": "/usr/bin/pst", "env": ["A=1"]}]
        })
    })
    .unwrap();
    let paths = |l: &[oci_spec::runtime::Hook]| -> Vec<String> {
        l.iter().map(|h| h.path().display().to_string()).collect()
    };
    assert_eq!(
        paths(&plan.hooks.prestart),
        ["/proc/123/exe", "/usr/bin/other"]
    );
    assert_eq!(
        plan.hooks.prestart[0].args().as_deref(),
        Some(
            &[
                "libnetwork-setkey".to_string(),
                "-exec-root=/var/run/docker".into(),
                "abc".into(),
                "def".into()
            ][..]
        )
    );
    assert_eq!(plan.hooks.prestart[1].timeout(), Some(5));
    assert_eq!(paths(&plan.hooks.create_runtime), ["/usr/bin/cr"]);
    assert_eq!(paths(&plan.hooks.poststart), ["/usr/bin/ps1"]);
    assert_eq!(paths(&plan.hooks.poststop), ["/usr/bin/pst"]);
    // The network namespace: a path is the engine's to join; none, a new one the
    // runtime makes; no network namespace at all is the host's network.
    let plan = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "network", "path": "/var/run/netns/x"}])
    })
    .unwrap();
    assert_eq!(plan.network, NetworkPlan::Join("/var/run/netns/x".into()));
    let plan = load_with(|c| c["linux"]["namespaces"] = json!([{"type": "network"}])).unwrap();
    assert_eq!(plan.network, NetworkPlan::New);
    let plan = load_with(|c| c["linux"]["namespaces"] = json!([{"type": "pid"}])).unwrap();
    assert_eq!(plan.network, NetworkPlan::Host);
    let e = err_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "network"}, {"type": "network", "path": "/x"}])
    });
    assert!(e.contains("only once"), "{e}");
    let e =
        err_with(|c| c["linux"]["namespaces"] = json!([{"type": "network", "path": "netns/x"}]));
    assert!(e.contains("must be absolute"), "{e}");
    let plan = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "pid", "path": "/proc/1/ns/pid"}])
    })
    .unwrap();
    assert_eq!(plan.namespaces.pid, Some("/proc/1/ns/pid".into()));
    let e = err_with(|c| {
        c["linux"]["devices"] = json!([{"path": "/dev/x", "type": "a", "major": 1, "minor": 3}])
    });
    assert!(
        e.contains("linux.devices") && e.contains("cgroup rules"),
        "{e}"
    );
    let e = err_with(|c| {
        c["linux"]["devices"] = json!([{"path": "dev/x", "type": "c", "major": 1, "minor": 3}])
    });
    assert!(e.contains("dev/x is not an absolute"), "{e}");
    let e = err_with(|c| {
        c["linux"]["devices"] = json!([{"path": "/dev/x", "type": "c", "major": -1, "minor": 3}])
    });
    assert!(e.contains("out of range"), "{e}");
    load_with(|c| c["linux"]["devices"] = json!([])).unwrap();
}

#[test]
fn bad_process() {
    let e = err_with(|c| drop(c.as_object_mut().unwrap().remove("process")));
    assert!(e.ends_with("config.json: process is missing"), "{e}");
    let e = err_with(|c| drop(c["process"].as_object_mut().unwrap().remove("args")));
    assert!(e.ends_with("process.args is missing"), "{e}");
    let e = err_with(|c| c["process"]["args"] = json!([]));
    assert!(e.contains("process.args: must name a program"), "{e}");
    let e = err_with(|c| c["process"]["cwd"] = json!("srv"));
    assert!(
        e.contains("process.cwd: srv is not an absolute path"),
        "{e}"
    );
}

#[test]
fn bad_root() {
    let e = err_with(|c| drop(c.as_object_mut().unwrap().remove("root")));
    assert!(e.ends_with("config.json: root is missing"), "{e}");
    let e = err_with(|c| c["root"]["path"] = json!("nope"));
    assert!(
        e.contains("root.path") && e.contains("nope: not a directory"),
        "{e}"
    );
    // A file is not a root filesystem.
    let bundle = Bundle::new(&{
        let mut c = runc_config();
        c["root"]["path"] = json!("config.json");
        c
    });
    assert!(matches!(
        bundle.load(),
        Err(BundleError::RootfsMissing { .. })
    ));
}

#[test]
fn bad_version() {
    for version in ["0.1.0", "2.0.0", ""] {
        let e = err_with(|c| c["ociVersion"] = json!(version));
        assert!(e.contains("is not supported (expected 1.x)"), "{e}");
    }
    load_with(|c| c["ociVersion"] = json!("1.2.0")).unwrap();
}

#[test]
fn bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, BundleError::Read { .. }));
    assert!(e.to_string().contains("config.json"), "{e}");
    let e = load(&dir.path().join("missing-bundle")).unwrap_err();
    assert!(e.to_string().contains("missing-bundle"), "{e}");
    std::fs::write(dir.path().join(CONFIG_FILE), "{not json").unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, BundleError::Parse { .. }));
    assert!(
        e.to_string()
            .contains("config.json is not a valid OCI runtime config"),
        "{e}"
    );
    // Valid JSON, wrong shape.
    std::fs::write(dir.path().join(CONFIG_FILE), r#"{"ociVersion": 1}"#).unwrap();
    assert!(matches!(load(dir.path()), Err(BundleError::Parse { .. })));
}

#[test]
fn cpuset_parsing() {
    assert_eq!(cpuset_count("0"), Ok(1));
    assert_eq!(cpuset_count(" 0 - 1 , 4 "), Ok(3));
    assert!(cpuset_count("").is_err());
    assert!(cpuset_count("0-100000").is_err());
    assert!(cpuset_count("a").is_err());
}

/// docs/engines.md carries the planner's field table (this module's documentation)
/// between its `bundle-table` markers, line for line.
#[test]
fn the_field_table_in_docs_is_the_planners() {
    let code = include_str!("../bundle.rs");
    let docs = include_str!("../../../../docs/engines.md");
    let ours: Vec<&str> = code
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter(|l| l.starts_with('|'))
        .collect();
    let start = docs
        .find("<!-- bundle-table")
        .and_then(|i| docs[i..].find('\n').map(|n| i + n + 1))
        .expect("docs/engines.md has no bundle-table marker");
    let end = start
        + docs[start..]
            .find("<!-- /bundle-table -->")
            .expect("docs/engines.md has no closing bundle-table marker");
    let theirs: Vec<&str> = docs[start..end].lines().collect();
    assert!(
        ours.len() > 30,
        "the planner's table has {} rows",
        ours.len()
    );
    let differ = (0..ours.len().max(theirs.len())).find(|&i| ours.get(i) != theirs.get(i));
    assert!(
        differ.is_none(),
        "docs/engines.md's field table differs from crates/oci/src/bundle.rs's at row {}:\n\
         docs: {:?}\ncode: {:?}\ncopy the module documentation's table rows between the markers",
        differ.unwrap_or(0),
        differ.and_then(|i| theirs.get(i)),
        differ.and_then(|i| ours.get(i)),
    );
}

#[test]
fn a_user_namespace_with_its_maps_goes_to_the_guest_and_half_of_one_is_refused() {
    let user_ns = |c: &mut Value| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
    };
    let plan = load_with(|c| {
        user_ns(c);
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 2000}]);
        c["linux"]["gidMappings"] = json!([
            {"containerID": 0, "hostID": 1000, "size": 3000},
            {"containerID": 5000, "hostID": 9000, "size": 1}
        ]);
    })
    .unwrap();
    let mapping = |container_id, host_id, size| forkvm_agent_proto::IdMapping {
        container_id,
        host_id,
        size,
    };
    let ns = forkvm_agent_proto::UserNamespace {
        uid_mappings: vec![mapping(0, 1000, 2000)],
        gid_mappings: vec![mapping(0, 1000, 3000), mapping(5000, 9000, 1)],
    };
    assert_eq!(plan.user_namespace.as_ref(), Some(&ns));
    let w = plan.warnings.join("\n");
    assert!(!w.contains("user"), "the user namespace is made: {w}");
    // It is made with the device nodes, before the createContainer hooks, which run in
    // it as in runc (in the container's namespaces); the settings after the hooks do
    // not make it again.
    match plan.container_request() {
        Some(forkvm_agent_proto::Request::Container { user_namespace, .. }) => {
            assert_eq!(user_namespace.as_ref(), Some(&ns))
        }
        other => panic!("{other:?}"),
    }
    match plan.devices_request() {
        Some(forkvm_agent_proto::Request::Container { user_namespace, .. }) => {
            assert_eq!(user_namespace, Some(ns))
        }
        other => panic!("{other:?}"),
    }
    match plan.settings_request() {
        None => {}
        Some(forkvm_agent_proto::Request::Container { user_namespace, .. }) => {
            assert_eq!(user_namespace, None)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(load_with(|_| {}).unwrap().user_namespace, None);

    let e = err_with(|c| {
        user_ns(c);
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
    });
    assert!(
        e.contains("linux.gidMappings") && e.contains("at least one range"),
        "{e}"
    );
    let e = err_with(|c| {
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
    });
    assert!(
        e.contains("linux.uidMappings/gidMappings") && e.contains("need a `user` namespace"),
        "{e}"
    );
}
