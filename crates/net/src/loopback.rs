//! A pod's loopback, as its network namespace on the host sees it: where a CRI
//! port-forward lands.
//!
//! containerd's `PortForward` (what `kubectl port-forward` reaches) dials
//! `localhost:PORT` from inside the pod's network namespace on the host, as it does for
//! runc, whose containers live in that namespace. A forkvm pod's containers live in its
//! VM, so nothing listens on that loopback. [`LoopbackRelay`] takes every TCP
//! connection to `127.0.0.1` in the namespace, whatever its port, and hands it to a
//! dialer (the guest agent's [`forkvm_agent_proto::forward`]), which reaches the same
//! port on the guest's loopback.
//!
//! One listening socket takes all the ports: an `sk_lookup` BPF program attached to the
//! namespace (Linux 5.9) steers each new connection to `127.0.0.1` to it; the accepted
//! socket's local address is the port the client dialled. The program is 23
//! instructions, assembled here rather than built with a BPF toolchain (the crates
//! that load compiled BPF objects bring a linker and an ELF loader for what this needs:
//! one map and one program). Attached through a BPF link held by the relay, it is
//! detached when the relay is dropped (or its process ends).
//!
//! IPv4 only: containerd dials `tcp4` first (the guest agent tries the guest's `::1`
//! when its `127.0.0.1` refuses). Bounded: at most [`MAX_CONNECTIONS`] relayed
//! connections at a time (more are reset at once), each closed once one direction
//! has been over for [`forkvm_agent_proto::forward::HALF_CLOSED_LIMIT`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Most connections the relay carries at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Opens a stream to the guest's port (the agent's forwarded connection).
pub type Dialer = dyn Fn(u16) -> io::Result<UnixStream> + Send + Sync;

/// The loopback relay of the calling thread's network namespace. Its connections are
/// steered to it while it lives; dropping it detaches the program (its listener's
/// thread stays until the process ends, with nothing steered to it).
pub struct LoopbackRelay {
    port: u16,
    // Held for the process's life: closing them detaches the program.
    _link: OwnedFd,
    _map: OwnedFd,
}

impl std::fmt::Debug for LoopbackRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackRelay")
            .field("port", &self.port)
            .finish()
    }
}

impl LoopbackRelay {
    /// Steers the TCP connections to `127.0.0.1` in the calling thread's network
    /// namespace to one listener and relays each through `dial`, given the port the
    /// client dialled. Needs `CAP_BPF` and `CAP_NET_ADMIN` (the runtime runs as root).
    pub fn start(dial: Box<Dialer>) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let map = sockmap_with(&listener)?;
        let prog = load_program(&map)?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
        let link = attach(&prog, &netns)?;
        let dial: Arc<Dialer> = Arc::from(dial);
        let slots = forkvm_agent_proto::forward::Slots::new(MAX_CONNECTIONS);
        std::thread::Builder::new()
            .name("loopback-relay".into())
            .spawn(move || {
                // What is refused is said once: a client can knock again and again.
                let mut warned = false;
                let mut warn_once = |msg: &str| {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!("loopback relay: {msg} (said once)");
                    }
                };
                loop {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(_) => {
                            // Out of descriptors, say: not a busy loop.
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            continue;
                        }
                    };
                    let Some(slot) = slots.take() else {
                        warn_once(&format!("more than {MAX_CONNECTIONS} connections refused"));
                        reset(client);
                        continue;
                    };
                    let dial = dial.clone();
                    let spawned = std::thread::Builder::new()
                        .name("loopback-conn".into())
                        .spawn(move || {
                            if let Err(e) = relay(client, &*dial) {
                                tracing::info!("loopback relay: {e}");
                            }
                            drop(slot);
                        });
                    if spawned.is_err() {
                        warn_once("no thread for a connection; refused");
                    }
                }
            })?;
        Ok(LoopbackRelay {
            port,
            _link: link,
            _map: map,
        })
    }

    /// The port of the relay's own listener (it also takes every other port).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Relays one steered connection: its local port is the one the client dialled. A
/// port the guest cannot be reached on resets the client's connection, as close to
/// "connection refused" as an accepted connection can come.
fn relay(client: TcpStream, dial: &Dialer) -> io::Result<()> {
    let port = match client.local_addr()? {
        SocketAddr::V4(a) => a.port(),
        SocketAddr::V6(a) => a.port(),
    };
    match dial(port) {
        Ok(guest) => forkvm_agent_proto::forward::splice(client, guest),
        Err(e) => {
            reset(client);
            Err(e)
        }
    }
}

/// Closes `conn` with a reset rather than an orderly end of file.
fn reset(conn: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) reads `linger`, which lives across the call, on a socket we
    // own.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

// The kernel's BPF interface (linux/bpf.h), what this module uses of it.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;
/// `union bpf_attr` is passed as this many bytes, zero past the fields set (the kernel
/// requires unknown trailing bytes to be zero).
const ATTR_SIZE: usize = 128;

