//! `forkvm __fork-child`: the process a fork child's VM runs in (internal verb). It
//! registers the child as a VM of its own (parent recorded) and serves its API, like
//! `forkvm boot` does for a booted VM.

use std::io::Write;

use anyhow::{bail, Context, Result};
use forkvm_api::{ProcessIdentity, VmHome};
use forkvm_vmm::fork::ReceivedChild;
use forkvm_vmm::ExitReason;

/// Restores the VM the parent sent on fd 3 and runs it; returns the exit code.
pub fn run() -> Result<i32> {
    let child = ReceivedChild::receive().context("cannot receive the fork")?;
    let registered = (|| -> Result<(VmHome, Box<dyn Write + Send>)> {
        let home = VmHome::create_fork_child(None).context("cannot register the fork child")?;
        home.record_process(ProcessIdentity::current())
            .context("cannot record the VMM process")?;
        let cfg = child.config();
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        // From here on this daemon's own messages go to its console log.
        let log = home.console_writer()?;
        forkvm_vmm::fork::redirect_stderr(&log).context("cannot log to the console file")?;
        let console: Box<dyn Write + Send> =
            match child.console_path() {
                Some(path) => Box::new(std::fs::File::create(path).with_context(|| {
                    format!("cannot create the console file {}", path.display())
                })?),
                None => Box::new(log),
            };
        Ok((home, console))
    })();
    let (home, console) = match registered {
        Ok(r) => r,
        Err(e) => {
            child.fail(&format!("{e:#}"));
            return Err(e);
        }
    };
    // Grandchildren record this VM as their parent (set before any thread starts).
    std::env::set_var(forkvm_api::ENV_ID, home.id());
    let mut vmm = child
        .start(console)
        .context("cannot restore the forked VM")?;
    let server =
        forkvm_api::serve(home, vmm.control_handle()).context("cannot serve the VM's API")?;
    let exit = vmm.run();
    server.finish_run(&exit);
    match exit.context("the forked VM failed while running")? {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(0),
        ExitReason::Failed(why) => bail!("the forked guest stopped abnormally: {why}"),
    }
}
