//! Pod templates: a booted pod VM saved as a forkvm template, from which a Kubernetes
//! pod's sandbox starts by fork instead of booting (`forkvm-runtime create
//! --pod-template DIR`, which the shim passes for a runtime handler whose options name
//! a template: docs/kubernetes.md).
//!
//! [`make`] boots the container guest with no root of its own (the agent serves from
//! its initramfs), the pod share ([`crate::pod::POD_SHARE_TAG`]) over an empty
//! directory that the guest never mounts (its agent mounts a share when a container
//! first needs it), [`TEMPLATE_NICS`] NIC on a TAP in a network namespace of its own,
//! vsock and rng; waits until its agent answers; and saves it
//! ([`forkvm_vmm::template::save_running`]). A share whose guest holds nothing but its
//! root is saved without a host descriptor, and a child serves the directory its fork
//! gives it (`forkvm_devices::virtio::fs`).
//!
//! A sandbox forked from it ([`child_spec`]) takes the pod's identity as a fork child
//! does: its NIC on the TAP tied to the pod's interface with that interface's MAC, the
//! pod's hostname, fresh entropy and CID, its pod directory as the share. Its
//! container (the pause process) is then made inside the VM as the pod's other
//! containers are, its root bound into the pod directory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use forkvm_jail::JailSpec;
use forkvm_registry::{ProcessIdentity, VmHome};
use forkvm_vmm::control::{ChildShare, ChildSpec, TemplateInfo};
use forkvm_vmm::launch::{ConsoleSpec, ProcessOptions};
use forkvm_vmm::{FsConfig, NetConfig, VmConfig};

use crate::pod::POD_SHARE_TAG;
use crate::vm;

/// The NICs of a pod template's VM: a pod has one interface from its CNI plugin.
pub const TEMPLATE_NICS: usize = 1;

/// The TAPs of the template VM's NICs (with their index), in the template maker's
/// network namespace.
const TEMPLATE_TAP: &str = "forkvm-tpl";

/// The hostname the template's guest boots with (each pod's sandbox sets its own).
const TEMPLATE_HOSTNAME: &str = "forkvm-pod";

/// Why a template cannot serve as a pod template.
#[derive(Debug, thiserror::Error)]
pub enum PodTemplateError {
    /// It has no pod share.
    #[error("the template's VM has no pod share (tag {POD_SHARE_TAG:?}): it is not a pod template (make one with `forkvm-runtime pod-template`)")]
    NoPodShare,
    /// It has no vsock, so no agent to reach.
    #[error("the template's VM has no vsock device: its agent cannot be reached")]
    NoVsock,
    /// Its guest has a root filesystem of its own.
    #[error("the template's VM has a root filesystem of its own; a pod template's containers bring theirs")]
    OwnRoot,
    /// The pod's network has another number of interfaces than the template has NICs.
    #[error("the pod's network namespace has {interfaces} interface(s); the pod template's VM has {nics} NIC(s)")]
    Nics {
        /// Interfaces of the pod's namespace.
        interfaces: usize,
        /// NICs of the template's VM.
        nics: usize,
    },
}

/// Checks that the VM saved as `cfg` is a pod template.
pub fn check_template(cfg: &VmConfig) -> Result<(), PodTemplateError> {
    if !cfg.shares.iter().any(|s| s.tag == POD_SHARE_TAG) {
        return Err(PodTemplateError::NoPodShare);
    }
    if cfg.vsock.is_none() {
        return Err(PodTemplateError::NoVsock);
    }
    if cfg
        .cmdline
        .split_whitespace()
        .any(|w| w.starts_with("forkvm.rootfs="))
    {
        return Err(PodTemplateError::OwnRoot);
    }
    Ok(())
}

