//! The shim binary's actions, as containerd runs them (runtime v2 contract):
//!
//! - `start`: containerd runs the binary in the bundle with `-namespace`, `-id`,
//!   `-address`, `-publish-binary` and `TTRPC_ADDRESS`; it starts the long-lived
//!   server (the same binary with `-socket`) unless the pod's shim already serves the
//!   socket, writes `address` in the bundle and prints the ttrpc address. The address
//!   is printed bare, the form every containerd since 1.6 reads (the containerd-shim
//!   crate would print the JSON that only containerd 1.7 and later parse), so this
//!   action is handled here rather than by the crate.
//! - the server: the crate's ttrpc server with this crate's [`Service`]; the crate
//!   makes the process a child subreaper, reaps children and logs to containerd's log
//!   FIFO.
//! - `delete`: cleanup after a shim that died ([`crate::service::cleanup`]).

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, ExitSignal, Flags, Shim, StartOpts};

use crate::exits::{self, Exits};
use crate::service::{self, Service};

/// The containerd runtime name that runs this shim (`containerd-shim-forkvm-v1`).
pub const RUNTIME_ID: &str = "io.containerd.forkvm.v1";

/// The Kubernetes annotation containerd's CRI sets on a pod's containers; its value
/// groups them into one shim, as runc-v2 does.
pub const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The shim: lives for the server process.
pub struct ForkvmShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

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

/// The `start` action (see the module docs): the address to print.
fn start(flags: &Flags) -> containerd_shim::Result<String> {
    // containerd may pipe the runtime options in; create gets them again.
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
    let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
    containerd_shim::synchronous::util::write_address(&address)?;
    Ok(address)
}

/// Handles the actions the containerd-shim crate does not handle the way containerd
/// 1.6 needs (`start`, `-v`); `None` for the others, which go to
/// [`containerd_shim::run`]. `Some(code)` is the process's exit code.
pub fn run_action(args: &[OsString]) -> Option<i32> {
    let flags = containerd_shim::parse(args.get(1..).unwrap_or_default()).ok()?;
    if flags.version {
        println!(
            "{}:\n  Version: {}\n  Runtime: {RUNTIME_ID}",
            args.first()
                .map(|a| Path::new(a).display().to_string())
                .unwrap_or_default(),
            env!("CARGO_PKG_VERSION")
        );
        return Some(0);
    }
    if flags.action != "start" {
        return None;
    }
    if flags.namespace.is_empty() {
        eprintln!("{RUNTIME_ID}: -namespace is required");
        return Some(1);
    }
    match start(&flags) {
        Ok(address) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(address.as_bytes()).and_then(|_| out.flush());
            Some(0)
        }
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            Some(1)
        }
    }
}

impl Shim for ForkvmShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ForkvmShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // Reached only through the crate's own `start` handling (bootstrap protocol);
        // `run_action` handles containerd's legacy `start`.
        let config = std::fs::read_to_string("config.json").ok();
        let group = grouping(config.as_deref(), &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        let exits = Exits::new();
        exits::follow_crate_reaper(exits.clone())?;
        let bundle = std::env::current_dir().map_err(|e| containerd_shim::Error::IoError {
            context: "the bundle (working directory)".into(),
            err: e,
        })?;
        Ok(service::cleanup(&bundle, &self.namespace, &self.id, exits))
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let exits = Exits::new();
        if let Err(e) = exits::follow_crate_reaper(exits.clone()) {
            tracing::error!(error = %e, "cannot follow the reaper: exits will be missed");
        }
        Service::new(
            self.namespace.clone(),
            Some(publisher),
            exits,
            self.exit.clone(),
        )
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
