//! A VM's console log, bounded: the guest decides how much it prints, the host decides
//! how much of it is kept.
//!
//! [`ConsoleLog`] appends the guest's serial output to `console.log` (which lives under
//! the state root, by default on `/run`'s tmpfs: host memory). Once the file passes
//! [`MAX_LOG`], its last [`KEEP_LOG`] bytes are moved to the front and the rest cut,
//! behind a line saying how much was dropped ([`cut_mark`]), with what other writers
//! appended meanwhile; a reader that follows the file goes on after a cut where it was
//! ([`position_after_cut`]); [`tail`] and the API's console stream read only what they
//! need.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Size at which a console log is cut.
pub const MAX_LOG: u64 = 16 << 20;
/// What of it is kept when it is cut: its end.
pub const KEEP_LOG: u64 = 8 << 20;
/// How much is written between two checks of the file's size.
const CHECK_EVERY: u64 = 256 << 10;
/// How a cut log's first line starts; [`cut_mark`] makes the whole line.
const CUT_MARK_HEAD: &str = "[forkvm: console log cut here; earlier output dropped: ";
/// Most of a file's end copied in one go after a cut: what other writers (the VM
/// process's own log lines) appended while the log was being cut.
const MAX_APPENDED: u64 = 1 << 20;

/// The line a cut log starts with: `dropped` is how many bytes of output all cuts of
/// this log have dropped before its first kept byte (counted over the log's whole life,
/// so that a reader can tell where it is whatever cuts it missed).
pub fn cut_mark(dropped: u64) -> Vec<u8> {
    format!("{CUT_MARK_HEAD}{dropped} bytes]\n").into_bytes()
}

/// What a console log's first bytes `head` say of it: how many bytes of output cuts have
/// dropped before its first kept byte, and how long the mark line saying so is; `(0, 0)`
/// for a log never cut (or a first line that is no mark of ours).
pub fn cut_head(head: &[u8]) -> (u64, u64) {
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return (0, 0);
    };
    std::str::from_utf8(&head[..end])
        .ok()
        .and_then(|l| l.strip_prefix(CUT_MARK_HEAD))
        .and_then(|l| l.strip_suffix(" bytes]"))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or((0, 0), |dropped| (dropped, end as u64 + 1))
}

/// Where, in a console log whose first bytes are `head`, the output that starts at
/// `offset` (counted over the log's whole life, cuts included: see [`cut_head`]) is;
/// `None` when a cut dropped it.
pub fn position_after_cut(offset: u64, head: &[u8]) -> Option<u64> {
    let (dropped, mark) = cut_head(head);
    offset.checked_sub(dropped).map(|kept| mark + kept)
}

/// A console log file that never grows much past [`MAX_LOG`].
#[derive(Debug)]
pub struct ConsoleLog {
    /// The file, open for appending (the VM process's own messages append to it too).
    file: File,
    /// The same file opened again without `O_APPEND` (appending writes ignore offsets),
    /// to move its end to the front; opened up front, so that cutting opens nothing
    /// (the serial device writes from vCPU threads, whose seccomp filter has no
    /// `openat`). `None` where it cannot be opened: the log is then not cut.
    cutter: Option<File>,
    max: u64,
    keep: u64,
    since_check: u64,
}

impl ConsoleLog {
    /// Bounds `file`, open for appending.
    pub fn new(file: File) -> Self {
        Self::with_limits(file, MAX_LOG, KEEP_LOG)
    }

    /// [`ConsoleLog::new`] with other limits (`keep` < `max`).
    pub fn with_limits(file: File, max: u64, keep: u64) -> Self {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let cutter = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .inspect_err(|e| tracing::debug!("the console log will not be cut: {e}"))
            .ok();
        Self::with_cutter(file, cutter, max, keep)
    }

