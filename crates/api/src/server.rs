//! The per-VM HTTP API: hyper (HTTP/1.1) on the VM's Unix socket, served by a
//! current-thread tokio runtime on its own thread inside the VMM process.
//!
//! Requests that change the VM (pause, resume, shutdown, fork) go one at a time: one
//! that arrives while another is in progress gets 409. Every error is a 4xx/5xx with a
//! JSON body `{"error": KIND, "message": TEXT}`; request bodies are capped at
//! [`MAX_BODY`] bytes (413 beyond).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Buf, Bytes, Frame};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::metrics::Histogram;
use crate::wire::{ChildSpec, ControlError, DeviceInfo, ForkRequest, Request, Response, RunState};
use forkvm_jail::ThreadKind;
use forkvm_registry::{Error, ExitRecord, ProcessIdentity, Status, VmHome};

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// Every route: (method, path). `docs/api/openapi.yaml` documents exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/vm"),
    ("POST", "/v1/vm/pause"),
    ("POST", "/v1/vm/resume"),
    ("POST", "/v1/vm/shutdown"),
    ("POST", "/v1/vm/fork"),
    ("POST", "/v1/vm/template"),
    ("GET", "/v1/vm/console"),
    ("GET", "/metrics"),
];

/// What the API serves requests with: the VMM's control handle, or a stand-in in tests.
pub trait Control: Send + Sync + 'static {
    /// Sends a request to the VMM and waits for the answer.
    fn call(&self, req: Request) -> Result<Response, ControlError>;
}

/// `GET /v1/vm`: the VM as the API describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Its ID.
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// Running or paused.
    pub state: RunState,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// virtio devices.
    pub devices: Vec<DeviceInfo>,
    /// The VM it was forked from.
    pub parent: Option<String>,
    /// VMs forked from it.
    pub children: Vec<String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Milliseconds since boot began.
    pub uptime_ms: u64,
    /// The VMM's pid.
    pub pid: u32,
    /// vCPU exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// VMM resident memory, bytes.
    pub rss_bytes: u64,
    /// VMM private memory, bytes.
    pub private_bytes: u64,
    /// Warm VM processes waiting to become its fork children.
    #[serde(default)]
    pub fork_pool: Vec<u32>,
    /// The file-system rules its VM process is bound by (Landlock), if any.
    #[serde(default)]
    pub landlock: Option<forkvm_jail::landlock::Bound>,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// `bad_request`, `not_found`, `method_not_allowed`, `payload_too_large`,
    /// `conflict`, `internal` or `unavailable`.
    pub error: String,
    /// What was wrong.
    pub message: String,
}

/// Response bodies.
pub type ApiBody = BoxBody<Bytes, std::io::Error>;
type Reply = hyper::Response<ApiBody>;

pub(crate) struct Shared {
    home: VmHome,
    control: Arc<dyn Control>,
    busy: AtomicBool,
    stop_requested: AtomicBool,
    forks: Mutex<Histogram>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(home: VmHome, control: Arc<dyn Control>) -> Arc<Self> {
        Arc::new(Self {
            home,
            control,
            busy: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            forks: Mutex::new(Histogram::default()),
            shutdown: watch::channel(false).0,
        })
    }
}

/// Held while a state-changing request is carried out.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

fn json_reply(status: StatusCode, value: &impl Serialize) -> Reply {
    let mut r = hyper::Response::new(full(
        serde_json::to_vec(value).expect("API values serialize"),
    ));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_reply(status: StatusCode, kind: &str, message: impl Into<String>) -> Reply {
    json_reply(
        status,
        &ApiError {
            error: kind.into(),
            message: message.into(),
        },
    )
}

fn control_error(e: ControlError) -> Reply {
    let (status, kind) = match &e {
        ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ControlError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        ControlError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ControlError::Gone => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        ControlError::TimedOut(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
    };
    error_reply(status, kind, e.to_string())
}

async fn call(shared: &Arc<Shared>, req: Request) -> Result<Response, Reply> {
    let control = shared.control.clone();
    match tokio::task::spawn_blocking(move || control.call(req)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(control_error(e)),
        Err(e) => Err(error_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request handler failed: {e}"),
        )),
    }
}

fn unexpected(r: &Response) -> Reply {
    error_reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the VMM answered unexpectedly: {r:?}"),
    )
}

