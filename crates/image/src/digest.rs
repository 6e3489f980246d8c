//! SHA-256 content digests (`sha256:<hex>`): validation, hashing readers, and the
//! "copy while hashing, then compare" primitive every blob import goes through.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// The only digest algorithm the store accepts.
pub(crate) const SHA256_PREFIX: &str = "sha256:";

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// The `sha256:<hex>` digest of `data`.
pub(crate) fn sha256_of(data: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", hex(&Sha256::digest(data)))
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits and returns the
/// hex part (what names the blob file). `what` says where the digest came from.
pub(crate) fn digest_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, Error> {
    match digest.strip_prefix(SHA256_PREFIX) {
        Some(hex) if is_hex(hex) && hex.len() == 64 => Ok(hex),
        _ => Err(Error::InvalidDigest {
            what: what.to_string(),
            digest: digest.to_string(),
        }),
    }
}

/// Lowercase hex digits only (and at least one).
pub(crate) fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Fails with [`Error::DigestMismatch`] unless `actual == expected`.
pub(crate) fn check(
    what: impl FnOnce() -> String,
    expected: &str,
    actual: &str,
) -> Result<(), Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::DigestMismatch {
            what: what(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// A reader that hashes and counts everything read through it.
pub(crate) struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads whatever the consumer left unread (tar stops at its end-of-archive
    /// marker; the digest covers the whole stream), then returns the digest and the
    /// number of bytes.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let digest = format!("{SHA256_PREFIX}{}", hex(&self.hasher.finalize()));
        Ok((digest, self.count))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// An incremental hasher for data that arrives in chunks (registry streams).
#[derive(Default)]
pub(crate) struct Hasher(Sha256);

impl Hasher {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub(crate) fn finish(self) -> String {
        format!("{SHA256_PREFIX}{}", hex(&self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            sha256_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut r = HashReader::new(&b"abc"[..]);
        let mut first = [0u8; 1];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(d, sha256_of(b"abc"));
        assert_eq!(n, 3);
    }

    #[test]
    fn malformed_digests_are_refused() {
        let good = sha256_of(b"x");
        assert!(digest_hex(&good, "t").is_ok());
        for bad in [
            "sha256:abc",
            "sha512:00",
            &good.to_uppercase(),
            &format!("{good}0"),
            "sha256:../../etc/passwd",
        ] {
            assert!(
                matches!(digest_hex(bad, "t"), Err(Error::InvalidDigest { .. })),
                "{bad}"
            );
        }
    }
}
