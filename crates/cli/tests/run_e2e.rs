//! End to end, in a KVM host: OCI images imported into the store run as VMs with
//! `forkvm run`, the way `podman run` runs them: the process's output on our stdout and
//! stderr, its exit code as ours, env, cwd, user and stdin applied, whiteouts honoured,
//! Ctrl-C delivered, and the image's root filesystem built once.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use common::{warm_container_guest, Finished, Forkvm};

/// Limit for one `forkvm` command: a run boots in seconds in the virtual host, and the
/// whole session must end within the virtual host's own limit, with diagnostics.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
use forkvm_image::fixtures;

/// `forkvm ARGS` with the store at `store`, stdin fed from `stdin` (else closed).
fn forkvm(store: &Path, args: &[&str], stdin: Option<Vec<u8>>) -> Finished {
    Forkvm::spawn_with(
        args,
        RUN_TIMEOUT,
        &[("FORKVM_STORE", store.as_os_str())],
        stdin,
    )
    .finish()
}

/// An image store under `dir` holding the fixture image as `fixture:1`.
fn store_with_fixture(dir: &Path) -> std::path::PathBuf {
    let store = dir.join("store");
    let layout = dir.join("layout");
    fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
    assert_code(
        &forkvm(&store, &["load", "-i", layout.to_str().unwrap()], None),
        0,
    );
    store
}

fn assert_code(out: &Finished, code: i32) {
    assert_eq!(out.status.code(), Some(code), "exit status\n{out}");
}

