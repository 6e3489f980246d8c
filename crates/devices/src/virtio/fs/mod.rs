//! virtio-fs (virtio 1.2 §5.11): a host directory shared into the guest, which mounts
//! it by tag (`mount -t virtiofs TAG DIR`).
//!
//! The FUSE server runs in the VMM process, on the event loop, over the guest memory the
//! VMM already maps: fuse-backend-rs's [`Server`] decodes each request straight from the
//! descriptor chain and writes the reply into it, and its passthrough filesystem (behind
//! [`share::Share`], which enforces read-only shares) does the host side with `O_PATH`
//! handles opened under the shared directory. Chosen over vhost-user with `virtiofsd`
//! because a vhost-user backend needs guest memory shared by file descriptor, which a
//! fork child's private copy-on-write pages are not, and because it is one process less
//! per VM to start and jail.
//!
//! Queues: 0 is the high-priority queue (FORGET, INTERRUPT), 1 the one request queue.
//! Each event serves at most [`MAX_CHAINS_PER_EVENT`] chains per queue and kicks itself
//! for the rest, so one guest cannot keep the event loop from its other devices.
//!
//! Saving ([`Persist`]) carries the server's table of what the guest holds (the files it
//! has looked up and not forgotten, the files and directories it has open, the FUSE
//! options INIT agreed on) and, beside the state, duplicates of the host descriptors
//! behind them ([`HostFiles`]): a fork child gets them over its launch socket and goes
//! on serving its guest's node IDs and handles with the very files its parent served
//! (each open one reopened, so that parent and child do not share a position or
//! flags), as a process after `fork()` has its parent's files. What the guest had
//! queued is served before the save ([`VirtioDevice::finish_queued`]): a child would
//! serve it again. Descriptors live only in
//! processes, so such a state cannot be written to disk: a VM whose guest has files of
//! a share in use cannot be saved as a template. A share whose guest holds nothing but
//! its root ([`SavedTable::holds_only_root`]) can be served from its configured
//! directory again with no descriptor ([`FsState::reopen`]): a template's, or a fork
//! child's given another directory (a pod's VM); a plain fork child goes on with its
//! parent's descriptors.

mod share;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{
    CachePolicy, Config as PassthroughConfig, PassthroughFs, Table, TableHandle, TableInode,
    TableOptions,
};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use serde::{Deserialize, Serialize};
use tracing::debug;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::DescriptorChain;

use super::activation::Activation;
use super::{device_type, read_config_bytes, VirtioDevice};
use crate::{GuestMemory, Persist};
pub use share::Share;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Request queues the device offers (besides the high-priority queue).
pub const REQUEST_QUEUES: u32 = 1;
/// Longest tag the configuration space holds, in bytes.
pub const MAX_TAG_LEN: usize = 36;
pub use super::MAX_CHAINS_PER_EVENT;
/// How long the guest may cache names and attributes before it asks again: the host may
/// change the directory under it (the same default as virtiofsd's `cache=auto`).
///
/// File contents stay in the guest's page cache across opens (the server answers OPEN
/// with `FOPEN_KEEP_CACHE`) and are dropped when the guest sees a file's size or
/// modification time change, at most this long after the host changed it
/// (`FUSE_AUTO_INVAL_DATA`, [`Share`]'s INIT). Without the kept cache every open
/// dropped the file's pages: measured in the virtual host, each exec of busybox from a
/// shared container root read the whole binary again (18 READ requests), 120 ms an exec
/// against 17 ms from a root disk.
pub const CACHE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

const TOKEN_ACTIVATE: u32 = 0;
/// Queue `i`'s kick is `TOKEN_FIRST_KICK + i`.
const TOKEN_FIRST_KICK: u32 = 1;

/// A host directory to share: what the VMM is configured with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    /// The tag the guest mounts it by (1 to [`MAX_TAG_LEN`] bytes, no NUL).
    pub tag: String,
    /// The host directory.
    pub host_path: PathBuf,
    /// Whether the guest may only read it (enforced on the host too).
    pub read_only: bool,
}

