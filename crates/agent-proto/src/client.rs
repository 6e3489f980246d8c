//! The host's side of the protocol: reaching the agent through the VMM's vsock socket,
//! JSON requests, and running a process with its stdio pumped over frames. Plain std
//! (blocking I/O and threads), no async runtime.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use forkvm_agent_proto::{client, ProcessSpec};
//!
//! let uds = std::path::Path::new("/tmp/vm.vsock");
//! let conn = client::wait_for_agent(uds, Instant::now() + Duration::from_secs(10))?;
//! let session = client::exec(conn, &ProcessSpec::new(["uname", "-a"]))?;
//! let code = session.pump(None, Box::new(std::io::stdout()), Box::new(std::io::stderr()))?;
//! println!("exit {code}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{Frame, FrameError};
use crate::protocol::{to_line, ProcessSpec, Request, Response, AGENT_PORT, MAX_LINE};

/// A connected, full-duplex byte stream to the agent.
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// A second handle to the same connection (one for reading, one for writing).
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down one or both directions for every handle.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Sets (or with `None` clears) the read and write timeouts of every handle.
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

impl Connection for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

/// How long a request waits for the agent's answer by default ([`call_within`],
/// [`exec`]): a guest that never answers is an error, not a hang. Generous, as a guest
/// under nested emulation may take seconds to start a process.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a JSON request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection failed (including a read timeout).
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The connection closed before a whole answer line.
    #[error("the agent closed the connection without answering")]
    Closed,
    /// No whole answer within the call's deadline ([`call_within`]).
    #[error("the agent did not answer within {} s", .0.as_secs_f64())]
    TimedOut(Duration),
    /// An answer line longer than [`MAX_LINE`].
    #[error("the agent's answer exceeds {MAX_LINE} bytes")]
    TooLong,
    /// An answer that is not a [`Response`].
    #[error("bad answer {line:?}: {source}")]
    BadResponse {
        /// The line as received.
        line: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// Why [`exec`] did not start the process.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be executed; a shell would exit with `exit_code`
    /// (127 not found, 126 not executable).
    #[error("{message}")]
    ExecFailed {
        /// What went wrong.
        message: String,
        /// 127 or 126.
        exit_code: i32,
    },
    /// The agent refused the request (bad user, missing cwd, no init allowed, ...).
    #[error("{message}")]
    Rejected {
        /// The agent's message.
        message: String,
    },
    /// An answer that does not belong to an exec request.
    #[error("unexpected answer to exec: {0:?}")]
    Unexpected(Response),
    /// The request or its answer did not get through.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Reads one `\n`-terminated line byte by byte, so nothing after it is consumed.
fn read_line<R: Read + ?Sized>(r: &mut R, max: usize) -> Result<String, CallError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(CallError::Closed),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= max {
                    return Err(CallError::TooLong);
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Sends one JSON request and reads its answer.
pub fn call<C: Read + Write + ?Sized>(conn: &mut C, req: &Request) -> Result<Response, CallError> {
    conn.write_all(to_line(req).as_bytes())?;
    let line = read_line(conn, MAX_LINE)?;
    serde_json::from_str(line.trim()).map_err(|source| CallError::BadResponse { line, source })
}

/// [`call`] with a deadline: the request must be sent and its whole answer read within
/// `timeout`, however the guest paces its bytes (the time left is set before every
/// read and write). The connection's timeouts are cleared again afterwards (an exec's
/// connection then streams for as long as its process runs).
pub fn call_within<C: Connection>(
    conn: &mut C,
    req: &Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    let mut timed = Deadlined {
        conn: &mut *conn,
        deadline: Instant::now() + timeout,
    };
    let result = call(&mut timed, req).map_err(|e| match e {
        CallError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            CallError::TimedOut(timeout)
        }
        other => other,
    });
    conn.set_timeouts(None)?;
    result
}

/// A connection whose every read and write may only take what is left until
/// `deadline`.
struct Deadlined<'a, C: Connection> {
    conn: &'a mut C,
    deadline: Instant,
}

impl<C: Connection> Deadlined<'_, C> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.conn.set_timeouts(Some(left))
    }
}

impl<C: Connection> Read for Deadlined<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.conn.read(buf)
    }
}

impl<C: Connection> Write for Deadlined<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// Connects to guest port `port` through the VMM's vsock Unix socket `uds`: writes
/// `CONNECT <port>\n` and expects `OK <host port>\n`. `timeout` bounds the connect
/// handshake only; the returned stream has no timeouts.
pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&mut s, 256).map_err(|e| match e {
        CallError::Io(e) => e,
        other => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("vsock handshake: {other}"),
        ),
    })?;
    if !line.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("vsock handshake: the guest did not accept port {port} ({line:?})"),
        ));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

