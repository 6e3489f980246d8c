//! What the user asks for: the VM's size, kernel, command line and devices. Each
//! device's configuration is the device's own type, re-exported here.

use std::path::PathBuf;

pub use forkvm_devices::virtio::block::BlockConfig;
pub use forkvm_devices::virtio::fs::FsConfig;
pub use forkvm_devices::virtio::net::{format_mac, parse_mac, random_mac, GuestIp, NetConfig};
pub use forkvm_devices::virtio::vsock::VsockConfig;

/// Default kernel command line: serial console, reboot through the i8042 reset line,
/// no PCI probe, no crypto self-tests. (No i8042 options: the FADT says there is no
/// PS/2 controller, and forcing a probe costs a second-long timeout.)
///
/// `cryptomgr.notests`: at every boot the kernel checks each cipher and hash it
/// registers against known answers, 0.5 s of a 4 s boot to init in the virtual test
/// host (1 vCPU; `crypto_algapi_init` and the KDF and HMAC tests it pulls in were the
/// longest initcalls). Those tests find a miscompiled or broken implementation, not a
/// hostile one, and the kernel is the same for every boot; a guest booted with `fips=1`
/// runs them all the same.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests";

/// A VM to boot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs (1..=254).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (devices are announced through ACPI). Arguments after
    /// ` -- ` go to init.
    pub cmdline: String,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<BlockConfig>,
    /// Network cards.
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Whether to add a virtio-rng device.
    pub rng: bool,
    /// Host directories shared with the guest, one virtio-fs device each (after the
    /// others in MMIO order). A VM with shares forks (its children serve the same
    /// directories, or, for a share whose guest holds only its root, the one the fork
    /// gives them) and is saved as a template only while its guest holds nothing of a
    /// share but its root.
    #[serde(default)]
    pub shares: Vec<FsConfig>,
    /// Whether host stdin feeds the serial console (off when stdin belongs to something
    /// else, e.g. the container process of `forkvm run`).
    #[serde(default = "console_input_default")]
    pub console_input: bool,
    /// Warm fork children to keep ([`crate::pool`]): filled when a booted VM runs, or
    /// when a fork child first forks; 0 keeps none.
    #[serde(default)]
    pub fork_pool: u32,
}

fn console_input_default() -> bool {
    true
}

/// Checks a guest hostname: 1 to 64 letters, digits, `-` and `.` (what the kernel
/// command line and the agent take as they are); the error names the rule.
pub fn check_hostname(hostname: &str) -> Result<(), String> {
    if hostname.is_empty()
        || hostname.len() > 64
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "hostname {hostname:?}: use 1 to 64 letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

impl VmConfig {
    /// A VM with `kernel`, one vCPU, 256 MiB, the default command line and an rng.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: true,
            shares: Vec::new(),
            console_input: true,
            fork_pool: 0,
        }
    }
}