/// How much of an oversized body is read and dropped before the 413 goes out: a client
/// still sending it would otherwise see the connection reset instead of the answer.
const DRAIN_LIMIT: usize = 1 << 20;

/// Reads the whole body, at most [`MAX_BODY`] bytes (413 beyond, once the client has
/// sent it, up to [`DRAIN_LIMIT`]).
async fn read_body<B>(body: B, declared: Option<u64>) -> Result<Bytes, Reply>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {MAX_BODY} bytes"),
        )
    };
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut kept = Vec::new();
    let mut seen = 0usize;
    let oversized = |seen: usize| seen > MAX_BODY || declared.is_some_and(|n| n > MAX_BODY as u64);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            // Refused by its declared size already: the rest was only being drained.
            Err(_) if oversized(seen) => break,
            Err(e) => {
                return Err(error_reply(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cannot read the request body: {e}"),
                ))
            }
        };
        if let Ok(mut data) = frame.into_data() {
            let data = data.copy_to_bytes(data.remaining());
            seen += data.len();
            if seen <= MAX_BODY {
                kept.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
    }
    if oversized(seen) {
        return Err(too_large());
    }
    Ok(Bytes::from(kept))
}

/// Parses a template request, `{"dir": "/absolute/path"}`.
pub fn parse_template_request(body: &[u8]) -> Result<std::path::PathBuf, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TemplateRequest {
        dir: std::path::PathBuf,
    }
    let req: TemplateRequest = serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {{\"dir\": \"/absolute/path\"}}: {e}"))?;
    if !req.dir.is_absolute() {
        return Err(format!("dir {:?} must be an absolute path", req.dir));
    }
    Ok(req.dir)
}

/// Parses a fork request; absent fields take their defaults, unknown ones are refused.
pub fn parse_fork_request(body: &[u8]) -> Result<ForkRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("the body must be a JSON ForkRequest object, e.g. {\"count\": 1}".into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    fn overlay<T: Default + Serialize>(
        what: &str,
        v: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let serde_json::Value::Object(given) = v else {
            return Err(format!("{what} must be a JSON object"));
        };
        let mut base = serde_json::to_value(T::default()).expect("defaults serialize");
        let obj = base
            .as_object_mut()
            .expect("a struct serializes to an object");
        for (k, val) in given {
            if !obj.contains_key(&k) {
                let known: Vec<&String> = obj.keys().collect();
                return Err(format!("unknown field {k:?} in {what} (known: {known:?})"));
            }
            obj.insert(k, val);
        }
        Ok(base)
    }
    let mut v = overlay::<ForkRequest>("the fork request", v)?;
    if let Some(children) = v.get_mut("children").and_then(|c| c.as_array_mut()) {
        for c in children.iter_mut() {
            *c = overlay::<ChildSpec>("a child spec", c.take())?;
        }
    }
    let req: ForkRequest =
        serde_json::from_value(v).map_err(|e| format!("invalid fork request: {e}"))?;
    if req.count == 0 {
        return Err("count must be at least 1".into());
    }
    Ok(req)
}