/// The one `.ext4` root filesystem in the store, with its inode and mtime.
fn rootfs_identity(store: &Path) -> Vec<(String, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    for e in walk(store) {
        if e.extension() == Some(OsStr::new("ext4")) {
            let m = std::fs::metadata(&e).unwrap();
            found.push((e.display().to_string(), m.ino(), m.mtime()));
        }
    }
    found
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Both import formats, then the `podman run` behaviours, all in one virtual-host
/// session (each guest boots in seconds there).
#[test]
fn images_run_as_vms_like_podman_run() {
    warm_container_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let layout = tmp.path().join("layout");
        let archive = tmp.path().join("docker.tar");
        fixtures::write_oci_layout(&layout, "fixture:1").unwrap();
        fixtures::write_docker_archive(&archive, "fixture-docker:latest").unwrap();

        let out = forkvm(&store, &["load", "-i", layout.to_str().unwrap()], None);
        assert_code(&out, 0);
        assert!(out.stdout.contains("fixture:1"), "{out}");
        let out = forkvm(&store, &["load", "-i", archive.to_str().unwrap()], None);
        assert_code(&out, 0);
        let out = forkvm(&store, &["images"], None);
        assert!(out.stdout.contains("localhost/fixture"), "{out}");
        assert!(out.stdout.contains("fixture-docker"), "{out}");

        // Output, stderr apart from stdout, the exit code; the guest console stays out of
        // our stdout.
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "fixture:1",
                "sh",
                "-c",
                "echo hello from a VM; echo to-err >&2; exit 3",
            ],
            None,
        );
        assert_code(&out, 3);
        assert_eq!(out.stdout, "hello from a VM\n", "{out}");
        assert!(out.stderr.contains("to-err"), "{out}");
        let built = rootfs_identity(&store);
        assert_eq!(built.len(), 1, "one root filesystem built: {built:?}");

        // A background process that keeps writing does not outlive the main one, nor
        // hold its exit back (as with runc, whose PID namespace dies with its init).
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "fixture:1",
                "sh",
                "-c",
                "(while :; do echo tick; sleep 0.1; done) & sleep 1; exit 7",
            ],
            None,
        );
        assert_code(&out, 7);
        assert!(out.stdout.starts_with("tick\n"), "{out}");

        // Env (image's, -e, -e from our environment), cwd, hostname, user.
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "-e",
                "FOO=bar",
                "-w",
                "/work",
                "--hostname",
                "box1",
                "fixture:1",
                "sh",
                "-c",
                "echo foo=$FOO fixture=$FIXTURE; pwd; hostname; id -u",
            ],
            None,
        );
        assert_code(&out, 0);
        assert_eq!(out.stdout, "foo=bar fixture=1\n/work\nbox1\n0\n", "{out}");
        // The second run of the image reuses its root filesystem (same file, untouched).
        assert_eq!(rootfs_identity(&store), built, "the rootfs was rebuilt");
        let out = forkvm(
            &store,
            &["run", "--rm", "-u", "nobody", "fixture:1", "id", "-u"],
            None,
        );
        assert_eq!(out.stdout, "65534\n", "{out}");

        // The docker archive's image: whiteout and opaque directory from layer 2;
        // the root is writable (a private layer) and the image's own file is there.
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "fixture-docker",
                "sh",
                "-c",
                "test -e /etc/removed-by-whiteout && echo present || echo absent; \
                 ls /opaque; cat /hello.txt; echo w > /written && cat /written",
            ],
            None,
        );
        assert_code(&out, 0);
        assert_eq!(
            out.stdout, "absent\nnew.txt\nhello from layer 2\nw\n",
            "{out}"
        );

        // stdin: 1 MiB piped through the VM intact.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let want = format!("{}\n", data.len());
        let out = forkvm(
            &store,
            &["run", "--rm", "-i", "fixture:1", "wc", "-c"],
            Some(data),
        );
        assert_code(&out, 0);
        assert_eq!(out.stdout.trim_start(), want, "{out}");

        // A terminal: the process's stdio is a pty.
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "-t",
                "fixture:1",
                "sh",
                "-c",
                "test -t 1 && echo tty-yes",
            ],
            None,
        );
        assert_code(&out, 0);
        assert!(out.stdout.contains("tty-yes"), "{out}");

        // Ctrl-C (SIGINT to forkvm) reaches the process, which traps it.
        let mut run = Forkvm::spawn_with(
            &[
                "run",
                "--rm",
                "fixture:1",
                "sh",
                "-c",
                "trap 'echo got-int; exit 5' INT; echo ready; while true; do sleep 0.2; done",
            ],
            RUN_TIMEOUT,
            &[("FORKVM_STORE", store.as_os_str())],
            None,
        );
        run.wait_for_stdout("ready");
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) only sends a signal to the forkvm process.
        unsafe { libc::kill(run.pid() as i32, libc::SIGINT) };
        let out = run.finish();
        assert_code(&out, 5);
        assert!(out.stdout.contains("got-int"), "{out}");

        // A command the image does not have: a clear error and 127, like podman.
        let out = forkvm(&store, &["run", "--rm", "fixture:1", "nosuchcmd"], None);
        assert_code(&out, 127);
        assert!(
            out.stderr.contains("nosuchcmd") && out.stderr.contains("not found"),
            "{out}"
        );
    });
}

