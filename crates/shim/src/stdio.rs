//! A process's standard streams: containerd's FIFOs handed to the runtime, or a pty
//! whose master the runtime sends back over a console socket.
//!
//! Without a terminal, the output FIFOs are opened read-write (so opening never waits
//! for a reader, and a reader that goes away does not kill the writer with SIGPIPE, as
//! runc-v2 keeps its FIFOs open) and given to the runtime as the process's stdout and
//! stderr. Stdin is a pipe: its read end is the process's stdin and a thread copies
//! the stdin FIFO into the write end, which `CloseIO` (or the FIFO's end) closes so the
//! process reads end-of-file.
//!
//! With a terminal, the runtime connects to a Unix socket the shim listens on and sends
//! the pty master with `SCM_RIGHTS`; threads copy between the master and the FIFOs,
//! and `ResizePty` sets the master's window size.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use crate::error::{Error, Result};
use crate::runtime::Stdio3;

/// The stdio paths containerd gave for one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// The stdin FIFO ("" for none).
    pub stdin: String,
    /// The stdout FIFO ("" for none).
    pub stdout: String,
    /// The stderr FIFO ("" for none).
    pub stderr: String,
    /// Whether the process gets a pty.
    pub terminal: bool,
}

/// Where one output stream goes: a plain path is a FIFO (or file), `file://` a file
/// appended to, "" nowhere. `binary://` loggers are not supported.
fn output_target(uri: &str) -> Result<Option<PathBuf>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Some(PathBuf::from(path)));
    }
    if uri.contains("://") {
        return Err(Error::InvalidArgument(format!(
            "unsupported stdio URI {uri}: only FIFO paths and file:// are supported"
        )));
    }
    Ok(Some(PathBuf::from(uri)))
}

fn open_output(uri: &str) -> Result<File> {
    match output_target(uri)? {
        None => OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(Error::io("open /dev/null")),
        Some(p) if uri.starts_with("file://") => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(Error::io(format!("create {}", dir.display())))?;
            }
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(&p)
                .map_err(Error::io(format!("open {}", p.display())))
        }
        // Read-write: never blocks waiting for a reader (see the module docs).
        Some(p) => OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .map_err(Error::io(format!("open {}", p.display()))),
    }
}

/// The shim's side of one process's stdio, kept until the process is deleted.
#[derive(Default)]
pub struct ProcessIo {
    /// Where stdin bytes go: the pipe to the process, or the pty master.
    stdin: Arc<Mutex<Option<File>>>,
    /// The pty master, for resizing.
    console: Option<Arc<File>>,
    /// Signalled when the output copy (terminal only) has finished.
    output_done: Option<mpsc::Receiver<()>>,
}

/// The streams to hand to the runtime, and the shim's side of them.
pub struct Prepared {
    /// For the runtime command.
    pub stdio: Stdio3,
    /// For the shim.
    pub io: ProcessIo,
    /// The terminal's console socket, when there is one.
    pub console: Option<ConsoleSocket>,
}

/// Opens `paths` for a new process (see the module docs).
pub fn prepare(paths: &StdioPaths) -> Result<Prepared> {
    if paths.terminal {
        let console = ConsoleSocket::new()?;
        return Ok(Prepared {
            stdio: Stdio3::default(),
            io: ProcessIo::default(),
            console: Some(console),
        });
    }
    let stdout = open_output(&paths.stdout)?;
    let stderr = open_output(&paths.stderr)?;
    let io = ProcessIo::default();
    let stdin = if paths.stdin.is_empty() {
        None
    } else {
        let (r, w) = std::io::pipe().map_err(Error::io("create the stdin pipe"))?;
        *io.stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(File::from(OwnedFd::from(w)));
        copy_stdin(PathBuf::from(&paths.stdin), io.stdin.clone());
        Some(OwnedFd::from(r))
    };
    Ok(Prepared {
        stdio: Stdio3 {
            stdin,
            stdout: Some(stdout.into()),
            stderr: Some(stderr.into()),
        },
        io,
        console: None,
    })
}

