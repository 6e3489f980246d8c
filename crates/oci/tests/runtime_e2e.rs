//! End to end, in a KVM host: `forkvm-runtime` driven the way runc shims and conmon
//! drive runc. This test process is the child subreaper, as a shim is, so it reaps the
//! monitor processes and sees the exit codes an engine would see.
//!
//! One virtual-host session covers: the lifecycle and the runtime spec's `state` object,
//! stdio and the exit code, `kill` reaching a trap, `exec` in the foreground and
//! detached, `fork` into new containers, a terminal through `--console-socket`, `ps`/`list`/`features`, a bad `config.json` leaving nothing behind, and
//! `delete --force` of a running container leaving nothing behind; a container joined to
//! a network namespace the way podman and CNI hand one over (a veth end with an address
//! and a default route) reaching a server outside it from that address.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_test_support::netns::{give_eth0, Netns};
use serde_json::{json, Value};

const RUNTIME: &str = env!("CARGO_BIN_EXE_forkvm-runtime");
/// Limit for one runtime command (create boots a VM: seconds in the virtual host).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A bundle: busybox as the rootfs (from the host's busybox-static) and `config`.
fn bundle(dir: &Path, args: &[&str], edit: impl FnOnce(&mut Value)) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox is not installed (scripts/setup.sh installs busybox-static)");
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "hostname", "wc", "id", "true", "kill", "ps", "nc", "ip",
        "grep",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "GREETING=hello"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
        },
        "root": {"path": "rootfs"},
        "hostname": "rt-e2e",
        "annotations": {"org.example.test": "yes"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"memory": {"limit": 268435456}},
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}]
        }
    });
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_owned()
}

struct Env {
    tmp: tempfile::TempDir,
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Env {
    fn root(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
    fn vm_root(&self) -> PathBuf {
        self.tmp.path().join("vms")
    }
    fn log(&self) -> PathBuf {
        self.tmp.path().join("runtime.log")
    }

    /// Runs the runtime with stdout/stderr in files named after `tag` (a monitor keeps
    /// them open after `create` returns, so they cannot be pipes we wait on).
    fn rt(&self, tag: &str, args: &[&str], stdin: Option<&Path>) -> Out {
        let out_path = self.tmp.path().join(format!("{tag}.out"));
        let err_path = self.tmp.path().join(format!("{tag}.err"));
        let mut cmd = Command::new(RUNTIME);
        cmd.arg("--root")
            .arg(self.root())
            .arg("--log")
            .arg(self.log())
            .args(["--log-format", "json"])
            .args(args)
            .env("FORKVM_ROOT", self.vm_root())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap())
            .stdin(match stdin {
                Some(p) => Stdio::from(File::open(p).unwrap()),
                None => Stdio::null(),
            });
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("forkvm-runtime {args:?} did not finish within {COMMAND_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Out {
            code: status.code(),
            stdout: std::fs::read_to_string(&out_path).unwrap(),
            stderr: std::fs::read_to_string(&err_path).unwrap(),
        }
    }

    fn ok(&self, tag: &str, args: &[&str]) -> Out {
        let out = self.rt(tag, args, None);
        assert_eq!(
            out.code,
            Some(0),
            "forkvm-runtime {args:?}\n{out}\n{}",
            self.diagnostics()
        );
        out
    }

    fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok("state", &["state", id]).stdout).unwrap()
    }

    fn read(&self, tag: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(tag)).unwrap_or_default()
    }

    /// The runtime log and every VM console, for failure messages.
    fn diagnostics(&self) -> String {
        let mut s = format!("--- runtime log\n{}", self.read("runtime.log"));
        for e in std::fs::read_dir(self.root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let log = e.path().join("monitor.log");
            if log.exists() {
                let tail = forkvm_registry::tail(&log, 30);
                s += &format!("\n--- {}\n{tail}", log.display());
            }
        }
        for e in std::fs::read_dir(self.vm_root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let console = e.path().join("console.log");
            s += &format!(
                "\n--- {}\n{}",
                console.display(),
                forkvm_registry::tail(&console, 30)
            );
        }
        s
    }

    /// The VM homes under the VMs' state root (not the registry's own entries, such as
    /// its staging directory, `.staged`).
    fn vm_homes(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.vm_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect()
    }
}

/// Waits for our (reparented) child `pid` and returns its exit code (128 + the signal
/// that ended it, if one did).
fn reap(pid: i32, limit: Duration) -> i32 {
    match reap_status(pid, limit) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        other => panic!("process {pid} ended as {other:?}"),
    }
}

/// Waits for our (reparented) child `pid`: its exit code, or the signal that ended it.
fn reap_status(pid: i32, limit: Duration) -> (Option<i32>, Option<i32>) {
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, status))) => {
                return (status.exit_status(), status.terminating_signal());
            }
            Ok(None) => {}
            Err(e) => panic!("waitpid({pid:?}): {e}"),
        }
        assert!(Instant::now() < deadline, "process {pid:?} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pid_of(state: &Value) -> i32 {
    state["pid"].as_i64().expect("state has a pid") as i32
}

/// Processes of this binary still running (monitors, detached execs).
fn runtime_processes() -> Vec<String> {
    forkvm_test_support::processes_matching("forkvm-runtime")
}

#[test]
fn runtime_drives_vms_like_runc() {
    if !forkvm_testhost::in_test_host() {
        forkvm_oci::vm::container_guest().expect("cannot prepare the container guest");
    }
    forkvm_testhost::on_kvm_host_with(
        forkvm_testhost::test_path!(),
        Duration::from_secs(600),
        None,
        body,
    );
}

