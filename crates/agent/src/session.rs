//! The agent's side of a running process's connection (after [`Response::Started`]):
//! host frames to the process (stdin, signals, resizes) and the process's output and
//! exit code back as frames.
//!
//! Threads: one per output stream (pipe or pty master) turning reads into frames; one
//! reading host frames; one writing stdin (so a process that does not read its stdin
//! never stops signal and resize frames behind it for more than 64 queued chunks); and
//! the connection's own thread, which waits for the exit status and sends the exit frame.
//!
//! [`Response::Started`]: crate::Response::Started

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{Frame, MAX_PAYLOAD};
use crate::reaper::exit_code;
use crate::spawn::{set_winsize, ProcessIo, Spawned};

/// After the process exited, how long output may stay quiet before the exit frame is
/// sent anyway (a background grandchild can hold the pipes open forever).
pub const OUTPUT_GRACE: Duration = Duration::from_millis(200);
/// How long an init process's connection may stay open after its exit frame before the
/// VM powers off regardless.
pub const INIT_LINGER: Duration = Duration::from_secs(1);
/// Stdin chunks queued for a process that is not reading.
const STDIN_QUEUE: usize = 64;
/// The terminal's end-of-file character (^D), written for a stdin close in tty mode.
const VEOF: u8 = 0x04;

/// The write half of the connection, shared by the output threads and the exit frame.
struct Sink {
    state: Mutex<SinkState>,
}

struct SinkState {
    /// `None` once the host is gone: output is then read and dropped.
    conn: Option<UnixStream>,
    /// The exit frame was sent: nothing may follow it.
    finished: bool,
}

impl Sink {
    fn send(&self, frame: &Frame, last: bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.finished {
            return;
        }
        st.finished = last;
        if let Some(conn) = st.conn.as_mut() {
            if frame.write_to(conn).is_err() {
                st.conn = None;
            }
        }
    }
}

/// Output activity, for deciding when the output has ended.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last chunk forwarded.
    last_ms: AtomicU64,
    /// Output threads holding a chunk not yet forwarded.
    busy: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::SeqCst))
    }
}

/// Reads `src` until EOF (or EIO: a pty whose slave is closed), forwarding each chunk
/// as a `wrap` frame.
fn pump_output(
    mut src: File,
    wrap: fn(Vec<u8>) -> Frame,
    sink: Arc<Sink>,
    activity: Arc<Activity>,
    done: mpsc::Sender<()>,
) {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                activity.busy.fetch_add(1, Ordering::SeqCst);
                sink.send(&wrap(buf[..n].to_vec()), false);
                activity.touch();
                activity.busy.fetch_sub(1, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = done.send(());
}

/// Writes queued stdin chunks; after a write error (the process closed its stdin) the
/// rest are dropped. Returns, closing the process's stdin, when the queue is closed.
fn pump_stdin(mut dst: File, chunks: mpsc::Receiver<Vec<u8>>) {
    let mut broken = false;
    for chunk in chunks {
        if !broken && dst.write_all(&chunk).is_err() {
            broken = true;
        }
    }
}

/// What a session needs of the agent that serves it: delivering a signal to its
/// process, and forgetting the process once it has ended.
pub(crate) trait Processes: Send + Sync {
    /// Sends `signal` to process `pid`, if the agent started it and it still runs.
    fn signal(&self, pid: libc::pid_t, signal: i32) -> std::io::Result<()>;
    /// The process ended: no more signals for it.
    fn forget(&self, pid: libc::pid_t);
}

/// Applies host frames until the host stops sending or sends garbage.
fn pump_input(
    mut reader: BufReader<UnixStream>,
    agent: Arc<dyn Processes>,
    pid: libc::pid_t,
    mut stdin: Option<mpsc::SyncSender<Vec<u8>>>,
    master: Option<Arc<File>>,
) {
    loop {
        let frame = match Frame::read_from(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                eprintln!("forkvm-agent: pid {pid}: {e}");
                return;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                if let Some(tx) = &stdin {
                    if tx.send(data).is_err() {
                        stdin = None;
                    }
                }
            }
            Frame::StdinClose => {
                if master.is_some() {
                    if let Some(tx) = &stdin {
                        let _ = tx.send(vec![VEOF]);
                    }
                } else {
                    stdin = None;
                }
            }
            Frame::Signal(sig) => {
                if let Err(e) = agent.signal(pid, sig) {
                    eprintln!("forkvm-agent: {e}");
                }
            }
            Frame::Resize { rows, cols } => {
                if let Some(m) = &master {
                    let _ = set_winsize(m.as_raw_fd(), rows, cols);
                }
            }
            Frame::Stdout(_) | Frame::Stderr(_) | Frame::Exit(_) => {
                eprintln!("forkvm-agent: pid {pid}: the host sent an agent-to-host frame");
                return;
            }
        }
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        eprintln!("forkvm-agent: spawn {name} thread: {e}");
    }
}