fn parse_follow(query: Option<&str>) -> Result<bool, String> {
    let mut follow = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        match (k, v) {
            ("follow", "true" | "1") => follow = true,
            ("follow", "false" | "0") => follow = false,
            ("follow", other) => return Err(format!("follow={other:?}: expected true or false")),
            (other, _) => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    Ok(follow)
}

/// A response body fed from a channel (the console stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn console_stream(shared: &Arc<Shared>, follow: bool) -> Reply {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let path = shared.home.console_path();
    let mut shutdown = shared.shutdown.subscribe();
    tokio::spawn(async move {
        let Ok(mut f) = tokio::fs::File::open(&path).await else {
            return;
        };
        // The log's first bytes (its cut mark, if any) and where in it this is.
        async fn head(f: &mut tokio::fs::File) -> Option<[u8; 128]> {
            let mut head = [0u8; 128];
            f.seek(std::io::SeekFrom::Start(0)).await.ok()?;
            let n = f.read(&mut head).await.ok()?;
            head[n..].fill(0);
            Some(head)
        }
        let mut buf = vec![0u8; 64 * 1024];
        let Some(first) = head(&mut f).await else {
            return;
        };
        if f.seek(std::io::SeekFrom::Start(0)).await.is_err() {
            return;
        }
        let mut pos = 0u64;
        // What cuts had dropped before this file's first kept byte, and its mark's length.
        let (mut dropped, mut mark) = forkvm_registry::console::cut_head(&first);
        loop {
            match f.read(&mut buf).await {
                Ok(0) => {
                    // The log was cut (`forkvm_registry::ConsoleLog`): go on after what
                    // was sent, by the new mark (from the start, mark line first, if
                    // some of what was not sent yet was dropped).
                    if f.metadata().await.is_ok_and(|m| m.len() < pos) {
                        let Some(h) = head(&mut f).await else { return };
                        let sent = dropped + pos.saturating_sub(mark);
                        let len = f.metadata().await.map_or(0, |m| m.len());
                        // A file that shrank without a mark of ours (replaced, truncated
                        // by hand) is read again from its start.
                        let marked = forkvm_registry::console::cut_head(&h) != (0, 0);
                        let at = forkvm_registry::position_after_cut(sent, &h)
                            .filter(|_| marked)
                            .unwrap_or(0)
                            .min(len);
                        (dropped, mark) = forkvm_registry::console::cut_head(&h);
                        if f.seek(std::io::SeekFrom::Start(at)).await.is_err() {
                            return;
                        }
                        pos = at;
                        continue;
                    }
                }
                Ok(n) => {
                    pos += n as u64;
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            if !follow || *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => {}
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = hyper::Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Who is on the other end of an API connection, as the kernel says (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Root, or the user the VM process runs as: it may name any path in a request (it
    /// could write there itself).
    Owner,
    /// Another user (a platform handed the socket to a tenant): paths it names for the
    /// VMM to create, truncate or unlink must lie in the VM's home.
    Other(u32),
}

impl Caller {
    /// The caller of uid `uid` (`None`: unknown, treated as another user).
    pub(crate) fn of(uid: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        match uid {
            Some(0) => Caller::Owner,
            Some(u) if u == own => Caller::Owner,
            other => Caller::Other(other.unwrap_or(u32::MAX)),
        }
    }
}

/// Refuses (with the message of a `403 forbidden`) a path `field` of a request names for
/// the VMM to create, truncate or unlink (a child's console or vsock socket, a template
/// directory) when `caller` may not name it: another user's must be absolute, without
/// `..`, in the VM's home, and not exist yet.
fn check_request_path(
    shared: &Shared,
    caller: Caller,
    field: &str,
    path: &std::path::Path,
) -> Result<(), String> {
    let Caller::Other(uid) = caller else {
        return Ok(());
    };
    let home = shared.home.dir();
    let plain = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::RootDir
        )
    });
    if !(path.is_absolute() && plain && path.starts_with(home) && path != home) {
        return Err(format!(
            "{field} {} is outside this VM's directory {}: a caller other than the VM's \
             owner (uid {uid}) may name only paths there",
            path.display(),
            home.display()
        ));
    }
    // Nothing there yet: the VM's own files (its state, console log, API socket) are not
    // a tenant's to truncate or replace.
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "{field} {} exists: a caller other than the VM's owner (uid {uid}) may name only \
             a new path in the VM's directory",
            path.display()
        ));
    }
    Ok(())
}

/// Answers one request of the VM's owner.
#[cfg(test)]
pub(crate) async fn handle<B>(shared: Arc<Shared>, req: hyper::Request<B>) -> Reply
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    handle_as(shared, Caller::Owner, req).await
}