    /// Bounds `file`, open for appending, cut through `cutter`, the same file open for
    /// reading and writing (by a launcher, where this process may not open it).
    pub fn with_cutter(file: File, cutter: Option<File>, max: u64, keep: u64) -> Self {
        Self {
            file,
            cutter,
            max,
            keep: keep.min(max),
            since_check: 0,
        }
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Cuts the file to its last `keep` bytes if it is past `max`.
    fn cut_if_full(&mut self) -> std::io::Result<()> {
        let len = self.file.metadata()?.len();
        if len <= self.max {
            return Ok(());
        }
        self.cut_at(len)
    }

    /// Cuts the file, which was `len` bytes long when its size was read: to its last
    /// `keep` bytes of those, then what was appended since.
    fn cut_at(&mut self, len: u64) -> std::io::Result<()> {
        let Some(f) = &self.cutter else {
            return Ok(());
        };
        // What earlier cuts dropped, from this file's own mark.
        let mut head = [0u8; 128];
        let n = f.read_at(&mut head, 0)?;
        let (dropped_before, old_mark) = cut_head(&head[..n]);
        let keep = self.keep.saturating_sub(cut_mark(u64::MAX).len() as u64);
        let mut tail = vec![0u8; keep as usize];
        f.read_exact_at(&mut tail, len - keep)?;
        // Start the kept part at a line.
        let start = tail.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        let first_kept = len - keep + start as u64;
        let mark = cut_mark(dropped_before + (first_kept - old_mark));
        f.write_all_at(&mark, 0)?;
        f.write_all_at(&tail[start..], mark.len() as u64)?;
        let mut end = (mark.len() + tail.len() - start) as u64;
        // What other writers appended meanwhile goes after it, not away with the cut (a
        // few tries; a line appended between the last look and the cut is lost).
        let mut copied = len;
        for _ in 0..4 {
            let now = self.file.metadata()?.len();
            if now <= copied {
                break;
            }
            let mut more = vec![0u8; (now - copied).min(MAX_APPENDED) as usize];
            f.read_exact_at(&mut more, copied)?;
            f.write_all_at(&more, end)?;
            end += more.len() as u64;
            copied += more.len() as u64;
        }
        f.set_len(end)
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.since_check += n as u64;
        if self.since_check >= CHECK_EVERY.min(self.max) {
            self.since_check = 0;
            // A log that cannot be cut keeps growing; the guest's output is not lost.
            if let Err(e) = self.cut_if_full() {
                tracing::debug!("cannot cut the console log: {e}");
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The last `n` lines of a file (a VM's console log), for error messages, read from at
/// most its last 64 KiB; empty when it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    const MAX_TAIL: u64 = 64 << 10;
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL)))?;
        let mut bytes = Vec::new();
        f.take(MAX_TAIL).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let text = read().unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appending(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_guest_that_prints_forever_keeps_the_log_bounded_and_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (max, keep) = (1 << 20, 512 << 10);
        let mut log = ConsoleLog::with_limits(appending(&path), max, keep);
        for i in 0..100_000u32 {
            writeln!(log, "line {i:08}").unwrap();
            assert!(
                log.file().metadata().unwrap().len() <= max + CHECK_EVERY,
                "grew past the limit at line {i}"
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(CUT_MARK_HEAD), "{}", &text[..80]);
        assert!(text.ends_with("line 00099999\n"), "the end is kept");
        // Whole lines after the mark, in order.
        let nums: Vec<u32> = text
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(tail(&path, 2), "line 00099998\nline 00099999");
    }

    #[test]
    fn a_follower_goes_on_after_cuts_without_reading_anything_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // Kept more than is written between two looks at the size (256 KiB).
        let (max, keep) = (512 << 10, 400 << 10);
        let mut log = ConsoleLog::with_limits(appending(&path), max, keep);
        let mut i = 0u32;
        let head = || {
            let mut h = [0u8; 128];
            let n = File::open(&path).unwrap().read_at(&mut h, 0).unwrap();
            cut_head(&h[..n]).0
        };
        // Writes lines until the log is cut again; returns it as the cut left it.
        let mut write_until_cut = || {
            let before = head();
            loop {
                writeln!(log, "line {i:08}").unwrap();
                i += 1;
                if head() != before {
                    return std::fs::read(&path).unwrap();
                }
            }
        };
        let lines = |bytes: &[u8]| -> Vec<u32> {
            std::str::from_utf8(bytes)
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("line ").map(|n| n.parse().unwrap()))
                .collect()
        };
        // A follower reads the log as the first cut left it, to its end...
        let first = write_until_cut();
        let (dropped, mark) = cut_head(&first);
        assert!(dropped > 0 && mark > 0);
        let read = dropped + (first.len() as u64 - mark);
        let last_read = *lines(&first).last().unwrap();
        // ...then misses a second cut: it goes on at the line after its last one.
        let second = write_until_cut();
        assert!(cut_head(&second).0 > dropped, "counted over both cuts");
        let at = position_after_cut(read, &second).expect("still kept") as usize;
        assert_eq!(lines(&second[at..])[0], last_read + 1);
        // One that had read less than the cuts dropped starts over, at the mark.
        assert_eq!(position_after_cut(10, &second), None);
        // A log never cut: offsets are the file's.
        assert_eq!(position_after_cut(10, b"line 1\n"), Some(10));
        assert_eq!(cut_head(b"line 1\n"), (0, 0));
    }

    #[test]
    fn what_another_writer_appended_during_a_cut_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (max, keep) = (64 << 10, 32 << 10);
        let mut log = ConsoleLog::with_limits(appending(&path), max, keep);
        // Fill past the limit without a check, as between two checks.
        let line = [b'x'; 99];
        let mut big = Vec::new();
        while (big.len() as u64) < max + 1024 {
            big.extend_from_slice(&line);
            big.push(b'\n');
        }
        log.file().write_all_at(&big, 0).unwrap();
        // The cut has read the size; then the process's own stderr appends a line to
        // the same file (another fd)...
        let len = log.file().metadata().unwrap().len();
        appending(&path)
            .write_all(b"the process's own line\n")
            .unwrap();
        // ...and the cut keeps it at the end.
        log.cut_at(len).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(CUT_MARK_HEAD));
        assert!(
            text.ends_with("the process's own line\n"),
            "{}",
            &text[text.len() - 60..]
        );
        assert!(text.len() as u64 <= keep + 200);
    }

    #[test]
    fn tail_reads_only_the_end_of_a_huge_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let f = appending(&path);
        f.set_len(1 << 40).unwrap(); // a sparse terabyte
        (&f).write_all(b"\nlast words\n").unwrap();
        assert_eq!(tail(&path, 1), "last words");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }
}
