//! VM fork, end to end on a real KVM: a running 2-vCPU guest forks into children that
//! continue from the parent's exact state, keep their memory private, get their own
//! identity (vsock CID, hostname, fresh entropy), and fork again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_test_support::{is_running as running, sigkill};
use forkvm_vmm::control::{ChildSpec, ControlHandle, ForkOutcome, ForkRequest, Request, Response};
use forkvm_vmm::launch::ChildHomes;
use forkvm_vmm::{VmConfig, Vmm, VsockConfig};

/// The guest's program: a marker on tmpfs, a counter, fresh random numbers each tick, a
/// process pinned to vCPU 1 proving that vCPU runs, and a check that what this VM wrote
/// to tmpfs last tick is still there (memory private per VM).
const GUEST_LOOP: &str = "echo original-marker > /tmp/marker; \
taskset -c 1 sh -c 'while true; do read u x < /proc/uptime; echo $u > /tmp/cpu1; sleep 0.2; done' & \
i=0; p=none; echo none > /tmp/mine; \
while true; do \
read m < /tmp/mine; if [ $m = $p ]; then s=ok; else s=BAD; fi; \
set -- $(od -An -N8 -tx8 /dev/urandom); read h < /proc/sys/kernel/hostname; \
read k < /tmp/marker; read c < /tmp/cpu1; \
echo tick=$i host=$h marker=$k rand=$1 priv=$s cpu1=$c; \
echo $1 > /tmp/mine; p=$1; i=$((i+1)); sleep 0.3; done";

/// One parsed `tick=` line of a guest's console.
#[derive(Clone, Debug)]
struct Tick {
    n: u64,
    fields: BTreeMap<String, String>,
}