/// The fork child a pod's sandbox is, for the template saved as `cfg`: its vsock
/// socket `uds`, its NICs on the TAPs tied to the pod's `network` with their MACs, its
/// `hostname`, and its pod directory `pod` as the pod share.
pub fn child_spec(
    cfg: &VmConfig,
    network: &forkvm_net::Network,
    uds: &Path,
    hostname: &str,
    pod: &Path,
) -> Result<ChildSpec, PodTemplateError> {
    check_template(cfg)?;
    if network.interfaces.len() != cfg.nets.len() {
        return Err(PodTemplateError::Nics {
            interfaces: network.interfaces.len(),
            nics: cfg.nets.len(),
        });
    }
    Ok(ChildSpec {
        vsock_uds: Some(uds.to_owned()),
        taps: network.interfaces.iter().map(|i| i.tap.clone()).collect(),
        macs: network
            .interfaces
            .iter()
            .map(|i| forkvm_vmm::config::format_mac(&i.mac))
            .collect(),
        hostname: Some(hostname.to_owned()),
        shares: vec![ChildShare {
            tag: POD_SHARE_TAG.to_owned(),
            host_path: pod.to_owned(),
        }],
        ..ChildSpec::default()
    })
}

/// A checked copy of the memory of the pod template in `template` whose authenticated
/// state names the memory MAC `memory_mac`, taken from the monitor of another running
/// sandbox of this runtime forked from it (`pidfd_getfd`), if there is one: the pods
/// of a template then share its memory (and its check), as fork children do. Its
/// content is not checked again: it is trusted because it comes from one of this
/// runtime's own monitors (root's, found in the runtime's state directory, which only
/// root writes, with the start time of its pid checked before and after), which
/// checked it or took it from another such monitor, and recorded the MAC it was
/// checked against. The copy must be the sealed memory file such a monitor keeps
/// ([`forkvm_vmm::template::Unverified::with_checked_copy`] checks the seals and
/// size). `None` when no such monitor runs or its copy cannot be taken.
pub fn checked_copy(
    store: &crate::state::StateStore,
    template: &Path,
    memory_mac: &[u8; 32],
    own: &str,
) -> Option<std::fs::File> {
    // Other monitors are named by host pids, which `pidfd_open` reads in this
    // process's pid namespace: only the host's will do.
    if forkvm_registry::ProcessIdentity::in_child_pid_namespace() {
        return None;
    }
    let states = store.list().ok()?;
    states
        .iter()
        .filter(|s| s.id != own && s.pod_template.as_deref() == Some(template))
        .filter_map(|s| Some((s, s.template_copy.as_ref()?)))
        .filter(|(s, c)| c.memory_mac == *memory_mac && s.pid_start_time.is_some())
        // That monitor still (its pid's start time), before anything is taken from it.
        .filter(|(s, _)| s.monitor_alive())
        .find_map(|(s, c)| {
            let copy = take_fd(s.monitor_pid.or(s.pid)?, c.fd)
                .inspect_err(|e| {
                    tracing::debug!(sandbox = s.id, "cannot take its template copy: {e}")
                })
                .ok()?;
            // Still that monitor (not a process that took its pid since) and still its copy.
            (s.monitor_alive() && is_template_copy(&copy)).then_some(copy)
        })
}

/// Duplicates descriptor `fd` of process `pid` into this one.
fn take_fd(pid: i32, fd: i32) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let pid = u32::try_from(pid).map_err(|_| std::io::Error::other("a negative pid"))?;
    let pidfd = forkvm_vmm::reap::pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes no pointers; the result is checked.
    let got = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns (pidfd_getfd sets close-on-exec).
    Ok(unsafe { std::fs::File::from_raw_fd(got as i32) })
}

/// Whether `file` is a checked template memory copy (the memory file
/// `forkvm_vmm::template` makes for one).
fn is_template_copy(file: &std::fs::File) -> bool {
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
    // The link reads `/memfd:NAME (deleted)`.
    std::fs::read_link(link).is_ok_and(|t| {
        t.to_str()
            .is_some_and(|t| t.starts_with("/memfd:forkvm-template-memory "))
    })
}

