//! A pod's containers in one VM, in-process: app containers made beside the boot
//! container, processes started in each, a main process that ends its container but
//! not the VM, and a container destroyed with its processes and mounts. Each test runs
//! on a thread in a mount namespace of its own, in a tmpfs of its own
//! ([`forkvm_test_support::in_own_mounts`]; the agent's threads and processes inherit
//! both), so the binds and mounts it makes go away with it. Needs root.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkvm_agent::server::{Agent, AgentConfig, Mode, PowerOffReason};
use forkvm_agent::{ProcessSpec, Request, Response};
use forkvm_agent_proto::{client, ContainerRoot, FsMount, PidNamespace};
use forkvm_test_support::in_own_mounts;

struct Pod {
    agent: Arc<Agent>,
    powered_off: mpsc::Receiver<PowerOffReason>,
    containers: PathBuf,
}

impl Pod {
    /// A PID-1 agent whose boot container is `/`, its app containers under `dir`.
    fn new(dir: &Path, mode: Mode) -> Pod {
        Pod::with_boot_root(dir, Path::new("/"), mode)
    }

    /// A PID-1 agent whose boot container is `boot_root`, its app containers under
    /// `dir`.
    fn with_boot_root(dir: &Path, boot_root: &Path, mode: Mode) -> Pod {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let containers = dir.join("containers");
        let mut config = AgentConfig::new(boot_root, mode);
        config.containers = containers.clone();
        let agent = Agent::with_power_off(
            config,
            Box::new(move |_, reason| {
                let _ = tx.lock().unwrap().send(reason);
            }),
        );
        Pod {
            agent,
            powered_off: rx,
            containers,
        }
    }

    fn connect(&self) -> UnixStream {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = self.agent.clone();
        std::thread::spawn(move || agent.serve(guest));
        host
    }

    fn call(&self, request: Request) -> Response {
        client::call(&mut self.connect(), &request).unwrap()
    }

    fn error(&self, request: Request) -> String {
        match self.call(request) {
            Response::Error { message } => message,
            other => panic!("{other:?}"),
        }
    }

    fn create(&self, id: &str, path: &str) -> Response {
        self.call(Request::CreateContainer {
            id: id.into(),
            root: ContainerRoot {
                share: None,
                path: path.into(),
            },
        })
    }

    fn in_container(&self, id: &str, request: Request) -> Response {
        self.call(Request::InContainer {
            id: id.into(),
            request: Box::new(request),
        })
    }
}

fn sh(script: &str) -> ProcessSpec {
    let mut spec = ProcessSpec::new(["sh", "-c", script]);
    spec.env = vec!["PATH=/usr/bin:/bin".into()];
    spec
}

/// A container image at `dir/image` for the containers to share: the host's `/usr`
/// (and `/bin`, `/lib`... as the host has them) and `/dev/null` bound in read-only,
/// nothing else.
fn image(dir: &Path) -> String {
    image_at(&dir.join("image"))
}

/// [`image`] at `image`.
fn image_at(image: &Path) -> String {
    let image = image.to_owned();
    std::fs::create_dir_all(&image).unwrap();
    let bind = |from: &Path, to: &Path| {
        if from.is_dir() {
            std::fs::create_dir_all(to).unwrap();
        } else {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(to, "").unwrap();
        }
        let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated paths that outlive the call; no data.
        let rc = unsafe {
            libc::mount(
                c(from).as_ptr(),
                c(to).as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "bind {}", from.display());
        // SAFETY: as above; a bind takes its flags from a remount of itself.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c(to).as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "read-only {}", to.display());
    };
    bind(Path::new("/usr"), &image.join("usr"));
    // A shell's background jobs read /dev/null.
    bind(Path::new("/dev/null"), &image.join("dev/null"));
    for top in ["bin", "sbin", "lib", "lib64"] {
        let host = Path::new("/").join(top);
        match std::fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(target, image.join(top)).unwrap(),
            Err(_) if host.is_dir() => bind(&host, &image.join(top)),
            Err(_) => {}
        }
    }
    image.display().to_string()
}

/// The mount points of this thread's namespace under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// What a thread that joins the mount namespace of process `pid` sees.
#[derive(Debug)]
struct NsView {
    /// The mount points from where it starts (the namespace's root, down its mounts).
    mounts: Vec<String>,
    /// After the classic way out of a `chroot` (a `chroot` of a directory in it, `..`
    /// from outside the new root, `chroot(".")`): whether the test's containers'
    /// directory (under `dir`) is there.
    escaped_sees_containers: bool,
    /// The same: whether a `/proc` with processes is there.
    escaped_sees_proc: bool,
    /// Whether it got out at all (its root another directory than where it started).
    escaped: bool,
}