/// Answers one request of `caller`.
pub(crate) async fn handle_as<B>(
    shared: Arc<Shared>,
    caller: Caller,
    req: hyper::Request<B>,
) -> Reply
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, p)| *p == path)
        .map(|(m, _)| *m)
        .collect();
    if allowed.is_empty() {
        return error_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {method} {path}"),
        );
    }
    if !allowed.contains(&method.as_str()) {
        let mut r = error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} accepts {}, not {method}", allowed.join(", ")),
        );
        if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
            r.headers_mut().insert(ALLOW, v);
        }
        return r;
    }
    let query = req.uri().query().map(str::to_owned);
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = match read_body(req.into_body(), declared).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if method == Method::GET && !body.is_empty() {
        return error_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a GET request takes no body",
        );
    }
    if query.is_some() && path != "/v1/vm/console" {
        return error_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{path} takes no query parameters"),
        );
    }
    match path.as_str() {
        "/v1/vm" => info(&shared).await,
        "/metrics" => metrics(&shared).await,
        "/v1/vm/console" => match parse_follow(query.as_deref()) {
            Ok(follow) => console_stream(&shared, follow),
            Err(e) => error_reply(StatusCode::BAD_REQUEST, "bad_request", e),
        },
        _ => change(&shared, caller, &path, &body).await,
    }
}