/// Connects to the agent and waits until it answers a Ping, retrying refused
/// connections, failed handshakes and unanswered Pings until `deadline`. Returns the
/// connection the Ping succeeded on (no timeouts set), ready for the next request.
pub fn wait_for_agent(uds: &Path, deadline: Instant) -> io::Result<UnixStream> {
    wait_for_agent_unless(uds, deadline, &|| false)
}

/// [`wait_for_agent`] that gives up early, with [`io::ErrorKind::Interrupted`], once
/// `cancelled` says so (checked before every attempt: the VM stopped, say).
pub fn wait_for_agent_unless(
    uds: &Path,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> io::Result<UnixStream> {
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no attempt before the deadline");
    loop {
        if cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("cancelled while waiting for the agent: {last}"),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the agent did not answer before the deadline: {last}"),
            ));
        }
        let attempt_timeout = left.min(Duration::from_secs(1));
        let attempt = connect_vsock(uds, AGENT_PORT, attempt_timeout).and_then(|mut s| {
            s.set_read_timeout(Some(attempt_timeout))?;
            match call(&mut s, &Request::Ping) {
                Ok(Response::Pong { .. }) => {
                    s.set_read_timeout(None)?;
                    Ok(s)
                }
                Ok(other) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("Ping answered with {other:?}"),
                )),
                Err(CallError::Io(e)) => Err(e),
                Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(
            Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

/// Starts `spec` on `conn`, waiting at most [`CALL_TIMEOUT`] for the agent to say it
/// started. On success the connection belongs to the returned session.
pub fn exec<C: Connection>(conn: C, spec: &ProcessSpec) -> Result<ExecSession<C>, ExecError> {
    exec_within(conn, spec, CALL_TIMEOUT)
}

/// [`exec`], waiting at most `timeout` for the agent's answer.
pub fn exec_within<C: Connection>(
    conn: C,
    spec: &ProcessSpec,
    timeout: Duration,
) -> Result<ExecSession<C>, ExecError> {
    let request = Request::Exec {
        process: spec.clone(),
    };
    exec_request(conn, &request, timeout)
}

/// [`exec`] in the container `id` of a VM with several ([`Request::InContainer`]).
pub fn exec_in_container<C: Connection>(
    conn: C,
    id: &str,
    spec: &ProcessSpec,
) -> Result<ExecSession<C>, ExecError> {
    let request = Request::InContainer {
        id: id.to_owned(),
        request: Box::new(Request::Exec {
            process: spec.clone(),
        }),
    };
    exec_request(conn, &request, CALL_TIMEOUT)
}

/// Sends `request`, an exec, and turns its connection into the process's session.
fn exec_request<C: Connection>(
    mut conn: C,
    request: &Request,
    timeout: Duration,
) -> Result<ExecSession<C>, ExecError> {
    let resp = call_within(&mut conn, request, timeout)?;
    let pid = match resp {
        Response::Started { pid } => pid,
        Response::ExecFailed { message, exit_code } => {
            return Err(ExecError::ExecFailed { message, exit_code })
        }
        Response::Error { message } => return Err(ExecError::Rejected { message }),
        other => return Err(ExecError::Unexpected(other)),
    };
    let writer = conn.try_clone().map_err(CallError::Io)?;
    Ok(ExecSession {
        pid,
        writer: Arc::new(Mutex::new(Box::new(writer))),
        closer: conn.try_clone().map_err(CallError::Io)?,
        reader: conn,
    })
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(writer: &SharedWriter, frame: &Frame) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    frame.write_to(&mut **w).map_err(frame_to_io)
}

fn frame_to_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// A process started by [`exec`]: its connection now carries frames.
pub struct ExecSession<C: Connection = UnixStream> {
    pid: i32,
    reader: C,
    writer: SharedWriter,
    closer: C,
}

/// Sends signals and terminal resizes to a running process; clones share the connection.
#[derive(Clone)]
pub struct Controller {
    writer: SharedWriter,
}

impl Controller {
    /// Delivers `sig` to the process (`kill(pid, sig)` in the guest).
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        send(&self.writer, &Frame::Signal(sig))
    }

    /// Sets the terminal size (tty processes; ignored otherwise).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        send(&self.writer, &Frame::Resize { rows, cols })
    }
}