fn ns_view(pid: i32, dir: &Path) -> NsView {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).unwrap();
    let containers = dir.join("containers");
    std::thread::spawn(move || {
        // Opened before: the namespace's /proc is the container's (if any).
        let proc_self = std::fs::File::open("/proc/thread-self").unwrap();
        // SAFETY: unshare, setns, chroot and chdir read only the NUL-terminated paths
        // given, and change this thread (its own file-system context) only.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_FS), 0);
            assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS), 0);
        }
        let table = {
            use std::io::Read;
            let fd = rustix::fs::openat(
                &proc_self,
                "mountinfo",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            let mut s = String::new();
            std::fs::File::from(fd).read_to_string(&mut s).unwrap();
            s
        };
        let mounts = table
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .collect();
        let id = |m: std::fs::Metadata| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        let started = id(std::fs::metadata("/").unwrap());
        // SAFETY: as above.
        unsafe {
            assert_eq!(libc::chroot(c"usr".as_ptr()), 0);
            for _ in 0..64 {
                assert_eq!(libc::chdir(c"..".as_ptr()), 0);
            }
            assert_eq!(libc::chroot(c".".as_ptr()), 0);
        }
        NsView {
            mounts,
            escaped: id(std::fs::metadata("/").unwrap()) != started,
            escaped_sees_containers: containers.exists(),
            escaped_sees_proc: Path::new("/proc/1/status").exists(),
        }
    })
    .join()
    .unwrap()
}

/// Collects a session's output and exit code on a thread of its own.
fn pumped(session: client::ExecSession) -> std::thread::JoinHandle<(i32, String)> {
    std::thread::spawn(move || {
        let out = forkvm_test_support::Captured::default();
        let code = session
            .pump(None, Box::new(out.clone()), Box::new(std::io::sink()))
            .unwrap();
        (code, out.text())
    })
}

#[test]
fn an_app_container_runs_in_its_own_root_and_ends_with_its_main_process_not_the_vm() {
    in_own_mounts(|dir| {
        let pod = Pod::new(dir, Mode::Init);
        let image = image(dir);
        assert_eq!(pod.create("app", &image), Response::Ok);
        let rootfs = pod.containers.join("app/rootfs");
        assert_eq!(
            mounts_under(&pod.containers)[..2],
            [
                rootfs.display().to_string(),
                rootfs.join("usr").display().to_string()
            ]
        );

        // A process of the container runs in its root, in the container's own mount
        // namespace, whose root is the container's.
        let other = client::exec_in_container(pod.connect(), "app", &sh("sleep 60")).unwrap();
        let pid = other.pid();
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
            std::fs::read_link("/proc/thread-self/ns/mnt").unwrap()
        );
        let view = ns_view(pid, dir);
        assert_eq!(view.mounts[..2], ["/", "/usr"], "{view:?}");
        let other = pumped(other);

        // Its main process: its exit ends the container's other processes, not the VM.
        let mut main = sh("echo main; exit 3");
        main.init = true;
        let session = client::exec_in_container(pod.connect(), "app", &main).unwrap();
        assert_eq!(pumped(session).join().unwrap(), (3, "main\n".into()));
        assert_eq!(other.join().unwrap().0, 128 + libc::SIGKILL);
        assert!(pod
            .powered_off
            .recv_timeout(Duration::from_millis(1500))
            .is_err());
        match client::exec_in_container(pod.connect(), "app", &main) {
            Err(client::ExecError::Rejected { message }) => {
                assert_eq!(message, "an init process was already started")
            }
            other => panic!("{:?}", other.map(|s| s.pid())),
        }

        // The boot container's processes stay in `/`, and its main process is its own.
        let boot = client::exec(pod.connect(), &sh("sleep 60")).unwrap();
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/root", boot.pid())).unwrap(),
            Path::new("/")
        );
        // A container's request may not signal another container's process.
        let e = match pod.in_container(
            "app",
            Request::Signal {
                pid: boot.pid(),
                signal: libc::SIGKILL,
            },
        ) {
            Response::Error { message } => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            e,
            format!(
                "pid {} is not a running process of container \"app\"",
                boot.pid()
            )
        );
        assert_eq!(
            pod.call(Request::Signal {
                pid: boot.pid(),
                signal: libc::SIGKILL
            }),
            Response::Ok
        );
        assert_eq!(pumped(boot).join().unwrap().0, 128 + libc::SIGKILL);
    });
}

