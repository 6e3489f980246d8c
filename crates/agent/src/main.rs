//! `forkvm-agent`: listens on vsock port 1024 inside the guest and serves the host's
//! requests (see the library's protocol). Started by the guest's init; it binds, then
//! detaches, so init continues only once the agent can be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use forkvm_agent::protocol::{parse_request, to_line, MAX_LINE};
use forkvm_agent::{Request, Response, AGENT_PORT, PROTOCOL_VERSION};

const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Adds `seed` to the kernel's input pool, credited as entropy, and reseeds the CRNG.
fn reseed(seed: &[u8]) -> Result<(), String> {
    if seed.len() < 32 {
        return Err(format!(
            "seed of {} bytes is too short (need 32)",
            seed.len()
        ));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its header;
    // `info` holds exactly that.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(last_err("RNDADDENTROPY"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } < 0 {
        return Err(last_err("RNDRESEEDCRNG"));
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: sethostname reads `len` bytes from the pointer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        return Err(last_err("sethostname"));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not a MAC"))?;
    parts.try_into().map_err(|_| format!("{s:?} is not a MAC"))
}

/// Sets the MAC of `ifname` (down, set, up: virtio-net without a control queue only
/// takes a new address while down).
fn set_mac(ifname: &str, mac: [u8; 6]) -> Result<(), String> {
    // SAFETY: a plain datagram socket for interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(last_err("socket"));
    }
    // SAFETY: `s` is a new descriptor we own.
    let _guard = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_ifru.ifru_flags of a valid ifreq.
    if unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut ifr) } < 0 {
        return Err(last_err(&format!("{ifname}: SIOCGIFFLAGS")));
    }
    // SAFETY: the union member set by SIOCGIFFLAGS.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up = flags & libc::IFF_UP as libc::c_short != 0;
    let set_flags = |ifr: &mut libc::ifreq, f: libc::c_short| -> Result<(), String> {
        ifr.ifr_ifru.ifru_flags = f;
        // SAFETY: SIOCSIFFLAGS reads the flags of a valid ifreq.
        if unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS as _, &*ifr) } < 0 {
            return Err(last_err(&format!("{ifname}: SIOCSIFFLAGS")));
        }
        Ok(())
    };
    if up {
        set_flags(&mut ifr, flags & !(libc::IFF_UP as libc::c_short))?;
    }
    // SAFETY: writing the hardware-address member of the union.
    unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads the hardware address of a valid ifreq.
    if unsafe { libc::ioctl(s, libc::SIOCSIFHWADDR as _, &ifr) } < 0 {
        return Err(last_err(&format!("{ifname}: SIOCSIFHWADDR")));
    }
    if up {
        set_flags(&mut ifr, flags)?;
    }
    Ok(())
}

fn handle(req: Request) -> Response {
    match req {
        Request::Ping => Response::Pong {
            version: PROTOCOL_VERSION,
            hostname: hostname(),
        },
        Request::Identity {
            hostname,
            seed,
            macs,
        } => {
            let result = reseed(&seed)
                .and_then(|()| set_hostname(&hostname))
                .and_then(|()| {
                    macs.iter()
                        .enumerate()
                        .try_for_each(|(i, m)| set_mac(&format!("eth{i}"), parse_mac(m)?))
                });
            match result {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            }
        }
    }
}

fn serve(conn: UnixStream) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = match parse_request(&line) {
            Ok(req) => handle(req),
            Err(message) => Response::Error { message },
        };
        if (&conn).write_all(to_line(&resp).as_bytes()).is_err() {
            return;
        }
    }
}

use std::io::Read;

fn listen(port: u32) -> Result<OwnedFd, String> {
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_err("vsock socket"));
    }
    // SAFETY: `fd` is a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the size we pass.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(last_err(&format!("bind vsock port {port}")));
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd, 64) } < 0 {
        return Err(last_err("listen"));
    }
    Ok(sock)
}

fn main() {
    let sock = match listen(AGENT_PORT) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("forkvm-agent: {e}");
            std::process::exit(1);
        }
    };
    // Detach once reachable: the parent returns to init, the child serves.
    // SAFETY: single-threaded here; the child only continues this program.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("{}", last_err("forkvm-agent: fork"));
            std::process::exit(1);
        }
        0 => {}
        _ => std::process::exit(0),
    }
    let listener = std::os::fd::AsRawFd::as_raw_fd(&sock);
    loop {
        // SAFETY: accept on our listening socket; null address pointers are allowed.
        let c = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: accept4 returned a new connected stream socket we own; a vsock stream
        // behaves like any stream socket for reads and writes.
        let conn = unsafe { UnixStream::from_raw_fd(c) };
        std::thread::spawn(move || serve(conn));
    }
}