fn body() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let env = Env {
        tmp: tempfile::tempdir().unwrap(),
    };
    let t = env.tmp.path();

    // --- lifecycle, state, stdio, exit code
    let b1 = bundle(
        &t.join("b1"),
        &[
            "sh",
            "-c",
            "echo $GREETING from $(hostname); echo oops >&2; read line; echo got $line; \
             cat /proc/self/status; echo oom=$(cat /proc/self/oom_score_adj); \
             [ -c /dev/full ] && [ -c /dev/tty ] && [ -L /dev/ptmx ] && [ -L /dev/stdout ] \
             && [ -d /dev/mqueue ] && [ ! -e /dev/vda ] && [ ! -e /dev/vsock ] && echo dev=runc; \
             echo kcore=$(wc -c < /proc/kcore); echo fwd=$(cat /proc/sys/net/ipv4/ip_forward); \
             echo ns=$$ $(cat /proc/1/comm); \
             (echo 0 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null && echo sys=rw || echo sys=ro; \
             [ -c /dev/extra/null2 ] && echo x > /dev/extra/null2 && echo devnode=ok; \
             (echo x > /rootfile) 2>/dev/null && echo root=rw || echo root=ro; \
             echo hook=$(grep -o '\"status\":\"[a-z]*\"' /hooked); \
             echo start=$(grep -o '\"status\":\"[a-z]*\"' /run/t/started); \
             echo dn=$(cat /proc/sys/kernel/domainname); \
             grep -q ' /run/t tmpfs rw,nosuid,nodev,noexec,relatime,size=1024k' /proc/mounts \
             && echo tmpfs=yes; \
             echo cg=$(cat /proc/self/cgroup) mem=$(cat /sys/fs/cgroup/memory.max) \
             pids=$(cat /sys/fs/cgroup/pids.max); \
             mkdir /run/t/sc 2>/dev/null && echo sc=open || echo sc=refused; \
             exit 3",
        ],
        |c| {
            // As Docker's default: runc's capability set, applied inside the guest.
            let caps = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
            c["process"]["capabilities"] = json!({
                "bounding": caps, "effective": caps, "permitted": caps
            });
            c["process"]["noNewPrivileges"] = json!(true);
            c["process"]["oomScoreAdj"] = json!(300);
            c["process"]["user"]["umask"] = json!(0o027);
            c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
            c["linux"]["maskedPaths"] = json!(["/proc/kcore", "/proc/no-such"]);
            c["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
            c["root"]["readonly"] = json!(true);
            c["linux"]["devices"] =
                json!([{"path": "/dev/extra/null2", "type": "c", "major": 1, "minor": 3}]);
            // Hooks in the container, a domain name, a tmpfs of the spec's.
            c["hooks"] = json!({
                "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /hooked"]}],
                "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /run/t/started"]}]
            });
            c["domainname"] = json!("e2e.example");
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/run/t",
                "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec", "size=1m"]}));
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/sys/fs/cgroup",
                "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "ro"]}));
            c["linux"]["resources"]["pids"] = json!({"limit": 64});
            c["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(json!({"type": "cgroup"}));
            // A seccomp profile, installed in the guest: mkdir refused.
            c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
        },
    );
    let input = t.join("input");
    std::fs::write(&input, "typed\n").unwrap();
    let pid_file = t.join("c1.pid");
    let started = Instant::now();
    let out = env.rt(
        "c1-create",
        &[
            "create",
            "--bundle",
            b1.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ],
        Some(&input),
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    println!(
        "create (VM booted, agent answering): {:?}",
        started.elapsed()
    );
    let state = env.state("c1");
    for field in ["ociVersion", "id", "status", "pid", "bundle"] {
        assert!(state.get(field).is_some(), "state lacks {field}: {state}");
    }
    assert_eq!(state["id"], "c1");
    assert_eq!(state["status"], "created");
    assert_eq!(state["bundle"], b1.to_str().unwrap());
    assert_eq!(state["annotations"]["org.example.test"], "yes");
    let spec_state: oci_spec::runtime::State = serde_json::from_value(state.clone()).unwrap();
    assert_eq!(
        *spec_state.status(),
        oci_spec::runtime::ContainerState::Created
    );
    let pid = pid_of(&state);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert!(forkvm_test_support::is_running(pid as u32));
    // The state's pid is the container's holder, as runc's container process is: the
    // init of a new pid namespace, in a new cgroup namespace, in the monitor's network
    // and mount namespaces (the spec's); the monitor, its VM's, stays in ours.
    let monitor = monitor_of(&env, "c1");
    assert_ne!(monitor, pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["NSpid:", &pid.to_string(), "1"])),
        "{status}"
    );
    for kind in ["pid", "cgroup"] {
        assert_ne!(ns_of(pid, kind), ns_of("self", kind), "{kind}");
        assert_eq!(ns_of(monitor, kind), ns_of("self", kind), "{kind}");
    }
    for kind in ["net", "mnt"] {
        assert_eq!(ns_of(pid, kind), ns_of(monitor, kind), "{kind}");
        assert_ne!(ns_of(pid, kind), ns_of("self", kind), "{kind}");
    }
    assert_eq!(env.vm_homes().len(), 1, "one VM registered");
    let out = env.rt("c1-start-again", &["state", "nope"], None);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("does not exist"), "{out}");

    env.ok("c1-start", &["start", "c1"]);
    let code = reap(pid, Duration::from_secs(60));
    assert_eq!(code, 3, "the container's exit code\n{}", env.diagnostics());
    let out = env.read("c1-create.out");
    assert!(
        out.starts_with("hello from rt-e2e\ngot typed\n"),
        "{out}\n{}",
        env.diagnostics()
    );
    // The spec's capabilities, no_new_privs, umask and OOM score, as runc applies them.
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .trim()
            .to_owned()
    };
    // CHOWN (0), KILL (5), NET_BIND_SERVICE (10).
    for key in ["CapBnd:", "CapEff:", "CapPrm:"] {
        assert_eq!(field(key), "0000000000000421", "{key}\n{out}");
    }
    assert_eq!(field("CapAmb:"), "0000000000000000", "{out}");
    assert_eq!(field("NoNewPrivs:"), "1", "{out}");
    assert_eq!(field("Umask:"), "0027", "{out}");
    assert_eq!(field("oom="), "300", "{out}");
    // runc's /dev: its default devices and links, none of the guest's own devices.
    assert_eq!(field("dev="), "runc", "{out}");
    // The spec's kernel parameter set, /proc/kcore masked, /proc/sys read-only.
    assert_eq!(field("kcore="), "0", "{out}");
    // PID 1 of its own PID namespace in the guest, whose /proc the container's is.
    assert_eq!(field("ns="), "1 sh", "{out}");
    assert_eq!(field("fwd="), "1", "{out}");
    assert_eq!(field("sys="), "ro", "{out}");
    // linux.devices: a node of a device the guest has, in a directory made for it.
    assert_eq!(field("devnode="), "ok", "{out}");
    // root.readonly: the root refuses writes (/dev, a tmpfs of its own, did not).
    assert_eq!(field("root="), "ro", "{out}");
    // createContainer ran at create, before the root became read-only (it wrote there);
    // startContainer at start; both with the state on stdin.
    assert_eq!(field("hook="), r#""status":"creating""#, "{out}");
    // The root is the bundle's directory, shared: what the hook wrote is there, as
    // with runc.
    assert!(
        std::fs::read_to_string(b1.join("rootfs/hooked"))
            .unwrap()
            .contains(r#""status":"creating""#),
        "the hook's file is in the bundle"
    );
    assert_eq!(field("start="), r#""status":"created""#, "{out}");
    assert_eq!(field("dn="), "e2e.example", "{out}");
    // The spec's tmpfs, with its options.
    assert_eq!(field("tmpfs="), "yes", "{out}");
    // Its cgroup in the guest, as a container on a host sees its own: the root of its
    // cgroup namespace, with the spec's memory and task limits.
    // The spec's seccomp profile confines the container inside its VM.
    assert_eq!(field("sc="), "refused", "{out}");
    assert_eq!(
        field("cg="),
        "0::/ mem=268435456 pids=64",
        "{out}\n{}",
        env.diagnostics()
    );
    assert_eq!(env.read("c1-create.err"), "oops\n");
    assert_eq!(env.state("c1")["status"], "stopped");
    assert!(env.state("c1").get("pid").is_none());
    let out = env.rt("c1-kill-stopped", &["kill", "c1", "TERM"], None);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("not running"), "{out}");
    env.ok("c1-delete", &["delete", "c1"]);
    assert!(!env.root().join("c1").exists());
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());

    // --- a long-running container: exec, ps, list, kill reaching a trap
    let b2 = bundle(
        &t.join("b2"),
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.2; done",
        ],
        |c| {
            // On a network (made by a hook, as Docker's is), so that its forks show how
            // they leave it.
            let dir = t.join("hooks2");
            std::fs::create_dir(&dir).unwrap();
            c["hooks"] = json!({"prestart": [{
                "path": "/bin/sh",
                "args": ["sh", "-c", NETWORK_HOOK, "sh", dir, "fkvm-hk2", "10.97.0"],
                "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
            }]});
            // The engine's cgroup for it, with a task limit.
            c["linux"]["cgroupsPath"] = json!("/forkvm-e2e/c2");
            // A root disk of its own, which forks with it.
            c["annotations"]["io.forkvm.rootfs"] = json!("disk");
            c["linux"]["resources"]["pids"] = json!({"limit": 300});
        },
    );
    let pid_file = t.join("c2.pid");
    let out = env.rt(
        "c2-create",
        &[
            "create",
            "-b",
            b2.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c2",
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    let pid = pid_of(&env.state("c2"));
    env.ok("c2-start", &["start", "c2"]);
    assert_eq!(env.state("c2")["status"], "running");
    let out = env.rt("c2-start-twice", &["start", "c2"], None);
    assert_eq!(out.code, Some(1), "{out}");

    let out = env.rt(
        "c2-exec",
        &[
            "exec",
            "c2",
            "sh",
            "-c",
            "echo in $(hostname) init=$(cat /proc/1/comm) $([ $$ != 1 ] && echo joined); exit 4",
        ],
        None,
    );
    assert_eq!(out.code, Some(4), "{out}\n{}", env.diagnostics());
    // It joined the container's PID namespace, whose init is the container's process.
    assert_eq!(out.stdout, "in rt-e2e init=sh joined\n");
    let process = t.join("process.json");
    std::fs::write(
        &process,
        json!({"args": ["sh", "-c", "sleep 1; echo detached $X"], "env": ["PATH=/bin", "X=yes"], "cwd": "/tmp", "user": {"uid": 0, "gid": 0}}).to_string(),
    )
    .unwrap();
    let exec_pid_file = t.join("exec.pid");
    let out = env.rt(
        "c2-exec-detached",
        &[
            "exec",
            "--process",
            process.to_str().unwrap(),
            "--detach",
            "--pid-file",
            exec_pid_file.to_str().unwrap(),
            "c2",
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}");
    let exec_pid: i32 = std::fs::read_to_string(&exec_pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(reap(exec_pid, Duration::from_secs(30)), 0);
    assert_eq!(env.read("c2-exec-detached.out"), "detached yes\n");
    let out = env.rt("c2-exec-missing", &["exec", "c2", "no-such-command"], None);
    assert_eq!(out.code, Some(127), "{out}");

    let ps: Vec<i32> =
        serde_json::from_str(&env.ok("c2-ps", &["ps", "--format", "json", "c2"]).stdout).unwrap();
    assert_eq!(ps, [pid]);
    let list: Vec<Value> =
        serde_json::from_str(&env.ok("list", &["list", "--format", "json"]).stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], "c2");
    assert_eq!(list[0]["status"], "running");
    let features: Value = serde_json::from_str(&env.ok("features", &["features"]).stdout).unwrap();
    assert!(features["ociVersionMax"]
        .as_str()
        .unwrap()
        .starts_with("1."));

    // Fork: two new containers resume from c2's exact state, its process included.
    let fork: Value =
        serde_json::from_str(&env.ok("c2-fork", &["fork", "--count", "2", "c2"]).stdout).unwrap();
    let children = fork["children"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{fork}");
    assert_eq!(children[0]["id"], "c2-fork-1");
    assert_eq!(children[1]["id"], "c2-fork-2");
    let child = env.state("c2-fork-1");
    assert_eq!(child["status"], "running");
    assert_eq!(child["bundle"], b2.to_str().unwrap());
    assert_eq!(pid_of(&child) as i64, children[0]["pid"].as_i64().unwrap());
    let list = env.ok("list-forks", &["list"]);
    assert_eq!(
        list.stdout.lines().filter(|l| l.contains(" c2")).count(),
        2,
        "{list}"
    );
    let out = env.rt("c2-fork-1-exec", &["exec", "c2-fork-1", "ps"], None);
    assert_eq!(
        out.code,
        Some(0),
        "{out}
{}",
        env.diagnostics()
    );
    assert!(
        out.stdout.contains("got TERM"),
        "the forked process runs on: {out}"
    );
    // The engine gave the parent its address, and has none for a child: the children's
    // NICs are down, and say so; the parent's stays up.
    for c in children {
        assert_eq!(c["nics_down"], json!(["eth0"]), "{fork}");
    }
    assert!(
        child["annotations"]["io.forkvm.network"]
            .as_str()
            .is_some_and(|a| a.starts_with("down: eth0")),
        "{child}"
    );
    let link = |id: &str| {
        env.ok(
            &format!("{id}-link"),
            &["exec", id, "ip", "-o", "link", "show", "eth0"],
        )
        .stdout
    };
    let child_link = link("c2-fork-1");
    assert!(
        !child_link.contains(",UP"),
        "the child's eth0 is down: {child_link}"
    );
    let parent_link = link("c2");
    assert!(
        parent_link.contains(",UP"),
        "the parent's eth0 is up: {parent_link}"
    );
    env.ok("c2-fork-1-kill", &["kill", "c2-fork-1", "TERM"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.state("c2-fork-1")["status"] != "stopped" {
        assert!(
            Instant::now() < deadline,
            "c2-fork-1 did not stop after TERM\n{}",
            env.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.state("c2")["status"], "running", "the parent runs on");
    env.ok("c2-fork-1-delete", &["delete", "c2-fork-1"]);
    env.ok("c2-fork-2-delete", &["delete", "--force", "c2-fork-2"]);
    assert_eq!(
        env.vm_homes().len(),
        1,
        "only c2's VM is left: {:?}",
        env.vm_homes()
    );

    // The container's VM process is jailed, in the cgroup the spec names, with limits
    // covering its memory (256 MiB of guest RAM and the VMM's).
    let vm_state = forkvm_registry::VmState::read(&env.vm_homes()[0].join("state.json")).unwrap();
    let vmm_pid = vm_state.process.expect("the VM process").pid;
    let jail = forkvm_jail::JailStatus::of(vmm_pid).unwrap();
    assert_eq!(jail.seccomp, 2, "{jail:?}");
    assert!(jail.no_new_privs, "{jail:?}");
    assert_eq!(jail.cap_eff, "0000000000000000", "{jail:?}");
    assert_eq!(jail.root.as_deref(), Some("tmpfs forkvm-root"), "{jail:?}");
    // In its VM family's pid namespace, one below the runtime's.
    assert_eq!(nspid_levels(vmm_pid), 2, "{jail:?}");
    assert_ne!(jail.pid_ns, Some(ns_of("self", "pid")), "{jail:?}");
    forkvm_test_support::assert_own_root(vmm_pid, &format!("{jail:?}"), &env.vm_homes()[0]);
    assert_eq!(jail.cgroup.as_deref(), Some("/forkvm-e2e/c2"), "{jail:?}");
    let memory_max =
        forkvm_vmm::memory::guest_memory_budget(256 << 20) + forkvm_jail::cgroup::VMM_OVERHEAD;
    assert_eq!(jail.memory_max, Some(memory_max.to_string()), "{jail:?}");
    assert_eq!(jail.pids_max.as_deref(), Some("300"), "{jail:?}");
    let c2_group = Path::new(forkvm_jail::cgroup::ROOT).join("forkvm-e2e/c2");
    assert!(c2_group.is_dir());
    // Bound by its own file-system rules: its VM's state root and forkvm's groups, not
    // the engine's group around it.
    let described = forkvm_api::Client::new(env.vm_homes()[0].join("api.sock"))
        .info()
        .unwrap();
    let rules = described.landlock.expect("file-system rules");
    assert_ne!(rules.enforced, forkvm_jail::landlock::Enforced::Inherited);
    assert!(
        rules.writable.allows(&env.vm_homes()[0].join("x")) && !rules.writable.allows(&c2_group),
        "{rules:?}"
    );

    let out = env.rt("c2-delete-running", &["delete", "c2"], None);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("not stopped"), "{out}");
    env.ok("c2-kill", &["kill", "c2", "15"]);
    assert_eq!(
        reap(pid, Duration::from_secs(30)),
        7,
        "{}",
        env.diagnostics()
    );
    assert!(
        env.read("c2-create.out").ends_with("got TERM\n"),
        "{}",
        env.read("c2-create.out")
    );
    env.ok("c2-delete", &["delete", "c2"]);
    assert!(!c2_group.exists(), "c2's cgroup is left");

    // --- a shared root: the container's writes reach the bundle and the host's, it;
    // a bound host file is a copy at its place; such a container does not fork; delete
    // --force of a running container leaves nothing behind
    let hosts = t.join("hosts3");
    std::fs::write(&hosts, "10.1.2.3 engine-made\n").unwrap();
    let b3 = bundle(&t.join("b3"), &["sleep", "1000"], |c| {
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/etc/hosts",
            "type": "bind", "source": hosts, "options": ["rbind", "ro"]}));
    });
    let out = env.rt(
        "c3-create",
        &["create", "--bundle", b3.to_str().unwrap(), "c3"],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    let pid = pid_of(&env.state("c3"));
    env.ok("c3-start", &["start", "c3"]);
    std::fs::write(b3.join("rootfs/tmp/from-host"), "host wrote\n").unwrap();
    let out = env.rt(
        "c3-exec",
        &[
            "exec",
            "c3",
            "sh",
            "-c",
            "echo guest wrote > /written; cat /tmp/from-host /etc/hosts; \
             (echo x >> /etc/hosts) 2>/dev/null && echo hosts=rw || echo hosts=ro",
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    assert_eq!(
        out.stdout,
        "host wrote\n10.1.2.3 engine-made\nhosts=ro\n",
        "{}",
        env.diagnostics()
    );
    assert_eq!(
        std::fs::read_to_string(b3.join("rootfs/written")).unwrap(),
        "guest wrote\n"
    );
    // An engine that joins the container's pid's mount namespace (podman cp) finds the
    // container's files there, and a /proc for its helpers; the host's /proc never
    // lands in the bundle's directory (which the guest reads).
    let nsenter = |args: &[&str]| {
        let out = Command::new("nsenter")
            .args(["--mount", "--target", &pid.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "nsenter {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(nsenter(&["cat", "/written"]), "guest wrote\n");
    assert_eq!(nsenter(&["cat", "/proc/self/comm"]), "cat\n");
    assert_eq!(
        std::fs::read_dir(b3.join("rootfs/proc")).unwrap().count(),
        0,
        "the bundle's /proc stays empty"
    );
    // runc makes the bind's destination where it is missing; the copy stays out of it.
    assert_eq!(
        std::fs::read_to_string(b3.join("rootfs/etc/hosts")).unwrap(),
        ""
    );
    let out = env.rt("c3-fork", &["fork", "c3"], None);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains(
            "container c3 cannot fork: its root is its bundle's directory, shared with the host"
        ) && out.stderr.contains("io.forkvm.rootfs=disk"),
        "{out}"
    );
    assert_eq!(env.vm_homes().len(), 1, "no child: {:?}", env.vm_homes());
    env.ok("c3-delete", &["delete", "--force", "c3"]);
    assert_eq!(reap(pid, Duration::from_secs(10)), 128 + libc::SIGKILL);
    assert!(!env.root().join("c3").exists());
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());
    let out = env.rt("c3-state", &["state", "c3"], None);
    assert!(out.stderr.contains("does not exist"), "{out}");

    // --- bad input: a startContainer hook that fails fails `start`, naming the hook and
    // ending with its stderr; the process never runs, and the container is stopped.
    let b16 = bundle(&t.join("b16"), &["sh", "-c", "echo ran"], |c| {
        c["hooks"] = json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo refused >&2; exit 7"]}
        ]});
    });
    env.ok(
        "c16-create",
        &["create", "--bundle", b16.to_str().unwrap(), "c16"],
    );
    let pid = pid_of(&env.state("c16"));
    let out = env.rt("c16-start", &["start", "c16"], None);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("hooks.startContainer[0] (/bin/sh): exit 7: refused"),
        "{out}"
    );
    reap(pid, Duration::from_secs(60));
    assert_eq!(env.read("c16-create.out"), "", "the process never ran");
    assert_eq!(env.state("c16")["status"], "stopped");
    env.ok("c16-delete", &["delete", "c16"]);
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());

    // --- the state's pid killed from outside (as runc's container process can be): the
    // container ends, its monitor and VM with it
    let b17 = bundle(&t.join("b17"), &["sleep", "1000"], |_| {});
    env.ok(
        "c17-create",
        &["create", "--bundle", b17.to_str().unwrap(), "c17"],
    );
    env.ok("c17-start", &["start", "c17"]);
    let (pid, monitor) = (pid_of(&env.state("c17")), monitor_of(&env, "c17"));
    // SAFETY: kill(2) of the container's holder, our reparented child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert_eq!(reap(pid, Duration::from_secs(10)), 128 + libc::SIGKILL);
    let gone = Instant::now() + Duration::from_secs(20);
    while forkvm_test_support::is_running(monitor as u32) {
        assert!(
            Instant::now() < gone,
            "the monitor outlived its holder\n{}",
            env.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.state("c17")["status"], "stopped");
    env.ok("c17-delete", &["delete", "c17"]);
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());

    // --- a terminal: the pty's master arrives on --console-socket, its size reaches the
    // guest, and the process sees a terminal
    let b6 = bundle(
        &t.join("b6"),
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; stty size",
        ],
        |c| c["process"]["terminal"] = json!(true),
    );
    let socket = t.join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || {
        forkvm_shim::stdio::receive_fd(&listener.accept().unwrap().0).unwrap()
    });
    let out = env.rt(
        "c6-create",
        &[
            "create",
            "--bundle",
            b6.to_str().unwrap(),
            "--console-socket",
            socket.to_str().unwrap(),
            "c6",
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    let mut master = receiver.join().unwrap();
    let mut size = rustix::termios::tcgetwinsize(&master).unwrap();
    size.ws_row = 40;
    size.ws_col = 100;
    rustix::termios::tcsetwinsize(&master, size).unwrap();
    let pid = pid_of(&env.state("c6"));
    env.ok("c6-start", &["start", "c6"]);
    let mut screen = Vec::new();
    // Until the monitor, the slave's only holder, exits (EIO).
    let _ = std::io::Read::read_to_end(&mut master, &mut screen);
    assert_eq!(
        reap(pid, Duration::from_secs(30)),
        0,
        "{}",
        env.diagnostics()
    );
    let screen = String::from_utf8_lossy(&screen);
    assert!(screen.contains("on-a-tty"), "{screen:?}");
    assert!(
        screen.contains("40 100"),
        "the terminal size reached the guest: {screen:?}"
    );
    env.ok("c6-delete", &["delete", "c6"]);

    // --- a network namespace handed over by path: the container's eth0 (10.99.0.2/24,
    // MTU 1400, default route via 10.99.0.1) is a veth whose peer is here, 10.99.0.1.
    let ns = Netns::new("fkvm-rt-e2e");
    give_eth0(&ns, None, "fkvm-out0");
    let server = std::net::TcpListener::bind("10.99.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut conn, peer) = server.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
        conn.write_all(b"pong from outside\n").unwrap();
        (peer.ip().to_string(), line)
    });
    let script =
        format!("ip -o addr show dev eth0; ip link show dev eth0; echo ping | nc 10.99.0.1 {port}");
    let netns_path = ns.path();
    let b7 = bundle(&t.join("b7"), &["sh", "-c", &script], |c| {
        c["linux"]["namespaces"][2] = json!({"type": "network", "path": netns_path});
    });
    env.ok(
        "c7-create",
        &["create", "--bundle", b7.to_str().unwrap(), "c7"],
    );
    let pid = pid_of(&env.state("c7"));
    env.ok("c7-start", &["start", "c7"]);
    let code = reap(pid, Duration::from_secs(60));
    let out = env.read("c7-create.out");
    assert_eq!(
        code,
        0,
        "{out}\n{}\n{}",
        env.read("c7-create.err"),
        env.diagnostics()
    );
    let (peer, line) = served.join().unwrap();
    assert_eq!(peer, "10.99.0.2", "the server saw the engine's address");
    assert_eq!(line, "ping\n");
    assert!(out.contains("pong from outside"), "{out}");
    assert!(
        out.contains("inet 10.99.0.2/24"),
        "the guest's eth0 has the address: {out}"
    );
    assert!(
        out.contains("mtu 1400"),
        "the guest's eth0 has the MTU: {out}"
    );
    env.ok("c7-delete", &["delete", "c7"]);
    // The namespace is as the engine made it: the TAP is gone.
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains("fktap"), "{links}");
    drop(ns);
    let gone = Instant::now() + Duration::from_secs(10);
    while Path::new("/sys/class/net/fkvm-out0").exists() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }

    // --- an engine that gives the namespace its interface only after `create` returned
    // (a VM takes its NICs at boot): `start` reads the namespace again before the VM
    // boots, and the guest has the interface.
    let late = Netns::new("fkvm-rt-late");
    let late_path = late.path();
    let b13 = bundle(
        &t.join("b13"),
        &[
            "sh",
            "-c",
            "ip -o addr show dev eth0; echo late | nc 10.99.0.1 18123",
        ],
        |c| {
            c["linux"]["namespaces"][2] = json!({"type": "network", "path": late_path});
        },
    );
    env.ok(
        "c13-create",
        &["create", "--bundle", b13.to_str().unwrap(), "c13"],
    );
    assert_eq!(env.state("c13")["status"], "created");
    let pid = pid_of(&env.state("c13"));
    give_eth0(&late, None, "fkvm-out1");
    let server = std::net::TcpListener::bind("10.99.0.1:18123").unwrap();
    let served = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut conn, _) = server.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
        conn.write_all(b"pong to the late one\n").unwrap();
        line
    });
    env.ok("c13-start", &["start", "c13"]);
    let code = reap(pid, Duration::from_secs(60));
    let out = env.read("c13-create.out");
    assert_eq!(
        code,
        0,
        "{out}\n{}\n{}",
        env.read("c13-create.err"),
        env.diagnostics()
    );
    assert_eq!(served.join().unwrap(), "late\n");
    assert!(out.contains("inet 10.99.0.2/24"), "{out}");
    assert!(out.contains("pong to the late one"), "{out}");
    env.ok("c13-delete", &["delete", "c13"]);

    // --- bad input: the interface the VM took over at create vanishes before start;
    // start fails naming it, and nothing is left (no monitor, VM or TAP).
    let b14 = bundle(&t.join("b14"), &["true"], |c| {
        c["linux"]["namespaces"][2] = json!({"type": "network", "path": late.path()});
    });
    env.ok(
        "c14-create",
        &["create", "--bundle", b14.to_str().unwrap(), "c14"],
    );
    let pid = pid_of(&env.state("c14"));
    late.ip(&["link", "del", "eth0"]);
    let out = env.rt("c14-start", &["start", "c14"], None);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains("eth0 vanished from the container's network namespace"),
        "{out}"
    );
    reap(pid, Duration::from_secs(30));
    env.ok("c14-delete", &["delete", "c14"]);
    let links = late.ip(&["-o", "link", "show"]);
    assert!(!links.contains("fktap"), "{links}");
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());

    // --- bad input: the TAP for eth0 cannot be made (a link of another kind already
    // has its name); create fails saying so and leaves the namespace as it was.
    give_eth0(&late, None, "fkvm-out2");
    let index = late.ip(&["-o", "link", "show", "dev", "eth0"]);
    let index = index.split(':').next().unwrap().trim().to_owned();
    let squatter = format!("fktap{index}");
    late.ip(&["link", "add", &squatter, "type", "bridge"]);
    let b15 = bundle(&t.join("b15"), &["true"], |c| {
        c["linux"]["namespaces"][2] = json!({"type": "network", "path": late.path()});
    });
    let out = env.rt(
        "c15-create",
        &["create", "--bundle", b15.to_str().unwrap(), "c15"],
        None,
    );
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains(&format!("cannot make the TAP {squatter}")),
        "{out}"
    );
    assert!(!env.root().join("c15").exists(), "c15 left state behind");
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());
    let qdiscs = late.exec("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "eth0 left tied: {qdiscs}");
    let links = late.ip(&["-o", "link", "show"]);
    assert!(
        links.contains(&squatter),
        "another's link was removed: {links}"
    );
    drop(late);

    // --- a network namespace the runtime makes (no path), configured by a prestart hook
    // the way Docker's libnetwork-setkey configures runc's: a veth end moved into the
    // namespace of the state's pid, with an address and a default route. The poststart
    // and poststop hooks see the state too.
    hooks_configure_the_network(&env, t);

    // --- bad bundles: a clear error naming the problem, nothing left behind
    let b4 = t.join("b4");
    bundle(&b4, &["true"], |_| {});
    std::fs::write(
        b4.join("config.json"),
        "{\"ociVersion\": \"1.0.2\", \"process\": ",
    )
    .unwrap();
    let out = env.rt(
        "c4-create",
        &["create", "--bundle", b4.to_str().unwrap(), "c4"],
        None,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("config.json"), "{out}");
    assert!(
        out.stderr.contains("not a valid OCI runtime config"),
        "{out}"
    );
    let b5 = bundle(&t.join("b5"), &["true"], |c| {
        c["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/data", "type": "bind", "source": "/fkvm-no-such-dir", "options": ["rbind"]}),
        );
    });
    let out = env.rt(
        "c5-create",
        &["create", "--bundle", b5.to_str().unwrap(), "c5"],
        None,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("mount /data: cannot bind /fkvm-no-such-dir into the VM: it does not exist"),
        "{out}"
    );
    let last_error = env
        .read("runtime.log")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|l| l["level"] == "error")
        .expect("an error line in the JSON log");
    assert!(last_error["msg"].as_str().unwrap().contains("mount /data"));
    let b8 = bundle(&t.join("b8"), &["true"], |c| {
        c["linux"]["namespaces"][2] =
            json!({"type": "network", "path": "/var/run/netns/fkvm-no-such-ns"});
    });
    let out = env.rt(
        "c8-create",
        &["create", "--bundle", b8.to_str().unwrap(), "c8"],
        None,
    );
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("fkvm-no-such-ns"), "{out}");
    // A hook that fails fails create, with the hook's own words; the monitor it ran
    // against (and its namespace) is gone.
    let b10 = bundle(&t.join("b10"), &["true"], |c| {
        c["hooks"] = json!({"createRuntime": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", "echo the hook says no >&2; exit 7"]
        }]});
    });
    let out = env.rt(
        "c10-create",
        &["create", "--bundle", b10.to_str().unwrap(), "c10"],
        None,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("hooks.createRuntime[0] (/bin/sh) exited with 7: the hook says no"),
        "{out}"
    );
    // Namespaces by path: the monitor (the state's pid) joins them, as runc's container
    // process would; the host's own network namespace by path (what Docker's --network
    // host hands over) leaves the monitor on it, the VM process in an empty one of its
    // own and the guest with loopback only.
    namespaces_by_path(&env, t);
    assert!(
        !std::fs::read_to_string("/proc/net/dev")
            .unwrap()
            .contains("fktap"),
        "a TAP was made on the host"
    );
    for id in ["c4", "c5", "c8", "c10", "c11", "c12"] {
        assert!(!env.root().join(id).exists(), "{id} left state behind");
    }
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());
    let list = env.ok("list-empty", &["list", "-q"]);
    assert_eq!(list.stdout, "");
    assert!(
        runtime_processes().is_empty(),
        "left running: {:?}",
        runtime_processes()
    );
}