/// Boots a pod VM of `vcpus` vCPUs and `mem_mib` MiB and saves it as a pod template in
/// `dir`. Call it on a thread of its own in a network namespace of its own: the
/// template VM's TAP is made there (the VM process inherits it).
pub fn make(dir: &Path, vcpus: u8, mem_mib: u64) -> Result<TemplateInfo> {
    let guest = vm::container_guest()?;
    let vm_root = std::path::absolute(forkvm_registry::default_root())?;
    let home = VmHome::create(&vm_root, None, None).context("cannot register the template's VM")?;
    home.record_process(ProcessIdentity::current())?;
    let result = (|| {
        // The share the pods' directories take: empty, never mounted by the guest.
        let share = std::path::absolute(home.dir())?.join("pod");
        std::fs::create_dir(&share).with_context(|| format!("cannot make {}", share.display()))?;
        let uds = std::path::absolute(home.dir())?.join(vm::VSOCK_SOCKET);
        let mut cfg = vm::config(
            &guest,
            &vm::Root::None,
            vcpus,
            mem_mib,
            TEMPLATE_HOSTNAME,
            &uds,
        )?;
        cfg.shares.push(FsConfig {
            tag: POD_SHARE_TAG.to_owned(),
            host_path: share,
            read_only: false,
        });
        cfg.nets = (0..TEMPLATE_NICS)
            .map(|i| NetConfig {
                tap: format!("{TEMPLATE_TAP}{i}"),
                mac: None,
                bridge: None,
                guest_ip: None,
            })
            .collect();
        home.record_machine(cfg.vcpus, cfg.mem_mib)?;
        let mut process = vm::start(
            &home,
            &cfg,
            JailSpec {
                container: true,
                ..JailSpec::default()
            },
            ConsoleSpec::Log,
            ProcessOptions::owned(),
        )?;
        let saved = (|| {
            let deadline = Instant::now() + vm::AGENT_DEADLINE;
            forkvm_agent_proto::client::wait_for_agent(&uds, deadline)
                .context("the template VM's agent did not answer")?;
            forkvm_vmm::template::save_running(&home, dir, Some(&cfg))
                .context("cannot save the pod VM as a template")
        })();
        let _ = forkvm_api::Client::new(home.socket_path())
            .with_timeout(Duration::from_secs(5))
            .shutdown();
        process.kill_and_reap();
        saved.map_err(|e| {
            e.context(format!(
                "its console:\n{}",
                forkvm_registry::tail(&home.console_path(), 20)
            ))
        })
    })();
    let _ = home.remove();
    result
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A pod template's VM as [`make`] configures it.
    fn template() -> VmConfig {
        let guest = forkvm_guest_kernel::GuestImage {
            kernel: "/cache/vmlinux".into(),
            bzimage: "/cache/vmlinuz".into(),
            initrd: "/cache/initrd".into(),
        };
        let mut cfg = vm::config(
            &guest,
            &vm::Root::None,
            1,
            512,
            TEMPLATE_HOSTNAME,
            Path::new("/run/vms/t/vsock.sock"),
        )
        .unwrap();
        cfg.shares.push(FsConfig {
            tag: POD_SHARE_TAG.into(),
            host_path: "/run/vms/t/pod".into(),
            read_only: false,
        });
        cfg.nets = vec![NetConfig {
            tap: "forkvm-tpl0".into(),
            mac: None,
            bridge: None,
            guest_ip: None,
        }];
        cfg
    }

    fn network(interfaces: usize) -> forkvm_net::Network {
        forkvm_net::Network {
            interfaces: (0..interfaces)
                .map(|i| forkvm_net::Interface {
                    name: format!("eth{i}"),
                    index: 2 + i as u32,
                    mac: [0x0a, 0x58, 10, 88, 77, 5 + i as u8],
                    mtu: 1500,
                    addresses: Vec::new(),
                    tap: format!("tap{i}"),
                })
                .collect(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_sandbox_forks_with_the_pods_nics_hostname_and_directory() {
        let cfg = template();
        assert!(!cfg.cmdline.contains("forkvm.rootfs"), "{}", cfg.cmdline);
        let pod = Path::new("/run/forkvm/@pods/sb");
        let spec = child_spec(
            &cfg,
            &network(1),
            Path::new("/run/vms/p/vsock.sock"),
            "web",
            pod,
        )
        .unwrap();
        assert_eq!(spec.taps, ["tap0"]);
        assert_eq!(spec.macs, ["0a:58:0a:58:4d:05"]);
        assert_eq!(spec.hostname.as_deref(), Some("web"));
        assert_eq!(spec.vsock_uds, Some(PathBuf::from("/run/vms/p/vsock.sock")));
        assert_eq!(spec.shares.len(), 1);
        assert_eq!(
            (
                spec.shares[0].tag.as_str(),
                spec.shares[0].host_path.as_path()
            ),
            (POD_SHARE_TAG, pod)
        );
    }

    #[test]
    fn the_next_pod_takes_the_checked_copy_a_running_sandboxs_monitor_holds() {
        use std::os::fd::AsRawFd;
        let root = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(root.path()).unwrap();
        let template = Path::new("/var/lib/forkvm/pod-template");
        // A memory file as a checked template copy is (this process stands for the
        // running sandbox's monitor).
        let copy =
            rustix::fs::memfd_create("forkvm-template-memory", rustix::fs::MemfdFlags::CLOEXEC)
                .map(std::fs::File::from)
                .unwrap();
        let mac = [7u8; 32];
        let mut sb = crate::state::ContainerState::new("sb1", "/b");
        sb.record_pid(std::process::id() as i32).unwrap();
        sb.pod_template = Some(template.to_owned());
        sb.template_copy = Some(crate::state::TemplateCopy {
            fd: copy.as_raw_fd(),
            memory_mac: mac,
        });
        store.create(&sb).unwrap();
        let got = checked_copy(&store, template, &mac, "sb2").expect("the copy");
        let ino = |f: &std::fs::File| std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        assert_eq!(ino(&got), ino(&copy), "the same memory file");
        // Not for another template's version, another template, or the sandbox itself.
        assert!(checked_copy(&store, template, &[8u8; 32], "sb2").is_none());
        assert!(checked_copy(&store, Path::new("/other"), &mac, "sb2").is_none());
        assert!(checked_copy(&store, template, &mac, "sb1").is_none());
        // A monitor whose pid's start time is not known: not trusted.
        store
            .update("sb1", |s| {
                s.pid_start_time = None;
                Ok(())
            })
            .unwrap();
        assert!(checked_copy(&store, template, &mac, "sb2").is_none());
        store
            .update("sb1", |s| s.record_pid(std::process::id() as i32))
            .unwrap();
        assert!(checked_copy(&store, template, &mac, "sb2").is_some());
        // A descriptor that is no template copy (the monitor's fd number reused).
        let other = tempfile::tempfile().unwrap();
        store
            .update("sb1", |s| {
                s.template_copy.as_mut().unwrap().fd = other.as_raw_fd();
                Ok(())
            })
            .unwrap();
        assert!(checked_copy(&store, template, &mac, "sb2").is_none());
    }

    #[test]
    fn what_is_not_a_pod_template_or_does_not_fit_the_pod_is_named() {
        let refused = |cfg: &VmConfig, interfaces| {
            child_spec(
                cfg,
                &network(interfaces),
                Path::new("/u"),
                "h",
                Path::new("/p"),
            )
            .unwrap_err()
            .to_string()
        };
        let e = refused(&template(), 2);
        assert!(
            e.contains("has 2 interface(s); the pod template's VM has 1 NIC(s)"),
            "{e}"
        );
        let mut no_share = template();
        no_share.shares.clear();
        assert!(refused(&no_share, 1).contains("no pod share"));
        let mut no_vsock = template();
        no_vsock.vsock = None;
        assert!(refused(&no_vsock, 1).contains("no vsock device"));
        let mut rooted = template();
        rooted.cmdline.push_str(" forkvm.rootfs=/dev/vda");
        assert!(refused(&rooted, 1).contains("root filesystem of its own"));
    }
}
