//! What the user asks for: the VM's size, kernel, command line and devices.

use std::path::PathBuf;

/// Default kernel command line: serial console, reboot through the i8042 reset line,
/// no PCI probe. (No i8042 options: the FADT says there is no PS/2 controller, and
/// forcing a probe costs a second-long timeout.)
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 pci=off";

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockSpec {
    /// Raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// A virtio-net card on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    /// TAP interface name.
    pub tap: String,
    /// MAC address; random locally administered when absent.
    pub mac: Option<[u8; 6]>,
}

/// The virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockSpec {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// Host Unix socket that stands for the guest's vsock ports.
    pub uds: PathBuf,
}

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
    pub disks: Vec<BlockSpec>,
    /// Network cards.
    pub nets: Vec<NetSpec>,
    /// The vsock device, if any.
    pub vsock: Option<VsockSpec>,
    /// Whether to add a virtio-rng device.
    pub rng: bool,
    /// Whether host stdin feeds the serial console (off when stdin belongs to something
    /// else, e.g. the container process of `forkvm run`).
    #[serde(default = "console_input_default")]
    pub console_input: bool,
}

fn console_input_default() -> bool {
    true
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
            console_input: true,
        }
    }
}
