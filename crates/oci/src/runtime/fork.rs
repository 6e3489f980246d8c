//! `fork`: a running container forked into new containers (an extension of runc's
//! command line; `forkvm fork CONTAINER` calls the same code).
//!
//! The container's VM forks through its forkvm API: each child is a VM of its own, in
//! its own VMM process, resuming from the parent's exact state (the container's process
//! included) with a fresh identity. Each becomes a container under the same root, named
//! `<parent>-fork-<n>`, `running`, with the child's VMM as its process and the parent
//! recorded, so `state`, `list`, `kill`, `exec` and `delete` work on it. The process in
//! a child has no stdio on the host (the parent's engine holds the parent's), and its
//! host process exits with 0 when its VM powers off. A child has no address on its
//! parent's network (the engine gave the parent one, and has none for the child): its
//! NICs, on TAPs of its own tied to nothing, are taken down, which the fork's output
//! (`nics_down`) and the child's `state` ([`NETWORK_ANNOTATION`]) say. Only a container
//! whose root is a disk of its VM forks ([`ROOTFS_ANNOTATION`] `disk`): a shared root is
//! the bundle's directory, which the children would write too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkvm_agent_proto::{Request, Response};
use forkvm_vmm::control::ForkRequest;
use serde::Serialize;

use crate::bundle::{RootMode, ROOTFS_ANNOTATION};
use crate::state::{ContainerState, StateError, StateStore, Status};

/// One forked container.
#[derive(Clone, Debug, Serialize)]
pub struct ForkedContainer {
    /// Its container id.
    pub id: String,
    /// Its host process (the child's VMM).
    pub pid: i32,
    /// Its forkvm VM id, when found.
    pub vm_id: Option<String>,
    /// Microseconds from the fork request until its vCPUs ran.
    pub running_after_us: u64,
    /// Its NICs, taken down: it has no address of its own on its parent's network.
    pub nics_down: Vec<String>,
}

/// The annotation (in `state`) that says a fork child's NICs are down.
pub const NETWORK_ANNOTATION: &str = "io.forkvm.network";

/// Asks the agent behind `uds` to take every NIC down; returns their names. A child
/// just forked drops or resets connections until its guest has taken its new CID, so
/// the request is retried for up to 30 s (taking NICs down twice does no harm: the
/// agent answers with every NIC, down).
fn unplug(uds: &Path) -> Result<Vec<String>> {
    use forkvm_agent_proto::client;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The agent answered a Ping on this connection: it has its new CID.
        let mut conn =
            client::wait_for_agent(uds, deadline).context("cannot reach the child's agent")?;
        match client::call_within(&mut conn, &Request::Unplug, Duration::from_secs(30)) {
            Ok(Response::Unplugged { nics }) => return Ok(nics),
            Ok(Response::Error { message }) => bail!("{message}"),
            Ok(other) => bail!("the agent answered unplug with {other:?}"),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("unplug: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("the child's agent did not answer unplug"),
        }
    }
}

/// What a container fork did.
#[derive(Clone, Debug, Serialize)]
pub struct ContainerFork {
    /// The forked container.
    pub parent: String,
    /// Microseconds the parent's vCPUs were paused.
    pub parent_pause_us: u64,
    /// The new containers.
    pub children: Vec<ForkedContainer>,
}

/// Forks running container `id` under state root `root` into `count` containers.
pub fn fork_container(root: &Path, id: &str, count: u32) -> Result<ContainerFork> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let store = StateStore::open(root)?;
    let parent = store.load(id)?;
    if parent.status != Status::Running || !parent.process_alive() {
        bail!("container {id} is {}, not running", parent.status);
    }
    // A pod's VM shares the pod's directory, where its containers' roots are: the
    // children would write the same files.
    if parent.is_pod_sandbox() || parent.pod_sandbox().is_some() {
        bail!(
            "container {id} cannot fork: it is a Kubernetes pod's, whose VM shares the pod's \
             containers' roots with the host (pods that start by fork are not done yet)"
        );
    }
    // A root disk is in the container's directory (containers made before the shared
    // root have one too, without the annotation).
    if !store
        .container_dir(id)?
        .join(crate::rootfs::ROOT_DISK)
        .exists()
    {
        bail!(
            "container {id} cannot fork: its root is its bundle's directory, shared with the \
             host, and the children would write the same files; create it with the \
             annotation {ROOTFS_ANNOTATION}={} to give its VM a root of its own that forks",
            RootMode::Disk.name()
        );
    }
    let home = super::ops::vm_home(&parent)?;
    // Children register next to their parent (under the monitor's FORKVM_ROOT).
    let vm_root = home.root().to_owned();
    let req = ForkRequest {
        count,
        ..ForkRequest::default()
    };
    // As long as the VM gives the children to start (it answers by then).
    let wait = forkvm_vmm::control::client_wait(&forkvm_vmm::control::Request::Fork(req.clone()));
    let client = forkvm_api::Client::new(home.socket_path()).with_timeout(wait);
    let out = client
        .fork(&req)
        .with_context(|| format!("cannot fork container {id}"))?;
    let mut children = Vec::new();
    for child in &out.children {
        let pid = child.pid as i32;
        let mut state = ContainerState::new(next_child_id(&store, id)?, &parent.bundle);
        state.annotations = parent.annotations.clone();
        state.parent = Some(id.to_owned());
        state.guest_pid = parent.guest_pid;
        state.vsock = child.vsock_uds.clone();
        state.vm_id = find_vm(&vm_root, child.pid);
        state.vm_root = Some(vm_root.clone());
        // The engine gave the parent its address and has none for the child: the
        // child's NICs (on TAPs of their own, tied to nothing) go down, and say so (a
        // child without NICs has none to take down).
        let unplugged = match &child.vsock_uds {
            Some(uds) => unplug(uds).unwrap_or_else(|e| {
                tracing::warn!("cannot take the NICs of {}'s fork down: {e:#}", id);
                Vec::new()
            }),
            None => Vec::new(),
        };
        if !unplugged.is_empty() {
            state.annotations.insert(
                NETWORK_ANNOTATION.into(),
                format!(
                    "down: {} (a fork child has no address on its parent's network)",
                    unplugged.join(", ")
                ),
            );
        }
        state.record_pid(pid)?;
        state.transition(Status::Created)?;
        state.transition(Status::Running)?;
        store.create(&state)?;
        children.push(ForkedContainer {
            id: state.id,
            pid,
            vm_id: state.vm_id,
            running_after_us: child.running_after_us,
            nics_down: unplugged,
        });
    }
    Ok(ContainerFork {
        parent: id.to_owned(),
        parent_pause_us: out.parent_pause_us,
        children,
    })
}

/// `<parent>-fork-<n>` with the first `n` not taken.
fn next_child_id(store: &StateStore, parent: &str) -> Result<String> {
    for n in 1.. {
        let id = format!("{parent}-fork-{n}");
        match store.load(&id) {
            Err(StateError::NotFound { .. }) => return Ok(id),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("an unbounded range ends")
}

/// The VM whose VMM process is `pid` (a fork child registers itself as it starts).
fn find_vm(vm_root: &Path, pid: u32) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = forkvm_registry::list(vm_root).ok()?.into_iter().find(|e| {
            e.state
                .as_ref()
                .is_ok_and(|s| s.process.as_ref().is_some_and(|p| p.pid == pid))
        });
        if let Some(e) = found {
            return Some(e.id);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