/// `forkvm run -v`: host directories shared into the VM (virtio-fs) read and written
/// both ways, with the container's uid, live without a remount; `:ro` refused; a VM
/// with a share is not forked.
#[test]
fn volumes_share_host_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    warm_container_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with_fixture(tmp.path());
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(vol.join("from-host"), "hello from the host\n").unwrap();
        let rw = format!("{}:/data", vol.display());
        let ro = format!("{}:/srv/ro:ro", vol.display());

        // Read what the host wrote, write as root and as uid 1000, make a tree; the same
        // directory read-only at /srv/ro: writes fail in the guest, nothing reaches the
        // host (one VM for both: each is a boot).
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "-v",
                &rw,
                "-v",
                &ro,
                "fixture:1",
                "sh",
                "-c",
                "cat /srv/ro/from-host; echo x > /srv/ro/nope; echo rc=$?; \
                 rm /srv/ro/from-host; echo rc=$?; \
                 cat /data/from-host; echo from the guest > /data/from-guest; \
                 mkdir -p /data/sub/deeper && ln -s from-guest /data/sub/link && \
                 ln /data/from-guest /data/hard && echo done",
            ],
            None,
        );
        assert_code(&out, 0);
        assert_eq!(
            out.stdout, "hello from the host\nrc=1\nrc=1\nhello from the host\ndone\n",
            "{out}"
        );
        assert!(out.stderr.contains("Read-only file system"), "{out}");
        assert!(!vol.join("nope").exists());
        assert!(
            vol.join("from-host").exists(),
            "removed through a read-only volume"
        );
        assert_eq!(
            std::fs::read_to_string(vol.join("from-guest")).unwrap(),
            "from the guest\n"
        );
        assert!(vol.join("sub/deeper").is_dir());
        assert_eq!(
            std::fs::read_link(vol.join("sub/link")).unwrap(),
            Path::new("from-guest")
        );
        assert_eq!(std::fs::metadata(vol.join("hard")).unwrap().nlink(), 2);
        let out = forkvm(
            &store,
            &[
                "run",
                "--rm",
                "-u",
                "1000:1000",
                "-v",
                &rw,
                "fixture:1",
                "sh",
                "-c",
                "echo mine > /data/owned && ls -ln /data/from-host",
            ],
            None,
        );
        assert_code(&out, 0);
        let meta = std::fs::metadata(vol.join("owned")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000), "{out}");
        // The host's owner shows inside.
        assert!(out.stdout.contains(" 0 "), "{out}");

        // Live both ways, no remount: the guest writes, the host answers, the guest reads;
        // the host rewrites a file the guest has read and the guest reads the new one.
        let run = Forkvm::spawn_with(
            &[
                "run",
                "--rm",
                "-v",
                &rw,
                "fixture:1",
                "sh",
                "-c",
                "echo ping > /data/live; i=0; while [ ! -f /data/answer ] && [ $i -lt 300 ]; do \
                 sleep 0.1; i=$((i+1)); done; cat /data/answer; echo > /data/read; \
                 i=0; until [ \"$(cat /data/answer)\" = PONG ] || [ $i -ge 300 ]; do \
                 sleep 0.1; i=$((i+1)); done; cat /data/answer",
            ],
            RUN_TIMEOUT,
            &[("FORKVM_STORE", store.as_os_str())],
            None,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !vol.join("live").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest never wrote"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whole when it appears (the guest polls for it).
        std::fs::write(vol.join("answer.new"), "pong\n").unwrap();
        std::fs::rename(vol.join("answer.new"), vol.join("answer")).unwrap();
        // Once the guest read it (its pages now cached), the host rewrites it in place,
        // same size, so only its modification time tells: the guest sees the new
        // contents (within the attribute timeout), not its cached pages forever.
        while !vol.join("read").exists() {
            assert!(std::time::Instant::now() < deadline, "the guest never read");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(vol.join("answer"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"PONG\n"))
            .unwrap();
        let out = run.finish();
        assert_code(&out, 0);
        assert_eq!(out.stdout, "pong\nPONG\n", "{out}");

        // A VM with a share forks, and its child reads and writes the same directory:
        // through its working directory and a file its parent had open before the fork
        // (node IDs and handles the child's guest took over), and by new lookups of
        // files the host made after the fork. (Both commands under one state root.)
        let root = tmp.path().join("vms");
        // (The virtual host's `/var/lib`, where root's template key is by default, is
        // read-only.)
        let key = tmp.path().join("template.key");
        let env = [
            ("FORKVM_STORE", store.as_os_str()),
            ("FORKVM_ROOT", root.as_os_str()),
            ("FORKVM_TEMPLATE_KEY", key.as_os_str()),
        ];
        let mut run = Forkvm::spawn_with(
            &[
                "run",
                "--rm",
                "--name",
                "sharing",
                "-v",
                &rw,
                "fixture:1",
                "sh",
                "-c",
                "cd /data && exec 3>>journal && echo ready && i=0; \
                 while [ ! -f stop ] && [ $i -lt 1200 ]; do h=$(hostname); echo \"$h $i\" >&3; \
                 [ -f from-host ] && cp from-host seen-by-$h; sleep 0.1; i=$((i+1)); done; \
                 echo still-running",
            ],
            RUN_TIMEOUT,
            &env,
            None,
        );
        run.wait_for_stdout("ready");
        let fork = Forkvm::spawn_with(&["fork", "sharing"], RUN_TIMEOUT, &env, None).finish();
        assert_code(&fork, 0);
        let info = Forkvm::spawn_with(&["inspect", "sharing"], RUN_TIMEOUT, &env, None).finish();
        assert_code(&info, 0);
        let info: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
        let children: Vec<String> = info["children"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        assert_eq!(children.len(), 1, "{info:#}");
        // `run` recorded the VM's launch beside the state root, out of its VM process's
        // reach (`template save` checks a template against it), and `fork` its child's:
        // the same.
        let record = |id: &str| -> serde_json::Value {
            let path = tmp.path().join("vms.launched").join(format!("{id}.json"));
            let json = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("no launch record {}: {e}", path.display()));
            serde_json::from_slice(&json).unwrap()
        };
        let parent = record(info["id"].as_str().expect("inspect's id"));
        assert_eq!(
            parent["shares"].as_array().map(Vec::len),
            Some(1),
            "{parent}"
        );
        assert_eq!(record(&children[0]), parent);
        std::fs::write(vol.join("from-host"), "written after the fork\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let (mut child_copy, mut parent_copy, mut child_line) = (None, None, false);
        let child_log = || {
            Forkvm::spawn_with(&["logs", &children[0]], RUN_TIMEOUT, &env, None)
                .finish()
                .to_string()
        };
        while child_copy.is_none() || parent_copy.is_none() || !child_line {
            assert!(
                std::time::Instant::now() < deadline,
                "parent copy {parent_copy:?}, child copy {child_copy:?}, child line {child_line}; \
                 journal:\n{}\nfork: {fork}\nthe child's log: {}",
                std::fs::read_to_string(vol.join("journal")).unwrap_or_default(),
                child_log()
            );
            std::thread::sleep(Duration::from_millis(200));
            for e in std::fs::read_dir(&vol).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(host) = name.strip_prefix("seen-by-") else {
                    continue;
                };
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if text == "written after the fork\n" {
                    match host.starts_with("fork-") {
                        true => child_copy = Some(host.to_owned()),
                        false => parent_copy = Some(host.to_owned()),
                    }
                }
            }
            child_line = std::fs::read_to_string(vol.join("journal"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("fork-"));
        }
        // The child's files are the container user's, as its parent's are.
        let child_file = vol.join(format!("seen-by-{}", child_copy.unwrap()));
        assert_eq!(std::fs::metadata(&child_file).unwrap().uid(), 0);
        // A template cannot hold the host files a share's guest has open: refused,
        // naming the share, once the capture shows them; nothing is written.
        let tpl = tmp.path().join("tpl");
        let save = Forkvm::spawn_with(
            &["template", "save", "sharing", tpl.to_str().unwrap()],
            RUN_TIMEOUT,
            &env,
            None,
        )
        .finish();
        assert_code(&save, 1);
        assert!(
            save.stderr
                .contains(&vol.canonicalize().unwrap().display().to_string())
                && save.stderr.contains("cannot be saved as a template"),
            "{save}"
        );
        assert!(!tpl.join("state.forkvm").exists());
        std::fs::write(vol.join("stop"), "").unwrap();
        let out = run.finish();
        assert_code(&out, 0);
        assert!(out.stdout.contains("still-running"), "{out}");
        // The child saw `stop` on the share too; whatever it still runs is stopped.
        for id in &children {
            let _ = Forkvm::spawn_with(&["stop", "-t", "1", id], RUN_TIMEOUT, &env, None).finish();
        }
    });
}

