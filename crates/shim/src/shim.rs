//! The shim binary's actions, as containerd runs them (runtime v2 contract), each in
//! the container's bundle directory with `-namespace`, `-id`, `-address` and
//! `-publish-binary`:
//!
//! - `start` ([`start`]): starts the long-lived server (this binary again, with
//!   `-socket`) unless the pod's shim already serves the socket, writes `address` in the
//!   bundle and prints the ttrpc address, bare: the form containerd 1.6 reads and every
//!   later containerd still accepts (as a task API v2 shim).
//! - the server ([`serve`]): a child subreaper with one reaper thread, logging to the
//!   `log` FIFO containerd reads, publishing events to `$TTRPC_ADDRESS`, serving the
//!   [`Service`] over ttrpc under both task API names (`containerd.task.v2.Task`, which
//!   containerd 1.6 calls, and `containerd.task.v3.Task`) until `Shutdown` with no
//!   container left.
//! - `delete` ([`delete`]): cleanup after a shim that died
//!   ([`crate::service::cleanup`]); prints a `DeleteResponse`.
//!
//! The containerd-shim crate provides the flags, the ttrpc service and messages, the
//! log FIFO writer, the events publisher and `spawn`; its own `run` is not used, as it
//! prints the JSON start reply only containerd 1.7+ parses and serves task API v3 only.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_sync::create_task;
use containerd_shim::protos::ttrpc;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts};

use crate::error::{Error, Result};
use crate::exits::{self, Exits};
use crate::service::{self, Service};

/// The containerd runtime name that runs this shim (`containerd-shim-forkvm-v1`).
pub const RUNTIME_ID: &str = "io.containerd.forkvm.v1";

/// The Kubernetes annotation containerd's CRI sets on a pod's containers; its value
/// groups them into one shim, as runc-v2 does.
pub const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The ttrpc service names the task service answers to.
const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";

/// Which shim serves container `id`, from its bundle's `config.json` text: the pod's
/// sandbox id when CRI set one, else the container itself.
pub fn grouping(config_json: Option<&str>, id: &str) -> String {
    config_json
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|spec| {
            spec.get("annotations")?
                .get(SANDBOX_ANNOTATION)?
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| id.to_string())
}

/// The socket path of a ttrpc address (`unix:///run/...`).
fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// The `start` action: the address to print.
pub fn start(flags: &Flags) -> Result<String> {
    // containerd may pipe the runtime options in; Create gets them again.
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(1 << 20).read_to_end(&mut Vec::new());
    }
    let config = std::fs::read_to_string("config.json").ok();
    let group = grouping(config.as_deref(), &flags.id);
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    // Runs `<this binary> -namespace .. -id .. -address .. -socket <address>`, which
    // serves (or finds the pod's shim serving) and then closes its stdout.
    let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
    containerd_shim::synchronous::util::write_address(&address)?;
    Ok(address)
}

/// The listener for `address`, or `None` when a live shim already serves it (another
/// container of the same pod).
fn listen(address: &str) -> Result<Option<UnixListener>> {
    let path = Path::new(socket_path(address));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            // A dead shim's socket.
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(Some)
                .map_err(Error::io(format!("listen on {}", path.display())))
        }
        Err(e) => Err(Error::io(format!("listen on {}", path.display()))(e)),
    }
}

/// Tells `start` (our parent, reading our stdout until it closes) that the server is
/// up: stdout becomes stderr (/dev/null).
fn signal_started() {
    if let Err(e) = rustix::stdio::dup2_stdout(std::io::stderr()) {
        tracing::error!(error = %e, "cannot close stdout");
    }
}

/// The task service's ttrpc methods under both service names.
fn task_methods(
    service: &Service,
) -> std::collections::HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> {
    let mut methods = create_task(Arc::new(service.clone()));
    let v2: Vec<_> = create_task(Arc::new(service.clone()))
        .into_iter()
        .map(|(name, h)| (name.replacen(TASK_SERVICE_V3, TASK_SERVICE_V2, 1), h))
        .collect();
    methods.extend(v2);
    methods
}

