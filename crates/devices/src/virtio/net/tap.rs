//! Opening a TAP interface through `/dev/net/tun` (the only `unsafe` of the net device: the
//! two TUN ioctls).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_SIZE};

/// `struct ifreq` as `TUNSETIFF` reads and writes it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if needed, which takes `CAP_NET_ADMIN`) the TAP interface `name` as a
/// non-blocking fd whose frames carry a 12-byte `virtio_net_hdr_v1` (`IFF_VNET_HDR`, no
/// packet-info prefix). Returns the fd and the interface's name as the kernel reports it.
pub fn open_tap(name: &str) -> Result<(File, String), NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(NetError::InvalidTapName(name.to_owned()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;

    let mut ifr = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd and `ifr` is a live, properly laid out
    // `struct ifreq` (name, flags, padding to its 40 bytes) the kernel reads and writes.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
    if ret < 0 {
        return Err(NetError::SetIff {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }

    let hdr_size = VNET_HDR_SIZE as libc::c_int;
    // SAFETY: `file` is a TAP fd after TUNSETIFF; the kernel only reads the `c_int` behind
    // the pointer, which lives across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_size) };
    if ret < 0 {
        return Err(NetError::VnetHdrSize(io::Error::last_os_error()));
    }

    let len = ifr
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ifr.name.len());
    let actual = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
    tracing::debug!(tap = %actual, "TAP opened");
    Ok((file, actual))
}

/// Makes the TAP behind `file` persistent (it outlives its last descriptor, until it is
/// deleted) or not.
pub fn set_tap_persistent(file: &File, persistent: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST on an open TUN descriptor takes its argument by value; no
    // memory is passed.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST as _,
            libc::c_ulong::from(persistent),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
