//! Address buses: map guest port-I/O and MMIO accesses to the device that owns the range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use forkvm_devices::BusDevice;

/// A device as registered on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while registering a device on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a registered one or is empty.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps a registered device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

/// A set of non-overlapping address ranges, each owned by a device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let below = self.ranges.range(..end).next_back();
        if let Some((&b, &(l, _))) = below {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a guest read; returns false when no device owns `addr` (the data then
    /// reads as all ones, like an empty ISA bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock poisoned").read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock poisoned").write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owner_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[0x80]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert_eq!(dev.lock().unwrap().0, vec![(3, vec![0x80])]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf8, 0x9).is_err());
        assert!(bus.insert(d(), 0x110, 0).is_err());
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
