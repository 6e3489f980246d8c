//! Templates: a VM's complete state saved to a directory, from which a new forkvm
//! process (after a restart, on another day) forks children exactly as from the
//! running VM.
//!
//! A template directory holds `memory.raw`, guest RAM in memfd order (pages that are
//! all zeros are left as holes, so the file is as sparse as the guest), and
//! `state.forkvm`, the [`VmSnapshot`] with the memory's length and MAC in forkvm's
//! checked state format, itself under a MAC. The MACs are keyed hashes made with the
//! host's template key ([`key`]): a template changed by anyone without the key (its
//! state pointed at another disk, its memory patched, a checksum recomputed) is
//! refused, as is a template saved on another host. Loading checks the state file's
//! frame (magic, version, size, checksum) and MAC, and the memory file's length and
//! MAC, before anything is used, with an error that says what is wrong. The memory is
//! checked while it is copied into a sealed memory file, which the children map
//! copy-on-write: what they run is what was checked, and the template's files may
//! change or go while they live (`memory.raw` is saved read-only all the same).
//!
//! The key is never in a VM process: a VM writes its state and memory unsealed into
//! its own directory, and whoever asked for the template seals them (`seal_in`,
//! [`save_running`]), reading them as untrusted input: the memory's layout must be the
//! one its size gives, no disk writable, no share in use, and, where the caller knows
//! the configuration the VM was launched with, its kernel, disks and shares the same.
//! What this cannot catch (a compromised VM process writing another configuration when
//! the caller does not know the launched one; another compromised VM process, which may
//! write the same state root, replacing the staged files during a save) is said in
//! `docs/security.md`.

pub mod key;
pub mod launched;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::control::ChildSpec;
use crate::control::{error_chain, ControlError, ForkOutcome, ForkRequest, TemplateInfo};
use crate::fork::{check_request, identities, Launching};
use crate::launch::{ChildHomes, Start};
use crate::memory::{MemoryLayout, RamRange};
use crate::pool::ChildPool;
use crate::snapshot::VmSnapshot;
use crate::vmm::Vmm;
pub use key::{KeyError, TemplateKey};

/// The state file of a template directory.
pub const STATE_FILE: &str = "state.forkvm";
/// The memory file of a template directory.
pub const MEMORY_FILE: &str = "memory.raw";
/// What a VM process writes beside its memory when it saves itself (`UnsealedState`);
/// [`save_running`] seals it into [`STATE_FILE`].
pub const UNSEALED_FILE: &str = "state.unsealed";
const PAGE: usize = 4096;

/// What `state.forkvm` holds: the [`TemplateState`], encoded, and its MAC.
#[derive(Debug, Serialize, Deserialize)]
struct SealedState {
    state: Vec<u8>,
    mac: [u8; 32],
}

/// The MAC context of a template's state.
const STATE_CONTEXT: &str = "forkvm template state v1";
/// The MAC context of a template's memory, as forkvm saved it before 2026-12-05: every
/// byte of the memory, holes included (checked only when the current MAC does not
/// match, so such templates still load).
const MEMORY_CONTEXT_V1: &str = "forkvm template memory v1";
/// The MAC context of a template's memory: the pages that are not all zeros, each as
/// its offset and its bytes, in order, then the memory's length ([`SparseMac`]).
/// Loading reads only the memory file's data, not its holes: its cost follows what the
/// guest stored, not its memory size.
const MEMORY_CONTEXT: &str = "forkvm template memory v2";

/// A template memory's MAC ([`MEMORY_CONTEXT`]): what is not in a page given to it is
/// zeros, so holes (and zero pages a copy of the file may have filled in) count as
/// nothing and the MAC does not depend on how the file is laid out.
struct SparseMac(blake3::Hasher);

impl SparseMac {
    fn new(key: &TemplateKey) -> Self {
        Self(key.hasher(MEMORY_CONTEXT))
    }

    /// Counts the page at `offset`, unless it is all zeros; returns whether it counted.
    fn page(&mut self, offset: u64, page: &[u8]) -> bool {
        if is_zero(page) {
            return false;
        }
        self.0.update(&offset.to_le_bytes());
        self.0.update(page);
        true
    }

    fn finalize(mut self, memory_len: u64) -> [u8; 32] {
        self.0.update(&memory_len.to_le_bytes());
        *self.0.finalize().as_bytes()
    }
}

/// A template's state: the VM's, and its memory's layout, length and MAC.
#[derive(Debug, Serialize, Deserialize)]
struct TemplateState {
    snapshot: VmSnapshot,
    ranges: Vec<RamRange>,
    memory_len: u64,
    memory_mac: [u8; 32],
}

/// A template's state as the VM process writes it: without MACs, for the holder of
/// the host's key to check and seal ([`seal_in`]). The VM process never has the key: one
/// taken over by its guest cannot forge templates, only write what is sealed when its
/// owner asks for a template (checked as [`seal_in`] says).
#[derive(Debug, Serialize, Deserialize)]
struct UnsealedState {
    snapshot: VmSnapshot,
    ranges: Vec<RamRange>,
    memory_len: u64,
}

impl TemplateState {
    /// vCPUs and memory (MiB) of the saved VM.
    fn machine(&self) -> (u8, u64) {
        (self.snapshot.config.vcpus, self.snapshot.config.mem_mib)
    }
}

