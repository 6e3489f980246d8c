//! Binary frames of a running process's connection: after [`crate::Response::Started`]
//! both directions carry `[kind: u8][len: u32 big-endian][payload]`, payload at most
//! [`MAX_PAYLOAD`] bytes. This module owns the encoding and its validation.

use std::io::{self, Read, Write};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bytes before the payload: kind and length.
pub const HEADER_LEN: usize = 5;

/// Frame kinds on the wire.
pub mod kind {
    /// Host→agent: bytes for the process's stdin.
    pub const STDIN: u8 = 0x01;
    /// Host→agent: no more stdin (empty payload).
    pub const STDIN_CLOSE: u8 = 0x02;
    /// Host→agent: signal the process (i32 BE signal number).
    pub const SIGNAL: u8 = 0x03;
    /// Host→agent: terminal size (u16 BE rows, u16 BE columns).
    pub const RESIZE: u8 = 0x04;
    /// Agent→host: bytes the process wrote to stdout (or to its terminal).
    pub const STDOUT: u8 = 0x11;
    /// Agent→host: bytes the process wrote to stderr (never in tty mode).
    pub const STDERR: u8 = 0x12;
    /// Agent→host: the process exited (i32 BE exit code); the last frame sent.
    pub const EXIT: u8 = 0x13;
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// End of the process's stdin.
    StdinClose,
    /// Deliver this signal to the process.
    Signal(i32),
    /// New terminal size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Process output on stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Process output on stderr.
    Stderr(Vec<u8>),
    /// Exit code: the status, or 128 + signal number when a signal killed it.
    Exit(i32),
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("frame I/O: {0}")]
    Io(#[from] io::Error),
    /// The connection ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A payload longer than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds {MAX_PAYLOAD}")]
    Oversize {
        /// Announced or attempted payload length.
        len: usize,
    },
    /// A kind this protocol version does not define.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A fixed-size payload of the wrong size.
    #[error("frame kind {kind:#04x} needs a {expected}-byte payload, got {len}")]
    BadLength {
        /// Frame kind.
        kind: u8,
        /// Size its payload must have.
        expected: usize,
        /// Size it had.
        len: usize,
    },
}

impl Frame {
    /// The wire kind of this frame.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Stdin(_) => kind::STDIN,
            Frame::StdinClose => kind::STDIN_CLOSE,
            Frame::Signal(_) => kind::SIGNAL,
            Frame::Resize { .. } => kind::RESIZE,
            Frame::Stdout(_) => kind::STDOUT,
            Frame::Stderr(_) => kind::STDERR,
            Frame::Exit(_) => kind::EXIT,
        }
    }

    /// Header and payload as one buffer.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let fixed;
        let payload: &[u8] = match self {
            Frame::Stdin(d) | Frame::Stdout(d) | Frame::Stderr(d) => d,
            Frame::StdinClose => &[],
            Frame::Signal(n) | Frame::Exit(n) => {
                fixed = n.to_be_bytes();
                &fixed
            }
            Frame::Resize { rows, cols } => {
                let mut b = [0u8; 4];
                b[..2].copy_from_slice(&rows.to_be_bytes());
                b[2..].copy_from_slice(&cols.to_be_bytes());
                return Ok(encode_raw(kind::RESIZE, &b));
            }
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Oversize { len: payload.len() });
        }
        Ok(encode_raw(self.kind(), payload))
    }

    /// Validates a payload of `kind`.
    pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Oversize { len: payload.len() });
        }
        let fixed = |expected: usize| -> Result<(), FrameError> {
            if payload.len() == expected {
                Ok(())
            } else {
                Err(FrameError::BadLength {
                    kind,
                    expected,
                    len: payload.len(),
                })
            }
        };
        let be_i32 = |p: &[u8]| i32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        Ok(match kind {
            kind::STDIN => Frame::Stdin(payload),
            kind::STDOUT => Frame::Stdout(payload),
            kind::STDERR => Frame::Stderr(payload),
            kind::STDIN_CLOSE => {
                fixed(0)?;
                Frame::StdinClose
            }
            kind::SIGNAL => {
                fixed(4)?;
                Frame::Signal(be_i32(&payload))
            }
            kind::EXIT => {
                fixed(4)?;
                Frame::Exit(be_i32(&payload))
            }
            kind::RESIZE => {
                fixed(4)?;
                Frame::Resize {
                    rows: u16::from_be_bytes([payload[0], payload[1]]),
                    cols: u16::from_be_bytes([payload[2], payload[3]]),
                }
            }
            other => return Err(FrameError::UnknownKind(other)),
        })
    }

    /// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
    pub fn read_from<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversize { len });
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                e.into()
            }
        })?;
        Frame::decode(header[0], payload).map(Some)
    }

    /// Writes this frame with one `write_all`.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), FrameError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }
}