#[test]
fn destroying_a_container_kills_its_processes_and_takes_its_mounts_away() {
    in_own_mounts(|dir| {
        let pod = Pod::new(dir, Mode::Init);
        let image = image(dir);
        assert_eq!(pod.create("web", &image), Response::Ok);
        assert_eq!(pod.create("db", &image), Response::Ok);
        let tmpfs = FsMount {
            destination: "/mnt".into(),
            fs_type: "tmpfs".into(),
            source: "tmpfs".into(),
            options: vec!["size=1m".into()],
        };
        assert_eq!(
            pod.in_container(
                "web",
                Request::Filesystems {
                    mounts: vec![tmpfs]
                }
            ),
            Response::Ok
        );
        let web = pod.containers.join("web");
        assert!(mounts_under(dir).contains(&web.join("rootfs/mnt").display().to_string()));
        // The mount is the container's: the image and the other container's root do
        // not have it.
        assert!(!mounts_under(&pod.containers.join("db"))
            .iter()
            .chain(&mounts_under(Path::new(&image)))
            .any(|m| m.ends_with("/mnt")));

        // Stats come from a container's cgroup: none yet, said so.
        match pod.in_container("db", Request::Stats) {
            Response::Error { message } => assert_eq!(message, "the container has no cgroup (yet)"),
            other => panic!("{other:?}"),
        }

        let session =
            client::exec_in_container(pod.connect(), "web", &sh("echo up; sleep 60")).unwrap();
        // Each container's mount namespace has its own root (with what the agent
        // mounted there), not the other's, nor the share or directory they come from.
        let view = ns_view(session.pid(), dir);
        assert!(view.mounts.contains(&"/mnt".to_owned()), "{view:?}");
        // The way out of a chroot (CAP_SYS_CHROOT, a container's default) leads back
        // into the container's root, mounted over the namespace's: `..` there goes
        // down its mounts again. Nothing of the guest's is reached.
        assert!(
            !view.escaped && !view.escaped_sees_containers && !view.escaped_sees_proc,
            "{view:?}"
        );
        // What a container mounts stays in its namespace.
        let made = pod.containers.join("db/rootfs/mnt");
        let mounted = client::exec_in_container(
            pod.connect(),
            "db",
            &sh("mount -t tmpfs tmpfs /mnt 2>&1 && echo mounted"),
        )
        .unwrap();
        assert_eq!(pumped(mounted).join().unwrap(), (0, "mounted\n".into()));
        assert!(!mounts_under(dir).contains(&made.display().to_string()));
        let session = pumped(session);
        let db = client::exec_in_container(pod.connect(), "db", &sh("sleep 1; echo db")).unwrap();

        assert_eq!(
            pod.call(Request::DestroyContainer { id: "web".into() }),
            Response::Ok
        );
        assert_eq!(
            session.join().unwrap(),
            (128 + libc::SIGKILL, "up\n".into())
        );
        assert!(!web.exists(), "{} is left", web.display());
        assert!(mounts_under(&web).is_empty(), "{:?}", mounts_under(&web));
        // The other container runs on.
        assert_eq!(pumped(db).join().unwrap(), (0, "db\n".into()));
        assert_eq!(
            pod.error(Request::DestroyContainer { id: "web".into() }),
            "no container \"web\" in this VM"
        );
        match client::exec_in_container(pod.connect(), "web", &sh("true")) {
            Err(client::ExecError::Rejected { message }) => {
                assert_eq!(message, "no container \"web\" in this VM")
            }
            other => panic!("{:?}", other.map(|s| s.pid())),
        }
        // Its id may be used again.
        assert_eq!(pod.create("web", &image), Response::Ok);
    });
}

