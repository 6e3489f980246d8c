//! The Task service in-process, over a fake runtime with runc's command line
//! (`tests/fake/runtime.sh`): lifecycles, exit codes, output, events and their order,
//! execs, signals, pause, stdin and `CloseIO`, runtime error messages. No containerd,
//! no containers, no KVM: this runs anywhere.
//!
//! The test process is the shim here: a child subreaper whose one reaper (shared by
//! every test in this file) collects the exits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{text_format, Message};
use containerd_shim::protos::shim::oci::{Options, ProcessDetails};
use containerd_shim::protos::types::task::Status;
use containerd_shim::ExitSignal;
use forkvm_shim::exits::{reap_children, Exits};
use forkvm_shim::{Error, Service};

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake/runtime.sh");

fn exits() -> Arc<Exits> {
    static EXITS: OnceLock<Arc<Exits>> = OnceLock::new();
    EXITS
        .get_or_init(|| {
            rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
            let exits = Exits::new();
            reap_children(exits.clone()).unwrap();
            exits
        })
        .clone()
}

type Events = Arc<Mutex<Vec<(String, String)>>>;

struct Fixture {
    tmp: tempfile::TempDir,
    svc: Service,
    events: Events,
    exit: Arc<ExitSignal>,
}

impl Fixture {
    fn new() -> Self {
        let events: Events = Arc::default();
        let sink = events.clone();
        let exit = Arc::new(ExitSignal::default());
        let svc = Service::new(
            "test-ns".into(),
            Box::new(move |topic, msg| {
                let text = text_format::print_to_string(&*msg);
                sink.lock().unwrap().push((topic.to_string(), text));
            }),
            exits(),
            exit.clone(),
        );
        Fixture {
            tmp: tempfile::tempdir().unwrap(),
            svc,
            events,
            exit,
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// A bundle whose container runs `sh -c`-style `cmd`, with empty stdout and stderr
    /// files beside it.
    fn bundle(&self, id: &str, cmd: &str) -> PathBuf {
        let b = self.tmp.path().join(id);
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        std::fs::write(b.join("cmd"), cmd).unwrap();
        File::create(b.join("stdout")).unwrap();
        File::create(b.join("stderr")).unwrap();
        b
    }

    fn options(&self, binary: &str) -> Any {
        let opts = Options {
            binary_name: binary.into(),
            root: self.root().to_str().unwrap().into(),
            ..Default::default()
        };
        Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        }
    }

    fn create(&self, id: &str, cmd: &str) -> Result<u32, Error> {
        let b = self.bundle(id, cmd);
        self.svc.create_task(&api::CreateTaskRequest {
            id: id.into(),
            bundle: b.to_str().unwrap().into(),
            stdout: b.join("stdout").to_str().unwrap().into(),
            stderr: b.join("stderr").to_str().unwrap().into(),
            options: Some(self.options(FAKE)).into(),
            ..Default::default()
        })
    }

    fn exec(&self, id: &str, exec_id: &str, fake_cmd: &str) -> Result<(), Error> {
        let b = self.tmp.path().join(id);
        let out = b.join(format!("{exec_id}.out"));
        File::create(&out).unwrap();
        let spec = format!("{{\"args\":[\"sh\"],\"cwd\":\"/\",\n\"fake\": \"{fake_cmd}\"\n}}");
        self.svc.add_exec(&api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdout: out.to_str().unwrap().into(),
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: spec.into_bytes(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn read(&self, id: &str, file: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(id).join(file)).unwrap()
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.root().join("test-ns/calls")).unwrap_or_default()
    }

    fn status(&self, id: &str, exec_id: &str) -> Status {
        self.svc
            .process_state(id, exec_id)
            .unwrap()
            .status
            .enum_value()
            .unwrap()
    }

    /// Waits for the process's exit status (at most 10 s).
    fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let (tx, rx) = std::sync::mpsc::channel();
        let svc = self.svc.clone();
        let (id2, exec2) = (id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let _ = tx.send(svc.wait_process(&id2, &exec2));
        });
        let (status, _at) = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{id}/{exec_id} did not exit within 10 s"))
            .unwrap();
        status
    }

    /// The topics published so far, in order, and the event texts.
    fn events(&self) -> Vec<(String, String)> {
        // The events thread publishes asynchronously; give it a moment.
        std::thread::sleep(Duration::from_millis(50));
        self.events.lock().unwrap().clone()
    }
}