/// Why a template could not be saved or used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file of the template cannot be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a valid forkvm template state.
    #[error("{path} is not a usable template state")]
    State {
        /// The state file.
        path: PathBuf,
        /// What check failed.
        #[source]
        source: forkvm_snapshot::FormatError,
    },
    /// The template's key cannot be used.
    #[error("cannot authenticate the template")]
    Key(#[from] KeyError),
    /// The state's MAC does not match: changed since it was saved, or saved with
    /// another key.
    #[error(
        "{}: not saved by this host's forkvm, or changed since: its MAC does not match the template key",
        .0.display()
    )]
    Forged(PathBuf),
    /// The memory file does not match the state.
    #[error("{path}: {problem}")]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The saved machine cannot be forked.
    #[error("cannot fork the template")]
    Fork(#[from] ControlError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Vmm {
    /// Saves this VM's state and memory in `dir` (created if needed; existing files are
    /// replaced), not yet sealed: `seal_in` (by the holder of the host's key:
    /// [`save_running`]) makes them a template. The VM is paused while its memory is written and resumed after,
    /// unless it was paused already.
    pub fn save_template(&mut self, dir: &Path) -> Result<TemplateInfo, ControlError> {
        let t0 = Instant::now();
        refuse_unwritable(dir)?;
        let fail = |e: TemplateError| ControlError::Failed(error_chain(&e));
        std::fs::create_dir_all(dir)
            .map_err(io(dir))
            .map_err(fail)?;
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let saved = self.capture().and_then(|snapshot| {
            crate::fork::refuse_shares_in_templates(&snapshot)?;
            write_unsealed(dir, snapshot, self.ram().memory(), self.ram().ranges()).map_err(fail)
        });
        if !was_paused {
            self.resume()?;
        }
        let (memory_bytes, stored_bytes) = saved?;
        Ok(TemplateInfo {
            dir: dir.to_owned(),
            memory_bytes,
            stored_bytes,
            pause_us: t0.elapsed().as_micros() as u64,
        })
    }
}

/// Refuses, by name, a template directory the VM process's jail does not let it write
/// (the kernel would answer `EACCES` half-way).
fn refuse_unwritable(dir: &Path) -> Result<(), ControlError> {
    forkvm_jail::landlock::check_writable("template directory", dir).map_err(|e| {
        ControlError::Invalid(format!(
            "{e}; save the template there (`forkvm template save` saves into the VM's \
             directory and moves the files)"
        ))
    })
}

/// Why a running VM could not be saved as a template through its API.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// There is no host key and none can be made here.
    #[error("cannot make or read the host's template key")]
    Key(#[source] KeyError),
    /// The VM refused or failed to save itself (its answer says why).
    #[error("the VM did not save itself")]
    Api(#[source] forkvm_api::client::ClientError),
    /// What the VM saved cannot be sealed (it is not what a VM process writes).
    #[error("what the VM saved cannot be made a template")]
    Seal(#[source] TemplateError),
    /// The saved files could not be moved into place.
    #[error("the saved template cannot be moved into place")]
    Move(#[source] TemplateError),
}

/// Saves the running VM registered in `home` as a template in `dir` through its API,
/// and seals it with the host's template key (made here if there is none): the VM
/// process never holds the key. The VM process's jail lets it write only under its
/// state root: it saves into its own directory, where its state and memory are read
/// as untrusted input (`seal_in`); the sealed state is written into `dir` (made if
/// needed) by this process, and the memory moved there is checked to be the file whose
/// MAC was computed. `expected`: the configuration the VM was launched with, when the
/// caller knows it; the saved state must carry the same (disks, shares, kernel, size).
pub fn save_running(
    home: &forkvm_registry::VmHome,
    dir: &Path,
    expected: Option<&VmConfig>,
) -> Result<TemplateInfo, SaveError> {
    let key = TemplateKey::host_or_new().map_err(SaveError::Key)?;
    let home_dir = std::path::absolute(home.dir()).unwrap_or_else(|_| home.dir().to_owned());
    let staging = home_dir.join(format!(".template-{}", std::process::id()));
    let info = forkvm_api::Client::new(home.socket_path())
        .with_timeout(Duration::from_secs(600))
        .save_template(&staging)
        .map_err(SaveError::Api)
        .and_then(|info| {
            // The VM process may change its directory meanwhile: what is sealed is
            // reached through one handle on the directory it wrote.
            let staged = open_nofollow(&staging, libc::O_DIRECTORY)
                .map_err(io(&staging))
                .map_err(SaveError::Seal)?;
            let sealed = seal_in(&staged, &staging, &key, expected).map_err(SaveError::Seal)?;
            install(&staged, &staging, sealed, dir).map_err(SaveError::Move)?;
            Ok(info)
        });
    let _ = std::fs::remove_dir_all(&staging);
    info
}

/// Puts a template sealed from the staging directory open as `from` (named
/// `from_path`) into `to` (made if needed; template files there replaced): the memory
/// file renamed there (copied, keeping its holes, from the file whose MAC was computed
/// where the two lie on different file systems) and checked to be that very file, then
/// the sealed state written there, last, so that `to` never holds a new state without
/// its memory.
fn install(from: &File, from_path: &Path, sealed: Sealed, to: &Path) -> Result<(), TemplateError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(to).map_err(io(to))?;
    let to_dir = open_nofollow(to, libc::O_DIRECTORY).map_err(io(to))?;
    let dst = to.join(MEMORY_FILE);
    let tmp_name = format!(".{MEMORY_FILE}.tmp");
    let tmp = to.join(&tmp_name);
    let _ = unlink_in(&to_dir, &tmp_name);
    let (name, tmp_c) = (
        std::ffi::CString::new(MEMORY_FILE).expect("no NUL"),
        std::ffi::CString::new(tmp_name.as_str()).expect("no NUL"),
    );
    // SAFETY: NUL-terminated names that live across the call, open directories.
    let moved = unsafe {
        libc::renameat(
            from.as_raw_fd(),
            name.as_ptr(),
            to_dir.as_raw_fd(),
            tmp_c.as_ptr(),
        )
    };
    if moved == 0 {
        let was = sealed
            .memory
            .metadata()
            .map_err(io(&from_path.join(MEMORY_FILE)))?;
        let now = open_in(&to_dir, &tmp_name)
            .and_then(|f| f.metadata())
            .map_err(io(&tmp))?;
        if (now.dev(), now.ino()) != (was.dev(), was.ino()) {
            let _ = unlink_in(&to_dir, &tmp_name);
            return Err(TemplateError::Memory {
                path: from_path.join(MEMORY_FILE),
                problem: "it was replaced after its MAC was computed".into(),
            });
        }
    } else {
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EXDEV) => {}
            e => return Err(io(&dst)(e)),
        }
        copy_sparse(&sealed.memory, &tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&tmp)(e)
        })?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    write_in(&to_dir, STATE_FILE, &sealed.state).map_err(io(&to.join(STATE_FILE)))
}