/// The monitor of container `id` whose state's pid is its holder (from the runtime's
/// own record: `state` shows the holder).
fn monitor_of(env: &Env, id: &str) -> i32 {
    let path = env.root().join(id).join("state.json");
    let state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["monitor_pid"].as_i64().expect("a monitor pid") as i32
}

/// The namespace `kind` of process `pid` (`/proc/PID/ns/KIND`'s link).
/// In how many pid namespaces process `pid` has a pid, from this process's down
/// (`NSpid:` of its status).
fn nspid_levels(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map_or(0, |p| p.split_whitespace().count())
}

fn ns_of(pid: impl std::fmt::Display, kind: &str) -> String {
    let link = format!("/proc/{pid}/ns/{kind}");
    std::fs::read_link(&link)
        .unwrap_or_else(|e| panic!("{link}: {e}"))
        .display()
        .to_string()
}

/// Ends the `unshare` holding namespaces for a test, however the test ends.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Container c11: its UTS, IPC and pid namespaces given by path (another process's,
/// made by `unshare`), its network the host's own by path; c12: a mount and a pid
/// namespace both by path, refused.
fn namespaces_by_path(env: &Env, t: &Path) {
    let holder = Holder(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--uts",
                "--ipc",
            ])
            .args(["sleep", "600"])
            .spawn()
            .expect("unshare (util-linux)"),
    );
    let h = holder.0.id();
    // Its namespaces made, and its pid namespace's first process (`sleep`) started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns_of(h, "uts") == ns_of("self", "uts")
        || forkvm_test_support::running_children(h).is_empty()
    {
        assert!(Instant::now() < deadline, "unshare made no namespaces");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b11 = bundle(&t.join("b11"), &["sh", "-c", "cat /proc/net/dev"], |c| {
        c["linux"]["namespaces"] = json!([
            {"type": "pid", "path": format!("/proc/{h}/ns/pid_for_children")},
            {"type": "mount"},
            {"type": "uts", "path": format!("/proc/{h}/ns/uts")},
            {"type": "ipc", "path": format!("/proc/{h}/ns/ipc")},
            {"type": "network", "path": "/proc/1/ns/net"},
            // A holder, in the pid namespace by path.
            {"type": "cgroup"},
        ]);
    });
    let out = env.rt(
        "c11-create",
        &["create", "--bundle", b11.to_str().unwrap(), "c11"],
        None,
    );
    assert_eq!(out.code, Some(0), "{out}\n{}", env.diagnostics());
    let log = env.read("runtime.log");
    assert!(
        log.contains("runtime's own network namespace") && log.contains("only loopback"),
        "the warning is not in the log:\n{log}"
    );
    let pid = pid_of(&env.state("c11"));
    for kind in ["uts", "ipc"] {
        assert_eq!(
            ns_of(pid, kind),
            ns_of(h, kind),
            "the monitor's {kind} namespace"
        );
    }
    assert_ne!(
        ns_of(pid, "mnt"),
        ns_of("self", "mnt"),
        "a mount namespace of its own"
    );
    assert_eq!(ns_of(pid, "pid"), ns_of(h, "pid_for_children"));
    assert_eq!(ns_of(pid, "net"), ns_of("self", "net"));
    // The state's pid is a holder in a cgroup namespace of its own; the monitor is in
    // the same pid namespace, not in a new cgroup one.
    let monitor = monitor_of(env, "c11");
    assert_ne!(ns_of(pid, "cgroup"), ns_of("self", "cgroup"));
    assert_eq!(ns_of(monitor, "cgroup"), ns_of("self", "cgroup"));
    for kind in ["pid", "uts", "ipc", "mnt"] {
        assert_eq!(ns_of(pid, kind), ns_of(monitor, kind), "{kind}");
    }
    // Its VM process, in a pid namespace below that one, records itself by its host
    // pid; its network namespace is an empty one of its own.
    let homes = env.vm_homes();
    assert_eq!(homes.len(), 1, "{homes:?}");
    let vm_state: Value =
        serde_json::from_slice(&std::fs::read(homes[0].join("state.json")).unwrap()).unwrap();
    let vm_pid = vm_state["process"]["pid"]
        .as_u64()
        .expect("the VM's process");
    let cmdline = std::fs::read(format!("/proc/{vm_pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("forkvm-vmm"),
        "{vm_state}"
    );
    // Its family's pid namespace is below the container's (which is below the host's).
    assert_ne!(ns_of(vm_pid, "pid"), ns_of(h, "pid_for_children"));
    assert_eq!(nspid_levels(vm_pid as u32), 3, "host, container, family");
    assert_ne!(
        ns_of(vm_pid, "net"),
        ns_of("self", "net"),
        "the VM process is on the host's network"
    );
    env.ok("c11-start", &["start", "c11"]);
    assert_eq!(
        reap(pid, Duration::from_secs(60)),
        0,
        "{}",
        env.diagnostics()
    );
    let dev = env.read("c11-create.out");
    let interfaces: Vec<&str> = dev
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| !name.contains('|'))
        .collect();
    assert_eq!(interfaces, ["lo"], "the guest has loopback only:\n{dev}");
    env.ok("c11-delete", &["delete", "c11"]);
    // A mount and a pid namespace both by path: refused by name, before anything.
    let b12 = bundle(&t.join("b12"), &["true"], |c| {
        c["linux"]["namespaces"] = json!([
            {"type": "pid", "path": format!("/proc/{h}/ns/pid_for_children")},
            {"type": "mount", "path": format!("/proc/{h}/ns/mnt")},
            {"type": "network"},
        ]);
    });
    let out = env.rt(
        "c12-create",
        &["create", "--bundle", b12.to_str().unwrap(), "c12"],
        None,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("both by path"), "{out}");
}