/// Many files on a share: more than the usual soft open-file limit, 1024 (the server
/// holds a descriptor per file the guest has looked up, and the VM process raises its
/// limit for that), listed whole and removed whole (`rm -r`
/// reads and unlinks page by page, and this virtual host's /tmp is tmpfs, whose offsets
/// are positions). Thousands of requests, each a round trip through nested emulation:
/// a session and a command limit of their own.
#[test]
fn many_files_on_a_share() {
    warm_container_guest();
    let session = Duration::from_secs(900);
    forkvm_testhost::on_kvm_host_with(forkvm_testhost::test_path!(), session, None, || {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with_fixture(tmp.path());
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let rw = format!("{}:/data", vol.display());
        let out = Forkvm::spawn_with(
            &[
                "run",
                "--rm",
                "-v",
                &rw,
                "fixture:1",
                "sh",
                "-c",
                "mkdir /data/many && i=0; while [ $i -lt 1500 ]; do : > /data/many/f$i; \
                 i=$((i+1)); done; ls /data/many | wc -l; rm -r /data/many && echo removed",
            ],
            Duration::from_secs(600),
            &[("FORKVM_STORE", store.as_os_str())],
            None,
        )
        .finish();
        assert_code(&out, 0);
        assert_eq!(out.stdout.trim_start(), "1500\nremoved\n", "{out}");
        assert!(!vol.join("many").exists());
    });
}