/// Copies `src` to a new `dst` with its data only: the holes stay holes, the mode is
/// kept.
fn copy_sparse(from: &File, dst: &Path) -> std::io::Result<()> {
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let _ = std::fs::remove_file(dst);
    let to = File::create(dst)?;
    to.set_len(meta.len())?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_extents(from, meta.len())? {
        let mut at = start;
        while at < end {
            let chunk = &mut buf[..(end - at).min(1 << 20) as usize];
            from.read_exact_at(chunk, at)?;
            to.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
    }
    to.sync_all()?;
    std::fs::set_permissions(dst, meta.permissions())
}

/// Writes the VM's memory `mem` (laid out as `ranges`) into `dir`'s [`MEMORY_FILE`]
/// (pages that are all zeros left as holes, read-only) and its state `snapshot` as
/// [`UNSEALED_FILE`]; returns the memory's size and the bytes stored.
fn write_unsealed(
    dir: &Path,
    snapshot: VmSnapshot,
    mem: &crate::memory::GuestMemory,
    ranges: &[RamRange],
) -> Result<(u64, u64), TemplateError> {
    let mem_path = dir.join(MEMORY_FILE);
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    file.set_len(total).map_err(io(&tmp))?;
    let mut stored = 0u64;
    for (region, r) in mem.iter().zip(ranges) {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes; the VM is paused, so
        // nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            if !is_zero(page) {
                file.write_all_at(page, r.file_offset + (i * PAGE) as u64)
                    .map_err(io(&tmp))?;
                stored += page.len() as u64;
            }
        }
    }
    file.sync_all().map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &mem_path).map_err(io(&mem_path))?;
    let state_path = dir.join(UNSEALED_FILE);
    let state = UnsealedState {
        snapshot,
        ranges: ranges.to_vec(),
        memory_len: total,
    };
    let blob = forkvm_snapshot::encode(&state).map_err(|source| TemplateError::State {
        path: state_path.clone(),
        source,
    })?;
    write_state(&state_path, &blob)?;
    Ok((total, stored))
}

/// Writes a state file atomically.
fn write_state(path: &Path, blob: &[u8]) -> Result<(), TemplateError> {
    forkvm_registry::write_atomic(path, blob).map_err(|source| TemplateError::State {
        path: path.to_owned(),
        source: forkvm_snapshot::FormatError::Io {
            path: path.display().to_string(),
            source,
        },
    })
}

/// A sealed template: its state, and the memory file its MAC was computed from.
struct Sealed {
    state: Vec<u8>,
    memory: File,
}

/// Makes the state and memory a VM process saved in the directory open as `dirfd`
/// (named `dir`: [`UNSEALED_FILE`], [`MEMORY_FILE`]) a template with the host's `key`,
/// every file reached through that handle without following a link, the memory file
/// only as a regular file with no other name (not a link to another template's or a
/// host file the VM process could reach): the state is read as untrusted input, the
/// memory's MAC computed from the memory file's data; returns the sealed state (not
/// written) and the memory file. The saved state must be
/// one a VM process writes (memory laid out as its size says; no writable disk; shares
/// whose guest holds only its root, which children open again); with `expected`, its
/// configuration must be that one's where it matters (kernel, initrd, disks, shares,
/// vCPUs, memory).
fn seal_in(
    dirfd: &File,
    dir: &Path,
    key: &TemplateKey,
    expected: Option<&VmConfig>,
) -> Result<Sealed, TemplateError> {
    let unsealed_path = dir.join(UNSEALED_FILE);
    let mem_path = dir.join(MEMORY_FILE);
    let state_file = open_in(dirfd, UNSEALED_FILE).map_err(io(&unsealed_path))?;
    let bad_state = |problem: String| TemplateError::State {
        path: unsealed_path.clone(),
        source: forkvm_snapshot::FormatError::Io {
            path: unsealed_path.display().to_string(),
            source: std::io::Error::other(problem),
        },
    };
    let meta = state_file.metadata().map_err(io(&unsealed_path))?;
    let limit = forkvm_snapshot::MAX_PAYLOAD + 4096;
    if !meta.is_file() || meta.len() > limit {
        return Err(bad_state(format!(
            "not a regular file of at most {limit} bytes"
        )));
    }
    let mut blob = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&state_file, limit), &mut blob)
        .map_err(io(&unsealed_path))?;
    let mut unsealed: UnsealedState =
        forkvm_snapshot::decode(&blob).map_err(|source| TemplateError::State {
            path: unsealed_path.clone(),
            source,
        })?;
    let cfg = &unsealed.snapshot.config;
    if unsealed.ranges != crate::memory::ram_ranges(cfg.mem_mib << 20) {
        return Err(bad_state(format!(
            "its memory ranges are not those of {} MiB",
            cfg.mem_mib
        )));
    }
    if let Some(d) = cfg.disks.iter().find(|d| !d.read_only) {
        return Err(bad_state(format!(
            "it has a writable disk ({})",
            d.path.display()
        )));
    }
    crate::fork::refuse_shares_in_templates(&unsealed.snapshot)
        .map_err(|e| bad_state(error_chain(&e)))?;
    if let Some(want) = expected {
        let differs = [
            ("kernel", cfg.kernel != want.kernel),
            ("initrd", cfg.initrd != want.initrd),
            ("disks", cfg.disks != want.disks),
            ("shares", cfg.shares != want.shares),
            ("vCPUs", cfg.vcpus != want.vcpus),
            ("memory", cfg.mem_mib != want.mem_mib),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(bad_state(format!(
                "it does not match the configuration the VM was launched with (in its {what})"
            )));
        }
    }
    // Its children open its shares' directories again (not a flag the VM sets).
    unsealed.snapshot.reopen_shares();
    let memory = open_in(dirfd, MEMORY_FILE).map_err(io(&mem_path))?;
    let bad = |problem: String| TemplateError::Memory {
        path: mem_path.clone(),
        problem,
    };
    let meta = memory.metadata().map_err(io(&mem_path))?;
    if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
        return Err(bad("not a regular file with one name".into()));
    }
    let ranges_len: u64 = unsealed.ranges.iter().map(|r| r.len).sum();
    if meta.len() != unsealed.memory_len || ranges_len != unsealed.memory_len {
        return Err(bad(format!(
            "is {} bytes; the saved state says {} in ranges of {ranges_len}",
            meta.len(),
            unsealed.memory_len
        )));
    }
    let mut buf = vec![0u8; 1 << 20];
    let memory_mac = sparse_pass(&memory, unsealed.memory_len, key, &mut buf, |_, _| Ok(()))
        .map_err(io(&mem_path))?;
    let state = TemplateState {
        snapshot: unsealed.snapshot,
        ranges: unsealed.ranges,
        memory_len: unsealed.memory_len,
        memory_mac,
    };
    let state_path = dir.join(STATE_FILE);
    let encoding = |source| TemplateError::State {
        path: state_path.clone(),
        source,
    };
    let state = forkvm_snapshot::encode(&state).map_err(encoding)?;
    let sealed = SealedState {
        mac: key.mac(STATE_CONTEXT, &state),
        state,
    };
    Ok(Sealed {
        state: forkvm_snapshot::encode(&sealed).map_err(encoding)?,
        memory,
    })
}