/// bpf(2): what the command returns (a new descriptor for those that make one).
fn bpf(cmd: libc::c_int, attr: &mut [u8; ATTR_SIZE]) -> io::Result<i32> {
    // SAFETY: bpf(2) reads (and for some commands writes) at most ATTR_SIZE bytes of
    // `attr`, which is that long; the pointers inside it point to live buffers the
    // caller holds across the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// bpf(2) for a command that makes a descriptor.
fn bpf_fd(cmd: libc::c_int, attr: &mut [u8; ATTR_SIZE]) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the command returned a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A one-entry socket map holding `listener` at key 0.
fn sockmap_with(listener: &TcpListener) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, BPF_MAP_TYPE_SOCKMAP);
    put_u32(&mut attr, 4, 4); // key: u32
    put_u32(&mut attr, 8, 8); // value: the socket (a u64 descriptor on update)
    put_u32(&mut attr, 12, 1); // one entry
    let map = bpf_fd(BPF_MAP_CREATE, &mut attr)
        .map_err(|e| context(e, "cannot make a BPF socket map"))?;
    let key: u32 = 0;
    let value: u64 = listener.as_raw_fd() as u64;
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, &key as *const u32 as u64);
    put_u64(&mut attr, 16, &value as *const u64 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
        .map(drop)
        .map_err(|e| context(e, "cannot put the relay's listener in the socket map"))?;
    Ok(map)
}

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `struct bpf_sk_lookup` field offsets.
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;

/// The program: a TCP connection to 127.0.0.1 (any port) goes to the socket at key 0
/// of the map; every other lookup goes on as usual.
fn program(map_fd: i32) -> Vec<Insn> {
    const MOV64_X: u8 = 0xbf; // dst = src
    const MOV64_K: u8 = 0xb7; // dst = imm
    const ADD64_K: u8 = 0x07; // dst += imm
    const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
    const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
    const LD_DW: u8 = 0x18; // dst = imm64 (two instructions)
    const JNE32_K: u8 = 0x56; // if (u32)dst != imm goto +off
    const JEQ_K: u8 = 0x15; // if dst == imm goto +off
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    const MAP_LOOKUP_ELEM: i32 = 1;
    const SK_RELEASE: i32 = 86;
    const SK_ASSIGN: i32 = 124;
    const SK_PASS: i32 = 1;
    // 127.0.0.1 as the context holds it (network order) read as a native u32.
    let loopback = i32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets());
    // Where the jumps go: `pass` (21); a jump's offset counts from the next one.
    const PASS: i16 = 21;
    vec![
        insn(MOV64_X, 6, 1, 0, 0),                        // 0: r6 = ctx
        insn(LDX_W, 2, 6, CTX_FAMILY, 0),                 // 1
        insn(JNE32_K, 2, 0, PASS - 3, libc::AF_INET),     // 2: not IPv4
        insn(LDX_W, 2, 6, CTX_PROTOCOL, 0),               // 3
        insn(JNE32_K, 2, 0, PASS - 5, libc::IPPROTO_TCP), // 4: not TCP
        insn(LDX_W, 2, 6, CTX_LOCAL_IP4, 0),              // 5
        insn(JNE32_K, 2, 0, PASS - 7, loopback),          // 6: not to 127.0.0.1
        insn(ST_W, 10, 0, -4, 0),                         // 7: key 0 on the stack
        insn(LD_DW, 1, PSEUDO_MAP_FD, 0, map_fd),         // 8: r1 = the map
        insn(0, 0, 0, 0, 0),                              // 9
        insn(MOV64_X, 2, 10, 0, 0),                       // 10: r2 = &key
        insn(ADD64_K, 2, 0, 0, -4),                       // 11
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),             // 12: r0 = socket or null
        insn(JEQ_K, 0, 0, PASS - 14, 0),                  // 13: no socket
        insn(MOV64_X, 7, 0, 0, 0),                        // 14: r7 = socket
        insn(MOV64_X, 1, 6, 0, 0),                        // 15
        insn(MOV64_X, 2, 7, 0, 0),                        // 16
        insn(MOV64_K, 3, 0, 0, 0),                        // 17
        insn(CALL, 0, 0, 0, SK_ASSIGN),                   // 18: (an error leaves it)
        insn(MOV64_X, 1, 7, 0, 0),                        // 19
        insn(CALL, 0, 0, 0, SK_RELEASE),                  // 20
        insn(MOV64_K, 0, 0, 0, SK_PASS),                  // 21: pass
        insn(EXIT, 0, 0, 0, 0),                           // 22
    ]
}

fn load_program(map: &OwnedFd) -> io::Result<OwnedFd> {
    let insns = program(map.as_raw_fd());
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_SK_LOOKUP);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + 15].copy_from_slice(b"forkvm_loopback");
    put_u32(&mut attr, 68, BPF_SK_LOOKUP); // expected attach type
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]);
        context(
            e,
            &format!(
                "cannot load the loopback relay's BPF program ({})",
                log.trim()
            ),
        )
    })
}

fn attach(prog: &OwnedFd, netns: &std::fs::File) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, netns.as_raw_fd() as u32);
    put_u32(&mut attr, 8, BPF_SK_LOOKUP);
    bpf_fd(BPF_LINK_CREATE, &mut attr).map_err(|e| {
        context(
            e,
            "cannot attach the loopback relay to the network namespace",
        )
    })
}
