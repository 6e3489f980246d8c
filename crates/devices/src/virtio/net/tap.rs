//! Opening a TAP interface through `/dev/net/tun`, and attaching one to a bridge (the only
//! `unsafe` of the net device: the TUN and interface ioctls).

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
    tun_ioctl_value(
        file,
        libc::TUNSETPERSIST as _,
        libc::c_ulong::from(persistent),
    )
}

/// A TUN ioctl that takes its argument by value (`TUNSETPERSIST`, `TUNSETOFFLOAD`).
fn tun_ioctl_value(file: &File, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests used take their argument by value on an open TUN descriptor;
    // no memory is passed.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, value) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the TAP behind `file` which offloads its reader takes (`TUN_F_*`): with
/// `TUN_F_CSUM` and `TUN_F_TSO4/6` it hands over frames of up to 64 KiB with partial
/// checksums, described in the virtio-net header.
pub fn set_tap_offloads(file: &File, flags: libc::c_uint) -> io::Result<()> {
    tun_ioctl_value(file, libc::TUNSETOFFLOAD as _, libc::c_ulong::from(flags))
}

/// `SIOCBRADDIF` (`linux/sockios.h`; not in `libc`): adds the interface whose index is in
/// the `ifreq` to the bridge it names.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with an `int` in the union (an interface index, or flags).
#[repr(C)]
struct IfReqInt {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

impl IfReqInt {
    fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid interface name"),
            ));
        }
        let mut ifr = Self {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _pad: [0; 20],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(ifr)
    }
}

/// One interface ioctl on `sock`, with `ifr` read and written by the kernel.
fn if_ioctl(
    sock: &std::os::fd::OwnedFd,
    request: libc::c_ulong,
    ifr: &mut IfReqInt,
) -> io::Result<()> {
    // SAFETY: `ifr` is a live `struct ifreq` (name, an int in the union, padding to its
    // 40 bytes) for the whole call; the requests used here read and write only that.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, ifr as *mut IfReqInt) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches the interface `tap` to the bridge `bridge` and brings it up (both in this
/// thread's network namespace; takes `CAP_NET_ADMIN`). Attaching it again is not an error.
pub fn attach_to_bridge(tap: &str, bridge: &str) -> io::Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) takes no pointers; the descriptor it returns is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut ifr = IfReqInt::new(tap)?;
    if_ioctl(&sock, libc::SIOCGIFINDEX as _, &mut ifr)
        .map_err(context(format!("no interface {tap}")))?;
    let index = ifr.value;
    let mut br = IfReqInt::new(bridge)?;
    br.value = index;
    match if_ioctl(&sock, SIOCBRADDIF, &mut br) {
        // EBUSY: it is already a port of this (or another) bridge.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        r => r.map_err(context(format!(
            "cannot attach {tap} to the bridge {bridge}"
        )))?,
    }
    if_ioctl(&sock, libc::SIOCGIFFLAGS as _, &mut ifr).map_err(context(format!("{tap}: flags")))?;
    ifr.value |= libc::IFF_UP;
    if_ioctl(&sock, libc::SIOCSIFFLAGS as _, &mut ifr)
        .map_err(context(format!("cannot bring {tap} up")))?;
    Ok(())
}