/// Writes `name` in the directory `dir` atomically (a new file renamed over it),
/// never through a link.
fn write_in(dir: &File, name: &str, blob: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let tmp_name = format!(".{name}.tmp");
    let tmp = std::ffi::CString::new(tmp_name.as_str()).map_err(std::io::Error::other)?;
    let dst = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let _ = unlink_in(dir, &tmp_name);
    // SAFETY: a NUL-terminated name that lives across the call; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(blob)?;
    file.sync_all()?;
    // SAFETY: NUL-terminated names that live across the call, an open directory.
    let renamed =
        unsafe { libc::renameat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), dst.as_ptr()) };
    if renamed != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `name` from the directory `dir`.
fn unlink_in(dir: &File, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name that lives across the call, an open directory.
    match unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Opens `path` with `flags`, not following a link at its last step.
fn open_nofollow(path: &Path, flags: i32) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Opens `name` in the directory `dir` to read, not following a link.
fn open_in(dir: &File, name: &str) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name that lives across the call; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether `page` holds only zeros.
fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128; the words are only compared.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().chain(tail).all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

/// Reads the data of `memory`'s first `len` bytes (never its holes) through `buf`,
/// giving each page that is not all zeros to `page` with its offset; returns the
/// memory's MAC ([`SparseMac`]).
fn sparse_pass(
    memory: &File,
    len: u64,
    key: &TemplateKey,
    buf: &mut [u8],
    mut page: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<[u8; 32]> {
    let mut digest = SparseMac::new(key);
    for (start, end) in data_extents(memory, len)? {
        let mut at = start;
        while at < end {
            let want = (end - at).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..want];
            memory.read_exact_at(chunk, at)?;
            for (i, p) in chunk.chunks(PAGE).enumerate() {
                let offset = at + (i * PAGE) as u64;
                if digest.page(offset, p) {
                    page(offset, p)?;
                }
            }
            at += want as u64;
        }
    }
    Ok(digest.finalize(len))
}

/// The ranges of `file`'s first `len` bytes that may hold data (`SEEK_DATA` /
/// `SEEK_HOLE`), widened to whole pages and never overlapping, in order; the whole
/// file where the file system cannot tell.
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |from: u64, whence| {
        // SAFETY: lseek on an open descriptor reads no memory.
        let at = unsafe { libc::lseek64(file.as_raw_fd(), from as i64, whence) };
        match at {
            -1 => Err(std::io::Error::last_os_error()),
            at => Ok(at as u64),
        }
    };
    let mut extents = Vec::new();
    let mut next = 0u64;
    while next < len {
        let start = match seek(next, libc::SEEK_DATA) {
            Ok(at) => at,
            // No data past `next`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?;
        let start = (start / PAGE as u64 * PAGE as u64).max(next);
        let end = end
            .div_ceil(PAGE as u64)
            .saturating_mul(PAGE as u64)
            .min(len);
        if start >= end {
            break;
        }
        extents.push((start, end));
        next = end;
    }
    Ok(extents)
}

/// How long a template fork waits for its warm processes: this, plus
/// [`WARM_WAIT_EACH`] per child.
const WARM_WAIT: Duration = Duration::from_secs(2);

/// Where under the state root a template's children bind their vsock sockets.
pub const VSOCK_DIR: &str = ".vsock";
/// What each child adds to [`WARM_WAIT`].
const WARM_WAIT_EACH: Duration = Duration::from_millis(50);

/// Refuses a fork of a template with shares for a child not given a directory for each:
/// the directory the saved VM served is its own (a pod template's lay in its VM's home,
/// gone since), not one to open again.
fn refuse_saved_share_dirs(cfg: &VmConfig, req: &ForkRequest) -> Result<(), ControlError> {
    for s in &cfg.shares {
        let given = |i: usize| {
            req.children
                .get(i)
                .is_some_and(|c| c.shares.iter().any(|g| g.tag == s.tag))
        };
        if let Some(i) = (0..req.count as usize).find(|&i| !given(i)) {
            return Err(ControlError::Invalid(format!(
                "the template's VM shares a directory (tag {:?}); child {i} must be given \
                 one of its own for it (a pod template's children are pods: \
                 forkvm-runtime create --pod-template)",
                s.tag
            )));
        }
    }
    Ok(())
}

/// A validated template, ready to fork.
pub struct Template {
    state: TemplateState,
    memory: File,
}

/// A template whose state was read and checked and whose memory file was opened and
/// sized, before its memory's checksum is checked ([`Unverified::verify`]): what it
/// forks into (vCPUs, memory) is known, so warm processes can start meanwhile.
pub struct Unverified {
    state: TemplateState,
    memory: File,
    mem_path: PathBuf,
}

impl Unverified {
    /// vCPUs and memory (MiB) of the machine this template forks into, from its
    /// authenticated state.
    pub fn machine(&self) -> (u8, u64) {
        self.state.machine()
    }

    /// The MAC of the memory the authenticated state names: what a checked copy of
    /// that memory was checked against ([`Unverified::with_checked_copy`]).
    pub fn memory_mac(&self) -> [u8; 32] {
        self.state.memory_mac
    }

    /// This template with `copy` as its checked memory: a sealed memory file another
    /// process of this host's runtime made by [`Unverified::verify`] of a template
    /// whose memory had this one's MAC ([`Template::memory_mac`]), handed over by the
    /// caller, which vouches for where it came from. Checked here: sealed against any
    /// change, and of the memory's size.
    pub fn with_checked_copy(self, copy: File) -> Result<Template, TemplateError> {
        use std::os::fd::AsRawFd;
        let bad = |problem: String| TemplateError::Memory {
            path: self.mem_path.clone(),
            problem,
        };
        // SAFETY: F_GET_SEALS on an open descriptor reads no memory.
        let seals = unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals < 0 || seals & want != want {
            return Err(bad("the checked copy handed over is not sealed".into()));
        }
        let len = copy.metadata().map_err(io(&self.mem_path))?.len();
        if len != self.state.memory_len {
            return Err(bad(format!(
                "the checked copy handed over is {len} bytes, not {}",
                self.state.memory_len
            )));
        }
        Ok(Template {
            state: self.state,
            memory: copy,
        })
    }

    /// The saved VM's configuration (its state is authenticated already).
    pub fn config(&self) -> &crate::config::VmConfig {
        &self.state.snapshot.config
    }

    /// Starts a pool of `count` warm processes (capped at [`MAX_FORK_POOL`]) for this
    /// template's children, registered under `homes`: they start while the memory is
    /// checked, and [`Template::fork`] hands the children to them (waiting a little for
    /// those still starting). `None` when the pool cannot start (the children then
    /// start from scratch).
    ///
    /// [`MAX_FORK_POOL`]: crate::pool::MAX_FORK_POOL
    pub fn warm_pool(&self, homes: &ChildHomes, count: u32) -> Option<ChildPool> {
        let (vcpus, mem_mib) = self.state.machine();
        // Its children bind their sockets under the state root (see `fork`) and open the
        // template's disks (read-only: a template has no writable one).
        let mut places = crate::launch::places(&homes.root, None);
        for d in &self.state.snapshot.config.disks {
            places.read(&d.path);
        }
        let devices = crate::devices::saved_shape(&self.state.snapshot.virtio);
        ChildPool::for_children(
            count,
            vcpus,
            mem_mib,
            devices,
            Some(homes.clone()),
            places,
            true,
        )
        .inspect_err(|e| tracing::warn!("cannot start warm processes for the template: {e}"))
        .ok()
    }

    /// Copies the memory file into a sealed memory file while checking it against the
    /// template's MAC: children map the copy, exactly what was checked, so a later
    /// change of the file (written, truncated, removed) cannot reach them. Only pages
    /// that are not all zeros are stored in the copy.
    pub fn verify(self, key: &TemplateKey) -> Result<Template, TemplateError> {
        let Self {
            state,
            memory,
            mem_path,
        } = self;
        let copy_failed = |e: crate::memory::MemoryError| TemplateError::Memory {
            path: mem_path.clone(),
            problem: format!("cannot copy it into memory: {}", error_chain(&e)),
        };
        let copy = crate::memory::create_memfd(c"forkvm-template-memory").map_err(copy_failed)?;
        copy.set_len(state.memory_len).map_err(io(&mem_path))?;
        // The file's data only (its holes are zeros, which the MAC does not count).
        let mut buf = vec![0u8; 1 << 20];
        let mac = sparse_pass(&memory, state.memory_len, key, &mut buf, |offset, page| {
            copy.write_all_at(page, offset)
        })
        .map_err(io(&mem_path))?;
        let copy = if key::same_mac(&mac, &state.memory_mac) {
            copy
        } else {
            // A template saved before the sparse MAC: every byte, holes included, into a
            // new copy made from the very bytes hashed (the file may have changed since
            // the first pass).
            drop(copy);
            let copy =
                crate::memory::create_memfd(c"forkvm-template-memory").map_err(copy_failed)?;
            copy.set_len(state.memory_len).map_err(io(&mem_path))?;
            let mut digest = key.hasher(MEMORY_CONTEXT_V1);
            let mut at = 0u64;
            while at < state.memory_len {
                let want = (state.memory_len - at).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..want];
                memory.read_exact_at(chunk, at).map_err(io(&mem_path))?;
                digest.update(chunk);
                for (i, page) in chunk.chunks(PAGE).enumerate() {
                    if !is_zero(page) {
                        copy.write_all_at(page, at + (i * PAGE) as u64)
                            .map_err(io(&mem_path))?;
                    }
                }
                at += want as u64;
            }
            if !key::same_mac(digest.finalize().as_bytes(), &state.memory_mac) {
                return Err(TemplateError::Memory {
                    path: mem_path,
                    problem: "its MAC does not match the template's: the memory was modified"
                        .into(),
                });
            }
            tracing::info!(
                "the template in {} was saved by an older forkvm: save it again for quicker \
                 loads",
                mem_path.display()
            );
            copy
        };
        crate::memory::seal(&copy).map_err(copy_failed)?;
        Ok(Template {
            state,
            memory: copy,
        })
    }
}

