//! Moving a state blob and file descriptors (guest memory layers, the host files a
//! device holds) to another process over a Unix stream socket: one `sendmsg` carrying
//! the blob's length, how many descriptors follow and the first of them as
//! `SCM_RIGHTS`; one more one-byte message per further [`FDS_PER_MESSAGE`]
//! descriptors; then the blob bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors one message carries (the kernel's limit, `SCM_MAX_FD`, is 253).
pub const FDS_PER_MESSAGE: usize = 250;
/// Most descriptors one transfer carries: as many as a process may hold.
pub const MAX_FDS: usize = 1 << 20;

/// Errors while sending or receiving a blob.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The socket failed.
    #[error("socket error")]
    Io(#[from] std::io::Error),
    /// `sendmsg`/`recvmsg` failed.
    #[error("cannot pass file descriptors")]
    Scm(#[source] vmm_sys_util::errno::Error),
    /// The peer closed before sending everything.
    #[error("the peer closed the connection early")]
    Closed,
    /// Too many descriptors or a blob over the limit.
    #[error("transfer too large: {0}")]
    TooLarge(String),
    /// Fewer or more descriptors came than the sender announced.
    #[error("{got} file descriptors came where {announced} were announced")]
    Descriptors {
        /// How many the header announced.
        announced: usize,
        /// How many had come.
        got: usize,
    },
}

/// Sends `blob` and `fds` on `sock`.
pub fn send_blob(sock: &UnixStream, blob: &[u8], fds: &[RawFd]) -> Result<(), TransferError> {
    if fds.len() > MAX_FDS {
        return Err(TransferError::TooLarge(format!(
            "{} descriptors",
            fds.len()
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&(blob.len() as u64).to_le_bytes());
    header[8..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let mut chunks = fds.chunks(FDS_PER_MESSAGE);
    let first = chunks.next().unwrap_or(&[]);
    let sent = sock
        .send_with_fds(&[&header[..]], first)
        .map_err(TransferError::Scm)?;
    if sent != header.len() {
        return Err(TransferError::Closed);
    }
    for chunk in chunks {
        let sent = sock
            .send_with_fds(&[&[0u8][..]], chunk)
            .map_err(TransferError::Scm)?;
        if sent != 1 {
            return Err(TransferError::Closed);
        }
    }
    (&*sock).write_all(blob)?;
    Ok(())
}

/// The header: the blob's length (u64) and the number of descriptors (u32), little
/// endian.
const HEADER_LEN: usize = 12;

/// Receives a blob of at most `max_len` bytes and its descriptors from `sock`.
pub fn recv_blob(sock: &UnixStream, max_len: u64) -> Result<(Vec<u8>, Vec<File>), TransferError> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let n = recv_fds(sock, &mut header, &mut fds)?;
    if n == 0 {
        return Err(TransferError::Closed);
    }
    // The header may arrive split across reads on a stream socket.
    (&*sock)
        .read_exact(&mut header[n..])
        .map_err(|_| TransferError::Closed)?;
    let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let announced = u32::from_le_bytes(header[8..].try_into().expect("4 bytes")) as usize;
    if len > max_len {
        return Err(TransferError::TooLarge(format!("{len}-byte blob")));
    }
    if announced > MAX_FDS {
        return Err(TransferError::TooLarge(format!("{announced} descriptors")));
    }
    while fds.len() < announced {
        let before = fds.len();
        let mut byte = [0u8; 1];
        if recv_fds(sock, &mut byte, &mut fds)? == 0 || fds.len() == before {
            break;
        }
    }
    if fds.len() != announced {
        return Err(TransferError::Descriptors {
            announced,
            got: fds.len(),
        });
    }
    let mut blob = vec![0u8; len as usize];
    (&*sock)
        .read_exact(&mut blob)
        .map_err(|_| TransferError::Closed)?;
    Ok((blob, fds))
}

/// One `recvmsg` into `buf`, with up to [`FDS_PER_MESSAGE`] descriptors appended to
/// `fds`; the bytes read.
fn recv_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<File>,
) -> Result<usize, TransferError> {
    let mut raw = [-1 as RawFd; FDS_PER_MESSAGE];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which lives across the call and is as long as
    // the iovec says.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(TransferError::Scm)?;
    fds.extend(raw[..nfds].iter().map(|&fd| {
        // Received without close-on-exec (vmm-sys-util's recvmsg takes no
        // MSG_CMSG_CLOEXEC): set it at once, so that a program this process executes
        // does not hold a share's files or guest memory. (A receiving VM process has
        // no other thread that forks and executes meanwhile.)
        // SAFETY: F_SETFD on a descriptor recvmsg just installed reads no memory.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: recvmsg installed these descriptors in this process; nothing else
        // owns them.
        unsafe { File::from_raw_fd(fd) }
    }));
    Ok(n)
}

/// The raw descriptor numbers of `files`, for [`send_blob`].
pub fn raw_fds(files: &[&File]) -> Vec<RawFd> {
    files.iter().map(|f| f.as_raw_fd()).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Seek;

    use super::*;

    #[test]
    fn blob_and_fds_cross_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"guest memory").unwrap();
        let blob = vec![7u8; 100_000];
        let sender = std::thread::spawn(move || {
            send_blob(&a, &blob, &raw_fds(&[&f])).unwrap();
            f
        });
        let (got, mut files) = recv_blob(&b, 1 << 20).unwrap();
        sender.join().unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(got.iter().all(|&x| x == 7));
        assert_eq!(files.len(), 1);
        let mut s = String::new();
        files[0].rewind().unwrap();
        files[0].read_to_string(&mut s).unwrap();
        assert_eq!(s, "guest memory");
    }

    #[test]
    fn more_descriptors_than_one_message_carries_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let n = FDS_PER_MESSAGE * 2 + 17;
        // Three files, each sent many times (the receiver gets a descriptor per send):
        // within the usual 1024 open files.
        let files: Vec<File> = (0..3)
            .map(|i| {
                let mut f = tempfile::tempfile().unwrap();
                write!(f, "{i}").unwrap();
                f
            })
            .collect();
        let sender = std::thread::spawn(move || {
            let refs: Vec<&File> = (0..n).map(|i| &files[i % 3]).collect();
            send_blob(&a, b"state", &raw_fds(&refs)).unwrap();
            files
        });
        let (got, mut received) = recv_blob(&b, 1 << 20).unwrap();
        sender.join().unwrap();
        assert_eq!(got, b"state");
        assert_eq!(received.len(), n);
        for (i, f) in received.iter_mut().enumerate() {
            let mut s = String::new();
            f.rewind().unwrap();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, (i % 3).to_string());
            // Received close-on-exec: no process this one starts inherits them.
            // SAFETY: F_GETFD on an open descriptor reads no memory.
            let fd_flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }

    #[test]
    fn fewer_descriptors_than_announced_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        // A header announcing 300 descriptors with one, then the peer goes away.
        let mut header = [0u8; HEADER_LEN];
        header[8..].copy_from_slice(&300u32.to_le_bytes());
        a.send_with_fds(&[&header[..]], &[f.as_raw_fd()]).unwrap();
        drop(a);
        assert!(matches!(
            recv_blob(&b, 10),
            Err(TransferError::Descriptors {
                announced: 300,
                got: 1
            })
        ));
    }

    #[test]
    fn oversized_blob_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        send_blob(&a, &[0u8; 64], &[]).unwrap();
        assert!(matches!(recv_blob(&b, 10), Err(TransferError::TooLarge(_))));
    }

    #[test]
    fn early_close_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv_blob(&b, 10), Err(TransferError::Closed)));
    }
}