/// A prestart hook that does what libnetwork does for runc, with `ip` and `nsenter`:
/// `$1` is where it saves the state, `$2` the host end of the veth, `$3` the first three
/// octets of the /24 (`.1` the host's, `.2` the container's). Hooks get only the
/// environment the spec gives them.
const NETWORK_HOOK: &str = r#"set -e
state=$(cat)
echo "$state" > "$1/prestart.json"
pid=$(echo "$state" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
ip link add "$2" type veth peer name eth0 netns "$pid"
ip addr add "$3.1/24" dev "$2"
ip link set "$2" up
nsenter -t "$pid" -n ip link set eth0 mtu 1450 up
nsenter -t "$pid" -n ip addr add "$3.2/24" dev eth0
nsenter -t "$pid" -n ip route add default via "$3.1"
nsenter -t "$pid" -n ip link set lo up
"#;

/// The address of the namespace-only resolver in [`hooks_configure_the_network`]:
/// Docker's embedded DNS lives at this loopback address of the container's namespace.
const NS_RESOLVER: &str = "127.0.0.11";
/// The name it knows, and its address.
const NS_NAME: &str = "fkvm-dns.test";
const NS_NAME_ADDR: [u8; 4] = [10, 98, 7, 7];

/// A DNS server at [`NS_RESOLVER`]:53 inside the network namespace of `pid`, as dockerd
/// serves one in a container's namespace: [`NS_NAME`] has an A record, everything else
/// an empty answer. Serves until the returned handle is stopped (its thread and socket
/// hold the namespace while they exist).
fn serve_dns_in(pid: i32) -> DnsServer {
    let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        forkvm_net::join(&ns).unwrap();
        let socket = std::net::UdpSocket::bind((NS_RESOLVER, 53)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if let Some(answer) = dns_answer(&buf[..n]) {
                socket.send_to(&answer, from).unwrap();
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the namespace's DNS server did not start");
    DnsServer { stop, thread }
}

/// A running [`serve_dns_in`].
struct DnsServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl DnsServer {
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// The answer to a one-question query: NOERROR, with an A record when it asks for
/// [`NS_NAME`]'s A record.
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    // Header (12 bytes), then the question: labels, 0, type (2), class (2).
    let mut i = 12;
    let mut labels = Vec::new();
    while *query.get(i)? != 0 {
        let len = usize::from(query[i]);
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).into_owned());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let question_end = i + 5;
    let hit = labels.join(".") == NS_NAME && qtype == 1;
    let mut a = query.get(..question_end)?.to_vec();
    a[2] = 0x81; // response, recursion desired
    a[3] = 0x80; // recursion available, NOERROR
    a[6..8].copy_from_slice(&u16::from(hit).to_be_bytes()); // answers
    a[8..12].fill(0); // no authority or additional records
    if hit {
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        a.extend_from_slice(&NS_NAME_ADDR);
    }
    Some(a)
}

fn hooks_configure_the_network(env: &Env, t: &Path) {
    let server = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut conn, peer) = server.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
        conn.write_all(b"pong from the host\n").unwrap();
        (peer.ip().to_string(), line)
    });
    let hooks_dir = t.join("hooks9");
    std::fs::create_dir(&hooks_dir).unwrap();
    let dir = hooks_dir.to_str().unwrap();
    let env_path = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
    let save = |name: &str| {
        json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {dir}/{name}.json")],
            "env": [env_path]
        })
    };
    // The engine's resolv.conf names the namespace's own resolver.
    let resolv = t.join("resolv9.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {NS_RESOLVER}\noptions ndots:0\n"),
    )
    .unwrap();
    let script = format!(
        "ip -o addr show dev eth0; ip link show dev eth0; echo ping | nc 10.98.0.1 {port}; \
         busybox nslookup {NS_NAME}"
    );
    let b9 = bundle(&t.join("b9"), &["sh", "-c", &script], |c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": resolv,
            "options": ["rbind", "ro"]
        }));
        c["hooks"] = json!({
            "prestart": [{
                "path": "/bin/sh",
                "args": ["sh", "-c", NETWORK_HOOK, "sh", dir, "fkvm-hk0", "10.98.0"],
                "env": [env_path],
                "timeout": 60
            }],
            "createRuntime": [save("createRuntime")],
            "poststart": [save("poststart")],
            "poststop": [save("poststop")]
        });
    });
    env.ok(
        "c9-create",
        &["create", "--bundle", b9.to_str().unwrap(), "c9"],
    );
    let pid = pid_of(&env.state("c9"));
    let read_state = |name: &str| -> Value {
        let p = hooks_dir.join(format!("{name}.json"));
        serde_json::from_slice(
            &std::fs::read(&p)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.display(), env.diagnostics())),
        )
        .unwrap()
    };
    for name in ["prestart", "createRuntime"] {
        let s = read_state(name);
        assert_eq!(s["status"], "creating", "{name}: {s}");
        assert_eq!(s["id"], "c9", "{name}: {s}");
        assert_eq!(
            pid_of(&s),
            pid,
            "{name}: the hook's pid is the monitor: {s}"
        );
    }
    let dns = serve_dns_in(pid);
    env.ok("c9-start", &["start", "c9"]);
    assert_eq!(read_state("poststart")["status"], "running");
    let code = reap(pid, Duration::from_secs(60));
    let out = env.read("c9-create.out");
    assert_eq!(
        code,
        0,
        "{out}\n{}\n{}",
        env.read("c9-create.err"),
        env.diagnostics()
    );
    dns.stop();
    let (peer, line) = served.join().unwrap();
    assert_eq!(peer, "10.98.0.2", "the host saw the address the hook gave");
    assert_eq!(line, "ping\n");
    assert!(out.contains("pong from the host"), "{out}");
    assert!(out.contains("inet 10.98.0.2/24"), "{out}");
    assert!(out.contains("mtu 1450"), "{out}");
    // The name only the namespace's resolver knows resolved in the guest, through the
    // agent's relay at the same address.
    assert!(
        out.contains("Address: 10.98.7.7"),
        "{out}\n{}",
        env.read("c9-create.err")
    );
    assert!(
        !hooks_dir.join("poststop.json").exists(),
        "poststop before delete"
    );
    env.ok("c9-delete", &["delete", "c9"]);
    assert_eq!(read_state("poststop")["status"], "stopped");
    // The namespace died with the monitor, and the veth with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new("/sys/class/net/fkvm-hk0").exists() {
        assert!(
            Instant::now() < deadline,
            "the hook's veth outlived the container"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The annotations containerd's CRI gives a pod's sandbox (`kind` "sandbox") or one of
/// its containers ("container"), of pod sandbox `sandbox`.
fn cri(c: &mut Value, kind: &str, sandbox: &str) {
    c["annotations"] = json!({
        forkvm_oci::bundle::CRI_CONTAINER_TYPE: kind,
        forkvm_oci::bundle::CRI_SANDBOX_ID: sandbox,
    });
}

/// A pod's container joins its sandbox's namespaces by path, as containerd's CRI
/// writes them, and has no bind mounts of its own.
fn member_of(c: &mut Value, sandbox: &str, sandbox_pid: i32) {
    cri(c, "container", sandbox);
    c["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": format!("/proc/{sandbox_pid}/ns/net")},
        {"type": "ipc", "path": format!("/proc/{sandbox_pid}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{sandbox_pid}/ns/uts")},
    ]);
}