/// Serves a started process on `conn` until its exit frame is sent. `reader` holds
/// whatever the host sent after the `exec` line. Returns when the host may read the exit
/// frame (and, for an init process, once the host closed or [`INIT_LINGER`] passed).
///
/// With `kill_on_hangup`, a host that goes away while the process runs takes the
/// process with it (SIGKILL): the host side of an `exec` stands for the process on the
/// host, so killing it there (an engine's SIGKILL of the exec's pid) must end it here.
/// `on_exit` runs as soon as the process has exited, before its last output is read
/// (an app container's main process: the rest of the container ends with it, so what
/// they still write does not hold the exit back).
pub(crate) fn run(
    agent: Arc<dyn Processes>,
    conn: UnixStream,
    reader: BufReader<UnixStream>,
    spawned: Spawned,
    kill_on_hangup: bool,
    on_exit: Option<Box<dyn FnOnce() + Send>>,
) -> SessionEnd {
    let Spawned { child, io } = spawned;
    let pid = child.pid();
    let sink = Arc::new(Sink {
        state: Mutex::new(SinkState {
            conn: conn.try_clone().ok(),
            finished: false,
        }),
    });
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        busy: AtomicUsize::new(0),
    });
    let (done_tx, done_rx) = mpsc::channel();
    let mut outputs = 0;
    let mut start_output = |src: File, wrap: fn(Vec<u8>) -> Frame| {
        let (sink, activity, done) = (sink.clone(), activity.clone(), done_tx.clone());
        outputs += 1;
        spawn_thread("output", move || {
            pump_output(src, wrap, sink, activity, done)
        });
    };
    let (stdin_dst, master) = match io {
        ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            start_output(stdout, Frame::Stdout);
            start_output(stderr, Frame::Stderr);
            (stdin, None)
        }
        ProcessIo::Pty { master, stdin } => {
            match master.try_clone() {
                Ok(m) => start_output(m, Frame::Stdout),
                Err(e) => eprintln!("forkvm-agent: pid {pid}: dup pty master: {e}"),
            }
            let input = if stdin { master.try_clone().ok() } else { None };
            (input, Some(Arc::new(master)))
        }
    };
    drop(done_tx);
    let stdin_tx = stdin_dst.map(|dst| {
        let (tx, rx) = mpsc::sync_channel(STDIN_QUEUE);
        spawn_thread("stdin", move || pump_stdin(dst, rx));
        tx
    });
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    {
        let agent = agent.clone();
        spawn_thread("input", move || {
            pump_input(reader, agent.clone(), pid, stdin_tx, master);
            if kill_on_hangup {
                // Fails harmlessly once the process has exited (the agent forgot it).
                if agent.signal(pid, libc::SIGKILL).is_ok() {
                    eprintln!("forkvm-agent: pid {pid}: the host went away; killed");
                }
            }
            let _ = gone_tx.send(());
        });
    }

    let status = child.wait();
    agent.forget(pid);
    if let Some(on_exit) = on_exit {
        on_exit();
    }
    let exited = Instant::now();
    let mut ended = 0;
    while ended < outputs {
        match done_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => ended += 1,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let quiet_since = exited.max(activity.last());
                if activity.busy.load(Ordering::SeqCst) == 0
                    && quiet_since.elapsed() >= OUTPUT_GRACE
                {
                    break;
                }
            }
        }
    }
    let code = exit_code(status);
    sink.send(&Frame::Exit(code), true);
    let _ = conn.shutdown(Shutdown::Write);
    SessionEnd { host_gone: gone_rx }
}

/// How a session ended.
pub(crate) struct SessionEnd {
    /// Signalled (or disconnected) when the host stopped sending.
    pub host_gone: mpsc::Receiver<()>,
}

impl SessionEnd {
    /// Waits until the host closed its side or `timeout` passed.
    pub fn wait_host(&self, timeout: Duration) {
        let _ = self.host_gone.recv_timeout(timeout);
    }
}