/// Bad `-v` values: clear errors before any VM starts.
#[test]
fn bad_volumes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let missing = tmp.path().join("missing");
    let spec = format!("{}:/data", missing.display());
    let out = forkvm(&store, &["run", "--rm", "-v", &spec, "any", "true"], None);
    assert_code(&out, 125);
    assert!(
        out.stderr.contains(&missing.display().to_string()) && out.stderr.contains("No such file"),
        "{out}"
    );
    let out = forkvm(
        &store,
        &["run", "--rm", "-v", "named:/data", "any", "true"],
        None,
    );
    assert_code(&out, 125);
    assert!(out.stderr.contains("no named volumes"), "{out}");
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let spec = format!("{}:/data", file.display());
    let out = forkvm(&store, &["run", "--rm", "-v", &spec, "any", "true"], None);
    assert_code(&out, 125);
    assert!(out.stderr.contains("not a directory"), "{out}");
}

/// Bad input that needs no VM: a missing image and a corrupt layer, each a clear error,
/// with the store unchanged.
#[test]
fn missing_images_and_corrupt_layers_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let out = forkvm(&store, &["run", "--rm", "no-such-image", "true"], None);
    assert_code(&out, 125);
    assert!(out.stderr.contains("no-such-image"), "{out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line\n{out}");

    let good = tmp.path().join("good");
    fixtures::write_oci_layout(&good, "good:1").unwrap();
    assert_code(
        &forkvm(&store, &["load", "-i", good.to_str().unwrap()], None),
        0,
    );
    let before = forkvm(&store, &["images", "-q", "--no-trunc"], None).stdout;

    let bad = tmp.path().join("bad");
    fixtures::write_oci_layout(&bad, "bad:1").unwrap();
    let layer = fixtures::corrupt_layer(&bad).unwrap();
    let out = forkvm(&store, &["load", "-i", bad.to_str().unwrap()], None);
    assert_code(&out, 1);
    assert!(
        out.stderr.contains("digest") && out.stderr.contains(&layer),
        "the error names the corrupt layer {layer}\n{out}"
    );
    let after = forkvm(&store, &["images", "-q", "--no-trunc"], None);
    assert_eq!(after.stdout, before, "the store changed\n{after}");
    let out = forkvm(&store, &["run", "bad:1", "true"], None);
    assert_code(&out, 125);
}
