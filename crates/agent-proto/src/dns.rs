//! The DNS relay's framing: the guest agent answers DNS on loopback addresses that only
//! the container's network namespace has (Docker's embedded resolver at `127.0.0.11`),
//! and relays each query to the host on vsock port [`DNS_RELAY_PORT`], where the
//! container's monitor asks the resolver inside that namespace ([`Request::DnsRelay`]).
//!
//! A connection carries queries and answers framed as DNS over TCP frames them
//! (RFC 1035 §4.2.2): a 2-byte big-endian length, then the message. The host answers
//! each query in order; an empty frame means the resolver did not answer in time.
//!
//! [`Request::DnsRelay`]: crate::Request::DnsRelay

use std::io::{self, Read, Write};

/// vsock port on the host (CID 2) the relay connects to; the VMM turns it into the Unix
/// socket `<vsock uds>_53`.
pub const DNS_RELAY_PORT: u32 = 53;
/// The DNS port the relay answers on in the guest and asks in the namespace.
pub const DNS_PORT: u16 = 53;
/// The largest message a frame carries (its length field's range).
pub const MAX_MESSAGE: usize = u16::MAX as usize;

/// Writes `msg` as one frame; a message longer than [`MAX_MESSAGE`] is an error.
pub fn write_frame(w: &mut impl Write, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a DNS message of {} bytes does not fit a frame", msg.len()),
        )
    })?;
    let mut frame = Vec::with_capacity(2 + msg.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    w.write_all(&frame)
}

/// Reads one frame's message (at most [`MAX_MESSAGE`] bytes, by construction).
pub fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut msg)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_stop_at_their_length() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"\x12\x34query").unwrap();
        write_frame(&mut wire, b"").unwrap();
        assert_eq!(&wire[..2], &[0, 7]);
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).unwrap(), b"\x12\x34query");
        assert_eq!(read_frame(&mut r).unwrap(), b"");
        assert_eq!(
            read_frame(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_truncated_frame_is_an_error_and_an_oversized_one_is_refused() {
        let mut r: &[u8] = &[0, 9, b'a', b'b'];
        assert_eq!(
            read_frame(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let e = write_frame(&mut Vec::new(), &vec![0u8; MAX_MESSAGE + 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
