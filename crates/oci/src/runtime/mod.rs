//! `forkvm-runtime`: runc's command-line contract, each container a forkvm VM.
//!
//! Engines (containerd's runc shim under Docker, conmon under podman, forkvm's own
//! containerd shim) call it exactly as they call runc:
//!
//! | Verb | What it does here |
//! |---|---|
//! | `create` | reads the bundle (refusing what a VM cannot honour, before anything exists) and starts the container's **monitor**: a process (this binary, `__monitor`) in the namespaces the bundle lists (mount, UTS, IPC, network: new, or joined by path; a pid namespace by path; the runtime's own where a type is not listed), with the container's root mounted over `/` in a mount namespace of its own, for engines that join it. It runs the bundle's `prestart` and `createRuntime` hooks with the state's `pid` (below), whose network namespace is the monitor's (Docker's network hook configures it), prepares the VM's root (copies of the bound files beside the shared rootfs, or a root disk made from it), and lets the monitor go on: it ties the namespace's interfaces to TAPs, boots the VM, waits for its agent and holds the container's stdio. It lives as long as the container and exits with the container's exit code. Where the spec lists pid, cgroup or user namespaces without a path, `create` also starts the container's **holder** ([`holder`], `__hold`): a process in the monitor's namespaces and those, the init of its pid namespace, that exits with the exit code the monitor hands it; it, else the monitor, is the state's `pid` and `--pid-file`'s. A failed create runs the `poststop` hooks. |
//! | `create` of a Kubernetes pod's sandbox or container | the sandbox's VM also shares the pod's directory ([`crate::pod`]); a pod's container boots no VM: its root is bound into that directory and its **member monitor** (`__member`) has the sandbox VM's agent make it there (`member.rs`) |
//! | `start` | tells the monitor to start the process (over `start.sock` in the container's directory), then runs the `poststart` hooks |
//! | `state`, `list`, `ps` | from the state directory (`--root`), with liveness checked by pid and start time |
//! | `kill` | signals the monitor, which forwards the signal to the process in the guest (SIGKILL ends the holder and the VM at once; a holder killed from outside takes its monitor and VM with it); a pod's container's process is signalled through the pod VM's agent |
//! | `delete` | removes a stopped container (`--force`: kills a running one first) and everything it left, and runs the `poststop` hooks |
//! | `exec` | runs another process in the container through the guest agent; `--detach` leaves a host process standing for it, as `create` does |
//! | `pause`, `resume` | pause and resume the whole VM |
//! | `features` | what this runtime supports, per the runtime spec's features document |
//! | `fork` | (forkvm's own) forks a running container's VM into new containers, see [`fork`] |
//! | `pod-template` | (forkvm's own) boots a pod VM and saves it as a pod template ([`crate::pod_template`]) |
//! | `create --pod-template DIR` of a pod's sandbox | (forkvm's own) the pod's VM is forked from the pod template instead of booted; the sandbox's container is made inside it as a pod's container is |
//!
//! Errors go to stderr and, as runc does, to `--log` (one JSON object a line with
//! `--log-format json`, which go-runc reads back for the engine's error message).

mod create;
mod exec;
pub mod fork;
mod helper;
pub mod holder;
mod log;
mod member;
pub(crate) mod ops;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use log::Log;

/// The version `--version` prints (with the commit).
pub const VERSION: &str = forkvm_version::VERSION;

/// `--version` in runc's shape: version, commit, runtime spec version.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\ncommit: {}\nspec: {}",
        env!("CARGO_PKG_VERSION"),
        forkvm_version::COMMIT,
        crate::state::OCI_VERSION
    )
});

/// The runtime's command line.
#[derive(Debug, Parser)]
#[command(
    name = "forkvm-runtime",
    about = "OCI runtime with runc's command line: every container is a forkvm microVM",
    version = VERSION,
    long_version = LONG_VERSION.as_str(),
)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: Global,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb takes (runc's global flags).
#[derive(Clone, Debug, Args)]
pub struct Global {
    /// Directory for the containers' state.
    #[arg(long, global = true, default_value = crate::state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// File the runtime logs to (default: stderr only).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// `text` or `json`.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    /// Log debug messages.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for compatibility; a VM has no host cgroup of its own to manage.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility.
    #[arg(long, global = true, default_missing_value = "true", num_args = 0..=1)]
    pub rootless: Option<String>,
    /// Accepted for compatibility (checkpointing is not supported).
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container (its VM boots; the process waits for `start`).
    Create(CreateArgs),
    /// Start the process of a created container.
    Start(IdArg),
    /// Print a container's state as JSON.
    State(IdArg),
    /// Send a signal to a container's process.
    Kill(KillArgs),
    /// Delete a container and what it left behind.
    Delete(DeleteArgs),
    /// Run another process in a running container.
    Exec(ExecArgs),
    /// List a container's host processes.
    Ps(PsArgs),
    /// Print what a container uses (`--stats`: CPU, memory and tasks of its cgroup in
    /// the guest, as runc's JSON).
    Events(EventsArgs),
    /// List containers.
    List(ListArgs),
    /// Pause a container's VM.
    Pause(IdArg),
    /// Resume a paused container's VM.
    Resume(IdArg),
    /// Print what this runtime supports (JSON).
    Features,
    /// Fork a running container into new containers (`<id>-fork-<n>`).
    Fork(ForkArgs),
    /// Boot a pod VM and save it as a pod template in DIR: Kubernetes pods whose
    /// sandbox is created with `--pod-template DIR` start by fork (docs/kubernetes.md).
    PodTemplate(PodTemplateArgs),
    /// The container's monitor process (started by `create`).
    #[command(name = "__monitor", hide = true)]
    Monitor(MonitorArgs),
    /// The monitor of a pod's container in its sandbox's VM (started by `create`).
    #[command(name = "__member", hide = true)]
    Member(MonitorArgs),
}

/// `pod-template`.
#[derive(Debug, Args)]
pub struct PodTemplateArgs {
    /// vCPUs of the pod VMs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Memory of the pod VMs, MiB.
    #[arg(long, default_value_t = crate::bundle::DEFAULT_MEM_MIB)]
    pub memory_mib: u64,
    /// The template directory (made if needed; a template there is replaced).
    pub dir: PathBuf,
}

/// `__monitor`: what `create` tells the monitor it starts.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// The container id.
    pub id: String,
    /// The read end of the pipe on which `create` says "go" once the host hooks have
    /// run (EOF without it: `create` gave up).
    #[arg(long)]
    pub go_fd: i32,
    /// The monitor's end of the socket pair to its container's holder, on which it hands
    /// the holder the exit code (a container with a holder: [`holder`]).
    #[arg(long)]
    pub holder_fd: Option<i32>,
}