async fn describe(shared: &Arc<Shared>) -> Result<VmDescription, Reply> {
    let info = match call(shared, Request::Info).await? {
        Response::Info(i) => i,
        other => return Err(unexpected(&other)),
    };
    let home = &shared.home;
    let state = home
        .state()
        .map_err(|e| error_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(VmDescription {
        id: state.id.clone(),
        name: state.name,
        state: info.state,
        vcpus: info.vcpus,
        mem_mib: info.mem_mib,
        devices: info.devices,
        parent: state.parent,
        children: home.children(),
        created: forkvm_registry::time::rfc3339(state.created_ms),
        uptime_ms: info.uptime_ms,
        pid: ProcessIdentity::current().pid,
        exits: info.exits,
        rss_bytes: info.rss_bytes,
        private_bytes: info.private_bytes,
        fork_pool: info.fork_pool,
        landlock: info.landlock,
    })
}

async fn info(shared: &Arc<Shared>) -> Reply {
    match describe(shared).await {
        Ok(d) => json_reply(StatusCode::OK, &d),
        Err(r) => r,
    }
}

async fn metrics(shared: &Arc<Shared>) -> Reply {
    let info = match call(shared, Request::Info).await {
        Ok(Response::Info(i)) => i,
        Ok(other) => return unexpected(&other),
        Err(r) => return r,
    };
    let text = {
        let h = shared.forks.lock().unwrap_or_else(|p| p.into_inner());
        crate::metrics::render(&info, &h)
    };
    let mut r = hyper::Response::new(full(text));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Pause, resume, shutdown, fork: one at a time.
async fn change(shared: &Arc<Shared>, caller: Caller, path: &str, body: &[u8]) -> Reply {
    if shared.stop_requested.load(Ordering::SeqCst) {
        return error_reply(StatusCode::CONFLICT, "conflict", "the VM is shutting down");
    }
    if shared.busy.swap(true, Ordering::SeqCst) {
        return error_reply(
            StatusCode::CONFLICT,
            "conflict",
            "another operation on this VM is in progress",
        );
    }
    let _busy = Busy(&shared.busy);
    let id = shared.home.id().to_owned();
    let set_status = |status: Status| {
        if let Err(e) = shared.home.update(|s| s.status = status) {
            tracing::warn!(error = %e, "cannot record the VM's status");
        }
    };
    match path {
        "/v1/vm/pause" | "/v1/vm/resume" => {
            let (req, status, state) = if path == "/v1/vm/pause" {
                (Request::Pause, Status::Paused, "paused")
            } else {
                (Request::Resume, Status::Running, "running")
            };
            match call(shared, req).await {
                Ok(Response::Done) => {
                    set_status(status);
                    json_reply(
                        StatusCode::OK,
                        &serde_json::json!({"id": id, "state": state}),
                    )
                }
                Ok(other) => unexpected(&other),
                Err(r) => r,
            }
        }
        "/v1/vm/shutdown" => {
            // Set before the VMM can act on it, so the exit is recorded as a stop.
            shared.stop_requested.store(true, Ordering::SeqCst);
            match call(shared, Request::Stop).await {
                Ok(Response::Done) => json_reply(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"id": id, "state": "stopping"}),
                ),
                Ok(other) => {
                    shared.stop_requested.store(false, Ordering::SeqCst);
                    unexpected(&other)
                }
                Err(r) => {
                    shared.stop_requested.store(false, Ordering::SeqCst);
                    r
                }
            }
        }
        "/v1/vm/fork" => {
            let req = match parse_fork_request(body) {
                Ok(r) => r,
                Err(e) => return error_reply(StatusCode::BAD_REQUEST, "bad_request", e),
            };
            for (i, c) in req.children.iter().enumerate() {
                let paths = [("console", &c.console), ("vsock_uds", &c.vsock_uds)];
                for (field, path) in paths {
                    if let Some(path) = path {
                        let field = format!("children[{i}].{field}");
                        if let Err(e) = check_request_path(shared, caller, &field, path) {
                            return error_reply(StatusCode::FORBIDDEN, "forbidden", e);
                        }
                    }
                }
            }
            match call(shared, Request::Fork(req)).await {
                Ok(Response::Forked(outcome)) => {
                    let mut h = shared.forks.lock().unwrap_or_else(|p| p.into_inner());
                    for c in &outcome.children {
                        h.observe_us(c.running_after_us);
                    }
                    drop(h);
                    json_reply(StatusCode::OK, &outcome)
                }
                Ok(other) => unexpected(&other),
                Err(r) => r,
            }
        }
        "/v1/vm/template" => {
            let dir = match parse_template_request(body) {
                Ok(d) => d,
                Err(e) => return error_reply(StatusCode::BAD_REQUEST, "bad_request", e),
            };
            if let Err(e) = check_request_path(shared, caller, "dir", &dir) {
                return error_reply(StatusCode::FORBIDDEN, "forbidden", e);
            }
            match call(shared, Request::SaveTemplate(dir)).await {
                Ok(Response::TemplateSaved(info)) => json_reply(StatusCode::OK, &info),
                Ok(other) => unexpected(&other),
                Err(r) => r,
            }
        }
        _ => error_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route POST {path}"),
        ),
    }
}

/// Serves HTTP/1.1 on one connection until it closes.
pub(crate) async fn serve_connection<IO>(shared: Arc<Shared>, caller: Caller, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle_as(shared, caller, req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .half_close(true)
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_BODY.max(8192))
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "API connection ended with an error");
    }
}

/// The running API server of one VM; see [`serve`].
pub struct ApiServer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Wakes the server thread while it still waits for its first caller.
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("id", &self.shared.home.id())
            .finish()
    }
}