impl Template {
    /// Opens and checks the template in `dir` with `key`.
    pub fn load(dir: &Path, key: &TemplateKey) -> Result<Self, TemplateError> {
        Self::open(dir, key)?.verify(key)
    }

    /// Opens the template in `dir` and checks all but its memory's MAC.
    pub fn open(dir: &Path, key: &TemplateKey) -> Result<Unverified, TemplateError> {
        let state_path = dir.join(STATE_FILE);
        let unusable = |source| TemplateError::State {
            path: state_path.clone(),
            source,
        };
        let sealed: SealedState =
            forkvm_snapshot::read_state_file(&state_path).map_err(unusable)?;
        if !key::same_mac(&key.mac(STATE_CONTEXT, &sealed.state), &sealed.mac) {
            return Err(TemplateError::Forged(state_path));
        }
        let mut state: TemplateState = forkvm_snapshot::decode(&sealed.state).map_err(unusable)?;
        // A template's shares are opened again by its children, whatever the state says.
        state.snapshot.reopen_shares();
        let mem_path = dir.join(MEMORY_FILE);
        let bad = |problem: String| TemplateError::Memory {
            path: mem_path.clone(),
            problem,
        };
        let (memory, meta) = forkvm_snapshot::open_regular(&mem_path).map_err(|e| match e {
            forkvm_snapshot::OpenRegularError::Io(e) => io(&mem_path)(e),
            refused => bad(refused.to_string()),
        })?;
        let len = meta.len();
        if len != state.memory_len {
            return Err(bad(format!(
                "is {len} bytes, the template's state expects {} (truncated or replaced)",
                state.memory_len
            )));
        }
        let ranges_len: u64 = state.ranges.iter().map(|r| r.len).sum();
        if ranges_len != state.memory_len {
            return Err(bad(
                "the template's memory ranges do not add up to its size".into(),
            ));
        }
        Ok(Unverified {
            state,
            memory,
            mem_path,
        })
    }

