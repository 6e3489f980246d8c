//! The state-file format: `FORKVMST` magic, format version, payload length, CRC-64 of
//! the payload, then the payload (bincode of the VMM's state). Every field is checked
//! before the payload is decoded: a truncated, tampered or foreign file is refused with
//! an error that says which check failed.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FORKVMST";
/// The format version this build writes and reads (3: a NIC's bridge and guest address
/// in the configuration; 4: templates under a keyed MAC instead of a checksum; 5: a
/// share's `FUSE_AUTO_INVAL_DATA` agreement; 6: a vsock device's next host port; 7: the
/// CID a vsock device's guest still sends from; 8: the identity port).
pub const FORMAT_VERSION: u32 = 8;
/// Largest payload accepted (a VM's state is kilobytes; this bounds a hostile file).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// forkvm's checksum: CRC-64/ECMA-182, of state payloads here and of template memory.
pub const CRC: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_ECMA_182);

/// Why a state blob or file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header or its declared length.
    #[error("truncated: {0} bytes, expected {1}")]
    Truncated(usize, u64),
    /// Not a forkvm state file.
    #[error("bad magic: not a forkvm state file")]
    BadMagic,
    /// Written by an incompatible forkvm.
    #[error("unsupported format version {0} (this forkvm reads version {FORMAT_VERSION})")]
    Version(u32),
    /// Declared payload larger than allowed.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    /// Checksum mismatch: the payload was modified or corrupted.
    #[error(
        "checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt"
    )]
    Checksum {
        /// CRC in the header.
        stored: u64,
        /// CRC of the payload.
        computed: u64,
    },
    /// The payload does not decode as the expected state.
    #[error("cannot decode the state")]
    Decode(#[source] bincode::error::DecodeError),
    /// The state cannot be encoded.
    #[error("cannot encode the state")]
    Encode(#[source] bincode::error::EncodeError),
    /// Reading or writing the file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_PAYLOAD as usize }>()
}

/// Frames `value` as a state blob (header + bincode payload).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = bincode::serde::encode_to_vec(value, config()).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validates the header and checksum of `blob`, then decodes its payload.
pub fn decode<T: DeserializeOwned>(blob: &[u8]) -> Result<T, FormatError> {
    if blob.len() < HEADER_LEN {
        return Err(FormatError::Truncated(blob.len(), HEADER_LEN as u64));
    }
    if blob[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(blob[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let len = u64_at(12);
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge(len));
    }
    let payload = &blob[HEADER_LEN..];
    if (payload.len() as u64) < len {
        return Err(FormatError::Truncated(blob.len(), HEADER_LEN as u64 + len));
    }
    let payload = &payload[..len as usize];
    let stored = u64_at(20);
    let computed = CRC.checksum(payload);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    let (value, _) =
        bincode::serde::decode_from_slice(payload, config()).map_err(FormatError::Decode)?;
    Ok(value)
}

/// Why [`open_regular`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum OpenRegularError {
    /// The path is a symbolic link.
    #[error("is a symbolic link")]
    Link,
    /// The path is a directory, device, FIFO or socket.
    #[error("is not a regular file")]
    NotRegular,
    /// Opening or examining it failed (it does not exist, say).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Opens `path` to read as an untrusted file: without following a final symbolic link,
/// without blocking (a FIFO), and only if it is a regular file. Returns it with its
/// metadata, for the caller to size it before reading.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), OpenRegularError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => OpenRegularError::Link,
            _ => OpenRegularError::Io(e),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(OpenRegularError::NotRegular);
    }
    Ok((file, meta))
}