/// Serves the API of the VM registered at `home` on its socket: binds `api.sock` (mode
/// 0600), records this process as the VM's VMM with status `running`, and starts the
/// server thread. Call it in the VM process once the VM is built and before it runs;
/// when it ends, hand how it ended to [`ApiServer::finish`].
pub fn serve(home: VmHome, control: impl Control) -> Result<ApiServer, Error> {
    let sock = home.socket_path();
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(Error::io(format!("cannot bind {}", sock.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("cannot chmod {}", sock.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("cannot make the API socket non-blocking"))?;
    home.update(|s| {
        s.status = Status::Running;
        s.process = Some(ProcessIdentity::current());
    })?;
    let shared = Shared::new(home, Arc::new(control));
    let inner = shared.clone();
    let wake = Arc::new(
        EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)
            .map_err(Error::io("cannot make the API thread's eventfd"))?,
    );
    let woken = wake.clone();
    let (confined_tx, confined) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("forkvm-api".into())
        .spawn(move || {
            // Before any request is read: no capabilities, the API's seccomp filter
            // (inherited by the runtime's threads).
            let confined = forkvm_jail::confine_thread(ThreadKind::Api);
            let failed = confined.is_err();
            let _ = confined_tx.send(confined);
            if failed {
                return;
            }
            match first_caller(&listener, &woken) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(error = %e, "cannot wait for the API's first caller"),
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_start(|| forkvm_jail::seccomp::mark(ThreadKind::Api))
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the API runtime");
                    return;
                }
            };
            rt.block_on(accept_loop(inner, listener));
        })
        .map_err(Error::io("cannot start the API thread"))?;
    match confined.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let why = std::io::Error::other(crate::wire::error_chain(&e));
            return Err(Error::io("cannot confine the API thread")(why));
        }
        Err(_) => {
            let why = std::io::Error::other("it ended before it was confined");
            return Err(Error::io("cannot start the API thread")(why));
        }
    }
    tracing::info!(id = %shared.home.id(), socket = %sock.display(), "API listening");
    Ok(ApiServer {
        shared,
        thread: Some(thread),
        wake,
    })
}

/// Waits until a caller connects to `listener` (`true`) or `wake` is written (`false`:
/// the server stops before anyone called). The runtime is built only then: an idle fork
/// child, which nobody may ever call, does not hold its poller, timer wheel and buffers
/// (its own memory: a fork child must cost kilobytes). A caller that connects meanwhile
/// waits in the socket's backlog for this wait's end, microseconds.
fn first_caller(
    listener: &std::os::unix::net::UnixListener,
    wake: &EventFd,
) -> std::io::Result<bool> {
    const CALLER: u64 = 0;
    const WAKE: u64 = 1;
    let epoll = Epoll::new()?;
    for (fd, token) in [(listener.as_raw_fd(), CALLER), (wake.as_raw_fd(), WAKE)] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let mut ready = [EpollEvent::default(); 2];
    loop {
        match epoll.wait(-1, &mut ready) {
            Ok(n) => return Ok(!ready[..n].iter().any(|e| e.data() == WAKE)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: std::os::unix::net::UnixListener) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the API socket");
            return;
        }
    };
    let mut shutdown = shared.shutdown.subscribe();
    // A stop sent before this subscribed (while the runtime was built for a first
    // caller) counts as seen already: `changed` would never see it.
    if *shutdown.borrow_and_update() {
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let active = active.clone();
                    let caller = Caller::of(stream.peer_cred().ok().map(|c| c.uid()));
                    active.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        serve_connection(shared, caller, stream).await;
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    // Let console followers drain and in-flight answers go out.
    for _ in 0..40 {
        if active.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl ApiServer {
    /// Whether a shutdown was requested through the API (tells a stop on request from a
    /// failure when the VM's run loop reports one).
    pub fn stop_requested(&self) -> bool {
        self.shared.stop_requested.load(Ordering::SeqCst)
    }

    /// The VM's home.
    pub fn home(&self) -> &VmHome {
        &self.shared.home
    }

    /// Records how the VM ended, ends console streams and stops serving.
    pub fn finish(mut self, exit: ExitRecord) {
        if let Err(e) = self.shared.home.record_exit(exit) {
            tracing::warn!(error = %e, "cannot record the VM's exit");
        }
        self.stop_serving();
    }

    fn stop_serving(&mut self) {
        self.shared.shutdown.send_replace(true);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(self.shared.home.socket_path());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_serving();
    }
}

#[cfg(test)]
mod tests;