#[test]
fn lifecycle_exit_code_output_and_events_in_order() {
    let fx = Fixture::new();
    let pid = fx.create("c1", "echo hi; echo err >&2; exit 3").unwrap();
    assert!(pid > 0);
    assert_eq!(fx.status("c1", ""), Status::CREATED);
    assert_eq!(fx.svc.task_pid("c1"), pid);
    let other = fx.bundle("other", "true");
    let again = fx.svc.create_task(&api::CreateTaskRequest {
        id: "c1".into(),
        bundle: other.to_str().unwrap().into(),
        options: Some(fx.options(FAKE)).into(),
        ..Default::default()
    });
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");

    assert_eq!(fx.svc.start_process("c1", "").unwrap(), pid);
    assert_eq!(fx.wait("c1", ""), 3);
    assert_eq!(fx.read("c1", "stdout"), "hi\n");
    assert_eq!(fx.read("c1", "stderr"), "err\n");
    let state = fx.svc.process_state("c1", "").unwrap();
    assert_eq!(state.status.enum_value().unwrap(), Status::STOPPED);
    assert_eq!(state.exit_status, 3);
    assert_eq!(state.pid, pid);
    assert!(state.exited_at.is_some());
    // A finished process cannot be signalled: NotFound, which containerd ignores.
    assert!(matches!(
        fx.svc.kill_process("c1", "", 15, false),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fx.svc.start_process("c1", ""),
        Err(Error::FailedPrecondition(_))
    ));

    let deleted = fx.svc.delete_process("c1", "").unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (pid, 3));
    assert!(matches!(
        fx.svc.process_state("c1", ""),
        Err(Error::NotFound(_))
    ));
    let calls = fx.calls();
    assert!(calls.contains("create --bundle "), "{calls}");
    assert!(calls.contains("init.pid c1\n"), "{calls}");
    assert!(calls.contains("start c1\n"), "{calls}");
    // The process had exited: a plain delete.
    assert!(calls.contains("delete c1\n"), "{calls}");

    let events = fx.events();
    let topics: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let exit = &events[2].1;
    assert!(exit.contains("container_id: \"c1\""), "{exit}");
    assert!(exit.contains("id: \"c1\""), "{exit}");
    assert!(exit.contains("exit_status: 3"), "{exit}");
    assert!(exit.contains(&format!("pid: {pid}")), "{exit}");
    let create = &events[0].1;
    assert!(create.contains("bundle:"), "{create}");
    assert!(create.contains("stdout:"), "{create}");

    // No container left: Shutdown ends the shim.
    let rx = shim_exit(&fx);
    fx.svc.shutdown_if_idle();
    rx.recv_timeout(Duration::from_secs(5))
        .expect("Shutdown with no container left ends the shim");
}

/// Receives once the shim's exit signal fires.
fn shim_exit(fx: &Fixture) -> std::sync::mpsc::Receiver<()> {
    let exit = fx.exit.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        exit.wait();
        let _ = tx.send(());
    });
    rx
}