/// Why a virtio-fs device could not be built, restored or saved.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Creating the activation eventfd failed.
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] std::io::Error),
    /// The tag is empty, too long or holds a NUL.
    #[error("share tag {tag:?}: {problem}")]
    BadTag {
        /// The tag.
        tag: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The shared directory cannot be used.
    #[error("shared directory {}: {problem}", path.display())]
    HostPath {
        /// The path as configured.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The FUSE server cannot serve the directory.
    #[error("cannot serve {}", path.display())]
    Server {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A saved state acknowledges features the device does not offer.
    #[error(transparent)]
    BadFeatures(#[from] crate::virtio::activation::UnofferedFeatures),
    /// The server's table cannot be taken out or duplicated.
    #[error("cannot save the share {tag:?} ({})", path.display())]
    Save {
        /// The share's tag.
        tag: String,
        /// Its host directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A saved table is not one this device can serve from.
    #[error("the saved state of the share {tag:?} is invalid: {problem}")]
    BadTable {
        /// The share's tag.
        tag: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// What of an [`Fs`] survives a snapshot: the transport's features and the server's
/// table, whose descriptors travel beside it ([`HostFiles`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FsState {
    /// The feature bits the driver accepted.
    pub acked_features: u64,
    /// What the guest holds.
    pub table: SavedTable,
    /// The host descriptors of `table`: one per inode, then one per handle, in order.
    /// Never serialized; [`HostFiles`] says how they travel.
    #[serde(skip)]
    pub files: HostFiles,
    /// Served from its configured directory again, with no descriptor: a template's
    /// share (no file can hold a descriptor), which must hold only its root.
    #[serde(default)]
    pub reopen: bool,
}

/// Most inodes plus handles a saved table may list: as many descriptors as a process
/// may hold.
pub const MAX_TABLE_ENTRIES: usize = forkvm_jail::limits::MAX_OPEN_FILES as usize;

/// The server's table of what the guest holds, descriptors aside.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTable {
    /// The FUSE protocol version INIT agreed on (major, minor).
    pub protocol: (u32, u32),
    /// Inodes the guest has looked up and not forgotten, the root included.
    pub inodes: Vec<SavedInode>,
    /// Files and directories the guest has open.
    pub handles: Vec<SavedHandle>,
    /// The next node ID the server gives out.
    pub next_inode: u64,
    /// The next handle the server gives out.
    pub next_handle: u64,
    /// Options INIT agreed on: write-back cache, no OPEN, no OPENDIR, `KILLPRIV_V2`,
    /// per-file DAX.
    pub options: [bool; 5],
    /// INIT agreed on `FUSE_AUTO_INVAL_DATA` ([`Share::keeps_cache`]).
    pub auto_inval_data: bool,
}

impl SavedTable {
    /// Whether the guest holds nothing but the share's root (no other node, no open
    /// handle): a share never mounted, or mounted and not used yet. Such a share
    /// needs no descriptor to go on: its root is its configured directory, opened
    /// again at the restore, so it can be saved in a template and given another
    /// directory in a fork child (a pod's directory, say).
    pub fn holds_only_root(&self) -> bool {
        self.handles.is_empty()
            && matches!(self.inodes.as_slice(), [root] if root.node == fuse_backend_rs::api::filesystem::ROOT_ID)
    }
}

/// An inode the guest holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInode {
    /// The guest's node ID.
    pub node: u64,
    /// Lookups not forgotten.
    pub refcount: u64,
    /// Its mode when looked up.
    pub mode: u32,
    /// Host inode number.
    pub ino: u64,
    /// Host device.
    pub dev: u64,
    /// Host mount ID.
    pub mnt: u64,
}

/// A file or directory the guest has open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHandle {
    /// The guest's handle.
    pub handle: u64,
    /// The node ID it is open on.
    pub node: u64,
    /// Its open flags, as the server keeps them.
    pub flags: u32,
    /// The host description's access mode and status flags (`F_GETFL`) at the save,
    /// while the guest was paused: what the child's own description is opened with
    /// (the parent's may change as soon as it resumes).
    pub status_flags: u32,
}

/// Host descriptors that belong with a saved device state but cannot be serialized:
/// the saving process puts them here, whoever moves the state moves them beside it
/// (`SCM_RIGHTS`) and puts them back in the same order before the restore, which takes
/// them (once).
#[derive(Default)]
pub struct HostFiles(Mutex<Vec<File>>);

impl HostFiles {
    /// Holds `files`.
    pub fn new(files: Vec<File>) -> Self {
        Self(Mutex::new(files))
    }

    /// Takes the descriptors out, leaving none.
    pub fn take(&self) -> Vec<File> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `files` in place of whatever was held.
    pub fn put(&self, files: Vec<File>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = files;
    }
}

impl std::fmt::Debug for HostFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "HostFiles({n})")
    }
}