/// `fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Number of new containers.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub count: u32,
    /// The running container to fork.
    pub id: String,
}

/// A container id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The container id.
    pub id: String,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(short, long)]
    pub bundle: Option<PathBuf>,
    /// Unix socket to send the pseudo-terminal's master to (terminal containers).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the container's process id to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra file descriptors to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// (forkvm) Fork a Kubernetes pod sandbox's VM from this pod template
    /// (`forkvm-runtime pod-template`) instead of booting one. Ignored for the pod's
    /// other containers (they are made in the sandbox's VM); refused for a container
    /// that is not a pod's.
    #[arg(long, value_name = "DIR")]
    pub pod_template: Option<PathBuf>,
    /// The container id.
    pub id: String,
}

/// `kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(short, long)]
    pub all: bool,
    /// The container id.
    pub id: String,
    /// The signal: a number or a name, with or without `SIG` (default SIGTERM).
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill the container first if it still runs.
    #[arg(short, long)]
    pub force: bool,
    /// The container id.
    pub id: String,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Unix socket to send the pseudo-terminal's master to.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables (`KEY=VALUE`).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// `UID[:GID]`.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional group ids.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// A JSON file with the process (a runtime spec `process` object).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Leave the process running and return at once.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the process id to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for compatibility (ignored: the VM is the boundary).
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted for compatibility (ignored: the VM is the boundary).
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for compatibility (ignored: the VM is the boundary).
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Extra file descriptors to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for compatibility.
    #[arg(long)]
    pub ignore_paused: bool,
    /// The container id.
    pub id: String,
    /// The command, when there is no `--process`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print the container's resource use once, then exit (the only mode: a stream of
    /// events is not offered).
    #[arg(long)]
    pub stats: bool,
    /// The interval of a stream of events (accepted; no stream is offered).
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// The container id.
    pub id: String,
}

/// `ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// The container id.
    pub id: String,
    /// `ps` options (accepted; the table lists the container's host processes).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `pod-template`: the template's VM and its TAP in a network namespace of this
/// thread's own, which goes with it.
fn pod_template(a: &PodTemplateArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    let dir = std::path::absolute(&a.dir)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare reads no memory; the new namespace is this thread's.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context(
                    "cannot make a network namespace for the template's VM (run as root)",
                );
            }
            let info = crate::pod_template::make(&dir, a.vcpus, a.memory_mib)?;
            println!(
                "saved a pod template ({} vCPU(s), {} MiB) to {}: {} MiB stored",
                a.vcpus,
                a.memory_mib,
                dir.display(),
                info.stored_bytes >> 20
            );
            Ok(0)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the template thread panicked")))
    })
}

/// Runs the command line; returns the process's exit code.
pub fn main() -> i32 {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|verb| verb == holder::HOLD_VERB)
    {
        let args: Vec<String> = std::env::args().skip(2).collect();
        holder::hold(&args);
    }
    let cli = Cli::parse();
    let log = Log::new(&cli.global);
    if let Err(e) = forkvm_config::load() {
        log.error(&e);
        eprintln!("forkvm-runtime: {e}");
        return 1;
    }
    let result = match cli.command {
        Command::Create(a) => create::create(&cli.global, &log, a).map(|()| 0),
        Command::Monitor(a) => return create::monitor(&cli.global, &log, &a),
        Command::Member(a) => return member::monitor(&cli.global, &log, &a),
        Command::Start(a) => ops::start(&cli.global, &a.id).map(|()| 0),
        Command::State(a) => ops::state(&cli.global, &a.id).map(|()| 0),
        Command::Kill(a) => ops::kill(&cli.global, &a).map(|()| 0),
        Command::Delete(a) => ops::delete(&cli.global, &log, &a).map(|()| 0),
        Command::Exec(a) => exec::exec(&cli.global, a),
        Command::Ps(a) => ops::ps(&cli.global, &a).map(|()| 0),
        Command::Events(a) => ops::events(&cli.global, &a).map(|()| 0),
        Command::List(a) => ops::list(&cli.global, &a).map(|()| 0),
        Command::Pause(a) => ops::pause(&cli.global, &a.id, true).map(|()| 0),
        Command::Resume(a) => ops::pause(&cli.global, &a.id, false).map(|()| 0),
        Command::Features => ops::features().map(|()| 0),
        Command::PodTemplate(a) => pod_template(&a),
        Command::Fork(a) => fork::fork_container(&cli.global.root, &a.id, a.count).and_then(|f| {
            println!("{}", serde_json::to_string_pretty(&f)?);
            Ok(0)
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            log.error(&msg);
            eprintln!("forkvm-runtime: {msg}");
            1
        }
    }
}