#[test]
fn bad_container_requests_are_refused_by_name() {
    in_own_mounts(|dir| {
        let pod = Pod::new(dir, Mode::Init);
        let image = image(dir);
        let error = |r: Response| match r {
            Response::Error { message } => message,
            other => panic!("{other:?}"),
        };
        let e = error(pod.create("../x", &image));
        assert!(
            e.starts_with("container id \"../x\": only ASCII letters"),
            "{e}"
        );
        let e = error(pod.create(&"a".repeat(65), &image));
        assert!(e.contains("65 bytes"), "{e}");
        let e = error(pod.create("app", "relative"));
        assert!(
            e.contains("without a share the path must be absolute"),
            "{e}"
        );
        let e = error(pod.create("app", "/no/such/dir"));
        assert!(
            e.starts_with("container \"app\": root /no/such/dir: "),
            "{e}"
        );
        let e = error(pod.call(Request::CreateContainer {
            id: "app".into(),
            root: ContainerRoot {
                share: Some("../up".into()),
                path: "rootfs".into(),
            },
        }));
        assert!(e.contains("whose tag is a file name"), "{e}");
        // A directory a container left behind is not taken over.
        std::fs::create_dir_all(pod.containers.join("stale")).unwrap();
        let e = error(pod.create("stale", &image));
        assert!(
            e.contains("cannot make") && e.contains("stale") && e.contains("exists"),
            "{e}"
        );
        std::fs::remove_dir(pod.containers.join("stale")).unwrap();
        // Nothing was left of the refused ones.
        assert!(mounts_under(&pod.containers).is_empty());
        assert!(!pod.containers.join("app").exists());

        assert_eq!(pod.create("app", &image), Response::Ok);
        assert_eq!(
            error(pod.create("app", &image)),
            "container \"app\" exists already"
        );
        assert_eq!(
            error(pod.in_container("ghost", Request::Signal { pid: 1, signal: 0 })),
            "no container \"ghost\" in this VM"
        );
        let e = error(pod.in_container("app", Request::Ping));
        assert!(
            e.starts_with("ping: not a request for one container"),
            "{e}"
        );
        let e = error(pod.in_container(
            "app",
            Request::InContainer {
                id: "app".into(),
                request: Box::new(Request::Ping),
            },
        ));
        assert!(e.starts_with("in_container: not a request"), "{e}");
        let e = error(pod.in_container("app", Request::DestroyContainer { id: "app".into() }));
        assert!(e.starts_with("destroy_container: not a request"), "{e}");

        // Outside PID-1 mode there are no containers to make.
        let daemon = Pod::new(dir, Mode::Daemon);
        assert_eq!(
            error(daemon.create("app", &image)),
            "create_container needs the agent to run as the guest's PID 1"
        );
    });
}

/// Whether `pid` has ended (gone, or a zombie nobody collected yet).
fn ended(pid: i32) -> bool {
    !forkvm_test_support::is_running(pid as u32)
}

fn wait_ended(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if ended(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn an_app_containers_end_takes_what_its_processes_started_too() {
    in_own_mounts(|dir| {
        let pod = Pod::new(dir, Mode::Init);
        let image = image(dir);
        assert_eq!(pod.create("app", &image), Response::Ok);
        assert_eq!(pod.create("other", &image), Response::Ok);
        // Daemons the agent never saw start: one per container.
        let daemon = |id: &str| {
            let spawn = sh("sleep 300 </dev/null >/dev/null 2>&1 & echo $!");
            let session = client::exec_in_container(pod.connect(), id, &spawn).unwrap();
            let (code, out) = pumped(session).join().unwrap();
            assert_eq!(code, 0);
            out.trim().parse::<i32>().unwrap()
        };
        let (app_daemon, other_daemon) = (daemon("app"), daemon("other"));
        assert!(!ended(app_daemon) && !ended(other_daemon));

        // A main process whose background keeps writing: its exit still comes, and the
        // writer goes with the container.
        let mut main = sh("(while :; do echo x; sleep 0.05; done) & sleep 0.3; exit 4");
        main.init = true;
        let session = client::exec_in_container(pod.connect(), "app", &main).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(pumped(session).join().unwrap().0));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(4));
        assert!(wait_ended(app_daemon), "the daemon outlived its container");
        assert!(
            !ended(other_daemon),
            "another container's daemon was killed"
        );

        assert_eq!(
            pod.call(Request::DestroyContainer { id: "other".into() }),
            Response::Ok
        );
        assert!(wait_ended(other_daemon), "the daemon outlived the destroy");
        assert!(mounts_under(&pod.containers.join("other")).is_empty());
    });
}