    /// vCPUs and memory (MiB) of the saved VM.
    pub fn machine(&self) -> (u8, u64) {
        self.state.machine()
    }

    /// The saved VM's configuration.
    pub fn config(&self) -> &crate::config::VmConfig {
        &self.state.snapshot.config
    }

    /// The checked memory's MAC (what [`Unverified::with_checked_copy`] matches).
    pub fn memory_mac(&self) -> [u8; 32] {
        self.state.memory_mac
    }

    /// The sealed memory file the children map, checked.
    pub fn memory(&self) -> &File {
        &self.memory
    }

    /// One child of this template, with `spec`'s identity, for a VM process its caller
    /// launches and owns itself (a container's monitor, in the container's network
    /// namespace and jail): what it starts from and the files that go beside the launch
    /// (the state, then the memory). The child's vsock socket must be named.
    pub fn child_start(self, spec: &ChildSpec) -> Result<(Start, Vec<File>), TemplateError> {
        let cfg = &self.state.snapshot.config;
        if cfg.vsock.is_some() && spec.vsock_uds.is_none() {
            return Err(ControlError::Invalid(
                "the child of a template with vsock needs its vsock socket named".into(),
            )
            .into());
        }
        let req = ForkRequest {
            count: 1,
            freeze: false,
            children: vec![spec.clone()],
        };
        check_request(cfg, &req)?;
        refuse_saved_share_dirs(cfg, &req)?;
        let mut seq = 0;
        let mut ids = identities(cfg, &req, &mut seq)?;
        crate::fork::check_share_overrides(&self.state.snapshot, &ids)?;
        let identity = ids.pop().expect("one child");
        let state = crate::fork::ForkState {
            snapshot: self.state.snapshot,
            layout: MemoryLayout {
                ranges: self.state.ranges,
                overlays: Vec::new(),
            },
            together: false,
        }
        .into_file()?;
        Ok((Start::Restore(Box::new(identity)), vec![state, self.memory]))
    }

    /// Starts `req.count` children from this template, registered under `homes`, in
    /// warm processes of `pool` while it has some.
    pub fn fork(
        self,
        req: &ForkRequest,
        homes: &ChildHomes,
        pool: Option<&ChildPool>,
    ) -> Result<ForkOutcome, TemplateError> {
        let t0 = Instant::now();
        let mut cfg = self.state.snapshot.config.clone();
        check_request(&cfg, req)?;
        refuse_saved_share_dirs(&cfg, req)?;
        // The children's vsock sockets (unless the request names them) go under the
        // state root, where their jail lets them bind, not beside the saved VM's.
        if let Some(v) = &mut cfg.vsock {
            let dir = homes.root.join(VSOCK_DIR);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            // Where a family of a uid of its own makes them (and its children theirs).
            if forkvm_jail::family_spec().is_some_and(|f| f.uid.is_some()) {
                forkvm_jail::uid::open_to_families(&dir).map_err(|e| TemplateError::Io {
                    path: dir.clone(),
                    source: std::io::Error::other(e),
                })?;
            }
            v.uds = dir.join(v.uds.file_name().unwrap_or("vsock".as_ref()));
        }
        let mut seq = 0;
        let ids = identities(&cfg, req, &mut seq)?;
        let layout = MemoryLayout {
            ranges: self.state.ranges,
            overlays: Vec::new(),
        };
        // A warm process is jailed with the template's places: a child given a
        // directory for a share starts in a process of its own, jailed with its own.
        let pool = pool.filter(|_| req.children.iter().all(|c| c.shares.is_empty()));
        if let Some(pool) = pool {
            // Forked from a zygote: milliseconds each, much less than a start from
            // scratch; bounded in case the zygote cannot start them.
            let wait = WARM_WAIT + WARM_WAIT_EACH * req.count;
            let ready = pool.wait_ready(req.count as usize, wait);
            tracing::debug!(ready, "warm processes for the template's children");
        }
        let children = Launching::start(
            self.state.snapshot,
            &layout,
            vec![self.memory],
            ids,
            req,
            homes,
            pool,
            t0,
        )?
        .finish()?;
        Ok(ForkOutcome {
            children,
            parent_pause_us: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use std::os::fd::AsRawFd;

    use super::*;
    use crate::config::VmConfig;
    use crate::memory::{ram_ranges, GuestMemory};

    /// A VM of 1 MiB, as the fixtures' memory is.
    fn snapshot() -> VmSnapshot {
        let mut cfg = VmConfig::new("/nonexistent/kernel");
        cfg.mem_mib = 1;
        VmSnapshot::empty(cfg)
    }

    /// Seals in place what a VM process saved in `dir` (as [`save_running`] seals,
    /// with the state written beside the memory).
    fn seal(dir: &Path, key: &TemplateKey) -> Result<(), TemplateError> {
        let dirfd = open_nofollow(dir, libc::O_DIRECTORY).map_err(io(dir))?;
        let sealed = seal_in(&dirfd, dir, key, None)?;
        write_in(&dirfd, STATE_FILE, &sealed.state).map_err(io(&dir.join(STATE_FILE)))?;
        unlink_in(&dirfd, UNSEALED_FILE).map_err(io(&dir.join(UNSEALED_FILE)))
    }

    /// A template saved with a new key in its own directory: (template dir, key dir).
    fn saved() -> (tempfile::TempDir, TemplateKey) {
        let (dir, key) = unsealed();
        assert!(
            Template::load(dir.path(), &key).is_err(),
            "what a VM process writes is no template before it is sealed"
        );
        seal(dir.path(), &key).unwrap();
        assert!(!dir.path().join(UNSEALED_FILE).exists());
        (dir, key)
    }

    /// What a VM process saved in a directory of its own, not sealed: (dir, key).
    fn unsealed() -> (tempfile::TempDir, TemplateKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = TemplateKey::open_or_create(&dir.path().join("keys/template.key")).unwrap();
        let ranges = ram_ranges(1 << 20);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"template page", GuestAddress(0x3000))
            .unwrap();
        let (total, stored) = write_unsealed(dir.path(), snapshot(), &mem, &ranges).unwrap();
        assert_eq!(total, 1 << 20);
        assert_eq!(stored, PAGE as u64, "only the one non-zero page is stored");
        (dir, key)
    }

    #[test]
    fn sealing_takes_only_what_a_vm_process_writes_in_its_own_directory() {
        let refused = |prepare: &dyn Fn(&Path), needle: &str| {
            let (dir, key) = unsealed();
            prepare(dir.path());
            let e = error_chain(&seal(dir.path(), &key).unwrap_err());
            assert!(e.contains(needle), "{e}");
            assert!(!dir.path().join(STATE_FILE).exists(), "nothing sealed");
        };
        // The memory a link to another file (another template's, a host file).
        let other = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(other.path(), vec![7u8; 1 << 20]).unwrap();
        refused(
            &|d| {
                std::fs::remove_file(d.join(MEMORY_FILE)).unwrap();
                std::os::unix::fs::symlink(other.path(), d.join(MEMORY_FILE)).unwrap();
            },
            MEMORY_FILE,
        );
        // ... or another name of it.
        refused(
            &|d| {
                std::fs::remove_file(d.join(MEMORY_FILE)).unwrap();
                std::fs::hard_link(other.path(), d.join(MEMORY_FILE)).unwrap();
            },
            "not a regular file with one name",
        );
        // The directory itself a link (to another's directory).
        let (dir, key) = unsealed();
        let elsewhere = tempfile::tempdir().unwrap();
        let link = elsewhere.path().join("staging");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = error_chain(&seal(&link, &key).unwrap_err());
        assert!(e.contains("staging"), "{e}");
        seal(dir.path(), &key).unwrap();
        // A state whose sizes are not the memory's.
        refused(
            &|d| {
                // Read-only as saved: made writable to grow it.
                std::fs::set_permissions(
                    d.join(MEMORY_FILE),
                    std::fs::Permissions::from_mode(0o644),
                )
                .unwrap();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(MEMORY_FILE))
                    .unwrap();
                f.set_len(2 << 20).unwrap();
            },
            "the saved state says 1048576",
        );
        // A state that is not one.
        refused(
            &|d| std::fs::write(d.join(UNSEALED_FILE), b"garbage").unwrap(),
            UNSEALED_FILE,
        );
    }

    fn expect_err(dir: &Path, key: &TemplateKey, needle: &str) {
        let e = Template::load(dir, key)
            .err()
            .expect("the template must be refused");
        let msg = error_chain(&e);
        assert!(msg.contains(needle), "{msg}");
    }

    #[test]
    fn an_installed_template_loads_and_a_copied_memory_file_keeps_its_holes() {
        let (dir, key) = unsealed();
        let to = tempfile::tempdir().unwrap();
        // Template files already there are replaced.
        std::fs::write(to.path().join(STATE_FILE), b"old").unwrap();
        let staged = open_nofollow(dir.path(), libc::O_DIRECTORY).unwrap();
        let sealed = seal_in(&staged, dir.path(), &key, None).unwrap();
        install(&staged, dir.path(), sealed, to.path()).unwrap();
        assert!(!dir.path().join(MEMORY_FILE).exists(), "moved");
        let t = Template::load(to.path(), &key).unwrap();
        let mut b = [0u8; 13];
        t.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
        // Across file systems the memory file is copied: data where it had data, holes
        // where it had holes, the same bytes and mode.
        let mem = to.path().join(MEMORY_FILE);
        let copy = to.path().join("copy");
        copy_sparse(&File::open(&mem).unwrap(), &copy).unwrap();
        assert_eq!(std::fs::read(&mem).unwrap(), std::fs::read(&copy).unwrap());
        let meta = std::fs::metadata(&copy).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 * 1024,
            "{} bytes allocated for one page of data",
            meta.blocks() * 512
        );
        assert_eq!(meta.mode() & 0o777, 0o444);
    }