/// The mount points under `dir` in this thread's mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_pods_containers_run_inside_its_sandboxs_vm() {
    if !forkvm_testhost::in_test_host() {
        forkvm_oci::vm::container_guest().expect("cannot prepare the container guest");
    }
    forkvm_testhost::on_kvm_host_with(
        forkvm_testhost::test_path!(),
        Duration::from_secs(600),
        None,
        // Everything (state, VM homes, bundles, the pod's binds) in a tmpfs of its own,
        // in a mount namespace of its own.
        || forkvm_test_support::in_own_mounts(pod_body),
    );
}

fn pod_body(tmp: &Path) {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let env = Env {
        tmp: tempfile::tempdir_in(tmp).unwrap(),
    };
    let t = env.tmp.path();

    // The pod's sandbox, as CRI's pause container: it boots the pod's VM.
    let sb = bundle(&t.join("sb"), &["sleep", "100000"], |c| {
        cri(c, "sandbox", "sb");
        c["hostname"] = json!("pod-host");
    });
    env.ok(
        "sb-create",
        &["create", "--bundle", sb.to_str().unwrap(), "sb"],
    );
    env.ok("sb-start", &["start", "sb"]);
    let sb_pid = pid_of(&env.state("sb"));
    let homes = env.vm_homes();
    assert_eq!(homes.len(), 1, "{homes:?}");

    // Two containers of the pod, each with a root of its own, talking over the pod's
    // loopback: a server answers one connection, a client reads it.
    let web = bundle(
        &t.join("web"),
        &[
            "sh",
            "-c",
            "echo hello-from-web | nc -l -p 8080; echo web-done; \
             [ -e /client-marker ] && echo sees-client; exit 4",
        ],
        |c| member_of(c, "sb", sb_pid),
    );
    std::fs::write(web.join("rootfs/web-marker"), "web").unwrap();
    let hosts = t.join("pod-hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n10.0.0.9 pod-peer\n").unwrap();
    let (data, conf) = (t.join("pod-data"), t.join("pod-conf"));
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(data.join("from-host"), "host-wrote").unwrap();
    std::fs::write(conf.join("token"), "the-token").unwrap();
    let client = bundle(
        &t.join("client"),
        &[
            "sh",
            "-c",
            "for i in $(seq 1 60); do nc 127.0.0.1 8080 && break; sleep 0.5; done; \
             [ -e /web-marker ] && echo sees-web; [ -e /client-marker ] && echo own-root; \
             grep -q pod-peer /etc/hosts && echo hosts-bound; \
             echo data=$(cat /data/from-host); echo from-client > /data/from-client; \
             echo token=$(cat /conf/token); echo x > /conf/token || echo conf-read-only; \
             grep ' /data ' /proc/self/mountinfo; \
             echo client-host=$(hostname); exit 5",
        ],
        |c| {
            member_of(c, "sb", sb_pid);
            // A bound file, as CRI binds /etc/hosts into a pod's containers, and two
            // bound directories (a volume, and a read-only one as a service account's
            // token is).
            let mounts = c["mounts"].as_array_mut().unwrap();
            mounts.push(json!({"destination": "/etc/hosts",
                "type": "bind", "source": hosts, "options": ["rbind", "ro"]}));
            mounts.push(json!({"destination": "/data",
                "type": "bind", "source": data, "options": ["rbind"]}));
            mounts.push(json!({"destination": "/conf",
                "type": "bind", "source": conf, "options": ["rbind", "ro"]}));
        },
    );
    std::fs::write(client.join("rootfs/client-marker"), "client").unwrap();
    let created = Instant::now();
    env.ok(
        "web-create",
        &["create", "--bundle", web.to_str().unwrap(), "web"],
    );
    println!("create of a pod's container: {:?}", created.elapsed());
    env.ok(
        "client-create",
        &["create", "--bundle", client.to_str().unwrap(), "client"],
    );
    // Neither booted a VM: both are in the sandbox's.
    assert_eq!(env.vm_homes(), homes, "a pod's container booted a VM");
    let web_state = env.state("web");
    assert_eq!(web_state["status"], "created", "{web_state}");
    let pod_dir = env.root().join("@pods/sb");
    assert_eq!(
        mounts_under(&pod_dir).len(),
        5,
        "the pod directory, the two roots and the client's two volumes: {:?}",
        mounts_under(&pod_dir)
    );
    let client_pid = pid_of(&env.state("client"));
    env.ok("web-start", &["start", "web"]);
    env.ok("client-start", &["start", "client"]);
    // Running, or already done (a stopped container has no pid in its state).
    let status = env.state("client")["status"].clone();
    assert!(status == "running" || status == "stopped", "{status}");
    let client_code = reap(client_pid, COMMAND_TIMEOUT);
    let web_code = reap(pid_of(&web_state), COMMAND_TIMEOUT);
    let client_out = env.read("client-create.out");
    let web_out = env.read("web-create.out");
    assert_eq!(
        (client_code, web_code),
        (5, 4),
        "client:\n{client_out}\nweb:\n{web_out}\n{}",
        env.diagnostics()
    );
    assert!(
        client_out.contains("hello-from-web")
            && client_out.contains("own-root")
            && client_out.contains("hosts-bound"),
        "{client_out}"
    );
    // Its volumes: the host's file read, its own written through, the read-only one
    // refused (and unchanged), the bind named as the host's directory.
    assert!(
        client_out.contains("data=host-wrote")
            && client_out.contains("token=the-token")
            && client_out.contains("conf-read-only")
            && client_out.contains("/client/volumes/0/pod-data /data "),
        "{client_out}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("from-client")).unwrap(),
        "from-client\n"
    );
    assert_eq!(
        std::fs::read_to_string(conf.join("token")).unwrap(),
        "the-token"
    );
    assert!(!client_out.contains("sees-web"), "{client_out}");
    assert!(
        client_out.contains("client-host=pod-host"),
        "the pod's UTS: {client_out}"
    );
    assert!(
        web_out.contains("web-done") && !web_out.contains("sees-client"),
        "{web_out}"
    );
    assert_eq!(env.state("web")["status"], "stopped");

    // exec in a running container of the pod, and a signal through the agent.
    let idle = bundle(&t.join("idle"), &["sleep", "100000"], |c| {
        member_of(c, "sb", sb_pid)
    });
    std::fs::write(idle.join("rootfs/idle-marker"), "idle").unwrap();
    env.ok(
        "idle-create",
        &["create", "--bundle", idle.to_str().unwrap(), "idle"],
    );
    env.ok("idle-start", &["start", "idle"]);
    let exec = env.ok(
        "idle-exec",
        &[
            "exec",
            "idle",
            "sh",
            "-c",
            "cat /idle-marker; echo; [ -e /web-marker ] || echo alone",
        ],
    );
    assert!(
        exec.stdout.contains("idle") && exec.stdout.contains("alone"),
        "{exec}"
    );
    // SIGKILL goes to the process through the agent: the monitor is not killed, it
    // exits with the process's status.
    let idle_state = env.state("idle");
    assert!(idle_state["pid"].is_i64(), "{idle_state}");
    env.ok("idle-kill", &["kill", "idle", "KILL"]);
    assert_eq!(
        reap_status(pid_of(&idle_state), COMMAND_TIMEOUT),
        (Some(128 + libc::SIGKILL), None),
        "{}",
        env.diagnostics()
    );
    // The pod's VM runs on.
    assert_eq!(env.state("sb")["status"], "running");

    // Bad input: a container of a pod this runtime does not have, and one whose
    // sandbox is not a sandbox; nothing is left of either.
    let orphan = bundle(&t.join("orphan"), &["true"], |c| {
        member_of(c, "nopod", sb_pid)
    });
    let out = env.rt(
        "orphan-create",
        &["create", "--bundle", orphan.to_str().unwrap(), "orphan"],
        None,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("pod sandbox nopod, which this runtime does not have"),
        "{out}"
    );
    let stray = bundle(&t.join("stray"), &["true"], |c| member_of(c, "web", sb_pid));
    let out = env.rt(
        "stray-create",
        &["create", "--bundle", stray.to_str().unwrap(), "stray"],
        None,
    );
    assert!(
        out.code == Some(1)
            && out
                .stderr
                .contains("container web, named as the pod sandbox of stray, is not a pod sandbox"),
        "{out}"
    );
    let listed = env.ok("list", &["list", "-q"]).stdout;
    assert!(
        !listed.contains("orphan") && !listed.contains("stray"),
        "{listed}"
    );

    // delete: the containers go from the VM and the pod directory; the sandbox's
    // delete takes the VM and the directory.
    for id in ["web", "client", "idle"] {
        env.ok(&format!("{id}-delete"), &["delete", id]);
    }
    assert_eq!(
        mounts_under(&pod_dir),
        [pod_dir.to_string_lossy().into_owned()],
        "the containers' roots are still bound"
    );
    assert!(
        web.join("rootfs/web-marker").exists(),
        "delete took the container's files"
    );
    env.ok("sb-delete", &["delete", "--force", "sb"]);
    assert!(mounts_under(&pod_dir).is_empty());
    assert!(!pod_dir.exists(), "the pod directory is left");
    assert!(env.vm_homes().is_empty(), "{:?}", env.vm_homes());
    assert!(runtime_processes().is_empty(), "{:?}", runtime_processes());
    assert!(client.join("rootfs/client-marker").exists());
    assert!(
        data.join("from-host").exists() && conf.join("token").exists(),
        "delete took a volume's files"
    );
}