/// Copies the stdin FIFO into `to` until the FIFO ends (its writer closed) or `to` is
/// taken away by [`ProcessIo::close_stdin`], then closes `to`.
fn copy_stdin(fifo: PathBuf, to: Arc<Mutex<Option<File>>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            // Blocks until containerd's client opens the FIFO for writing.
            let mut from = match File::open(&fifo) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(fifo = %fifo.display(), error = %e, "cannot open stdin");
                    to.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return;
                }
            };
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut guard = to.lock().unwrap_or_else(|e| e.into_inner());
                let Some(w) = guard.as_mut() else { return };
                if w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            to.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot spawn the stdin thread");
    }
}

impl ProcessIo {
    /// The terminal's side, once the runtime has sent the pty master: copies
    /// `paths.stdin` into it and it into `paths.stdout`.
    pub fn with_console(master: File, paths: &StdioPaths) -> Result<Self> {
        let master = Arc::new(master);
        let stdin = Arc::new(Mutex::new(None));
        if !paths.stdin.is_empty() {
            let w = master
                .try_clone()
                .map_err(Error::io("dup the pty master"))?;
            *stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
            copy_stdin(PathBuf::from(&paths.stdin), stdin.clone());
        }
        let mut out = open_output(&paths.stdout)?;
        let mut from = master
            .try_clone()
            .map_err(Error::io("dup the pty master"))?;
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                // Ends with EIO once every slave end is closed (the process exited).
                let _ = std::io::copy(&mut from, &mut out);
                let _ = done_tx.send(());
            })
            .map_err(Error::io("spawn the console thread"))?;
        Ok(ProcessIo {
            stdin,
            console: Some(master),
            output_done: Some(done_rx),
        })
    }

    /// Closes the process's stdin (`CloseIO`): it reads end-of-file (without a
    /// terminal), or no more input reaches the terminal.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Sets the terminal's size (`ResizePty`).
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(master) = &self.console else {
            return Err(Error::FailedPrecondition(
                "the process has no terminal".into(),
            ));
        };
        let size = rustix::termios::Winsize {
            ws_row: height.min(u16::MAX.into()) as u16,
            ws_col: width.min(u16::MAX.into()) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master.as_ref(), size)
            .map_err(|e| Error::io("resize the terminal")(e.into()))
    }

    /// Waits (up to `timeout`) until the terminal's output has all been copied out, so
    /// that the exit is reported after the last output.
    pub fn wait_output(&mut self, timeout: Duration) {
        if let Some(rx) = self.output_done.take() {
            if rx.recv_timeout(timeout).is_err() {
                tracing::warn!("terminal output still open after the process exited");
            }
        }
    }
}

/// A Unix socket the runtime sends a pty master to (`--console-socket`), in a private
/// temporary directory.
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    received: mpsc::Receiver<Result<File>>,
}

impl ConsoleSocket {
    /// Listens on a new socket; a thread accepts the runtime's connection.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("forkvm-pty")
            .tempdir()
            .map_err(Error::io("create the console socket directory"))?;
        let path = dir.path().join("pty.sock");
        let listener =
            UnixListener::bind(&path).map_err(Error::io(format!("bind {}", path.display())))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("console-socket".into())
            .spawn(move || {
                let got = listener
                    .accept()
                    .map_err(Error::io("accept on the console socket"))
                    .and_then(|(conn, _)| receive_fd(&conn));
                let _ = tx.send(got);
            })
            .map_err(Error::io("spawn the console socket thread"))?;
        Ok(ConsoleSocket { dir, received: rx })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pty.sock")
    }

    /// The pty master the runtime sent, waiting up to `timeout` after the runtime
    /// command returned.
    pub fn master(self, timeout: Duration) -> Result<File> {
        match self.received.recv_timeout(timeout) {
            Ok(got) => got,
            Err(_) => Err(Error::FailedPrecondition(format!(
                "the OCI runtime sent no pty master to {} within {timeout:?}",
                self.path().display()
            ))),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        // Wake the accepting thread if nobody connected (a failed create).
        let _ = UnixStream::connect(self.path());
    }
}

