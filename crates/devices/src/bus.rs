//! The contract between the VMM's port-I/O and MMIO buses and the devices on them.

/// A device that answers guest accesses to a range of port-I/O or MMIO addresses.
///
/// `offset` is relative to the start of the range the device was registered at. A read
/// must fill all of `data`; bytes a device does not implement read as zero.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
