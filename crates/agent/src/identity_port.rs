//! The guest side of the identity port (`forkvm_vmm::identity_port` on the host): the
//! second UART, `/dev/ttyS1`, over which a fork child's VMM sends its identity without
//! a vsock connection (a first connection after a fork costs the child's guest ~700 KiB
//! of copied pages; this costs it a UART interrupt and the agent's own work).
//!
//! The agent opens the port when it starts (in the VM that will be forked), puts it in
//! raw mode (no echo: a request must never come back as its answer), writes
//! [`IDENTITY_PORT_ANNOUNCE`] and keeps a thread blocked reading it. Each line that is
//! a request it serves on the port (`identity` or `ping`) gets one answer line; any
//! other line (what a snapshot left half-read, noise) gets none.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use forkvm_agent_proto::{IDENTITY_PORT_ANNOUNCE, IDENTITY_PORT_DEVICE};

use crate::protocol::{parse_request, to_line, Request, Response};
use crate::server::Agent;

/// Longest line read from the port (an identity request is a few hundred bytes).
const MAX_PORT_LINE: usize = 4096;

/// `TIOCGSERIAL`: the UART's `struct serial_struct`, whose first field is its type.
const TIOCGSERIAL: libc::c_ulong = 0x541e;
/// `PORT_UNKNOWN`: a legacy port the kernel registered but found no UART at.
const PORT_UNKNOWN: libc::c_int = 0;

/// Serves the identity port on a thread of its own when the machine has one (opened
/// there: nothing about the port holds up the caller). A machine without it (another
/// VMM, an older forkvm) is left alone; on one whose second UART is a line of its own
/// (another VMM's ttyS1), the agent takes it over.
pub fn start(agent: Arc<Agent>) {
    let spawned = std::thread::Builder::new()
        .name("identity-port".into())
        .stack_size(256 << 10)
        .spawn(move || {
            let port = match open() {
                Ok(Some(port)) => port,
                Ok(None) => return,
                Err(e) => {
                    eprintln!("forkvm-agent: identity port {IDENTITY_PORT_DEVICE}: {e}");
                    return;
                }
            };
            if let Err(e) = serve(&agent, port) {
                eprintln!("forkvm-agent: identity port: {e}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("forkvm-agent: identity port thread: {e}");
    }
}

/// The port, raw, when a UART is there.
fn open() -> io::Result<Option<File>> {
    let port = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(IDENTITY_PORT_DEVICE)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENXIO | libc::ENODEV | libc::EIO)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // `struct serial_struct` is 72 bytes on x86-64; the buffer is larger.
    let mut serial = [0 as libc::c_int; 32];
    // SAFETY: TIOCGSERIAL writes one `struct serial_struct` into the buffer, which is
    // larger than it and lives across the call.
    if unsafe { libc::ioctl(port.as_raw_fd(), TIOCGSERIAL as _, serial.as_mut_ptr()) } < 0 {
        // Not a serial port at all.
        return Ok(None);
    }
    if serial[0] == PORT_UNKNOWN {
        return Ok(None);
    }
    raw(&port)?;
    Ok(Some(port))
}

/// Raw mode: bytes as they come, no echo, no line editing, no flow control.
fn raw(port: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and termios pointer.
    if unsafe { libc::tcgetattr(port.as_raw_fd(), &mut t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only changes the flags of the termios it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !libc::CRTSCTS;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: a valid descriptor and termios pointer.
    if unsafe { libc::tcsetattr(port.as_raw_fd(), libc::TCSANOW, &t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Announces the port, then answers its requests until it fails.
fn serve(agent: &Agent, port: File) -> io::Result<()> {
    let mut out = port.try_clone()?;
    out.write_all(format!("{IDENTITY_PORT_ANNOUNCE}\n").as_bytes())?;
    serve_lines(BufReader::new(port), &mut out, |req| {
        Some(agent.answer_on_port(req))
    })
}

/// Reads `input` line by line (each bounded: a longer one is dropped whole) and writes
/// the answer `answer` gives to each line that is a request, if any.
fn serve_lines(
    mut input: impl BufRead,
    out: &mut impl Write,
    answer: impl Fn(Request) -> Option<Response>,
) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut input)
            .take(MAX_PORT_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_PORT_LINE {
                // Too long: drop it up to its end.
                loop {
                    line.clear();
                    let n = (&mut input).take(64 * 1024).read_until(b'\n', &mut line)?;
                    if n == 0 {
                        return Ok(());
                    }
                    if line.last() == Some(&b'\n') {
                        break;
                    }
                }
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let Ok(req) = parse_request(text) else {
            continue;
        };
        if let Some(resp) = answer(req) {
            out.write_all(to_line(&resp).as_bytes())?;
            out.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(input: &[u8]) -> String {
        let mut out = Vec::new();
        // Any answer will do: what is tested is which lines get one.
        serve_lines(input, &mut out, |req| match req {
            Request::Ping => Some(Response::Ok),
            _ => Some(Response::Error {
                message: "no".into(),
            }),
        })
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_request_line_gets_one_answer_and_noise_none() {
        let input = b"\n{\"op\":\"ping\"}\nhalf a line left by a snapshot\n\n{\"op\":\"ping\"}\n{\"op\":\"shutdown\"}\n";
        assert_eq!(
            served(input),
            "{\"status\":\"ok\"}\n{\"status\":\"ok\"}\n{\"status\":\"error\",\"message\":\"no\"}\n"
        );
    }

    #[test]
    fn an_overlong_line_is_dropped_whole() {
        let mut input = vec![b'x'; MAX_PORT_LINE * 3];
        input.extend_from_slice(b"{\"op\":\"ping\"}\n{\"op\":\"ping\"}\n");
        // The overlong line ends with what looks like a request: dropped with it.
        assert_eq!(served(&input), "{\"status\":\"ok\"}\n");
    }

    #[test]
    fn a_line_cut_off_at_the_end_is_not_served() {
        assert_eq!(served(b"{\"op\":\"ping\"}"), "");
    }
}
