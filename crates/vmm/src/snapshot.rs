//! What a VM's complete state is, and capturing it from a paused VM: every vCPU, the
//! VM-wide KVM state (PICs, IOAPIC, PIT, kvmclock), the UARTs, and every virtio device
//! with its transport. Plain data (serde), so one path serves fork and templates.

use std::fs::File;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use forkvm_devices::legacy::SerialState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::{DeviceState, VirtioSnapshot};
use crate::identity_port::IdentityPortState;
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
    /// The identity port (COM2) and whether the guest's agent reads it.
    pub identity_port: IdentityPortState,
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
            identity_port: Default::default(),
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
    /// Takes out the host descriptors the devices' states hold (the files a share's
    /// guest has open), in MMIO order: they travel beside the encoded snapshot.
    pub fn take_host_files(&self) -> Vec<File> {
        self.virtio
            .iter()
            .flat_map(|v| match &v.device {
                DeviceState::Fs(fs) => fs.files.take(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Gives the devices' states back the host descriptors [`take_host_files`] took out
    /// (as many as each state's table needs, in MMIO order); all of them must be used.
    ///
    /// [`take_host_files`]: VmSnapshot::take_host_files
    pub fn give_host_files(&self, files: Vec<File>) -> Result<(), String> {
        let needed: usize = self
            .virtio
            .iter()
            .map(|v| match &v.device {
                DeviceState::Fs(fs) => fs.files_needed(),
                _ => 0,
            })
            .sum();
        if files.len() != needed {
            return Err(format!(
                "{} host descriptors came for devices that hold {needed}",
                files.len()
            ));
        }
        let mut files = files.into_iter();
        for v in &self.virtio {
            if let DeviceState::Fs(fs) = &v.device {
                fs.files
                    .put(files.by_ref().take(fs.files_needed()).collect());
            }
        }
        Ok(())
    }

    /// The saved state of the share tagged `tag`: the devices are in the registry's
    /// order, the shares last and in the configuration's order.
    pub fn share_state(&self, tag: &str) -> Option<&forkvm_devices::virtio::fs::FsState> {
        let k = self.config.shares.iter().position(|s| s.tag == tag)?;
        self.virtio
            .iter()
            .filter_map(|v| match &v.device {
                DeviceState::Fs(fs) => Some(fs),
                _ => None,
            })
            .nth(k)
    }

    /// Marks every share to be served from its configured directory again, with no
    /// descriptor ([`forkvm_devices::virtio::fs::FsState::reopen`]): a template's, whose
    /// shares hold only their root (the save refused others).
    pub(crate) fn reopen_shares(&mut self) {
        for v in &mut self.virtio {
            if let DeviceState::Fs(fs) = &mut v.device {
                fs.reopen = true;
            }
        }
    }

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
    /// Shares given another host directory than the parent's: (tag, directory).
    #[serde(default)]
    pub shares: Vec<(String, PathBuf)>,
}

#[cfg(test)]
mod tests {
    use forkvm_devices::virtio::fs::{FsState, HostFiles, SavedHandle, SavedInode, SavedTable};

    use super::*;

    /// A share's state whose table lists `inodes` inodes and `handles` handles.
    fn share(inodes: u64, handles: u64) -> VirtioSnapshot {
        let table = SavedTable {
            inodes: (1..=inodes)
                .map(|node| SavedInode {
                    node,
                    refcount: 1,
                    mode: 0,
                    ino: node,
                    dev: 0,
                    mnt: 0,
                })
                .collect(),
            handles: (1..=handles)
                .map(|handle| SavedHandle {
                    handle,
                    node: 1,
                    flags: 0,
                    status_flags: 0,
                })
                .collect(),
            ..Default::default()
        };
        let files = (0..inodes + handles)
            .map(|_| tempfile::tempfile().unwrap())
            .collect();
        VirtioSnapshot {
            device: DeviceState::Fs(FsState {
                table,
                files: HostFiles::new(files),
                ..Default::default()
            }),
            transport: Default::default(),
        }
    }

    fn held(snap: &VmSnapshot) -> Vec<usize> {
        snap.virtio
            .iter()
            .map(|v| match &v.device {
                DeviceState::Fs(fs) => {
                    let files = fs.files.take();
                    let n = files.len();
                    fs.files.put(files);
                    n
                }
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn host_files_travel_beside_the_snapshot_in_device_order() {
        let mut snap = VmSnapshot::empty(VmConfig::new("/nonexistent/kernel"));
        // The last is a template's (it holds only its root): it is served from its
        // directory again, and carries no descriptor.
        snap.virtio = vec![share(2, 1), share(2, 0), share(1, 0)];
        if let DeviceState::Fs(fs) = &mut snap.virtio[2].device {
            assert_eq!(fs.files.take().len(), 1, "the helper gave it one");
            fs.reopen = true;
        }
        let files = snap.take_host_files();
        assert_eq!(files.len(), 5);
        assert_eq!(held(&snap), [0, 0, 0], "taken out of the states");

        // Encoded and decoded as a fork's state, then given back.
        let blob = forkvm_snapshot::encode(&snap).unwrap();
        let back: VmSnapshot = forkvm_snapshot::decode(&blob).unwrap();
        assert_eq!(
            held(&back),
            [0, 0, 0],
            "descriptors never travel in the encoding"
        );
        let fewer: Vec<File> = files[1..].iter().map(|f| f.try_clone().unwrap()).collect();
        let e = back.give_host_files(fewer).unwrap_err();
        assert!(
            e.contains("4 host descriptors came for devices that hold 5"),
            "{e}"
        );
        assert_eq!(held(&back), [0, 0, 0], "nothing given on a mismatch");
        back.give_host_files(files).unwrap();
        assert_eq!(held(&back), [3, 2, 0]);
    }
}