impl FsState {
    /// How many descriptors go with this state: none for one served from its
    /// directory again ([`FsState::reopen`]).
    pub fn files_needed(&self) -> usize {
        if self.reopen {
            return 0;
        }
        self.table.inodes.len() + self.table.handles.len()
    }
}

/// A virtio-fs device serving one host directory.
pub struct Fs {
    activation: Activation,
    config: FsConfig,
    share: Arc<Share>,
    server: Server<Arc<Share>>,
    config_space: Vec<u8>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs").field("config", &self.config).finish()
    }
}

impl Fs {
    /// A device serving `config.host_path` (a directory, symlinks resolved once here).
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        config_space(&config.tag)?;
        let root = shared_dir(&config.host_path)?;
        let fs = passthrough(&config, &root)?;
        fs.import().map_err(|source| FsError::Server {
            path: root.clone(),
            source,
        })?;
        Self::serving(config, fs)
    }

    /// A device serving `fs`, which holds its table already.
    fn serving(config: FsConfig, fs: PassthroughFs) -> Result<Self, FsError> {
        let config_space = config_space(&config.tag)?;
        let share = Arc::new(Share::new(fs, config.read_only));
        Ok(Self {
            activation: Activation::new("virtio-fs").map_err(FsError::EventFd)?,
            config,
            server: Server::new(share.clone()),
            share,
            config_space,
        })
    }

    /// What the device was configured with.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Serves up to [`MAX_CHAINS_PER_EVENT`] chains of queue `index`; kicks the queue
    /// again when more are waiting. The chains served.
    fn process_queue(&mut self, index: usize) -> usize {
        let Self {
            activation, server, ..
        } = self;
        let Some(active) = activation.active_mut() else {
            return 0;
        };
        active.serve_chains(index, "virtio-fs", |mem, chain| {
            // What the guest sent is the guest's business: logged at debug, so a guest
            // cannot fill the host's logs with bad requests.
            let (written, as_guest_user) = serve(server, mem, chain).unwrap_or_else(|e| {
                debug!(queue = index, "virtio-fs: a request failed: {e}");
                (0, true)
            });
            // The server acted as a guest's user and back: the kernel then made every
            // permitted capability effective again (CAP_NET_ADMIN included).
            if as_guest_user {
                forkvm_jail::caps::restore_effective();
            }
            written
        })
    }
}

/// The requests the passthrough server serves as the guest's user (it switches the
/// thread's user and group IDs around them, and back to root after).
const AS_GUEST_USER: [Opcode; 4] = [
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Symlink,
    Opcode::Create,
];

