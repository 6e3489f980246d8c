//! `forkvm-vmm`: the process every forkvm VM runs in, whoever started it (`forkvm boot`
//! and `run`, the OCI runtime's monitor, a VM that forks, `forkvm template fork`).
//!
//! It owns one VM from start to end: it receives its [`Launch`] on fd 3 (see
//! [`forkvm_vmm::launch`]), registers the VM (opens the home its launcher registered,
//! or publishes the one it staged while it waited warm), boots or restores it, serves
//! its API, reports to the launcher that it runs, runs it until it ends and records
//! how. The VMs it forks are started as this same executable. It links the VMM and
//! the VM registry and API, nothing else: no image store, OCI runtime or command-line
//! code.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use forkvm_jail::caps::Needs;
use forkvm_jail::Jail;
use forkvm_registry::{ConsoleLog, Ending, ExitRecord, VmHome};
use forkvm_vmm::fork::ChildPayload;
use forkvm_vmm::launch::{ChildHomes, ConsoleSpec, HomeSpec, Launch, LaunchError, Launched, Start};
use forkvm_vmm::steps::Steps;
use forkvm_vmm::warm::Prepared;
use forkvm_vmm::{ExitReason, Vmm, VmmError};

fn main() {
    if let Some(arg) = std::env::args().nth(1) {
        match arg.as_str() {
            "--version" | "-V" => {
                println!("forkvm-vmm {}", forkvm_version::VERSION);
                return;
            }
            _ => {
                eprintln!(
                    "forkvm-vmm: the process a forkvm VM runs in; it takes no arguments and is \
                     started by forkvm (boot, run, the OCI runtime, a fork), not by hand"
                );
                std::process::exit(2);
            }
        }
    }
    // Before anything opens a descriptor: the /dev/kvm its launcher passed, if any.
    forkvm_vmm::vm::adopt_passed_kvm();
    // Before any thread: one malloc arena (a fork child's threads held 64 KiB in arenas
    // of their own). Forked warm processes and their children inherit it.
    if let Err(e) = forkvm_jail::limits::one_malloc_arena() {
        eprintln!("forkvm-vmm: each thread keeps its own malloc arena: {e}");
    }
    forkvm_config::logging::init_stderr(None);
    // Its host pid, as its launcher's procfs names it (a VM family's processes have
    // other pids in their own namespace, `forkvm_jail::family`): what its home records
    // and its API reports.
    let _ = forkvm_registry::ProcessIdentity::current();
    // Before the jail: a fork of many children holds a socket per child until each
    // reports, and a shared directory a descriptor per file the guest looked up.
    if let Err(e) = forkvm_jail::limits::raise_open_files() {
        tracing::warn!("cannot raise the open file limit: {e}");
    }
    let launched = match Launched::receive() {
        Ok(l) => l,
        // A warm fork process whose VM went away before it was needed.
        Err(LaunchError::Abandoned) => std::process::exit(0),
        Err(e) => {
            eprintln!("forkvm-vmm: {}", forkvm_vmm::control::error_chain(&e));
            std::process::exit(2);
        }
    };
    if launched.fork.is_some() {
        if let Err(e) = forkvm_jail::limits::no_huge_pages() {
            tracing::warn!("this fork child may take huge pages: {e}");
        }
    }
    // In the foreground the launcher tells the user why the VM did not start or how
    // it ended (from the report and the exit record); elsewhere stderr is the log.
    let foreground = launched.launch.console == ConsoleSpec::LogAndStdout;
    match run(launched) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if !foreground {
                eprintln!("forkvm-vmm: {e:#}");
            }
            std::process::exit(1);
        }
    }
}

