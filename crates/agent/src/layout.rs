//! Where a container guest's root lives: the paths init mounts and power-off unmounts.

/// Where the container root is assembled.
pub const ROOTFS: &str = "/rootfs";
/// Read-only mount of the rootfs device.
pub const LOWER: &str = "/run/forkvm/lower";
/// tmpfs holding the overlay's upper and work directories.
pub const RW: &str = "/run/forkvm/rw";
/// Where the shares of the host files a container binds in are mounted, each at its
/// tag ([`crate::mounts`]): outside the container's root.
pub const FILE_SHARES: &str = "/run/forkvm/files";
/// Everything init mounts for the container lives under one of these.
pub const CONTAINER_MOUNTS: [&str; 2] = [ROOTFS, "/run/forkvm"];
