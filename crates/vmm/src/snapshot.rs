//! What a VM's complete state is, and capturing it from a paused VM: every vCPU, the
//! VM-wide KVM state (PICs, IOAPIC, PIT, kvmclock), the UART, and every virtio device
//! with its transport. Plain data (serde), so one path serves fork and templates.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use forkvm_devices::legacy::SerialState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::VirtioSnapshot;
use crate::vcpu::VcpuState;
use crate::vm::VmArchState;

/// The complete state of a paused VM, guest memory aside.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// What the VM was built from.
    pub config: VmConfig,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// PICs, IOAPIC, PIT and kvmclock.
    pub arch: VmArchState,
    /// The console UART.
    pub serial: SerialState,
    /// Virtio devices in MMIO order.
    pub virtio: Vec<VirtioSnapshot>,
    /// Host wall-clock time of the capture, nanoseconds since the epoch.
    pub captured_realtime_ns: u64,
}

impl VmSnapshot {
    /// A snapshot of a VM configured as `config` with no vCPU, device or interrupt
    /// state: what tests of the paths around a restore need.
    #[cfg(test)]
    pub(crate) fn empty(config: VmConfig) -> Self {
        VmSnapshot {
            config,
            vcpus: Vec::new(),
            arch: crate::vm::VmArchState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: Default::default(),
            virtio: Vec::new(),
            captured_realtime_ns: 1,
        }
    }
}

/// Host wall-clock time in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl VmSnapshot {
    /// Nanoseconds since the capture: how far the restored guest's clock must move on.
    pub fn elapsed_ns(&self) -> u64 {
        realtime_ns().saturating_sub(self.captured_realtime_ns)
    }
}

/// Who a fork child is: its own vsock CID and socket, TAPs and MACs, and the fresh
/// randomness its guest agent reseeds the guest's entropy pool with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildIdentity {
    /// vsock CID.
    pub cid: Option<u64>,
    /// vsock host socket.
    pub vsock_uds: Option<PathBuf>,
    /// TAP per NIC.
    pub taps: Vec<String>,
    /// MAC per NIC.
    pub macs: Vec<[u8; 6]>,
    /// Guest hostname.
    pub hostname: String,
    /// 64 bytes from the host's CSPRNG for the guest's entropy pool.
    pub seed: Vec<u8>,
}