fn ticks(log: &Path) -> Vec<Tick> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    common::whole_lines(&text)
        .filter(|l| l.starts_with("tick=") && l.contains(" cpu1="))
        .filter_map(|l| {
            let fields: BTreeMap<String, String> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Some(Tick {
                n: fields.get("tick")?.parse().ok()?,
                fields,
            })
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    eprintln!("[fork_e2e] waiting for {what}");
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills fork children when the test ends, however it ends.
struct Children(Vec<u32>);

impl Drop for Children {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

fn fork(handle: &ControlHandle, consoles: &[PathBuf]) -> ForkOutcome {
    let req = ForkRequest {
        count: consoles.len() as u32,
        freeze: false,
        children: consoles
            .iter()
            .map(|c| ChildSpec {
                console: Some(c.clone()),
                ..ChildSpec::default()
            })
            .collect(),
    };
    match handle.call(Request::Fork(req)) {
        Ok(Response::Forked(out)) => out,
        other => panic!("fork failed: {other:?}"),
    }
}

/// Checks one VM's console after the fork: it kept counting from `from`, its memory
/// stayed private, both vCPUs ran, and it still has the parent's marker.
fn check_continues(name: &str, log: &Path, from: u64) -> Vec<Tick> {
    let t = ticks(log);
    assert!(t.len() >= 3, "{name}: too few ticks after the fork:\n{t:?}");
    assert!(
        t[0].n >= from,
        "{name} restarted its counter ({} < {from}): not the parent's state",
        t[0].n
    );
    for w in t.windows(2) {
        assert_eq!(w[1].n, w[0].n + 1, "{name}: counter skipped: {w:?}");
    }
    for tick in &t[1..] {
        assert_eq!(
            tick.fields["priv"], "ok",
            "{name}: another VM's write leaked in: {tick:?}"
        );
        assert_eq!(tick.fields["marker"], "original-marker", "{name}: {tick:?}");
    }
    let cpu1: BTreeSet<&String> = t.iter().map(|x| &x.fields["cpu1"]).collect();
    assert!(
        cpu1.len() >= 2,
        "{name}: nothing ran on vCPU 1 after the fork: {t:?}"
    );
    t
}

#[test]
fn running_vm_forks_into_private_children_with_their_own_identity() {
    let guest = forkvm_guest_kernel::default_guest().expect("default guest");
    assert!(
        forkvm_guest_kernel::find_agent().is_some(),
        "the guest agent is not built: run `cargo xtask prepare-guest`"
    );
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let parent_log = dir.path().join("parent.log");
        let mut cfg = VmConfig::new(&guest.kernel);
        cfg.initrd = Some(guest.initrd.clone());
        cfg.vcpus = 2;
        cfg.mem_mib = 256;
        cfg.vsock = Some(VsockConfig {
            cid: 3,
            uds: dir.path().join("parent.vsock"),
        });
        cfg.cmdline = common::guest_cmdline(GUEST_LOOP);
        // Two warm processes: a fork of three takes both and starts one from scratch.
        cfg.fork_pool = 2;
        let console = File::create(&parent_log).unwrap();
        let child_root = dir.path().join("root");
        let (tx, rx) = std::sync::mpsc::channel();
        let vmm_thread = std::thread::spawn(move || {
            let mut vmm = Vmm::boot(&cfg, Box::new(console)).expect("boot");
            vmm.set_child_homes(ChildHomes {
                root: child_root,
                parent: None,
            });
            vmm.fill_fork_pool();
            tx.send(vmm.control_handle()).unwrap();
            vmm.run()
        });
        let handle = rx.recv().expect("the VMM booted");
        wait_for("the parent to count", Duration::from_secs(120), || {
            ticks(&parent_log).len() >= 4
        });
        let pool_full = || {
            wait_for(
                "the fork pool to fill",
                Duration::from_secs(120),
                || matches!(handle.call(Request::Info), Ok(Response::Info(i)) if i.fork_pool.len() == 2),
            )
        };
        pool_full();

        // First fork: three children.
        let before = ticks(&parent_log).last().unwrap().n;
        let consoles: Vec<PathBuf> = (0..3)
            .map(|i| dir.path().join(format!("child{i}.log")))
            .collect();
        let out = fork(&handle, &consoles);
        let mut kids = Children(out.children.iter().map(|c| c.pid).collect());
        assert_eq!(out.children.len(), 3);
        assert_eq!(
            out.children.iter().map(|c| c.warm).collect::<Vec<_>>(),
            [true, true, false],
            "{out:?}"
        );
        let cids: BTreeSet<u64> = out.children.iter().map(|c| c.cid.expect("a CID")).collect();
        assert_eq!(cids.len(), 3, "children share a vsock CID: {out:?}");
        // Every child's vCPU threads run the guest under their seccomp filter, warm or not.
        for c in &out.children {
            let vcpus = forkvm_test_support::thread_confinement(c.pid, "vcpu");
            assert_eq!(vcpus.len(), 2, "child {}: {vcpus:?}", c.pid);
            for (name, seccomp, nnp) in &vcpus {
                assert_eq!(
                    (seccomp.as_str(), nnp.as_str()),
                    ("2", "1"),
                    "{} {name}",
                    c.pid
                );
            }
        }
        assert!(!cids.contains(&3), "a child kept the parent's CID");
        eprintln!(
            "fork of 3: parent paused {} us; children running after {:?} us",
            out.parent_pause_us,
            out.children
                .iter()
                .map(|c| c.running_after_us)
                .collect::<Vec<_>>()
        );

        // Each child's agent answers over the child's own vsock socket (so the guest took
        // its new CID), and has applied the child's identity.
        for c in &out.children {
            let uds = c.vsock_uds.as_ref().unwrap();
            let mut last = None;
            wait_for(
                "a child's agent to apply its identity",
                Duration::from_secs(60),
                || {
                    last =
                        forkvm_vmm::fork::agent_call(uds, &forkvm_agent_proto::Request::Ping).ok();
                    matches!(&last, Some(forkvm_agent_proto::Response::Pong { hostname, .. }) if hostname.starts_with("fork-"))
                },
            );
        }
        // Each child took its identity over the identity port (no connection), and
        // recorded so in its home.
        let child_root = dir.path().join("root");
        for c in &out.children {
            let mut via = None;
            wait_for(
                "a child to record its identity",
                Duration::from_secs(60),
                || {
                    via = forkvm_registry::list(&child_root)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|e| e.state.ok())
                        .find(|s| s.process.as_ref().is_some_and(|p| p.pid == c.pid))
                        .and_then(|s| s.identity)
                        .map(|i| i.via);
                    via.is_some()
                },
            );
            assert_eq!(via.as_deref(), Some("identity-port"), "child {}", c.pid);
        }
        let all_counting = || consoles.iter().all(|c| ticks(c).len() >= 6);
        wait_for(
            "the children to count",
            Duration::from_secs(120),
            all_counting,
        );

        // Every VM continued privately from the parent's state.
        let parent_after: Vec<Tick> = ticks(&parent_log)
            .into_iter()
            .filter(|t| t.n > before)
            .collect();
        assert!(parent_after.len() >= 2, "the parent stopped after the fork");
        let mut per_child = Vec::new();
        for (i, c) in consoles.iter().enumerate() {
            let t = check_continues(&format!("child {i}"), c, before);
            per_child.push(t);
        }
        // Own hostname per child, and no two VMs draw the same random numbers once the
        // agent has reseeded (the first tick may run before the reseed).
        let hosts: BTreeSet<&String> = per_child
            .iter()
            .map(|t| &t.last().unwrap().fields["host"])
            .collect();
        assert_eq!(hosts.len(), 3, "children share a hostname: {hosts:?}");
        let mut seen: BTreeMap<&String, usize> = BTreeMap::new();
        for (i, t) in per_child.iter().enumerate() {
            for tick in t.iter().skip(2) {
                if let Some(other) = seen.insert(&tick.fields["rand"], i) {
                    assert_eq!(
                        other, i,
                        "children {other} and {i} drew the same random number"
                    );
                }
            }
        }

        // Fork again: the parent has run (and written) since; a new child starts from
        // the parent's *current* state, which now includes a memory overlay.
        pool_full();
        let before2 = ticks(&parent_log).last().unwrap().n;
        let late = dir.path().join("late.log");
        let out2 = fork(&handle, std::slice::from_ref(&late));
        kids.0.extend(out2.children.iter().map(|c| c.pid));
        assert!(out2.children[0].warm, "{out2:?}");
        wait_for(
            "the second-generation child to count",
            Duration::from_secs(120),
            || ticks(&late).len() >= 4,
        );
        check_continues("late child", &late, before2);

        handle.call(Request::Stop).expect("stop the parent");
        let _ = vmm_thread.join();
        drop(kids);
    });
}

/// Runs `forkvm --root ROOT ARGS` to completion.
fn run_forkvm(root: &Path, args: &[&str]) -> std::process::Output {
    run_forkvm_keyed(root, &root.with_file_name("template.key"), args)
}

/// Runs `forkvm --root ROOT ARGS` with the template key `key` (the virtual host's
/// `/var/lib`, where root's key is by default, is read-only).
fn run_forkvm_keyed(root: &Path, key: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::FORKVM)
        .arg("--root")
        .arg(root)
        .env("FORKVM_TEMPLATE_KEY", key)
        .args(args)
        .output()
        .expect("cannot run forkvm")
}