/// Reads and validates a state file written with [`encode`]. The file is opened without
/// following a symbolic link and must be a regular file no larger than a header and
/// [`MAX_PAYLOAD`], checked before anything is read (a link to `/dev/zero` or a huge
/// file is refused, not read into memory).
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let io = |source: std::io::Error| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let (file, meta) = open_regular(path).map_err(|e| {
        io(match e {
            OpenRegularError::Io(e) => e,
            refused => {
                std::io::Error::other(format!("{refused}; a state file must be a regular file"))
            }
        })
    })?;
    let max = HEADER_LEN as u64 + MAX_PAYLOAD;
    if meta.len() > max {
        return Err(FormatError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the check: never read past the limit.
    (&file).take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(FormatError::TooLarge(bytes.len() as u64));
    }
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use forkvm_test_support::error_chain as chain;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
    }

    fn sample() -> State {
        State {
            regs: (0..64).collect(),
            name: "vm".into(),
        }
    }

    #[test]
    fn round_trip() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(&blob[..8], b"FORKVMST");
        assert_eq!(decode::<State>(&blob).unwrap(), sample());
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut blob = encode(&sample()).unwrap();
        blob[0] = b'X';
        assert!(matches!(decode::<State>(&blob), Err(FormatError::BadMagic)));
    }

    #[test]
    fn other_version_is_refused() {
        let mut blob = encode(&sample()).unwrap();
        blob[8] = 99;
        assert!(matches!(
            decode::<State>(&blob),
            Err(FormatError::Version(99))
        ));
    }

    #[test]
    fn truncation_is_refused() {
        let blob = encode(&sample()).unwrap();
        for cut in [0, 7, HEADER_LEN - 1, blob.len() - 1] {
            let e = decode::<State>(&blob[..cut]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated(..)), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn tampered_payload_fails_the_checksum() {
        let mut blob = encode(&sample()).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0x01;
        let e = decode::<State>(&blob).unwrap_err();
        assert!(matches!(e, FormatError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("corrupt"));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut blob = encode(&sample()).unwrap();
        blob[12..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode::<State>(&blob),
            Err(FormatError::TooLarge(_))
        ));
    }

    #[test]
    fn valid_frame_of_the_wrong_type_fails_to_decode() {
        let blob = encode(&"just a string").unwrap();
        assert!(matches!(
            decode::<State>(&blob),
            Err(FormatError::Decode(_))
        ));
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        std::fs::write(&path, encode(&sample()).unwrap()).unwrap();
        assert_eq!(read_state_file::<State>(&path).unwrap(), sample());
        let e = read_state_file::<State>(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"));
    }

    #[test]
    fn links_devices_and_huge_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("state.bin");
        std::fs::write(&good, encode(&sample()).unwrap()).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let e = chain(&read_state_file::<State>(&link).unwrap_err());
        assert!(e.contains("link") && e.contains("symbolic link"), "{e}");
        let e = chain(&read_state_file::<State>(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("/dev/zero: is not a regular file"), "{e}");
        // A sparse file past the limit: refused by its size, never read.
        let huge = dir.path().join("huge");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_PAYLOAD + 4096).unwrap();
        assert!(matches!(
            read_state_file::<State>(&huge),
            Err(FormatError::TooLarge(n)) if n == MAX_PAYLOAD + 4096
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// A hostile state file: any payload under a valid frame (the checksum
        /// recomputed, as a forger would) decodes or is refused, never a panic or an
        /// allocation past the payload limit (a length prefix claiming 2^60 elements).
        #[test]
        fn arbitrary_payloads_in_a_valid_frame_decode_or_are_refused(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..8),
        ) {
            for p in [payload, {
                // And small changes to a real one.
                let mut real = encode(&sample()).unwrap()[HEADER_LEN..].to_vec();
                for (at, x) in &flips {
                    let n = real.len();
                    real[at % n] ^= x;
                }
                real
            }] {
                let mut blob = Vec::new();
                blob.extend_from_slice(&MAGIC);
                blob.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
                blob.extend_from_slice(&(p.len() as u64).to_le_bytes());
                blob.extend_from_slice(&CRC.checksum(&p).to_le_bytes());
                blob.extend_from_slice(&p);
                let _ = decode::<State>(&blob);
            }
        }
    }
}