#[test]
fn shutdown_keeps_a_shim_that_still_has_containers() {
    let fx = Fixture::new();
    fx.create("busy", "exec sleep 100").unwrap();
    let rx = shim_exit(&fx);
    fx.svc.shutdown_if_idle();
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    // A created, never started container: delete forces it, and it died of SIGKILL.
    let deleted = fx.svc.delete_process("busy", "").unwrap();
    assert_eq!(deleted.exit_status, 137);
    assert!(
        fx.calls().contains("delete --force busy\n"),
        "{}",
        fx.calls()
    );
    fx.svc.shutdown_if_idle();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

#[test]
fn runtime_errors_carry_the_logged_message() {
    let fx = Fixture::new();
    let b = fx.bundle("bad", "true");
    std::fs::write(b.join("fail"), "no such image: nothing").unwrap();
    let err = fx.create("bad", "true").unwrap_err();
    match &err {
        Error::RuntimeFailed { verb, message } => {
            assert_eq!(verb, "create");
            assert_eq!(message, "no such image: nothing");
        }
        other => panic!("not a runtime failure: {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "OCI runtime create failed: no such image: nothing"
    );
    assert!(matches!(
        fx.svc.process_state("bad", ""),
        Err(Error::NotFound(_))
    ));

    // A binary that does not exist.
    let b = fx.bundle("nobin", "true");
    let err = fx
        .svc
        .create_task(&api::CreateTaskRequest {
            id: "nobin".into(),
            bundle: b.to_str().unwrap().into(),
            options: Some(fx.options("/nonexistent/forkvm-runtime")).into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, Error::RuntimeNotFound { .. }), "{err:?}");
    assert!(fx.events().is_empty(), "failed creates publish nothing");
}

#[test]
fn execs_signals_pids_and_pause() {
    let fx = Fixture::new();
    let init = fx.create("c2", "exec sleep 100").unwrap();
    fx.svc.start_process("c2", "").unwrap();
    assert_eq!(fx.status("c2", ""), Status::RUNNING);

    // An exec with output and an exit code.
    fx.exec("c2", "e1", "echo in-exec; exit 5").unwrap();
    assert!(matches!(
        fx.exec("c2", "e1", "true"),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(fx.status("c2", "e1"), Status::CREATED);
    let e1 = fx.svc.start_process("c2", "e1").unwrap();
    assert!(e1 > 0 && e1 != init);
    assert_eq!(fx.wait("c2", "e1"), 5);
    assert_eq!(fx.read("c2", "e1.out"), "in-exec\n");

    // A long exec: among the pids (the fake `ps` lists only the container's pid), with
    // its exec id; SIGKILL is 137.
    fx.exec("c2", "e2", "exec sleep 100").unwrap();
    let e2 = fx.svc.start_process("c2", "e2").unwrap();
    let pids = fx.svc.list_pids("c2").unwrap();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(pids[0].pid, init);
    assert!(pids[0].info.is_none());
    assert_eq!(pids[1].pid, e2);
    let info = pids[1].info.as_ref().unwrap();
    assert_eq!(info.type_url, "containerd.runc.v1.ProcessDetails");
    assert_eq!(
        ProcessDetails::parse_from_bytes(&info.value)
            .unwrap()
            .exec_id,
        "e2"
    );
    assert!(matches!(
        fx.svc.delete_process("c2", "e2"),
        Err(Error::FailedPrecondition(_))
    ));
    fx.svc.kill_process("c2", "e2", 9, false).unwrap();
    assert_eq!(fx.wait("c2", "e2"), 137);
    assert_eq!(fx.svc.delete_process("c2", "e2").unwrap().exit_status, 137);
    assert_eq!(fx.svc.delete_process("c2", "e1").unwrap().exit_status, 5);
    assert!(matches!(
        fx.svc.process_state("c2", "e1"),
        Err(Error::NotFound(_))
    ));

    // Pause and resume go through the runtime.
    fx.svc.set_paused("c2", true).unwrap();
    assert_eq!(fx.status("c2", ""), Status::PAUSED);
    fx.svc.set_paused("c2", false).unwrap();
    assert_eq!(fx.status("c2", ""), Status::RUNNING);

    // The container is signalled through `RUNTIME kill`.
    fx.svc.kill_process("c2", "", 15, false).unwrap();
    assert_eq!(fx.wait("c2", ""), 143);
    assert!(fx.calls().contains("kill c2 15\n"), "{}", fx.calls());
    assert_eq!(fx.svc.delete_process("c2", "").unwrap().exit_status, 143);

    let topics: Vec<String> = fx.events().into_iter().map(|(t, _)| t).collect();
    let expect = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(topics, expect);
}

#[test]
fn stdin_reaches_the_process_and_close_io_ends_it() {
    let fx = Fixture::new();
    let b = fx.bundle("cat", "exec cat");
    let fifo = b.join("stdin");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    fx.svc
        .create_task(&api::CreateTaskRequest {
            id: "cat".into(),
            bundle: b.to_str().unwrap().into(),
            stdin: fifo.to_str().unwrap().into(),
            stdout: b.join("stdout").to_str().unwrap().into(),
            options: Some(fx.options(FAKE)).into(),
            ..Default::default()
        })
        .unwrap();
    fx.svc.start_process("cat", "").unwrap();
    // The client's end of the stdin FIFO, kept open: only CloseIO ends the input.
    let mut client = OpenOptions::new().write(true).open(&fifo).unwrap();
    client.write_all(b"abc\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.read("cat", "stdout") != "abc\n" {
        assert!(Instant::now() < deadline, "stdin did not reach the process");
        std::thread::sleep(Duration::from_millis(20));
    }
    fx.svc.close_stdin("cat", "").unwrap();
    assert_eq!(fx.wait("cat", ""), 0);
    drop(client);
    fx.svc.delete_process("cat", "").unwrap();
    assert!(!Path::new(&fifo).is_file());
}
