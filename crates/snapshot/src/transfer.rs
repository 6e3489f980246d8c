//! Moving a state blob and file descriptors (guest memory layers) to another process
//! over a Unix stream socket: one `sendmsg` carrying the length and the fds as
//! `SCM_RIGHTS`, then the blob bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors one transfer carries.
pub const MAX_FDS: usize = 32;

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
}

/// Sends `blob` and `fds` on `sock`.
pub fn send_blob(sock: &UnixStream, blob: &[u8], fds: &[RawFd]) -> Result<(), TransferError> {
    if fds.len() > MAX_FDS {
        return Err(TransferError::TooLarge(format!(
            "{} descriptors",
            fds.len()
        )));
    }
    let header = (blob.len() as u64).to_le_bytes();
    let sent = sock
        .send_with_fds(&[&header[..]], fds)
        .map_err(TransferError::Scm)?;
    if sent != header.len() {
        return Err(TransferError::Closed);
    }
    (&*sock).write_all(blob)?;
    Ok(())
}

/// Receives a blob of at most `max_len` bytes and its descriptors from `sock`.
pub fn recv_blob(sock: &UnixStream, max_len: u64) -> Result<(Vec<u8>, Vec<File>), TransferError> {
    let mut header = [0u8; 8];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which lives across the call and is as long
    // as the iovec says.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(TransferError::Scm)?;
    let fds: Vec<File> = raw[..nfds]
        .iter()
        .map(|&fd| {
            // SAFETY: recvmsg installed these descriptors in this process; nothing else
            // owns them.
            unsafe { File::from_raw_fd(fd) }
        })
        .collect();
    if n == 0 {
        return Err(TransferError::Closed);
    }
    // The length may arrive split across reads on a stream socket.
    (&*sock)
        .read_exact(&mut header[n..])
        .map_err(|_| TransferError::Closed)?;
    let len = u64::from_le_bytes(header);
    if len > max_len {
        return Err(TransferError::TooLarge(format!("{len}-byte blob")));
    }
    let mut blob = vec![0u8; len as usize];
    (&*sock)
        .read_exact(&mut blob)
        .map_err(|_| TransferError::Closed)?;
    Ok((blob, fds))
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