/// Receives one file descriptor sent with `SCM_RIGHTS` on `conn`.
pub fn receive_fd(conn: &UnixStream) -> Result<File> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut data = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut data)];
    rustix::net::recvmsg(conn, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
        .map_err(|e| Error::io("receive the pty master")(e.into()))?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(File::from(fd));
            }
        }
    }
    Err(Error::FailedPrecondition(
        "the console socket carried no file descriptor".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::IoSlice;
    use std::os::fd::AsFd;
    use std::path::Path;

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    #[test]
    fn output_uris() {
        assert_eq!(output_target("").unwrap(), None);
        assert_eq!(
            output_target("/run/fifo/c1-stdout").unwrap(),
            Some(PathBuf::from("/run/fifo/c1-stdout"))
        );
        assert_eq!(
            output_target("file:///var/log/c1.log").unwrap(),
            Some(PathBuf::from("/var/log/c1.log"))
        );
        let err = output_target("binary:///usr/bin/logger?x=1").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn stdin_reaches_the_process_and_close_io_ends_it() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("stdin");
        let out = tmp.path().join("stdout");
        mkfifo(&fifo);
        mkfifo(&out);
        // The client's ends: the reader of stdout, the writer of stdin.
        let out2 = out.clone();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            File::open(out2).unwrap().read_to_string(&mut s).unwrap();
            s
        });
        let prepared = prepare(&StdioPaths {
            stdin: fifo.to_str().unwrap().into(),
            stdout: out.to_str().unwrap().into(),
            stderr: String::new(),
            terminal: false,
        })
        .unwrap();
        let mut client = OpenOptions::new().write(true).open(&fifo).unwrap();
        client.write_all(b"hello\n").unwrap();

        // The process: reads its stdin to the end, writes it to its stdout.
        let Stdio3 { stdin, stdout, .. } = prepared.stdio;
        let mut pin = File::from(stdin.unwrap());
        let mut pout = File::from(stdout.unwrap());
        let mut line = [0u8; 6];
        pin.read_exact(&mut line).unwrap();
        pout.write_all(&line).unwrap();
        // The client keeps its FIFO end open; CloseIO alone ends the stream.
        prepared.io.close_stdin();
        let mut rest = Vec::new();
        pin.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(pout);
        assert_eq!(reader.join().unwrap(), "hello\n");
        drop(client);
    }

    #[test]
    fn the_console_socket_receives_a_pty_master() {
        let socket = ConsoleSocket::new().unwrap();
        let path = socket.path();
        // What a runtime does: connect and send the master with SCM_RIGHTS.
        let (master, _slave) = {
            let m = rustix::pty::openpt(
                rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY,
            )
            .unwrap();
            rustix::pty::grantpt(&m).unwrap();
            rustix::pty::unlockpt(&m).unwrap();
            let name = rustix::pty::ptsname(&m, Vec::new()).unwrap();
            let slave = File::options()
                .read(true)
                .write(true)
                .open(name.to_str().unwrap())
                .unwrap();
            (m, slave)
        };
        let conn = UnixStream::connect(&path).unwrap();
        let fds = [master.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &conn,
            &[IoSlice::new(b"pty")],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        let got = socket.master(Duration::from_secs(5)).unwrap();
        let io = ProcessIo {
            console: Some(Arc::new(got)),
            ..ProcessIo::default()
        };
        io.resize(100, 30).unwrap();
        let size = rustix::termios::tcgetwinsize(&master).unwrap();
        assert_eq!((size.ws_col, size.ws_row), (100, 30));
        assert!(ProcessIo::default().resize(1, 1).is_err());
    }

    #[test]
    fn a_console_socket_nobody_uses_times_out() {
        let socket = ConsoleSocket::new().unwrap();
        let err = socket.master(Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("no pty master"), "{err}");
    }
}
