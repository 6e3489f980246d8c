//! Tests of the request handling against a stand-in VMM.

use std::sync::mpsc;

use crate::wire::{ChildInfo, ForkOutcome, TemplateInfo, VmInfo};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use forkvm_registry::Status;

/// A VMM stand-in: tracks pause state; fork optionally waits for a signal.
#[derive(Default)]
struct Fake {
    paused: Mutex<bool>,
    gone: AtomicBool,
    fork_gate: Mutex<Option<mpsc::Receiver<()>>>,
    forks: AtomicUsize,
}

impl Control for Fake {
    fn call(&self, req: Request) -> Result<Response, ControlError> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(ControlError::Gone);
        }
        let mut paused = self.paused.lock().unwrap();
        match req {
            Request::Info => Ok(Response::Info(VmInfo {
                state: if *paused {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                vcpus: 2,
                mem_mib: 128,
                devices: vec![],
                uptime_ms: 5,
                exits: [("io".to_string(), 3)].into(),
                rss_bytes: 1,
                private_bytes: 1,
                fork_pool: vec![7],
                landlock: None,
            })),
            Request::Pause if *paused => Err(ControlError::Conflict("already paused".into())),
            Request::Pause => {
                *paused = true;
                Ok(Response::Done)
            }
            Request::Resume if !*paused => Err(ControlError::Conflict("not paused".into())),
            Request::Resume => {
                *paused = false;
                Ok(Response::Done)
            }
            Request::Stop => Ok(Response::Done),
            Request::SaveTemplate(dir) => Ok(Response::TemplateSaved(TemplateInfo {
                dir,
                memory_bytes: 128 << 20,
                stored_bytes: 4096,
                pause_us: 7,
            })),
            Request::Fork(f) => {
                drop(paused);
                if let Some(gate) = self.fork_gate.lock().unwrap().as_ref() {
                    let _ = gate.recv();
                }
                self.forks.fetch_add(1, Ordering::SeqCst);
                Ok(Response::Forked(ForkOutcome {
                    children: (0..f.count)
                        .map(|i| ChildInfo {
                            pid: 100 + i,
                            cid: None,
                            vsock_uds: None,
                            running_after_us: 1500,
                            warm: i == 0,
                        })
                        .collect(),
                    parent_pause_us: 10,
                }))
            }
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    fake: Arc<Fake>,
}

struct FakeRef(Arc<Fake>);
impl Control for FakeRef {
    fn call(&self, req: Request) -> Result<Response, ControlError> {
        self.0.call(req)
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let home = VmHome::create(dir.path(), Some("t"), None).unwrap();
    let fake = Arc::new(Fake::default());
    let shared = Shared::new(home, Arc::new(FakeRef(fake.clone())));
    Setup {
        _dir: dir,
        shared,
        fake,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn send(shared: &Arc<Shared>, method: &str, path: &str, body: &[u8]) -> (StatusCode, Bytes) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let resp = handle(shared.clone(), req).await;
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn error_kind(body: &Bytes) -> String {
    let e: ApiError = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    assert!(!e.message.is_empty());
    e.error
}

#[test]
fn documented_requests_succeed() {
    let s = setup();
    rt().block_on(async {
        let (st, b) = send(&s.shared, "GET", "/v1/vm", b"").await;
        assert_eq!(st, StatusCode::OK);
        let d: VmDescription = serde_json::from_slice(&b).unwrap();
        assert_eq!((d.vcpus, d.mem_mib, d.name.as_deref()), (2, 128, Some("t")));
        assert_eq!(d.id, s.shared.home.id());

        assert_eq!(
            send(&s.shared, "POST", "/v1/vm/pause", b"").await.0,
            StatusCode::OK
        );
        assert_eq!(s.shared.home.state().unwrap().status, Status::Paused);
        let (st, b) = send(&s.shared, "POST", "/v1/vm/pause", b"").await;
        assert_eq!(
            (st, error_kind(&b).as_str()),
            (StatusCode::CONFLICT, "conflict")
        );
        assert_eq!(
            send(&s.shared, "POST", "/v1/vm/resume", b"").await.0,
            StatusCode::OK
        );
        assert_eq!(s.shared.home.state().unwrap().status, Status::Running);

        let (st, b) = send(&s.shared, "POST", "/v1/vm/fork", br#"{"count": 2}"#).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let o: ForkOutcome = serde_json::from_slice(&b).unwrap();
        assert_eq!(o.children.len(), 2);

        let (st, b) = send(
            &s.shared,
            "POST",
            "/v1/vm/template",
            br#"{"dir": "/var/tpl"}"#,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let t: TemplateInfo = serde_json::from_slice(&b).unwrap();
        assert_eq!(t.dir, std::path::PathBuf::from("/var/tpl"));
        for bad in [
            &br#"{"dir": "relative"}"#[..],
            br#"{"dir": "/x", "y": 1}"#,
            b"{}",
            b"[]",
        ] {
            let (st, b) = send(&s.shared, "POST", "/v1/vm/template", bad).await;
            assert_eq!(
                (st, error_kind(&b).as_str()),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }

        let (st, b) = send(&s.shared, "GET", "/metrics", b"").await;
        assert_eq!(st, StatusCode::OK);
        let text = String::from_utf8(b.to_vec()).unwrap();
        assert!(
            text.contains("forkvm_fork_latency_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("forkvm_vm_exits_total{reason=\"io\"} 3"),
            "{text}"
        );

        std::fs::write(s.shared.home.console_path(), b"hello console\n").unwrap();
        let (st, b) = send(&s.shared, "GET", "/v1/vm/console", b"").await;
        assert_eq!((st, &b[..]), (StatusCode::OK, &b"hello console\n"[..]));

        let (st, b) = send(&s.shared, "POST", "/v1/vm/shutdown", b"").await;
        assert_eq!(st, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
        let (st, b) = send(&s.shared, "POST", "/v1/vm/pause", b"").await;
        assert_eq!(
            (st, error_kind(&b).as_str()),
            (StatusCode::CONFLICT, "conflict")
        );
    });
}

#[test]
fn bad_requests_get_json_4xx_and_change_nothing() {
    let s = setup();
    rt().block_on(async {
        let cases: &[(&str, &str, &[u8], StatusCode, &str)] = &[
            ("GET", "/nope", b"", StatusCode::NOT_FOUND, "not_found"),
            ("GET", "/v1/vm/", b"", StatusCode::NOT_FOUND, "not_found"),
            (
                "DELETE",
                "/v1/vm",
                b"",
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (
                "GET",
                "/v1/vm/pause",
                b"",
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (
                "POST",
                "/v1/vm/fork",
                b"{not json",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                b"",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                b"[1,2]",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                br#"{"count":1,"bogus":1}"#,
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                br#"{"count":"x"}"#,
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                br#"{"count":0}"#,
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "POST",
                "/v1/vm/fork",
                br#"{"count":1,"children":[{"cid":"x"}]}"#,
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "GET",
                "/v1/vm",
                b"x",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "GET",
                "/v1/vm?x=1",
                b"",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "GET",
                "/v1/vm/console?follow=maybe",
                b"",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "GET",
                "/v1/vm/console?tail=3",
                b"",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
        ];
        for (m, p, body, want, kind) in cases {
            let (st, b) = send(&s.shared, m, p, body).await;
            assert_eq!(st, *want, "{m} {p}: {}", String::from_utf8_lossy(&b));
            assert_eq!(error_kind(&b), *kind, "{m} {p}");
        }
        let big = vec![b' '; MAX_BODY + 1];
        let (st, b) = send(&s.shared, "POST", "/v1/vm/fork", &big).await;
        assert_eq!(
            (st, error_kind(&b).as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        // Nothing changed: not paused, no fork, still answering.
        assert_eq!(s.fake.forks.load(Ordering::SeqCst), 0);
        assert!(!*s.fake.paused.lock().unwrap());
        assert_eq!(s.shared.home.state().unwrap().status, Status::Creating);
        assert_eq!(
            send(&s.shared, "GET", "/v1/vm", b"").await.0,
            StatusCode::OK
        );
    });
}

#[test]
fn method_not_allowed_names_the_allowed_ones() {
    let s = setup();
    let resp = rt().block_on(handle(
        s.shared.clone(),
        hyper::Request::builder()
            .method("PUT")
            .uri("/v1/vm/fork")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    ));
    assert_eq!(resp.headers().get(ALLOW).unwrap(), "POST");
}

#[test]
fn control_errors_map_to_statuses() {
    for (e, want) in [
        (ControlError::Conflict("x".into()), StatusCode::CONFLICT),
        (ControlError::Invalid("x".into()), StatusCode::BAD_REQUEST),
        (
            ControlError::Failed("x".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (ControlError::Gone, StatusCode::SERVICE_UNAVAILABLE),
        (
            ControlError::TimedOut("x".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        assert_eq!(control_error(e).status(), want);
    }
    let s = setup();
    s.fake.gone.store(true, Ordering::SeqCst);
    let (st, b) = rt().block_on(send(&s.shared, "GET", "/v1/vm", b""));
    assert_eq!(
        (st, error_kind(&b).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
}

#[test]
fn a_change_during_another_is_a_conflict() {
    let s = setup();
    let (tx, rx) = mpsc::channel();
    *s.fake.fork_gate.lock().unwrap() = Some(rx);
    rt().block_on(async {
        let shared = s.shared.clone();
        let fork =
            tokio::spawn(
                async move { send(&shared, "POST", "/v1/vm/fork", br#"{"count":1}"#).await },
            );
        // Wait until the fork holds the VM.
        while !s.shared.busy.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for p in [
            "/v1/vm/pause",
            "/v1/vm/resume",
            "/v1/vm/shutdown",
            "/v1/vm/fork",
        ] {
            let (st, b) = send(&s.shared, "POST", p, br#"{"count":1}"#).await;
            assert_eq!(st, StatusCode::CONFLICT, "{p}");
            assert!(String::from_utf8_lossy(&b).contains("in progress"));
        }
        tx.send(()).unwrap();
        assert_eq!(fork.await.unwrap().0, StatusCode::OK);
        assert!(!s.shared.stop_requested.load(Ordering::SeqCst));
        assert_eq!(
            send(&s.shared, "POST", "/v1/vm/pause", b"").await.0,
            StatusCode::OK
        );
    });
}

/// Feeds raw bytes to the HTTP server on an in-memory connection; returns what it wrote.
fn raw_exchange(shared: &Arc<Shared>, input: &[u8]) -> Vec<u8> {
    rt().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let conn = tokio::spawn(serve_connection(shared.clone(), Caller::Owner, server));
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("the server hung")
            .unwrap();
        conn.await.expect("the connection task panicked");
        out
    })
}

#[test]
fn raw_http_answers() {
    let s = setup();
    let out = raw_exchange(&s.shared, b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let out = raw_exchange(
        &s.shared,
        format!(
            "POST /v1/vm/fork HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        )
        .as_bytes(),
    );
    assert!(
        out.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let out = raw_exchange(&s.shared, b"GARBAGE\r\n\r\n");
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 4"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary bytes on the socket: no panic, no hang, and any answer is HTTP.
    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let s = setup();
        let out = raw_exchange(&s.shared, &input);
        prop_assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "));
        prop_assert_eq!(s.fake.forks.load(Ordering::SeqCst), 0);
    }

    /// Request-shaped input with arbitrary method, path and body: no panic, every error
    /// is JSON, and the VM still answers afterwards.
    #[test]
    fn arbitrary_requests_are_answered(
        method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
        path in prop_oneof![
            prop::sample::select(ROUTES.iter().map(|r| r.1.to_string()).collect::<Vec<_>>()),
            "/[a-z/?=&%0-9]{0,30}",
        ],
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let s = setup();
        let (st, b) = rt().block_on(send(&s.shared, method, &path, &body));
        if !st.is_success() {
            error_kind(&b);
            prop_assert!(st.is_client_error() || st == StatusCode::INTERNAL_SERVER_ERROR, "{}", st);
        }
        let (st, _) = rt().block_on(send(&s.shared, "GET", "/v1/vm", b""));
        prop_assert_eq!(st, StatusCode::OK);
    }

    /// The fork body parser accepts or refuses any JSON text, never panics.
    #[test]
    fn fork_parser_total(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_fork_request(&body);
    }
}

#[test]
fn serves_on_its_socket_and_finishes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = VmHome::create(dir.path(), None, None).unwrap();
    let sock = home.socket_path();
    let console = home.console_path();
    let state = home.state_path();
    let server = serve(home, FakeRef(Arc::new(Fake::default()))).unwrap();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let st = forkvm_registry::VmState::read(&state).unwrap();
    assert_eq!(st.status, Status::Running);
    assert!(st.is_alive());
    let c = crate::Client::new(&sock);
    assert_eq!(c.info().unwrap().vcpus, 2);
    c.pause().unwrap();
    match c.pause() {
        Err(crate::ClientError::Api {
            status: 409, kind, ..
        }) => assert_eq!(kind, "conflict"),
        other => panic!("{other:?}"),
    }
    std::fs::write(&console, b"line 1\n").unwrap();
    // A follower gets what is there, then what comes, and ends when the VM does.
    let follower = std::thread::spawn({
        let c = c.clone();
        move || {
            let mut got = Vec::new();
            c.console(true, |d| {
                got.extend_from_slice(d);
                Ok(())
            })
            .unwrap();
            got
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&console)
        .unwrap()
        .write_all(b"line 2\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The log is cut to its end (forkvm_registry::ConsoleLog): the follower goes on
    // from the new start.
    std::fs::write(&console, b"[cut]\nline 3\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.shutdown().unwrap();
    assert!(server.stop_requested());
    server.finish(ExitRecord::new(0, forkvm_registry::Ending::Stopped));
    assert_eq!(
        String::from_utf8(follower.join().unwrap()).unwrap(),
        "line 1\nline 2\n[cut]\nline 3\n"
    );
    assert!(!sock.exists());
    let st = forkvm_registry::VmState::read(&state).unwrap();
    assert_eq!(st.status, Status::Exited);
    assert_eq!(st.exit.unwrap().reason, forkvm_registry::Ending::Stopped);
    assert!(matches!(c.info(), Err(crate::ClientError::Connect { .. })));
}

#[test]
fn the_runtime_waits_for_the_first_caller_and_a_server_never_called_finishes() {
    let dir = tempfile::tempdir().unwrap();
    // Called late: the first caller, waiting in the backlog, is answered.
    let home = VmHome::create(dir.path(), None, None).unwrap();
    let sock = home.socket_path();
    let server = serve(home, FakeRef(Arc::new(Fake::default()))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = crate::Client::new(&sock);
    assert_eq!(c.info().unwrap().vcpus, 2);
    assert_eq!(c.info().unwrap().vcpus, 2);
    server.finish(ExitRecord::new(0, forkvm_registry::Ending::Stopped));
    assert!(!sock.exists());
    // Never called: it finishes at once, its thread waiting for a caller woken.
    let home = VmHome::create(dir.path(), None, None).unwrap();
    let (sock, state) = (home.socket_path(), home.state_path());
    let server = serve(home, FakeRef(Arc::new(Fake::default()))).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.finish(ExitRecord::new(0, forkvm_registry::Ending::Stopped));
        let _ = done_tx.send(());
    });
    done.recv_timeout(Duration::from_secs(5))
        .expect("a server nobody called finishes at once");
    // Stopped just as its first caller came (the runtime being built): it still ends.
    for i in 0..40 {
        let home = VmHome::create(dir.path(), None, None).unwrap();
        let sock = home.socket_path();
        let server = serve(home, FakeRef(Arc::new(Fake::default()))).unwrap();
        // Connected and gone: the server wakes for it, and has no one to wait for.
        drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Stops at different points of the server's wake-up.
            std::thread::sleep(Duration::from_micros(100 * i));
            server.finish(ExitRecord::new(0, forkvm_registry::Ending::Stopped));
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("a server stopped at its first caller finishes");
    }
    assert!(!sock.exists());
    let st = forkvm_registry::VmState::read(&state).unwrap();
    assert_eq!(st.status, Status::Exited);
}

#[test]
fn another_users_request_paths_must_lie_in_the_vms_home() {
    let s = setup();
    let home = s.shared.home.dir().to_owned();
    let tenant = Caller::Other(1000);
    let post = |caller, path: &str, body: String| {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        rt().block_on(async {
            let resp = handle_as(s.shared.clone(), caller, req).await;
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        })
    };
    // Outside the home, or climbing out of it: refused by name, nothing forked or saved.
    for (route, body, field) in [
        (
            "/v1/vm/fork",
            serde_json::json!({"count": 1, "children": [{"console": "/etc/shadow"}]}),
            "children[0].console",
        ),
        (
            "/v1/vm/fork",
            serde_json::json!({"count": 1, "children": [{"vsock_uds": format!("{}/../x.sock", home.display())}]}),
            "children[0].vsock_uds",
        ),
        (
            "/v1/vm/template",
            serde_json::json!({"dir": "/var/lib/t"}),
            "dir",
        ),
    ] {
        let (st, b) = post(tenant, route, body.to_string());
        assert_eq!(st, StatusCode::FORBIDDEN, "{route} {body}");
        assert_eq!(error_kind(&b), "forbidden");
        let msg = String::from_utf8_lossy(&b);
        assert!(msg.contains(field) && msg.contains("uid 1000"), "{msg}");
    }
    // Nor the VM's own files in its home: its state, its console log, its API socket.
    for own in ["state.json", "console.log", "api.sock"] {
        let path = home.join(own);
        std::fs::write(&path, b"").unwrap();
        let body = serde_json::json!({"count": 1, "children": [{"vsock_uds": path}]});
        let (st, b) = post(tenant, "/v1/vm/fork", body.to_string());
        assert_eq!(st, StatusCode::FORBIDDEN, "{own}");
        assert!(String::from_utf8_lossy(&b).contains("exists"), "{own}");
    }
    assert_eq!(s.fake.forks.load(Ordering::SeqCst), 0);
    // A new path in the home: served; and the owner names any path.
    let inside = home.join("child.log");
    let body = serde_json::json!({"count": 1, "children": [{"console": inside}]}).to_string();
    assert_eq!(post(tenant, "/v1/vm/fork", body).0, StatusCode::OK);
    let body = serde_json::json!({"count": 1, "children": [{"console": "/tmp/c.log"}]}).to_string();
    assert_eq!(post(Caller::Owner, "/v1/vm/fork", body).0, StatusCode::OK);
    assert_eq!(Caller::of(Some(0)), Caller::Owner);
    assert_eq!(Caller::of(None), Caller::Other(u32::MAX));
}