/// `field` of `/proc/PID/status`, split at white space.
fn status_field(pid: i32, field: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn pid_ns(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap()
}

#[test]
fn a_main_process_is_pid_1_of_its_containers_namespace_or_joins_its_sandboxs() {
    in_own_mounts(|dir| {
        let boot_root = image_at(&dir.join("boot"));
        let pod = Pod::with_boot_root(dir, Path::new(&boot_root), Mode::Init);
        // Each root with its proc, `/proc/timer_list` masked and `/proc/sys` read-only.
        let proc = Request::Filesystems {
            mounts: vec![FsMount {
                destination: "/proc".into(),
                fs_type: "proc".into(),
                source: "proc".into(),
                options: vec!["nosuid".into(), "noexec".into(), "nodev".into()],
            }],
        };
        let settings = Request::Container {
            devices: vec![],
            sysctls: Default::default(),
            masked_paths: vec!["/proc/timer_list".into()],
            readonly_paths: vec!["/proc/sys".into()],
            readonly_root: false,
            domainname: None,
            seccomp: vec![],
            user_namespace: None,
        };
        let main = |script: &str, ns: PidNamespace| {
            let mut spec = sh(script);
            spec.init = true;
            spec.pid_namespace = Some(ns);
            spec
        };
        assert_eq!(pod.call(proc.clone()), Response::Ok);
        assert_eq!(pod.call(settings.clone()), Response::Ok);
        let boot = client::exec(pod.connect(), &main("exec sleep 61", PidNamespace::New)).unwrap();
        for id in ["app", "shares", "peer"] {
            let root = image_at(&dir.join(id));
            assert_eq!(pod.create(id, &root), Response::Ok);
            assert_eq!(pod.in_container(id, proc.clone()), Response::Ok);
            assert_eq!(pod.in_container(id, settings.clone()), Response::Ok);
        }
        // A main process that cannot start leaves neither its namespace nor its /proc:
        // the next one starts as the first would have.
        let proc_mounts = || mounts_under(&pod.containers.join("app/rootfs/proc")).len();
        let before = proc_mounts();
        match client::exec_in_container(pod.connect(), "app", &{
            let mut spec = main("", PidNamespace::New);
            spec.args = vec!["no-such-program".into()];
            spec
        }) {
            Err(client::ExecError::ExecFailed { exit_code, .. }) => assert_eq!(exit_code, 127),
            other => panic!("{:?}", other.map(|s| s.pid())),
        }
        assert_eq!(proc_mounts(), before);
        // One naming a container the VM does not have is refused by name.
        match client::exec_in_container(
            pod.connect(),
            "app",
            &main("true", PidNamespace::Container("ghost".into())),
        ) {
            Err(client::ExecError::Rejected { message }) => {
                assert_eq!(message, "pid_namespace: no container \"ghost\" in this VM")
            }
            other => panic!("{:?}", other.map(|s| s.pid())),
        }
        let app = client::exec_in_container(
            pod.connect(),
            "app",
            &main("exec sleep 62", PidNamespace::New),
        )
        .unwrap();
        let shares = client::exec_in_container(
            pod.connect(),
            "shares",
            &main("exec sleep 63", PidNamespace::Sandbox),
        )
        .unwrap();

        // One naming an app container shares that one's.
        let peer = client::exec_in_container(
            pod.connect(),
            "peer",
            &main("exec sleep 64", PidNamespace::Container("app".into())),
        )
        .unwrap();
        assert_eq!(pid_ns(peer.pid()), pid_ns(app.pid()));

        // Seen from here: the boot and app main processes are each PID 1 of a namespace
        // of their own; the sharing one is in the boot container's.
        for session in [&boot, &app] {
            let pid = session.pid();
            assert_eq!(status_field(pid, "NSpid:"), [pid.to_string(), "1".into()]);
        }
        assert_ne!(pid_ns(boot.pid()), pid_ns(app.pid()));
        assert_ne!(pid_ns(app.pid()), pid_ns(std::process::id() as i32));
        assert_eq!(pid_ns(shares.pid()), pid_ns(boot.pid()));
        assert_ne!(status_field(shares.pid(), "NSpid:")[1], "1");

        // Seen from inside: a later process joins its container's namespace, whose /proc
        // shows that namespace's processes only, with the masks and read-only paths
        // applied again.
        let look = sh("echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; \
             for s in 1 2 3; do cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | \
             grep -q \"sleep 6[$s]\" && echo 6$s; done; \
             { wc -c < /proc/timer_list; } 2>&1; \
             [ -w /proc/sys/kernel/ns_last_pid ] && echo sys=rw || echo sys=ro");
        let inside = |id: &str| {
            let session = client::exec_in_container(pod.connect(), id, &look).unwrap();
            let (code, out) = pumped(session).join().unwrap();
            assert_eq!(code, 0, "{out}");
            let lines: Vec<String> = out.lines().map(str::to_owned).collect();
            assert_ne!(lines[0], "1", "{out}");
            lines[1..].to_vec()
        };
        // (The pattern `sleep 6[1]` does not match the grep's own command line.)
        assert_eq!(
            inside("app"),
            ["sleep 62 ", "62", "0", "sys=ro"].map(String::from),
        );
        assert_eq!(
            inside("shares"),
            ["sleep 61 ", "61", "63", "0", "sys=ro"].map(String::from),
        );

        for session in [&boot, &app, &shares, &peer] {
            let pid = session.pid();
            // SAFETY: kill(2) of the agent's child, not yet collected.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for session in [boot, app, shares, peer] {
            assert_eq!(pumped(session).join().unwrap().0, 128 + libc::SIGKILL);
        }
    });
}