/// Hands one request chain to the server: the bytes it wrote into the chain, and
/// whether the request was one served as the guest's user ([`AS_GUEST_USER`]).
fn serve(
    server: &Server<Arc<Share>>,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<(u32, bool), String> {
    let reader = Reader::from_descriptor_chain(mem, chain.clone())
        .map_err(|e| format!("bad request buffers: {e}"))?;
    let as_guest_user = reader
        .clone()
        .read_obj::<InHeader>()
        .is_ok_and(|h| AS_GUEST_USER.iter().any(|&op| op as u32 == h.opcode));
    let writer = VirtioFsWriter::new(mem, chain).map_err(|e| format!("bad reply buffers: {e}"))?;
    let written = server
        .handle_message(reader, writer.into(), None, None)
        .map_err(|e| e.to_string())?;
    // At most the chain's writable length, which the queue bounds to u32.
    Ok((u32::try_from(written).unwrap_or(u32::MAX), as_guest_user))
}

/// The configuration space for `tag`: the tag NUL-padded to [`MAX_TAG_LEN`] bytes, then
/// the number of request queues (little endian).
fn config_space(tag: &str) -> Result<Vec<u8>, FsError> {
    let bad = |problem| FsError::BadTag {
        tag: tag.to_owned(),
        problem,
    };
    if tag.is_empty() {
        return Err(bad("empty"));
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(bad("longer than 36 bytes"));
    }
    if tag.contains('\0') {
        return Err(bad("holds a NUL byte"));
    }
    let mut space = vec![0u8; MAX_TAG_LEN + 4];
    space[..tag.len()].copy_from_slice(tag.as_bytes());
    space[MAX_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
    Ok(space)
}

/// `path` with its symlinks resolved, if it is a directory.
fn shared_dir(path: &Path) -> Result<PathBuf, FsError> {
    let failed = |problem: String| FsError::HostPath {
        path: path.to_owned(),
        problem,
    };
    let root = std::fs::canonicalize(path).map_err(|e| failed(e.to_string()))?;
    let meta = std::fs::metadata(&root).map_err(|e| failed(e.to_string()))?;
    if !meta.is_dir() {
        return Err(failed("not a directory".into()));
    }
    // The server opens what the guest looks up relative to the directory: it must be
    // able to search it.
    std::fs::read_dir(&root).map_err(|e| failed(format!("cannot read it: {e}")))?;
    Ok(root)
}

/// The passthrough filesystem for the directory `root` (resolved from
/// `config.host_path`), its table still empty; with the open-file limit raised for it.
fn passthrough(config: &FsConfig, root: &Path) -> Result<PassthroughFs, FsError> {
    // One descriptor per file the guest looked up and has not forgotten.
    if let Err(e) = forkvm_jail::limits::raise_open_files() {
        tracing::warn!("virtio-fs: cannot raise the open file limit: {e}");
    }
    let root_dir = root
        .to_str()
        .ok_or_else(|| FsError::HostPath {
            path: config.host_path.clone(),
            problem: "the path is not UTF-8".into(),
        })?
        .to_owned();
    PassthroughFs::new(PassthroughConfig {
        root_dir,
        cache_policy: CachePolicy::Always,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        do_import: true,
        ..Default::default()
    })
    .map_err(|source| FsError::Server {
        path: root.to_owned(),
        source,
    })
}

/// The table `saved` describes over `files` (one per inode, then one per handle), each
/// checked to be the file the table says (device, inode number, type); open files and
/// directories get open file descriptions of their own ([`reopen`]).
fn checked_table(tag: &str, saved: &SavedTable, files: Vec<File>) -> Result<Table, FsError> {
    let bad = |problem: String| FsError::BadTable {
        tag: tag.to_owned(),
        problem,
    };
    let entries = saved.inodes.len() + saved.handles.len();
    if entries > MAX_TABLE_ENTRIES {
        return Err(bad(format!("{entries} entries")));
    }
    if files.len() != entries {
        return Err(bad(format!(
            "{} host descriptors came for {entries} entries",
            files.len()
        )));
    }
    if saved.protocol.0 != fuse_backend_rs::abi::fuse_abi::KERNEL_VERSION {
        return Err(bad(format!(
            "FUSE protocol {}.{}",
            saved.protocol.0, saved.protocol.1
        )));
    }
    let mut files = files.into_iter();
    let mut modes = std::collections::HashMap::with_capacity(saved.inodes.len());
    let mut inodes = Vec::with_capacity(saved.inodes.len());
    for i in &saved.inodes {
        let file = files.next().expect("counted");
        let st = fstat(&file).map_err(|e| bad(format!("node {}: {e}", i.node)))?;
        if (st.st_dev, st.st_ino, st.st_mode & libc::S_IFMT)
            != (i.dev, i.ino, i.mode & libc::S_IFMT)
        {
            return Err(bad(format!("node {} is not the file it names", i.node)));
        }
        if i.node == fuse_backend_rs::api::filesystem::ROOT_ID
            && i.mode & libc::S_IFMT != libc::S_IFDIR
        {
            return Err(bad("the root is not a directory".into()));
        }
        modes.insert(i.node, (i.dev, i.ino, i.mode));
        inodes.push(TableInode {
            inode: i.node,
            refcount: i.refcount,
            mode: i.mode,
            ino: i.ino,
            dev: i.dev,
            mnt: i.mnt,
            file,
        });
    }
    let mut handles = Vec::with_capacity(saved.handles.len());
    for h in &saved.handles {
        let file = files.next().expect("counted");
        let Some(&(dev, ino, mode)) = modes.get(&h.node) else {
            return Err(bad(format!(
                "handle {} is open on node {}, which it does not hold",
                h.handle, h.node
            )));
        };
        let st = fstat(&file).map_err(|e| bad(format!("handle {}: {e}", h.handle)))?;
        if (st.st_dev, st.st_ino) != (dev, ino) {
            return Err(bad(format!(
                "handle {} is not open on node {}",
                h.handle, h.node
            )));
        }
        let file = match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFDIR => reopen(&file, h.status_flags as i32)
                .map_err(|e| bad(format!("handle {} cannot be reopened: {e}", h.handle)))?,
            // A FIFO's open would wait for its other end: it stays shared.
            _ => file,
        };
        handles.push(TableHandle {
            handle: h.handle,
            inode: h.node,
            flags: h.flags,
            file,
        });
    }
    let [writeback, no_open, no_opendir, killpriv_v2, perfile_dax] = saved.options;
    Ok(Table {
        inodes,
        handles,
        next_inode: saved.next_inode,
        next_handle: saved.next_handle,
        options: TableOptions {
            writeback,
            no_open,
            no_opendir,
            killpriv_v2,
            perfile_dax,
        },
    })
}

/// The table of a share whose guest holds only its root (`saved`), over the root
/// `fs` opens at its configured directory: the guest's lookups on the root and the
/// options INIT agreed on go on, on that directory.
fn root_only_table(
    config: &FsConfig,
    fs: &PassthroughFs,
    saved: &SavedTable,
) -> Result<Table, FsError> {
    let bad = |problem: String| FsError::BadTable {
        tag: config.tag.clone(),
        problem,
    };
    if saved.protocol.0 != fuse_backend_rs::abi::fuse_abi::KERNEL_VERSION {
        return Err(bad(format!(
            "FUSE protocol {}.{}",
            saved.protocol.0, saved.protocol.1
        )));
    }
    fs.import().map_err(|source| FsError::Server {
        path: config.host_path.clone(),
        source,
    })?;
    let mut table = fs.export_table().map_err(|source| FsError::Server {
        path: config.host_path.clone(),
        source,
    })?;
    let [writeback, no_open, no_opendir, killpriv_v2, perfile_dax] = saved.options;
    table.options = TableOptions {
        writeback,
        no_open,
        no_opendir,
        killpriv_v2,
        perfile_dax,
    };
    table.next_inode = table.next_inode.max(saved.next_inode);
    table.next_handle = table.next_handle.max(saved.next_handle);
    for root in &mut table.inodes {
        root.refcount = saved.inodes[0].refcount;
    }
    Ok(table)
}

/// A new open file description of what `file` has open, with the access mode and
/// status flags `flags` (`F_GETFL` at the save): the child's own, so that neither its
/// position (a directory stream) nor its flags (the server sets `O_APPEND` or
/// `O_DIRECT` as a guest's request says) are shared with the parent's.
fn reopen(file: &File, flags: i32) -> std::io::Result<File> {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_DIRECT
        | libc::O_NOATIME
        | libc::O_NONBLOCK
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_LARGEFILE;
    let path =
        std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    // SAFETY: a NUL-terminated path that lives across the call.
    let fd = unsafe { libc::open(path.as_ptr(), (flags & keep) | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `fstat(2)` of `file`.
fn fstat(file: &File) -> std::io::Result<libc::stat64> {
    // SAFETY: an all-zero stat64 is a valid value; fstat64 only writes into it.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor and `st` lives across the call.
    match unsafe { libc::fstat64(file.as_raw_fd(), &mut st) } {
        0 => Ok(st),
        _ => Err(std::io::Error::last_os_error()),
    }
}

impl Persist<'_> for Fs {
    type State = FsState;
    type ConstructorArgs = FsConfig;
    type Error = FsError;

    /// The transport's features and the server's table, with duplicates of its
    /// descriptors in [`FsState::files`].
    fn save(&self) -> Result<FsState, FsError> {
        let table = self
            .share
            .passthrough()
            .export_table()
            .map_err(|source| FsError::Save {
                tag: self.config.tag.clone(),
                path: self.config.host_path.clone(),
                source,
            })?;
        let mut files = Vec::with_capacity(table.inodes.len() + table.handles.len());
        let inodes = table
            .inodes
            .into_iter()
            .map(|i| {
                files.push(i.file);
                SavedInode {
                    node: i.inode,
                    refcount: i.refcount,
                    mode: i.mode,
                    ino: i.ino,
                    dev: i.dev,
                    mnt: i.mnt,
                }
            })
            .collect();
        let handles = table
            .handles
            .into_iter()
            .map(|h| {
                // SAFETY: F_GETFL on an open descriptor reads no memory.
                let status = unsafe { libc::fcntl(h.file.as_raw_fd(), libc::F_GETFL) };
                files.push(h.file);
                SavedHandle {
                    handle: h.handle,
                    node: h.inode,
                    flags: h.flags,
                    status_flags: status.max(0) as u32,
                }
            })
            .collect();
        let o = table.options;
        let state = FsState {
            acked_features: self.activation.acked_features(),
            table: SavedTable {
                protocol: self.server.protocol(),
                inodes,
                handles,
                next_inode: table.next_inode,
                next_handle: table.next_handle,
                options: [
                    o.writeback,
                    o.no_open,
                    o.no_opendir,
                    o.killpriv_v2,
                    o.perfile_dax,
                ],
                auto_inval_data: self.share.keeps_cache(),
            },
            files: HostFiles::new(files),
            reopen: false,
        };
        Ok(state)
    }

    /// A device that goes on serving the guest `state` was saved from: its table, over
    /// the descriptors in [`FsState::files`] (taken), each checked to be the file the
    /// table names. The shared directory is the saved root's, not `config.host_path`
    /// looked up again, except where no descriptor came and the guest holds only the
    /// root ([`SavedTable::holds_only_root`]): then it is `config.host_path`, opened as
    /// a booted device opens it (a template's share, or one a fork child is given
    /// another directory for, whose parent's descriptors it dropped).
    fn restore(config: FsConfig, state: &FsState) -> Result<Self, FsError> {
        config_space(&config.tag)?;
        let files = state.files.take();
        let (fs, table) = match files.is_empty() && state.table.holds_only_root() {
            true => {
                let fs = passthrough(&config, &shared_dir(&config.host_path)?)?;
                let table = root_only_table(&config, &fs, &state.table)?;
                (fs, table)
            }
            false => {
                let table = checked_table(&config.tag, &state.table, files)?;
                (passthrough(&config, &config.host_path)?, table)
            }
        };
        fs.import_table(table).map_err(|e| FsError::BadTable {
            tag: config.tag.clone(),
            problem: e.to_string(),
        })?;
        let mut dev = Self::serving(config, fs)?;
        dev.share.set_keeps_cache(state.table.auto_inval_data);
        let (major, minor) = state.table.protocol;
        dev.server.set_protocol(major, minor);
        dev.activation
            .restore_acked_features(state.acked_features, AVAIL_FEATURES)?;
        Ok(dev)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 1 + REQUEST_QUEUES as usize]
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(offset, "virtio-fs: the configuration space is read-only");
    }

    super::activation_field!();

    /// Serves every queued request (a request served after the save would be served
    /// again by a fork child: a second MKDIR, UNLINK or appending WRITE on the host). A
    /// queue holds at most [`QUEUE_SIZE`] chains, and the paused guest adds none.
    fn finish_queued(&mut self) {
        let rounds = usize::from(QUEUE_SIZE) / MAX_CHAINS_PER_EVENT + 2;
        for index in 0..=REQUEST_QUEUES as usize {
            for _ in 0..rounds {
                if self.process_queue(index) < MAX_CHAINS_PER_EVENT {
                    break;
                }
            }
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.register(ops, TOKEN_ACTIVATE);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => self.activation.drain_evt(),
            token if token >= TOKEN_FIRST_KICK => self
                .activation
                .drain_kick((token - TOKEN_FIRST_KICK) as usize),
            other => tracing::warn!(token = other, "virtio-fs: unexpected event"),
        }
        if self.activation.sync(ops, TOKEN_FIRST_KICK) {
            for index in 0..=REQUEST_QUEUES as usize {
                self.process_queue(index);
            }
        }
    }
}

#[cfg(test)]
mod tests;