/// The server (see the module docs); returns when the shim should exit.
pub fn serve(flags: &Flags) -> Result<()> {
    if flags.socket.is_empty() {
        return Err(Error::InvalidArgument("-socket is required".into()));
    }
    // Out of containerd's process group: a terminal's ^C for containerd is not ours.
    let _ = rustix::process::setsid();
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| Error::io("become a child subreaper")(e.into()))?;
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        // No log FIFO (run by hand): log nowhere rather than fail.
        eprintln!("{RUNTIME_ID}: no containerd log: {e}");
    }
    let Some(listener) = listen(&flags.socket)? else {
        tracing::info!(socket = %flags.socket, "the pod's shim serves this socket already");
        containerd_shim::synchronous::util::write_address(&flags.socket)?;
        signal_started();
        return Ok(());
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .map_err(|_| Error::InvalidArgument("TTRPC_ADDRESS is not set".into()))?;
    let publisher = RemotePublisher::new(&ttrpc_address)?;
    let exits = Exits::new();
    exits::reap_children(exits.clone()).map_err(Error::io("spawn the reaper"))?;
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(
        flags.namespace.clone(),
        service::publisher_sink(publisher, flags.namespace.clone()),
        exits,
        exit.clone(),
    );
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(containerd_shim::Error::from)?
        .register_service(task_methods(&service));
    server.start().map_err(containerd_shim::Error::from)?;
    signal_started();
    tracing::info!(socket = %flags.socket, "serving");
    exit.wait();
    tracing::info!("shutting down");
    server.shutdown();
    let _ = std::fs::remove_file(socket_path(&flags.socket));
    Ok(())
}

/// The `delete` action: cleans up the bundle's container; the response for stdout.
pub fn delete(flags: &Flags) -> Result<Vec<u8>> {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let exits = Exits::new();
    exits::reap_children(exits.clone()).map_err(Error::io("spawn the reaper"))?;
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(Error::io("the working directory"))?
    } else {
        flags.bundle.clone().into()
    };
    let response = service::cleanup(&bundle, &flags.namespace, &flags.id, exits);
    response.write_to_bytes().map_err(|e| Error::Shim(e.into()))
}

/// Runs the binary's action for `args` (the process's arguments); the exit code.
pub fn main(args: &[OsString]) -> i32 {
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            return 1;
        }
    };
    if flags.version {
        println!(
            "{}:\n  Version: {}\n  Revision: {}\n  Runtime: {RUNTIME_ID}",
            args.first()
                .map(|a| Path::new(a).display().to_string())
                .unwrap_or_default(),
            env!("CARGO_PKG_VERSION"),
            forkvm_version::COMMIT
        );
        return 0;
    }
    if flags.namespace.is_empty() {
        eprintln!("{RUNTIME_ID}: -namespace is required");
        return 1;
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags).map(String::into_bytes),
        "delete" => delete(&flags),
        "" => serve(&flags).map(|()| Vec::new()),
        other => Err(Error::InvalidArgument(format!("unknown action {other:?}"))),
    };
    match result {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&out).and_then(|()| stdout.flush());
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "shim failed");
            eprintln!("{RUNTIME_ID}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_a_shim_and_containers_have_their_own() {
        let pod = r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-id":"sb1","x":"y"}}"#;
        assert_eq!(grouping(Some(pod), "c1"), "sb1");
        assert_eq!(grouping(Some(r#"{"annotations":{}}"#), "c1"), "c1");
        assert_eq!(grouping(Some(r#"{"ociVersion":"1.0.2"}"#), "c1"), "c1");
        assert_eq!(grouping(Some("not json"), "c1"), "c1");
        assert_eq!(grouping(None, "c1"), "c1");
    }
}