    #[test]
    fn saved_template_loads_with_its_contents() {
        let (dir, key) = saved();
        let t = Template::load(dir.path(), &key).unwrap();
        let mut b = [0u8; 13];
        t.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
        assert_eq!(t.machine(), (1, 1));
        let mode = std::fs::metadata(dir.path().join(MEMORY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "memory file is read-only");
    }

    /// Children map a sealed copy of what was checked: the file changing or going
    /// after the check (a truncation would SIGBUS a child mapping it) reaches nothing.
    #[test]
    fn children_get_a_sealed_copy_of_the_checked_memory() {
        let (dir, key) = saved();
        let t = Template::load(dir.path(), &key).unwrap();
        let path = dir.path().join(MEMORY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut b = [0u8; 13];
        t.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
        assert_eq!(t.memory.metadata().unwrap().len(), 1 << 20);
        // SAFETY: F_GET_SEALS on a descriptor the template owns.
        let seals = unsafe { libc::fcntl(t.memory.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        assert_eq!(seals & want, want, "seals {seals:#x}");
    }

    #[test]
    fn truncated_memory_is_refused() {
        let (dir, key) = saved();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(MEMORY_FILE))
            .unwrap();
        f.set_len(4096).unwrap();
        expect_err(dir.path(), &key, "truncated");
    }

    #[test]
    fn modified_memory_is_refused() {
        let (dir, key) = saved();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(MEMORY_FILE))
            .unwrap();
        f.write_all_at(b"X", 0x3000).unwrap();
        expect_err(dir.path(), &key, "the memory was modified");
    }

    #[test]
    fn the_memory_mac_counts_data_not_holes_and_whatever_fills_one_is_refused() {
        let (dir, key) = saved();
        let path = dir.path().join(MEMORY_FILE);
        let holes = data_extents(&File::open(&path).unwrap(), 1 << 20).unwrap();
        assert!(
            holes.iter().map(|(a, b)| b - a).sum::<u64>() < 1 << 20,
            "the file has holes: {holes:?}"
        );
        // The same memory with its holes filled with zeros (a copy that lost them).
        let dense = tempfile::tempdir().unwrap();
        for name in [STATE_FILE, MEMORY_FILE] {
            std::fs::write(
                dense.path().join(name),
                std::fs::read(dir.path().join(name)).unwrap(),
            )
            .unwrap();
        }
        let t = Template::load(dense.path(), &key).unwrap();
        let mut b = [0u8; 13];
        t.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
        // A byte written into a hole is data the MAC never counted.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 0x8_0000).unwrap();
        expect_err(dir.path(), &key, "the memory was modified");
    }

    #[test]
    fn a_template_saved_with_the_first_memory_mac_still_loads() {
        let (dir, key) = saved();
        // Its state re-sealed with the MAC of every byte, as forkvm saved it before.
        let mut memory = vec![0u8; 1 << 20];
        File::open(dir.path().join(MEMORY_FILE))
            .unwrap()
            .read_exact_at(&mut memory, 0)
            .unwrap();
        let sealed: SealedState =
            forkvm_snapshot::decode(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        let mut state: TemplateState = forkvm_snapshot::decode(&sealed.state).unwrap();
        let mut v1 = key.hasher(MEMORY_CONTEXT_V1);
        v1.update(&memory);
        state.memory_mac = *v1.finalize().as_bytes();
        let state = forkvm_snapshot::encode(&state).unwrap();
        let sealed = SealedState {
            mac: key.mac(STATE_CONTEXT, &state),
            state,
        };
        std::fs::write(
            dir.path().join(STATE_FILE),
            forkvm_snapshot::encode(&sealed).unwrap(),
        )
        .unwrap();
        let t = Template::load(dir.path(), &key).unwrap();
        let mut b = [0u8; 13];
        t.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
    }

    #[test]
    fn a_checked_copy_serves_another_load_of_the_same_template_only_sealed_and_sized() {
        let (dir, key) = saved();
        let first = Template::load(dir.path(), &key).unwrap();
        let unverified = Template::open(dir.path(), &key).unwrap();
        assert_eq!(unverified.memory_mac(), first.memory_mac());
        let shared = unverified
            .with_checked_copy(first.memory().try_clone().unwrap())
            .unwrap();
        let mut b = [0u8; 13];
        shared.memory.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(&b, b"template page");
        // Not sealed, or of another size: refused.
        let refused = |copy: File| {
            let t = Template::open(dir.path(), &key).unwrap();
            error_chain(&t.with_checked_copy(copy).err().unwrap())
        };
        let open = crate::memory::create_memfd(c"not-sealed").unwrap();
        open.set_len(1 << 20).unwrap();
        let e = refused(open);
        assert!(e.contains("not sealed"), "{e}");
        let small = crate::memory::create_memfd(c"small").unwrap();
        small.set_len(4096).unwrap();
        crate::memory::seal(&small).unwrap();
        let e = refused(small);
        assert!(e.contains("4096 bytes"), "{e}");
    }

    #[test]
    fn a_memory_file_swapped_after_sealing_or_a_configuration_not_the_vms_is_refused() {
        // Swapped between the MAC and the move (another template's, say): not installed.
        let (dir, key) = unsealed();
        let to = tempfile::tempdir().unwrap();
        let staged = open_nofollow(dir.path(), libc::O_DIRECTORY).unwrap();
        let sealed = seal_in(&staged, dir.path(), &key, None).unwrap();
        let mem = dir.path().join(MEMORY_FILE);
        let other = dir.path().join("other");
        std::fs::copy(&mem, &other).unwrap();
        std::fs::rename(&other, &mem).unwrap();
        let e = error_chain(&install(&staged, dir.path(), sealed, to.path()).unwrap_err());
        assert!(e.contains("replaced after its MAC was computed"), "{e}");
        assert!(!to.path().join(STATE_FILE).exists(), "nothing installed");
        // A configuration the VM was not launched with (a disk it never had).
        let (dir, key) = unsealed();
        let staged = open_nofollow(dir.path(), libc::O_DIRECTORY).unwrap();
        let mut launched = snapshot().config;
        launched.disks = vec![crate::config::BlockConfig {
            path: "/srv/disk.img".into(),
            read_only: true,
        }];
        let e = error_chain(
            &seal_in(&staged, dir.path(), &key, Some(&launched))
                .err()
                .unwrap(),
        );
        assert!(
            e.contains("does not match the configuration the VM was launched with (in its disks)"),
            "{e}"
        );
        assert!(seal_in(&staged, dir.path(), &key, Some(&snapshot().config)).is_ok());
    }

    #[test]
    fn tampered_state_is_refused() {
        let (dir, key) = saved();
        let p = dir.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
        expect_err(dir.path(), &key, "checksum mismatch");
        std::fs::write(&p, b"not a template").unwrap();
        expect_err(dir.path(), &key, STATE_FILE);
    }

    /// The attack the issue "Contain the guest" proved: a state edited to attach a host
    /// file as a writable disk, its checksum recomputed. The frame is valid; the MAC is
    /// not.
    #[test]
    fn forged_state_with_a_valid_checksum_is_refused() {
        let (dir, key) = saved();
        let p = dir.path().join(STATE_FILE);
        let sealed: SealedState = forkvm_snapshot::read_state_file(&p).unwrap();
        let mut state: TemplateState = forkvm_snapshot::decode(&sealed.state).unwrap();
        state
            .snapshot
            .config
            .disks
            .push(forkvm_devices::virtio::block::BlockConfig {
                path: "/etc/shadow".into(),
                read_only: false,
            });
        let forged = SealedState {
            state: forkvm_snapshot::encode(&state).unwrap(),
            mac: sealed.mac,
        };
        std::fs::write(&p, forkvm_snapshot::encode(&forged).unwrap()).unwrap();
        expect_err(
            dir.path(),
            &key,
            "not saved by this host's forkvm, or changed since",
        );
    }

    #[test]
    fn another_hosts_template_is_refused() {
        let (dir, _) = saved();
        let other = tempfile::tempdir().unwrap();
        let key = TemplateKey::open_or_create(&other.path().join("template.key")).unwrap();
        expect_err(dir.path(), &key, "its MAC does not match the template key");
    }

    #[test]
    fn missing_files_are_named() {
        let (dir, key) = saved();
        std::fs::remove_file(dir.path().join(MEMORY_FILE)).unwrap();
        expect_err(dir.path(), &key, MEMORY_FILE);
        let empty = tempfile::tempdir().unwrap();
        expect_err(empty.path(), &key, STATE_FILE);
    }
}
