//! Terminals and signals of a process that stands in for a container's process on the
//! host: `forkvm run`, the runtime's monitor and its `exec`.
//!
//! * [`ForwardedSignals`]: the signals a container process should get (SIGINT, SIGTERM,
//!   ...) are blocked in every thread and taken by one `sigwait` thread, which hands them
//!   to the guest process once one is attached ([`SignalRelay::attach`]) and remembers the
//!   first terminating one that came before ([`SignalRelay::early`]).
//! * [`RawTerminal`]: stdin's terminal in raw mode, so keys reach the guest's pty as
//!   typed.
//! * [`Pty`] and [`send_console`]: a host pseudo-terminal whose master goes to an OCI
//!   `--console-socket` (SCM_RIGHTS) while its slave becomes the container's stdio.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use forkvm_agent_proto::client::Controller;
use rustix::termios::{self, OptionalActions, Termios};

/// SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 and SIGWINCH, blocked in every thread
/// and taken by one forwarding thread.
pub struct ForwardedSignals {
    set: libc::sigset_t,
}

/// Where [`ForwardedSignals`] sends what it takes.
#[derive(Clone, Default)]
pub struct SignalRelay {
    target: Arc<Mutex<Option<Controller>>>,
    early: Arc<AtomicI32>,
}

impl SignalRelay {
    /// From now on signals go to this process.
    pub fn attach(&self, controller: Controller) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(controller);
    }

    /// The first signal (other than SIGWINCH) that came while no process was attached.
    pub fn early(&self) -> Option<i32> {
        Some(self.early.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl ForwardedSignals {
    const SIGNALS: [libc::c_int; 7] = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
    ];

    /// Blocks the signals in this thread; call it before any other thread exists so
    /// that every thread (vCPUs included) inherits the mask.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in Self::SIGNALS {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: changes only this thread's mask (threads spawned later inherit it).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Unblocks the signals in this thread: a process started by one that blocked them
    /// (a fork child of a container's VMM) inherits the mask across `exec`.
    pub fn unblock_inherited() -> io::Result<()> {
        let this = Self::block()?;
        // SAFETY: changes only this thread's mask; `this.set` is initialised.
        let rc =
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &this.set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Starts the thread that hands each signal to the attached process (a terminal's
    /// size change becomes a resize when `tty`). With a terminal in raw mode, Ctrl-C
    /// arrives as a byte, not here.
    pub fn spawn(self, tty: bool) -> io::Result<SignalRelay> {
        let relay = SignalRelay::default();
        let set = self.set;
        let r = relay.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid, initialised sigset_t; `sig` is written.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let target = r.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(controller) = target else {
                    if sig != libc::SIGWINCH {
                        let _ =
                            r.early
                                .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    continue;
                };
                let _ = if sig == libc::SIGWINCH {
                    match (tty, terminal_size(io::stdin())) {
                        (true, Some((rows, cols))) => controller.resize(rows, cols),
                        _ => Ok(()),
                    }
                } else {
                    controller.signal(sig)
                };
            })?;
        Ok(relay)
    }
}

/// A terminal's size as (rows, columns).
pub fn terminal_size(fd: impl AsFd) -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(fd).ok()?;
    (ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Stdin's terminal in raw mode (keys, Ctrl-C included, go to the guest's pty),
/// restored when dropped.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Enters raw mode and tells the guest the terminal's size; `None` when stdin is
    /// not a terminal (a process can still get a pty with piped input).
    pub fn enter(controller: &Controller) -> Option<Self> {
        let stdin = io::stdin();
        if !termios::isatty(&stdin) {
            return None;
        }
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        if let Some((rows, cols)) = terminal_size(&stdin) {
            let _ = controller.resize(rows, cols);
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// A host pseudo-terminal pair.
pub struct Pty {
    /// The master: what the engine reads and writes.
    pub master: OwnedFd,
    /// The slave: the container's stdin, stdout and stderr on the host.
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a new pair; the slave is in raw mode, since the guest's own pty does the
    /// line discipline and this one must pass bytes through unchanged.
    pub fn open() -> io::Result<Self> {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let name = ptsname(&master, Vec::new())?;
        let slave: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(name.to_str().map_err(io::Error::other)?)?
            .into();
        let mut t = termios::tcgetattr(&slave)?;
        t.make_raw();
        termios::tcsetattr(&slave, OptionalActions::Now, &t)?;
        Ok(Self { master, slave })
    }
}

/// Sends `master` over the Unix socket at `socket` (an OCI `--console-socket`), as
/// runc does: one byte of data with the descriptor in an SCM_RIGHTS message.
pub fn send_console(socket: &Path, master: &OwnedFd) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    let stream = UnixStream::connect(socket)?;
    let fds = [master.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // runc sends the pty's name as the data; shims read and ignore it.
    let data = b"/dev/ptmx";
    sendmsg(
        &stream,
        &[io::IoSlice::new(data)],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}