fn encode_raw(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Frame> {
        vec![
            Frame::Stdin(b"hello".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::StdinClose,
            Frame::Signal(15),
            Frame::Signal(-1),
            Frame::Resize {
                rows: 50,
                cols: 132,
            },
            Frame::Stdout(vec![0xff; MAX_PAYLOAD]),
            Frame::Stderr(b"err\n".to_vec()),
            Frame::Exit(137),
        ]
    }

    #[test]
    fn every_frame_round_trips_through_a_byte_stream() {
        let mut wire = Vec::new();
        for f in all_kinds() {
            f.write_to(&mut wire).unwrap();
        }
        let mut r = &wire[..];
        for f in all_kinds() {
            assert_eq!(Frame::read_from(&mut r).unwrap(), Some(f));
        }
        assert_eq!(Frame::read_from(&mut r).unwrap(), None);
    }

    #[test]
    fn wire_layout_is_kind_then_big_endian_length() {
        assert_eq!(
            Frame::Signal(9).encode().unwrap(),
            [0x03, 0, 0, 0, 4, 0, 0, 0, 9]
        );
        assert_eq!(
            Frame::Resize { rows: 24, cols: 80 }.encode().unwrap(),
            [0x04, 0, 0, 0, 4, 0, 24, 0, 80]
        );
        assert_eq!(Frame::StdinClose.encode().unwrap(), [0x02, 0, 0, 0, 0]);
        assert_eq!(
            Frame::Stdout(b"ab".to_vec()).encode().unwrap(),
            [0x11, 0, 0, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn oversize_frames_are_refused_both_ways() {
        assert!(matches!(
            Frame::Stdout(vec![0; MAX_PAYLOAD + 1]).encode(),
            Err(FrameError::Oversize { len }) if len == MAX_PAYLOAD + 1
        ));
        // A header announcing 4 GiB is refused before anything is allocated.
        let wire = [0x11, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Frame::read_from(&mut &wire[..]),
            Err(FrameError::Oversize { .. })
        ));
        let mut wire = vec![0x11];
        wire.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        wire.resize(wire.len() + MAX_PAYLOAD + 1, 0);
        assert!(matches!(
            Frame::read_from(&mut &wire[..]),
            Err(FrameError::Oversize { .. })
        ));
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[0x11, 0, 0],                      // short header
            &[0x11, 0, 0, 0, 3, b'a'],          // short payload
            &[0x7f, 0, 0, 0, 0],                // unknown kind
            &[0x03, 0, 0, 0, 2, 0, 9],          // signal of 2 bytes
            &[0x13, 0, 0, 0, 5, 0, 0, 0, 0, 0], // exit of 5 bytes
            &[0x02, 0, 0, 0, 1, 0],             // stdin close with payload
            &[0x04, 0, 0, 0, 0],                // resize without payload
        ];
        for wire in cases {
            assert!(Frame::read_from(&mut &wire[..]).is_err(), "{wire:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever a hostile agent (or host) sends, reading frames ends in frames or an
        /// error, never a panic or a payload past the limit.
        #[test]
        fn arbitrary_bytes_read_as_frames_or_errors(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            big_len in proptest::prelude::any::<u32>(),
        ) {
            let mut r = &bytes[..];
            while let Ok(Some(frame)) = Frame::read_from(&mut r) {
                let encoded = frame.encode().unwrap();
                proptest::prop_assert!(encoded.len() <= HEADER_LEN + MAX_PAYLOAD);
            }
            // A header claiming any length never makes the reader allocate past it.
            let mut header = vec![kind::STDOUT];
            header.extend_from_slice(&big_len.to_be_bytes());
            let got = Frame::read_from(&mut &header[..]);
            if big_len as usize > MAX_PAYLOAD {
                let oversize = matches!(got, Err(FrameError::Oversize { .. }));
                proptest::prop_assert!(oversize);
            }
        }

        /// Request lines from a hostile host: parsed or refused, never a panic.
        #[test]
        fn arbitrary_request_lines_parse_or_are_refused(line in ".{0,300}") {
            let _ = crate::protocol::parse_request(&line);
        }
    }
}