impl<C: Connection> ExecSession<C> {
    /// The process's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A handle for signals and resizes, usable while [`ExecSession::pump`] runs.
    pub fn controller(&self) -> Controller {
        Controller {
            writer: self.writer.clone(),
        }
    }

    /// Runs the process's stdio until it exits and returns its exit code (128 + signal
    /// when a signal killed it). `stdin` is forwarded until its EOF, then closed; `None`
    /// closes it at once. The stdin thread is not joined: a `stdin` that blocks (a
    /// terminal) is left reading and its next chunk is dropped. Closes the connection.
    pub fn pump(
        self,
        stdin: Option<Box<dyn Read + Send>>,
        mut stdout: Box<dyn Write + Send>,
        mut stderr: Box<dyn Write + Send>,
    ) -> io::Result<i32> {
        let ExecSession {
            reader: mut conn,
            writer,
            closer,
            ..
        } = self;
        match stdin {
            None => {
                // The process may already be gone; its exit frame still comes.
                let _ = send(&writer, &Frame::StdinClose);
            }
            Some(mut input) => {
                let writer = writer.clone();
                std::thread::Builder::new()
                    .name("exec-stdin".into())
                    .spawn(move || {
                        let mut buf = vec![0u8; 32 * 1024];
                        loop {
                            match input.read(&mut buf) {
                                Ok(0) => {
                                    let _ = send(&writer, &Frame::StdinClose);
                                    return;
                                }
                                Ok(n) => {
                                    if send(&writer, &Frame::Stdin(buf[..n].to_vec())).is_err() {
                                        return;
                                    }
                                }
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(_) => {
                                    let _ = send(&writer, &Frame::StdinClose);
                                    return;
                                }
                            }
                        }
                    })?;
            }
        }
        let result = loop {
            match Frame::read_from(&mut conn) {
                Ok(Some(Frame::Stdout(d))) => {
                    stdout.write_all(&d)?;
                    stdout.flush()?;
                }
                Ok(Some(Frame::Stderr(d))) => {
                    stderr.write_all(&d)?;
                    stderr.flush()?;
                }
                Ok(Some(Frame::Exit(code))) => break Ok(code),
                Ok(Some(other)) => {
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the agent sent a host-to-agent frame: {other:?}"),
                    ))
                }
                Ok(None) => {
                    break Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection before the exit frame",
                    ))
                }
                Err(e) => break Err(frame_to_io(e)),
            }
        };
        let _ = closer.shutdown(Shutdown::Both);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that reads requests and never answers.
    fn silent_agent() -> (UnixStream, std::thread::JoinHandle<()>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(guest.read(&mut sink), Ok(n) if n > 0) {}
        });
        (host, t)
    }

    #[test]
    fn a_guest_that_never_answers_is_an_error_not_a_hang() {
        let (mut host, _t) = silent_agent();
        let t0 = Instant::now();
        let e = call_within(&mut host, &Request::Ping, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, CallError::TimedOut(_)), "{e}");
        assert_eq!(e.to_string(), "the agent did not answer within 0.2 s");
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The deadline was the call's: the connection has no timeout left behind.
        assert_eq!(host.read_timeout().unwrap(), None);

        let (host, _t) = silent_agent();
        let e = exec_within(
            host,
            &ProcessSpec::new(["true"]),
            Duration::from_millis(200),
        )
        .err()
        .expect("no answer");
        assert!(matches!(e, ExecError::Call(CallError::TimedOut(_))), "{e}");
    }

    /// A guest that drips its answer a byte at a time, each within any per-read
    /// timeout, still misses the call's deadline.
    #[test]
    fn an_answer_dripped_slowly_misses_the_deadline() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let _t = std::thread::spawn(move || {
            read_line(&mut guest, MAX_LINE).unwrap();
            for b in to_line(&Response::Ok).bytes() {
                std::thread::sleep(Duration::from_millis(150));
                if guest.write_all(&[b]).is_err() {
                    return;
                }
            }
        });
        let t0 = Instant::now();
        let e = call_within(&mut host, &Request::Ping, Duration::from_millis(400)).unwrap_err();
        assert!(matches!(e, CallError::TimedOut(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn an_answer_in_time_is_read() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            read_line(&mut guest, MAX_LINE).unwrap();
            guest.write_all(to_line(&Response::Ok).as_bytes()).unwrap();
        });
        let r = call_within(&mut host, &Request::Ping, Duration::from_secs(10)).unwrap();
        assert!(matches!(r, Response::Ok), "{r:?}");
        t.join().unwrap();
    }
}