/// Sends this process's stderr (its own messages, a panic) to `file`.
fn redirect_stderr(file: &File) -> std::io::Result<()> {
    // SAFETY: dup2 onto fd 2 of a descriptor `file` keeps open for the call.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The console of a VM in the foreground: the terminal and the VM's console log.
struct Tee {
    out: std::io::Stdout,
    log: ConsoleLog,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.log.write_all(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Where the console goes; the process's own messages follow the console log unless
/// the VM is in the foreground.
fn console(
    home: &VmHome,
    spec: &ConsoleSpec,
    files: &mut Vec<File>,
) -> Result<Box<dyn Write + Send>> {
    let log = home.console_writer()?;
    if *spec != ConsoleSpec::LogAndStdout {
        redirect_stderr(&log).context("cannot log to the console file")?;
    }
    Ok(match spec {
        ConsoleSpec::Log => Box::new(ConsoleLog::new(log)),
        ConsoleSpec::LogAndStdout => Box::new(Tee {
            out: std::io::stdout(),
            log: ConsoleLog::new(log),
        }),
        // Opened by the launcher, sent last: appending, then for cutting.
        ConsoleSpec::File(path) => match (files.pop(), files.pop()) {
            (Some(cutter), Some(f)) => Box::new(ConsoleLog::with_cutter(
                f,
                Some(cutter),
                forkvm_registry::console::MAX_LOG,
                forkvm_registry::console::KEEP_LOG,
            )),
            _ => bail!(
                "the console file {} did not come with the launch",
                path.display()
            ),
        },
    })
}

/// Builds the VM: boots it (running) or restores it (paused); its children register
/// under `homes`.
fn start(
    launch: &Launch,
    fork: Option<&ChildPayload>,
    files: Vec<File>,
    prepared: Option<Prepared>,
    console: Box<dyn Write + Send>,
    homes: ChildHomes,
    steps: &mut Steps,
) -> Result<Vmm> {
    match (fork, &launch.start) {
        (Some(payload), _) => payload
            .restore(files, console, homes, prepared, steps)
            .context("cannot restore the forked VM"),
        (None, Start::Boot(cfg)) => {
            let mut vmm = Vmm::boot(cfg, console).context("cannot boot the VM")?;
            vmm.set_child_homes(homes);
            Ok(vmm)
        }
        (None, Start::Restore(_)) => bail!("a fork child without the fork's state"),
    }
}

/// Records the VM process's cgroup in its home (for `rm` to remove if the process is
/// killed before it can); a fork child's after its report, off the fork's latency.
fn record_cgroup(home: &VmHome, jail: Option<&Jail>) {
    let Some(group) = jail.and_then(Jail::cgroup) else {
        return;
    };
    let dir = group.dir().to_owned();
    if let Err(e) = home.update(|s| s.cgroup = Some(dir)) {
        tracing::warn!("cannot record the VM's cgroup: {e}");
    }
}

/// What a VM built from `cfg` still needs capabilities for once it runs: its fork
/// children make TAPs of their own; a shared directory's file server acts for the guest.
fn needs(cfg: &forkvm_vmm::VmConfig) -> Needs {
    Needs {
        network: !cfg.nets.is_empty(),
        files: !cfg.shares.is_empty(),
    }
}

/// How the VM ended, as its home records it; `stop_requested` tells a stop through the
/// API apart from a failure.
fn exit_record(exit: &Result<ExitReason, VmmError>, stop_requested: bool) -> ExitRecord {
    match exit {
        Ok(ExitReason::PowerOff) => ExitRecord::new(0, Ending::PowerOff),
        Ok(ExitReason::Reset) => ExitRecord::new(0, Ending::Reboot),
        Ok(ExitReason::Stopped) => ExitRecord::new(0, Ending::Stopped),
        Ok(ExitReason::Failed(_)) if stop_requested => ExitRecord::new(0, Ending::Stopped),
        Ok(ExitReason::Failed(why)) => ExitRecord::new(1, Ending::Failed(why.clone())),
        Err(e) => ExitRecord::new(1, Ending::Failed(forkvm_vmm::control::error_chain(e))),
    }
}

fn run(mut launched: Launched) -> Result<i32> {
    let mut files = std::mem::take(&mut launched.files);
    let warm = launched.prepared.is_some();
    let mut steps = Steps::new(launched.received);
    steps.add("queued", u128::from(launched.queued_us));
    let mut home = None;
    let mut jail = None;
    let started = (|| {
        let h = home.insert(launched.register().context("cannot register the VM")?);
        steps.mark("register");
        // The console first: a file it names may lie where the jail lets nothing be
        // written.
        let console = console(h, &launched.launch.console, &mut files)?;
        steps.mark("console");
        // Before the VM is built: everything the guest can reach runs jailed.
        jail = launched.enter_jail(h)?;
        steps.mark("jail");
        // Taken once the jail is entered: entering one other than the warm-up's ends
        // the vCPU threads it started.
        let prepared = launched.prepared.take();
        let launch = &launched.launch;
        let homes = ChildHomes {
            root: h.root().to_owned(),
            parent: Some(h.id().to_owned()),
        };
        let mut vmm = start(
            launch,
            launched.fork.as_ref(),
            files,
            prepared,
            console,
            homes,
            &mut steps,
        )?;
        if let Some(jail) = &jail {
            jail.set_up(needs(vmm.config()))
                .context("cannot drop the VM process's capabilities")?;
            steps.mark("capabilities");
        }
        // A restored VM was built paused: now it runs (with the fork's other children,
        // when they start together).
        if let Some(payload) = &launched.fork {
            if payload.starts_together() {
                launched
                    .wait_for_siblings()
                    .context("cannot start with the fork's other children")?;
                steps.mark("siblings");
            }
            vmm.release_vcpus()
                .context("cannot start the restored VM")?;
            steps.mark("resume");
        }
        Ok(vmm)
    })();
    let launch = &launched.launch;
    let mut vmm = match started {
        Ok(vmm) => vmm,
        Err(e) => {
            launched.report_failure(&format!("{e:#}"));
            match (&launch.home, home) {
                // A home this process made goes with it; the launcher's stays for the
                // launcher to read and remove.
                (HomeSpec::New(_), Some(h)) => {
                    let _ = h.remove();
                }
                (HomeSpec::Registered { .. }, Some(h)) => {
                    let _ = h.record_exit(ExitRecord::new(1, Ending::Failed(format!("{e:#}"))));
                }
                (_, None) => {}
            }
            return Err(e);
        }
    };
    let home = home.expect("registered before the VM started");
    let server = match &launched.fork {
        // A fork child reports as soon as its vCPUs run (the fork's latency), then serves.
        Some(payload) => {
            launched
                .report_running()
                .context("cannot report to the parent")?;
            steps.mark("report");
            if let Err(e) = vmm.confirm_resumed() {
                // Reported running already: its home says how it ended.
                let why = format!("a vCPU of the restored VM did not start: {e}");
                let _ = home.record_exit(ExitRecord::new(1, Ending::Failed(why.clone())));
                bail!(why);
            }
            tracing::info!(warm, "fork child running after {steps}");
            payload
                .apply_identity_in_background(&home, vmm.identity_port())
                .context("cannot start the identity thread")?;
            if let Err(e) = launched.date_published_home(&home) {
                tracing::warn!("cannot record when the VM was created: {e}");
            }
            record_cgroup(&home, jail.as_ref());
            forkvm_api::serve(home, vmm.control_handle()).context("cannot serve the VM's API")?
        }
        // A booted VM reports once its API answers, then fills its fork pool.
        None => {
            record_cgroup(&home, jail.as_ref());
            let server = forkvm_api::serve(home, vmm.control_handle())
                .context("cannot serve the VM's API")?;
            launched
                .report_running()
                .context("cannot report to the launcher")?;
            vmm.fill_fork_pool();
            server
        }
    };
    drop(launched);
    // What the start took and freed goes back: the stack its decoding and restore went
    // down to, then the heap's free chunks (the launch, a fork child's decoded state, the
    // stack's map).
    if let Err(e) = forkvm_jail::limits::release_main_stack_below_here() {
        tracing::debug!("the start's stack stays written: {e}");
    }
    forkvm_jail::limits::release_free_heap();
    let exit = vmm.run();
    let record = exit_record(&exit, server.stop_requested());
    server.finish(record);
    // Its fork pool's processes end with it (their sockets close), then its cgroup goes.
    drop(vmm);
    // The last thing it does: it leaves its cgroup and removes it.
    drop(jail);
    match exit.context("the VM failed while running")? {
        ExitReason::PowerOff => tracing::info!("guest powered off"),
        ExitReason::Reset => tracing::info!("guest rebooted; the VM is stopped"),
        ExitReason::Stopped => tracing::info!("stopped by request"),
        ExitReason::Failed(why) => bail!("the guest stopped abnormally: {why}"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_records() {
        let failed: Result<ExitReason, VmmError> = Ok(ExitReason::Failed("shutdown".into()));
        assert_eq!(exit_record(&failed, true).reason, Ending::Stopped);
        assert_eq!(exit_record(&failed, true).code, 0);
        assert_eq!(exit_record(&failed, false).code, 1);
        assert_eq!(
            exit_record(&failed, false).reason,
            Ending::Failed("shutdown".into())
        );
        assert_eq!(
            exit_record(&Ok(ExitReason::PowerOff), false).reason,
            Ending::PowerOff
        );
        assert_eq!(exit_record(&Ok(ExitReason::Reset), false).code, 0);
        assert_eq!(
            exit_record(&Ok(ExitReason::Stopped), false).reason,
            Ending::Stopped
        );
    }
}