/// Runs `forkvm --root ROOT ARGS`, requires success, returns stdout.
fn forkvm_ok(root: &Path, args: &[&str]) -> String {
    let out = run_forkvm(root, args);
    assert!(
        out.status.success(),
        "forkvm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn counts(root: &Path, vm: &str) -> Vec<u64> {
    common::whole_lines(&forkvm_ok(root, &["logs", vm]))
        .filter_map(|l| l.strip_prefix("count="))
        .filter_map(|n| n.split_whitespace().next()?.parse().ok())
        .collect()
}

fn vms(root: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&forkvm_ok(root, &["ps", "--format", "json"])).expect("ps JSON")
}

/// The warm processes of `vm`'s fork pool, as `forkvm inspect` reports them.
fn pool_pids(root: &Path, vm: &str) -> Vec<u32> {
    let info: serde_json::Value =
        serde_json::from_str(&forkvm_ok(root, &["inspect", vm])).expect("inspect JSON");
    info["fork_pool"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// The live fork-pool zygotes whose parent is `pid`.
fn zygotes_of(pid: u32) -> Vec<u32> {
    forkvm_test_support::running_children(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "forkvm-zygote")
        })
        .collect()
}

fn children_of(root: &Path, parent: &str) -> Vec<String> {
    vms(root)
        .iter()
        .filter(|v| v["parent"].as_str() == Some(parent))
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn forked_children_are_vms_of_their_own_and_fork_again() {
    let guest = forkvm_guest_kernel::default_guest().expect("default guest");
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        // A directory every user may make files in, as `/tmp`: the family's uid reaches
        // its state root and makes its children's vsock sockets beside the parent's
        // (where it could not, the family would stay uid 0).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let root = dir.path().join("root");
        let uds = dir.path().join("p.vsock");
        let script = "i=0; while true; do echo count=$i; i=$((i+1)); sleep 0.5; done";
        let parent = forkvm_ok(
            &root,
            &[
                "boot",
                "-d",
                "--name",
                "origin",
                "--vsock",
                &format!("cid=3,uds={}", uds.display()),
                "--cmdline",
                &common::guest_cmdline(script),
            ],
        )
        .trim()
        .to_owned();
        wait_for("the parent to count", Duration::from_secs(120), || {
            counts(&root, "origin").len() >= 3
        });
        // A booted VM fills its fork pool (`--fork-pool` defaults to 2).
        wait_for("the fork pool to fill", Duration::from_secs(120), || {
            pool_pids(&root, "origin").len() == 2
        });
        let warm = pool_pids(&root, "origin");
        // A warm process that dies is never handed out.
        sigkill(warm[1]);
        wait_for("the warm process to die", Duration::from_secs(10), || {
            !running(warm[1])
        });

        // Fork through the CLI: the children register as VMs with the parent recorded.
        let at_fork = *counts(&root, "origin").last().unwrap();
        let out: ForkOutcome =
            serde_json::from_str(&forkvm_ok(&root, &["fork", "origin", "-n", "2", "--json"]))
                .unwrap();
        let _kids = Children(out.children.iter().map(|c| c.pid).collect());
        let pids: Vec<u32> = out.children.iter().map(|c| c.pid).collect();
        assert!(
            !pids.contains(&warm[1]),
            "a dead warm process was used: {out:?}"
        );
        // The live warm process became a child; the pool ran short and started the other.
        assert!(
            pids.contains(&warm[0]),
            "the warm process was not used: {out:?}"
        );
        assert_eq!(
            out.children.iter().map(|c| c.warm).collect::<Vec<_>>(),
            [true, false],
            "{out:?}"
        );
        wait_for("the fork pool to refill", Duration::from_secs(120), || {
            pool_pids(&root, "origin").len() == 2
        });
        let refilled = pool_pids(&root, "origin");
        assert!(
            !refilled.iter().any(|p| warm.contains(p)),
            "{refilled:?} reuses {warm:?}"
        );
        wait_for("the children to register", Duration::from_secs(60), || {
            children_of(&root, &parent).len() == 2
        });
        let kids = children_of(&root, &parent);
        // `boot` recorded the parent's launch beside the state root, `fork` its
        // children's: the same (a child's kernel, disks, size... are its parent's).
        let record = |id: &str| -> serde_json::Value {
            let path = dir.path().join("root.launched").join(format!("{id}.json"));
            serde_json::from_slice(&std::fs::read(&path).expect("no launch record")).unwrap()
        };
        assert_eq!(
            record(&parent)["kernel"].as_str(),
            guest.kernel.to_str(),
            "{}",
            record(&parent)
        );
        for k in &kids {
            assert_eq!(record(k), record(&parent), "child {k}");
        }
        // The booted VM and its fork children are jailed, each in its own cgroup.
        forkvm_test_support::assert_probe_tells_dumpable_processes();
        let mut groups = vec![assert_jailed(&root, "origin")];
        for k in &kids {
            groups.push(assert_jailed(&root, k));
        }
        // One family: the children in the pid namespace their parent's launcher made,
        // of its uid, in its cgroup.
        let family = inspect(&root, "origin")["jail"]["pid_ns"].clone();
        for k in &kids {
            assert_eq!(inspect(&root, k)["jail"]["pid_ns"], family, "child {k}");
        }
        let uid = assert_own_uid(&root, "origin", &groups[0]);
        for (k, group) in kids.iter().zip(&groups[1..]) {
            assert_eq!(assert_own_uid(&root, k, group), uid, "child {k}");
        }
        // Another family: another uid, whose homes this one cannot enter.
        let other = forkvm_ok(
            &root,
            &[
                "boot",
                "-d",
                "--name",
                "other",
                "--cmdline",
                &common::guest_cmdline("sleep 600"),
            ],
        )
        .trim()
        .to_owned();
        wait_for(
            "the other VM to take its uid",
            Duration::from_secs(60),
            || {
                inspect(&root, "other")["jail"]["uid"]
                    .as_u64()
                    .is_some_and(|u| u != 0)
            },
        );
        let other_uid = inspect(&root, "other")["jail"]["uid"].as_u64().unwrap() as u32;
        assert_ne!(other_uid, uid, "two families share a uid");
        let as_family = |path: &Path| {
            forkvm_test_support::runs_as(
                uid,
                forkvm_jail::uid::FAMILIES_GID,
                &format!("ls {}", path.display()),
            )
        };
        assert!(
            as_family(&root.join(&parent)),
            "the family cannot enter its own home"
        );
        assert!(
            !as_family(&root.join(&other)),
            "uid {uid} entered another family's home (its API socket is there)"
        );
        let other_group = PathBuf::from(forkvm_jail::cgroup::ROOT)
            .join("forkvm")
            .join(format!("family-{other_uid}"));
        forkvm_ok(&root, &["rm", "-f", "other"]);
        // Its family's init removes the family's group once the family is gone.
        wait_for(
            "the other family's group to go",
            Duration::from_secs(30),
            || !other_group.exists(),
        );
        for k in &kids {
            wait_for("a child to count", Duration::from_secs(60), || {
                counts(&root, k).len() >= 2
            });
            let c = counts(&root, k);
            assert!(
                c[0] >= at_fork,
                "child {k} restarted at {} (parent was at {at_fork})",
                c[0]
            );
        }

        // Nested fork: a child forks in turn; the grandchild continues from the child.
        let child = &kids[0];
        let child_at = *counts(&root, child).last().unwrap();
        // A child keeps no pool until it forks itself.
        assert!(pool_pids(&root, child).is_empty());
        forkvm_ok(&root, &["fork", child, "-n", "1"]);
        wait_for(
            "the grandchild to register",
            Duration::from_secs(60),
            || children_of(&root, child).len() == 1,
        );
        let grandchild = children_of(&root, child).remove(0);
        assert_eq!(record(&grandchild), record(&parent), "grandchild");
        wait_for("the grandchild to count", Duration::from_secs(60), || {
            counts(&root, &grandchild).len() >= 2
        });
        let g = counts(&root, &grandchild);
        assert!(
            g[0] >= child_at,
            "grandchild restarted at {} (child was at {child_at})",
            g[0]
        );
        for w in g.windows(2) {
            assert_eq!(w[1], w[0] + 1, "grandchild counter skipped: {g:?}");
        }
        // The parent kept running through both forks.
        assert!(*counts(&root, "origin").last().unwrap() > at_fork);

        // While a fork's children start, the parent serves its devices and requests. A
        // fork of three takes the two warm processes; its third child's console is a
        // FIFO nobody reads yet, so the fork cannot finish (opening it for the child
        // waits for a reader): the parent's API must answer meanwhile. (When the fork
        // ran on the parent's event loop, that open held the loop, and `inspect` timed
        // out.)
        let before_fork = children_of(&root, &parent);
        let fifo = root.join("held-console.fifo");
        let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0, "mkfifo");
        // The family's to open (its VM process runs as the family's uid, not as root).
        std::os::unix::fs::lchown(&fifo, Some(uid), None).unwrap();
        let api = root.join(parent.as_str()).join("api.sock");
        let req = forkvm_api::wire::ForkRequest {
            count: 3,
            children: vec![
                Default::default(),
                Default::default(),
                forkvm_api::wire::ChildSpec {
                    console: Some(fifo.clone()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let forking = std::thread::spawn(move || forkvm_api::client::Client::new(&api).fork(&req));
        wait_for(
            "the parent's API to show the fork took its warm processes",
            Duration::from_secs(120),
            || pool_pids(&root, "origin").len() < 2,
        );
        assert!(
            !forking.is_finished(),
            "the fork ended with its third child's console unopened"
        );
        // Let the third child's console open (and keep it drained).
        let reader = fifo.clone();
        std::thread::spawn(move || {
            let mut f = File::open(&reader).unwrap();
            let _ = std::io::copy(&mut f, &mut std::io::sink());
        });
        let three = forking.join().unwrap().expect("the fork of three");
        let _three = Children(three.children.iter().map(|c| c.pid).collect());
        assert_eq!(
            three.children.iter().map(|c| c.warm).collect::<Vec<_>>(),
            [true, true, false],
            "{three:?}"
        );
        wait_for(
            "the three children to register",
            Duration::from_secs(60),
            || children_of(&root, &parent).len() == before_fork.len() + 3,
        );
        for k in children_of(&root, &parent) {
            if !before_fork.contains(&k) {
                forkvm_ok(&root, &["rm", "-f", &k]);
            }
        }
        let _ = std::fs::remove_file(&fifo);
        wait_for("the fork pool to refill", Duration::from_secs(120), || {
            pool_pids(&root, "origin").len() == 2
        });

        // A pool never outlives its VM: not when the VM process is killed, nor after
        // `rm -f`.
        wait_for(
            "the child's fork pool to fill",
            Duration::from_secs(120),
            || pool_pids(&root, child).len() == 2,
        );
        let child_pool = pool_pids(&root, child);
        let child_pid = vms(&root)
            .iter()
            .find(|v| v["id"].as_str() == Some(child.as_str()))
            .and_then(|v| v["pid"].as_u64())
            .expect("the child's pid") as u32;
        // The pools' zygotes: children of the VM processes.
        let origin_pid = vms(&root)
            .iter()
            .find(|v| v["id"].as_str() == Some(parent.trim()))
            .and_then(|v| v["pid"].as_u64())
            .expect("the origin's pid") as u32;
        let zygotes: Vec<u32> = [child_pid, origin_pid]
            .iter()
            .flat_map(|&p| zygotes_of(p))
            .collect();
        assert_eq!(zygotes.len(), 2, "one zygote per pool: {zygotes:?}");
        // Warm processes (which hold the VM's memory as they wait) and the zygotes that
        // fork them are not dumpable either.
        for pid in child_pool
            .iter()
            .chain(&pool_pids(&root, "origin"))
            .chain(&zygotes)
        {
            assert_eq!(
                forkvm_test_support::reachable_without_ptrace(*pid),
                Some(false),
                "process {pid} (a warm process or zygote) is open to a root process \
                 without CAP_SYS_PTRACE"
            );
        }
        sigkill(child_pid);
        let origin_pool = pool_pids(&root, "origin");
        forkvm_ok(&root, &["rm", "-f", "origin"]);
        for pid in child_pool.iter().chain(&origin_pool).chain(&zygotes) {
            wait_for(
                "a warm process to end with its VM",
                Duration::from_secs(30),
                || !running(*pid),
            );
        }

        let grandchild_group = assert_jailed(&root, &grandchild);
        for vm in [grandchild.as_str(), &kids[1]] {
            forkvm_ok(&root, &["stop", "-t", "2", vm]);
        }
        // A VM that ends removes its cgroup; `rm` removes a killed one's.
        for group in [&grandchild_group, &groups[2]] {
            wait_for(
                "a stopped VM's cgroup to go",
                Duration::from_secs(30),
                || !group.exists(),
            );
        }
        forkvm_ok(&root, &["rm", "-f", child]);
        assert!(!groups[0].exists(), "{}", groups[0].display());
        assert!(!groups[1].exists(), "{}", groups[1].display());
    });
}

/// The pid namespace of process `pid` (`pid:[N]`).
fn pid_ns(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap_or_else(|e| panic!("process {pid}'s pid namespace: {e}"))
        .display()
        .to_string()
}

/// `forkvm inspect VM`.
fn inspect(root: &Path, vm: &str) -> serde_json::Value {
    serde_json::from_str(&forkvm_ok(root, &["inspect", vm])).unwrap()
}

/// Checks that VM `vm`'s process is jailed, as `forkvm inspect` reports it and the kernel
/// says: every thread under seccomp with no new privileges, no effective capability, in
/// a cgroup of its own whose limits cover its memory, in its minimal root. Returns the
/// cgroup's directory.
fn assert_jailed(root: &Path, vm: &str) -> PathBuf {
    let info = inspect(root, vm);
    let jail = &info["jail"];
    let id = info["id"].as_str().unwrap();
    assert_eq!(jail["seccomp"], 2, "{vm}: {jail}");
    assert_eq!(jail["no_new_privs"], true, "{vm}: {jail}");
    assert_eq!(jail["cap_eff"], "0000000000000000", "{vm}: {jail}");
    // In its family's group, `/forkvm/family-<n>/<id>`.
    let group = jail["cgroup"].as_str().unwrap_or_default().to_owned();
    let family_group = group
        .strip_prefix("/forkvm/family-")
        .and_then(|g| g.strip_suffix(&format!("/{id}")))
        .filter(|n| n.parse::<u32>().is_ok());
    assert!(family_group.is_some(), "{vm}: {jail}");
    let mem = info["mem_mib"].as_u64().unwrap() << 20;
    let budget = forkvm_vmm::memory::guest_memory_budget(mem);
    let overhead = forkvm_jail::cgroup::VMM_OVERHEAD;
    assert_eq!(
        jail["memory_max"],
        (budget + overhead).to_string(),
        "{vm}: {jail}"
    );
    let pids_max = forkvm_jail::cgroup::DEFAULT_PIDS_MAX.to_string();
    assert_eq!(jail["pids_max"], pids_max, "{vm}: {jail}");
    // Bound by file-system rules: its own (a booted VM; "partially" on a kernel whose
    // Landlock has no truncate right, as this virtual host's 6.1) or its parent's.
    let rules = &info["landlock"];
    let enforced = rules["enforced"].as_str().unwrap_or_default();
    match info["parent"].is_null() {
        true => assert!(matches!(enforced, "fully" | "partially"), "{vm}: {rules}"),
        false => assert_eq!(enforced, "inherited", "{vm}: {rules}"),
    }
    assert!(
        rules["dirs"].as_array().is_some_and(|d| d.iter().any(|d| d
            .as_str()
            .is_some_and(|d| d.starts_with("/sys/fs/cgroup/forkvm/family-")))),
        "{vm}: {rules}"
    );
    let pid = info["pid"].as_u64().unwrap() as u32;
    // Not dumpable: another VM process (root, without capabilities) cannot read its
    // /proc entries.
    assert_eq!(
        forkvm_test_support::reachable_without_ptrace(pid),
        Some(false),
        "{vm}: its /proc/<pid> is open to a root process without CAP_SYS_PTRACE"
    );
    assert_eq!(jail["root"], "tmpfs forkvm-root", "{vm}: {jail}");
    // In its family's pid namespace, not the host's: it can signal no process of the
    // host's (root as they are).
    let own_pid_ns = pid_ns(std::process::id());
    assert!(
        jail["pid_ns"].as_str().is_some_and(|ns| ns != own_pid_ns),
        "{vm}: {jail}"
    );
    forkvm_test_support::assert_own_root(pid, &jail.to_string(), root);
    let threads = forkvm_test_support::thread_confinement(pid, "");
    assert!(threads.len() > 2, "{vm}: {threads:?}");
    for (name, seccomp, nnp) in &threads {
        assert_eq!(
            (seccomp.as_str(), nnp.as_str()),
            ("2", "1"),
            "{vm}: thread {name}"
        );
    }
    PathBuf::from(format!("{}{group}", forkvm_jail::cgroup::ROOT))
}

/// Checks that VM `vm` (of cgroup `group`) runs as its family's own uid: its processes'
/// effective uid is one of the families', its home that uid's (mode 0700), its family's
/// cgroup named by it and delegated to it, the state root open to families only.
/// Returns the uid.
fn assert_own_uid(root: &Path, vm: &str, group: &Path) -> u32 {
    let info = inspect(root, vm);
    let uid = info["jail"]["uid"].as_u64().unwrap_or(0) as u32;
    let first = forkvm_jail::uid::FIRST_UID;
    assert!(
        (first..first + forkvm_jail::uid::UIDS).contains(&uid),
        "{vm} runs as uid {uid}: {}",
        info["jail"]
    );
    let id = info["id"].as_str().unwrap();
    let home = std::fs::metadata(root.join(id)).unwrap();
    assert_eq!(
        (home.uid(), home.mode() & 0o7777),
        (uid, 0o700),
        "{vm}'s home"
    );
    let family = group.parent().unwrap();
    assert_eq!(
        family.file_name().unwrap().to_str().unwrap(),
        format!("family-{uid}")
    );
    assert_eq!(
        std::fs::metadata(family).unwrap().uid(),
        uid,
        "{}",
        family.display()
    );
    let procs = std::fs::metadata(family.join("cgroup.procs")).unwrap();
    assert_eq!(
        procs.uid(),
        uid,
        "the family's group is not delegated to it"
    );
    // A first VM's own group (root made it) keeps its limits root's; its fork
    // children's groups are the family's.
    let limits_owner = std::fs::metadata(group.join("memory.max")).unwrap().uid();
    match info["parent"].is_null() {
        true => assert_eq!(limits_owner, 0, "{vm}'s limits are its family's to change"),
        false => assert_eq!(limits_owner, uid, "{vm}"),
    }
    let state_root = std::fs::metadata(root).unwrap();
    assert_eq!(
        (
            state_root.uid(),
            state_root.gid(),
            state_root.mode() & 0o7777
        ),
        (0, forkvm_jail::uid::FAMILIES_GID, 0o1770),
        "the state root"
    );
    uid
}

/// Runs `forkvm --root ROOT ARGS`, requires failure, returns stderr.
fn forkvm_err(root: &Path, args: &[&str]) -> String {
    let out = run_forkvm(root, args);
    assert!(!out.status.success(), "forkvm {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn templates_persist_and_fork_in_a_new_process_with_a_correct_clock() {
    forkvm_guest_kernel::default_guest().expect("default guest");
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let tpl = dir.path().join("tpl");
        let uds = dir.path().join("t.vsock");
        // The VM's clock is set 25 years back first: a template whose guest has a
        // wrong clock (CI once saw one boot at the epoch). Its children must read the
        // host's time all the same: the agent sets the clock the identity brings.
        let script = "date -s '2001-09-09 01:46:40' >/dev/null; \
             i=0; while true; do echo count=$i clock=$(date +%s); i=$((i+1)); sleep 0.5; done";
        forkvm_ok(
            &root,
            &[
                "boot",
                "-d",
                "--name",
                "base",
                "--vcpus",
                "2",
                "--mem",
                "128",
                "--vsock",
                &format!("cid=3,uds={}", uds.display()),
                "--cmdline",
                &common::guest_cmdline(script),
            ],
        );
        wait_for("the VM to count", Duration::from_secs(120), || {
            counts(&root, "base").len() >= 3
        });
        let base_log = forkvm_ok(&root, &["logs", "base"]);
        assert!(
            base_log.contains("clock=100000000"),
            "the VM's clock was not set back:\n{base_log}"
        );
        // The count the template holds lies between the last one logged before the
        // save and the last one logged after it (the VM counts on once saved; how far
        // by the time its log is read depends on the machine's load).
        let before_save = *counts(&root, "base").last().unwrap();
        forkvm_ok(&root, &["template", "save", "base", tpl.to_str().unwrap()]);
        let after_save = *counts(&root, "base").last().unwrap();
        // The VM process may change the file system only where its jail lets it (its
        // state root, ...): asked through its API for a template elsewhere, it refuses,
        // naming the places, and makes nothing (`template save` saved into the VM's
        // directory and moved the files).
        let base = vms(&root)
            .into_iter()
            .find(|v| v["name"] == "base")
            .expect("base in ps");
        let api = root.join(base["id"].as_str().unwrap()).join("api.sock");
        // (Not in `dir`: the VM's vsock socket lies there, so the VM may write there.)
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("tpl");
        let err = forkvm_api::client::Client::new(&api)
            .save_template(&outside)
            .expect_err("a template outside the jail's places was saved");
        assert!(
            err.to_string().contains("jail lets it write only under")
                && err.to_string().contains(&root.display().to_string()),
            "{err}"
        );
        assert!(
            !outside.exists(),
            "the refused save made {}",
            outside.display()
        );
        // So is a fork whose child's console would lie elsewhere: refused before any
        // child starts.
        let console_elsewhere = forkvm_api::wire::ForkRequest {
            count: 1,
            children: vec![forkvm_api::wire::ChildSpec {
                console: Some(elsewhere.path().join("child.log")),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = forkvm_api::client::Client::new(&api)
            .fork(&console_elsewhere)
            .expect_err("a child's console outside the jail's places was made");
        assert!(
            err.to_string().contains("child 0's console")
                && err.to_string().contains("jail lets it write only under"),
            "{err}"
        );
        assert!(!elsewhere.path().join("child.log").exists());
        // A child forked through the API has no launch record (only `forkvm fork` and
        // `template fork` record theirs): `template save` will not take its
        // configuration from its VM process unless told to, and makes nothing.
        let base_id = base["id"].as_str().unwrap().to_owned();
        let api_fork = forkvm_api::client::Client::new(&api)
            .fork(&forkvm_api::wire::ForkRequest {
                count: 1,
                ..Default::default()
            })
            .expect("fork through the API");
        let _api_child = Children(api_fork.children.iter().map(|c| c.pid).collect());
        wait_for(
            "the API's child to register",
            Duration::from_secs(60),
            || children_of(&root, &base_id).len() == 1,
        );
        let api_child = children_of(&root, &base_id).remove(0);
        let unrecorded = dir.path().join("tpl-unrecorded");
        let err = forkvm_err(
            &root,
            &["template", "save", &api_child, unrecorded.to_str().unwrap()],
        );
        assert!(
            err.contains(&format!("VM {api_child} has no launch record"))
                && err.contains("--trust-vm-config"),
            "{err}"
        );
        assert!(
            !unrecorded.exists(),
            "a refused save made {}",
            unrecorded.display()
        );
        let saved = run_forkvm(
            &root,
            &[
                "template",
                "save",
                "--trust-vm-config",
                &api_child,
                unrecorded.to_str().unwrap(),
            ],
        );
        let stderr = String::from_utf8_lossy(&saved.stderr);
        assert!(
            saved.status.success() && stderr.contains("saved with it (--trust-vm-config)"),
            "{saved:?}"
        );
        assert!(unrecorded.join("state.forkvm").exists());
        forkvm_ok(&root, &["rm", "-f", &api_child]);
        // `template save` checked the state against the launch `boot` recorded beside
        // the state root, out of the VM process's reach. A VM process whose saved state
        // names another kernel than the one launched (here: the record names another)
        // gets no template, and nothing is made.
        let id = base["id"].as_str().unwrap();
        let record = dir.path().join("root.launched").join(format!("{id}.json"));
        let mut launched: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).expect("no launch record")).unwrap();
        assert!(
            launched["kernel"]
                .as_str()
                .is_some_and(|k| k.contains("vmlinu")),
            "{launched}"
        );
        let kernel = launched["kernel"].clone();
        launched["kernel"] = "/boot/another-kernel".into();
        std::fs::write(&record, serde_json::to_vec(&launched).unwrap()).unwrap();
        let other = dir.path().join("tpl-other");
        let err = forkvm_err(
            &root,
            &["template", "save", "base", other.to_str().unwrap()],
        );
        assert!(
            err.contains(
                "does not match the configuration the VM was launched with (in its kernel)"
            ),
            "{err}"
        );
        assert!(!other.join("state.forkvm").exists(), "a template was made");
        // The original VM goes away; only the files remain.
        forkvm_ok(&root, &["stop", "-t", "2", "base"]);
        forkvm_ok(&root, &["rm", "base"]);
        std::thread::sleep(Duration::from_secs(8));

        // A child's clock must read at least this, 8 s past the save: a clock stuck
        // at the save reads 8 s less. (Whole seconds, as the guest's `date +%s`.)
        let fork_requested = now_s();
        let out: ForkOutcome = serde_json::from_str(&forkvm_ok(
            &root,
            &[
                "template",
                "fork",
                tpl.to_str().unwrap(),
                "-n",
                "2",
                "--json",
            ],
        ))
        .unwrap();
        let _kids = Children(out.children.iter().map(|c| c.pid).collect());
        assert_eq!(out.children.len(), 2);
        // Started in warm processes made while the template's memory was checked.
        assert!(out.children.iter().all(|c| c.warm), "{out:?}");
        // One family: both in a pid namespace of their own (the pids the fork reports
        // are the host's), whose init outlived the `forkvm` that made it.
        let families: Vec<String> = out.children.iter().map(|c| pid_ns(c.pid)).collect();
        assert_eq!(families[0], families[1], "{out:?}");
        assert_ne!(families[0], pid_ns(std::process::id()), "{out:?}");
        wait_for("both children to register", Duration::from_secs(60), || {
            vms(&root).len() == 2
        });
        let mut template_uids = BTreeSet::new();
        for vm in vms(&root) {
            let id = vm["id"].as_str().unwrap().to_owned();
            // `template fork` recorded each child's launch: the template's configuration.
            let child_record = dir.path().join("root.launched").join(format!("{id}.json"));
            let record: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&child_record).expect("no launch record for a template child"),
            )
            .unwrap();
            assert_eq!(record["kernel"], kernel, "{record}");
            // Of the family `template fork` made: its uid, its group.
            let jail = inspect(&root, &id)["jail"].clone();
            let uid = jail["uid"].as_u64().unwrap_or(0);
            assert!(uid >= u64::from(forkvm_jail::uid::FIRST_UID), "{jail}");
            template_uids.insert(uid);
            assert_eq!(
                jail["cgroup"]
                    .as_str()
                    .and_then(|g| g.strip_suffix(&format!("/{id}"))),
                Some(format!("/forkvm/family-{uid}").as_str()),
                "{jail}"
            );
            wait_for("a child to count", Duration::from_secs(60), || {
                counts(&root, &id).len() >= 3
            });
            let c = counts(&root, &id);
            assert!(
                c[0] + 3 >= before_save && c[0] <= after_save + 3,
                "child {id} did not resume the saved VM (first count {}, saved between \
                 {before_save} and {after_save})",
                c[0]
            );
            // The identity (applied in the background) sets the clock the template had
            // wrong, and the guest says so; the readings after that line are the host's
            // time: printed after the fork request and before the log was read; how
            // long ago depends on the machine's speed, so the bounds are those two
            // moments (one second of slack each for whole-second truncation).
            let (mut clock, mut read_at) = (None, 0);
            wait_for(
                "a child to set its clock and count on",
                Duration::from_secs(60),
                || {
                    let log = forkvm_ok(&root, &["logs", &id]);
                    read_at = now_s();
                    let Some(at) = log.find("off the host's: set") else {
                        return false;
                    };
                    // The first reading after the line may have been taken just
                    // before the set and printed after it: the second is later.
                    let after: Vec<i64> = common::whole_lines(&log[at..])
                        .filter_map(|l| l.split("clock=").nth(1))
                        .filter_map(|t| t.trim().parse().ok())
                        .collect();
                    clock = after.get(1).and(after.last()).copied();
                    clock.is_some()
                },
            );
            let clock = clock.expect("a clock reading");
            assert!(
                clock >= fork_requested - 1,
                "child {id}'s clock reads {clock}, {} s before the fork was requested: \
                 stuck at the save?",
                fork_requested - clock
            );
            assert!(
                clock <= read_at + 1,
                "child {id}'s clock reads {clock}, {} s ahead of the host's",
                clock - read_at
            );
        }
        assert_eq!(
            template_uids.len(),
            1,
            "one family, one uid: {template_uids:?}"
        );
        for c in &out.children {
            let uds = c.vsock_uds.as_ref().unwrap();
            wait_for(
                "a child's agent to apply its identity",
                Duration::from_secs(60),
                || {
                    matches!(
                        forkvm_vmm::fork::agent_call(uds, &forkvm_agent_proto::Request::Ping),
                        Ok(forkvm_agent_proto::Response::Pong { hostname, .. }) if hostname.starts_with("fork-")
                    )
                },
            );
        }

        // Broken templates are refused, naming the problem, and start nothing.
        let broken = |name: &str, damage: &dyn Fn(&Path)| {
            let copy = dir.path().join(name);
            std::fs::create_dir_all(&copy).unwrap();
            for f in [
                forkvm_vmm::template::STATE_FILE,
                forkvm_vmm::template::MEMORY_FILE,
            ] {
                std::fs::copy(tpl.join(f), copy.join(f)).unwrap();
            }
            damage(&copy);
            let before = vms(&root).len();
            let err = forkvm_err(&root, &["template", "fork", copy.to_str().unwrap()]);
            assert_eq!(vms(&root).len(), before, "a broken template started a VM");
            // Nor left a warm process's home (they went with their pool).
            let staged = std::fs::read_dir(root.join(".staged")).map_or(0, |d| d.count());
            assert_eq!(staged, 0, "a broken template left warm processes");
            err
        };
        let mem = |d: &Path| d.join(forkvm_vmm::template::MEMORY_FILE);
        let e = broken("truncated", &|d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(mem(d))
                .unwrap()
                .set_len(4096)
                .unwrap()
        });
        assert!(e.contains("truncated"), "{e}");
        let e = broken("flipped", &|d| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(mem(d))
                .unwrap();
            f.write_all_at(b"\x5a", 0x12345).unwrap();
        });
        assert!(e.contains("modified"), "{e}");
        let e = broken("state", &|d| {
            let p = d.join(forkvm_vmm::template::STATE_FILE);
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n / 2] ^= 1;
            std::fs::write(&p, b).unwrap();
        });
        assert!(e.contains("checksum mismatch"), "{e}");
        // Without this host's key, a template is not used: no key at all, or another
        // host's (what a state edited and re-checksummed without the key also meets).
        let other = dir.path().join("other.key");
        let tpl_arg = tpl.to_str().unwrap();
        let before = vms(&root).len();
        let refused = |needle: &str| {
            let out = run_forkvm_keyed(&root, &other, &["template", "fork", tpl_arg]);
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && e.contains(needle), "{e}");
            assert_eq!(vms(&root).len(), before, "a refused template started a VM");
        };
        refused(&format!("no template key at {}", other.display()));
        forkvm_vmm::template::TemplateKey::open_or_create(&other).unwrap();
        refused("not saved by this host's forkvm, or changed since");

        for vm in vms(&root) {
            forkvm_ok(&root, &["stop", "-t", "2", vm["id"].as_str().unwrap()]);
        }
    });
}
