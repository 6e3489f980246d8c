//! Owns the newc (`070701`) cpio writer and a minimal reader used to check archives.
//!
//! The Linux initramfs unpacker accepts only the "new ASCII" format: a 110-byte
//! hexadecimal header, the NUL-terminated name, padding to a 4-byte boundary, the
//! data, padding to a 4-byte boundary, and a final `TRAILER!!!` entry.

use std::io::{self, Write};

/// File type bits for a directory.
pub const S_IFDIR: u32 = 0o040000;
/// File type bits for a regular file.
pub const S_IFREG: u32 = 0o100000;
/// File type bits for a symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// File type bits for a character device.
pub const S_IFCHR: u32 = 0o020000;
/// Mask selecting the file type bits of a mode.
pub const S_IFMT: u32 = 0o170000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Streams newc cpio entries into a writer.
///
/// All timestamps, owners and inode numbers are deterministic (mtime 0, uid/gid 0,
/// sequential inodes), so the same inputs always produce the same bytes.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    finished: bool,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            finished: false,
        }
    }

    /// Appends a directory (`mode` holds permission bits only).
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])
    }

    /// Appends a regular file (`mode` holds permission bits only).
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    /// Appends a symbolic link `name -> target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Appends a character device node.
    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the `TRAILER!!!` entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_trailer()?;
        self.out.flush()?;
        // `finished` is set, so the writer can be moved out without a double trailer.
        let Self { out, .. } = self;
        Ok(out)
    }

    fn write_trailer(&mut self) -> io::Result<()> {
        if !self.finished {
            self.next_ino = 0;
            self.entry(TRAILER, 0, 1, (0, 0), &[])?;
            self.finished = true;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::other("cpio archive already finished"));
        }
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {name:?}"),
            ));
        }
        let filesize = u32::try_from(data.len()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: too large for cpio ({e})"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{filesize:08X}\
             {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path inside the archive (no leading `/`).
    pub name: String,
    /// Full mode: file type and permission bits.
    pub mode: u32,
    /// Device numbers for device nodes.
    pub rdev: (u32, u32),
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
}

/// Parses a newc archive up to and including the trailer (which is not returned).
///
/// Checks the magic, the 4-byte alignment of every header and data block, and
/// that a `TRAILER!!!` entry is present.
pub fn parse_newc(bytes: &[u8]) -> io::Result<Vec<CpioEntry>> {
    fn bad(msg: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }
    fn field(h: &[u8], i: usize) -> io::Result<u32> {
        let s = std::str::from_utf8(&h[6 + 8 * i..6 + 8 * (i + 1)])
            .map_err(|e| bad(format!("non-ASCII header field: {e}")))?;
        u32::from_str_radix(s, 16).map_err(|e| bad(format!("bad header field {s:?}: {e}")))
    }
    let align = |x: usize| (x + 3) & !3;
    let mut pos = 0;
    let mut entries = Vec::new();
    loop {
        if pos % 4 != 0 {
            return Err(bad(format!("header at {pos} not 4-byte aligned")));
        }
        let h = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| bad(format!("truncated header at {pos} (missing trailer?)")))?;
        if &h[..6] != MAGIC {
            return Err(bad(format!("bad magic at {pos}")));
        }
        let mode = field(h, 1)?;
        let filesize = field(h, 6)? as usize;
        let rdev = (field(h, 9)?, field(h, 10)?);
        let namesize = field(h, 11)? as usize;
        let name_start = pos + HEADER_LEN;
        let name_bytes = bytes
            .get(name_start..name_start + namesize)
            .ok_or_else(|| bad("truncated name".into()))?;
        if name_bytes.last() != Some(&0) {
            return Err(bad("name not NUL-terminated".into()));
        }
        let name = String::from_utf8_lossy(&name_bytes[..namesize - 1]).into_owned();
        let data_start = align(name_start + namesize);
        let data = bytes
            .get(data_start..data_start + filesize)
            .ok_or_else(|| bad(format!("truncated data for {name}")))?
            .to_vec();
        pos = align(data_start + filesize);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_entry_kinds() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("bin/hello", 0o644, b"hello").unwrap();
        w.file("empty", 0o600, b"").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse_newc(&bytes).unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].name, "bin");
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
        assert_eq!(e[1].data, b"hello");
        assert_eq!(e[1].mode, S_IFREG | 0o644);
        assert_eq!(e[2].data, b"");
        assert_eq!(e[3].mode & S_IFMT, S_IFLNK);
        assert_eq!(e[3].data, b"busybox");
        assert_eq!(e[4].mode, S_IFCHR | 0o600);
        assert_eq!(e[4].rdev, (5, 1));
        let tail = b"TRAILER!!!\0";
        assert!(bytes.windows(tail.len()).any(|w| w == tail));
    }

    #[test]
    fn header_layout_is_exact() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        // 110 header + "a\0" = 112 (aligned), 3 data bytes + 1 pad = 116.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..115], b"xyz");
        assert_eq!(bytes[115], 0);
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn missing_trailer_is_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"x").unwrap();
        let bytes = w.finish().unwrap();
        let cut = bytes.len() - 124;
        assert!(parse_newc(&bytes[..cut]).is_err());
    }

    #[test]
    fn writing_after_finish_fails_and_names_are_checked() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
        w.write_trailer().unwrap();
        assert!(w.file("late", 0o644, b"").is_err());
    }
}
