//! `forkvm template save VM DIR` (through the VM's API) and `forkvm template fork DIR`
//! (in this process: it opens the template, starts warm processes for the children
//! while it checks the memory, then starts the children in them).

use std::path::Path;

use anyhow::{Context, Result};
use forkvm_vmm::control::ForkRequest;
use forkvm_vmm::launch::ChildHomes;
use forkvm_vmm::template::{Template, TemplateKey};

use super::fork::{print_outcome, record_children};
use super::vm::{find, live};
use crate::cli::TemplateCommand;

/// What `template save` does with a VM it has no launch record of: without
/// `--trust-vm-config`, refuses (naming why and the flag); with it, warns.
fn unrecorded(root: &Path, id: &str, trust_vm_config: bool) -> Result<()> {
    let record = forkvm_vmm::template::launched::records_dir(root)
        .map(|d| d.join(format!("{id}.json")).display().to_string())
        .unwrap_or_else(|_| "beside the state root".into());
    let what = format!(
        "VM {id} has no launch record ({record}; e.g. a child of a fork asked for through \
         the API, a VM another program or an older forkvm started): only its VM process says \
         what it was launched with, and a VM process its guest took over could name any host \
         file as a disk or share of the template's children"
    );
    if !trust_vm_config {
        anyhow::bail!("{what}; save it with --trust-vm-config to take that configuration");
    }
    eprintln!("forkvm: warning: {what}; saved with it (--trust-vm-config)");
    Ok(())
}

/// Runs `forkvm template ...`.
pub fn run(cmd: TemplateCommand, root: &Path) -> Result<i32> {
    match cmd {
        TemplateCommand::Save {
            vm,
            dir,
            trust_vm_config,
        } => {
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("bad template directory {}", dir.display()))?;
            let home = find(root, &vm)?;
            // Refused at once when the VM does not run.
            live(&home)?;
            // The state the VM process saves must be of the VM its owner launched.
            let launched = forkvm_vmm::template::launched::launched(root, home.id())
                .with_context(|| format!("cannot read the launch record of VM {}", home.id()))?;
            if launched.is_none() {
                unrecorded(root, home.id(), trust_vm_config)?;
            }
            let info = forkvm_vmm::template::save_running(&home, &dir, launched.as_ref())
                .with_context(|| format!("cannot save VM {} as a template", home.id()))?;
            println!(
                "saved {} to {}: {} MiB of memory ({} MiB stored), paused {:.1} ms",
                home.id(),
                dir.display(),
                info.memory_bytes >> 20,
                info.stored_bytes >> 20,
                info.pause_us as f64 / 1000.0
            );
            Ok(0)
        }
        TemplateCommand::Fork { dir, count, json } => {
            // This process forks: it holds a launch socket and a pidfd per warm child
            // until each reports (two descriptors per child of a fork of up to 1024).
            if let Err(e) = forkvm_jail::limits::raise_open_files() {
                tracing::warn!("cannot raise the open file limit: {e}");
            }
            // The children of this fork are one VM family, in a pid namespace of their
            // own whose init outlives this process (before the pool's threads start, and
            // before the host's template key is read: the init keeps a copy of this
            // process's memory).
            // Their uid and cgroup are the family's own, where this process may give them
            // (a uid unless the template shares directories: its file server passes for
            // any user, and a uid would bound nothing).
            let mut family = None;
            if forkvm_jail::enabled() {
                let allotted = forkvm_jail::uid::can_allot()
                    .then(|| forkvm_vmm::launch::new_family(root))
                    .flatten();
                let ending = match &allotted {
                    Some(f) => forkvm_jail::family::Ending::of(f),
                    None => forkvm_jail::family::Ending::none(),
                };
                // The family's init holds its lock once made; this process's copy goes.
                match forkvm_jail::family::start_here(ending) {
                    Ok(true) => family = allotted.map(|f| f.spec.clone()),
                    Ok(false) => {
                        if let Some(f) = &allotted {
                            forkvm_jail::uid::remove_group(&f.spec);
                        }
                        tracing::info!(
                            "the children stay in this pid namespace: making one needs \
                             CAP_SYS_ADMIN"
                        )
                    }
                    Err(e) => return Err(e).context("cannot make the children's pid namespace"),
                }
            }
            let unusable = || format!("cannot use the template in {}", dir.display());
            let key = TemplateKey::host().with_context(unusable)?;
            let opened = Template::open(&dir, &key).with_context(unusable)?;
            if let Some(mut f) = family {
                if !opened.config().shares.is_empty() {
                    f.uid = None;
                } else if let Err(e) = forkvm_jail::uid::prepare_state_root(root) {
                    tracing::warn!("the children run as uid 0: {e}");
                    f.uid = None;
                }
                forkvm_jail::set_family(f);
            }
            // Children register under this root, with no parent VM.
            let homes = ChildHomes {
                root: std::path::absolute(root)?,
                parent: None,
            };
            // Warm processes for the children start while the memory is checked; the
            // ones not used go with the pool when this command ends.
            let pool = opened.warm_pool(&homes, count);
            let template = opened.verify(&key).with_context(unusable)?;
            let launch = template.config().clone();
            let req = ForkRequest {
                count,
                ..ForkRequest::default()
            };
            let out = template
                .fork(&req, &homes, pool.as_ref())
                .with_context(|| format!("cannot fork the template in {}", dir.display()))?;
            // Their launch is the template's authenticated configuration.
            record_children(root, None, &out, &launch);
            print_outcome(&dir.display().to_string(), &out, json)?;
            Ok(0)
        }
    }
}
