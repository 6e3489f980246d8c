// forkvm patch: this whole file. See third_party/README.md.

//! The passthrough filesystem's table of what the guest holds (the inodes it has looked
//! up and not forgotten, the files and directories it has open, the options `init`
//! negotiated), taken out of one `PassthroughFs` and put into another: what a process
//! that goes on serving the same guest, a fork child's, needs. The host descriptors
//! travel as `File`s (duplicates of this process's), so the other process serves
//! exactly the files this one does, renamed or unlinked ones included.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::bitmap::BitmapSlice;

use super::inode_store::InodeId;
use super::{HandleData, InodeData, InodeHandle, PassthroughFs};
use crate::abi::fuse_abi as fuse;

/// An inode the guest holds.
#[derive(Debug)]
pub struct TableInode {
    /// The guest's node ID.
    pub inode: u64,
    /// Lookups the guest has not forgotten.
    pub refcount: u64,
    /// The file's mode (type and permissions) when it was looked up.
    pub mode: u32,
    /// Host inode number.
    pub ino: u64,
    /// Host device.
    pub dev: u64,
    /// Host mount ID.
    pub mnt: u64,
    /// An `O_PATH` descriptor of the file.
    pub file: File,
}

/// A file or directory the guest has open.
#[derive(Debug)]
pub struct TableHandle {
    /// The guest's handle.
    pub handle: u64,
    /// The node ID it was opened on.
    pub inode: u64,
    /// Its open flags.
    pub flags: u32,
    /// The open descriptor.
    pub file: File,
}

/// Options `init` negotiated with the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// Write-back caching.
    pub writeback: bool,
    /// No OPEN requests.
    pub no_open: bool,
    /// No OPENDIR requests.
    pub no_opendir: bool,
    /// `HANDLE_KILLPRIV_V2`.
    pub killpriv_v2: bool,
    /// Per-file DAX.
    pub perfile_dax: bool,
}

/// Everything a `PassthroughFs` knows of its guest.
#[derive(Debug)]
pub struct Table {
    /// Every inode the guest holds, the root included.
    pub inodes: Vec<TableInode>,
    /// Every open file and directory.
    pub handles: Vec<TableHandle>,
    /// The next node ID to give out.
    pub next_inode: u64,
    /// The next handle to give out.
    pub next_handle: u64,
    /// What `init` negotiated.
    pub options: TableOptions,
}

impl<S: BitmapSlice + Send + Sync> PassthroughFs<S> {
    /// The table, with duplicates of this filesystem's descriptors. Fails for inodes
    /// kept as file handles (`inode_file_handles`), which this export does not carry.
    pub fn export_table(&self) -> io::Result<Table> {
        let inodes = self.inode_map.inodes.read().unwrap();
        let mut exported = Vec::new();
        for data in inodes.data_values() {
            let InodeHandle::File(file) = &data.handle else {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "inodes kept as file handles cannot be exported",
                ));
            };
            exported.push(TableInode {
                inode: data.inode,
                refcount: data.refcount.load(Ordering::Acquire),
                mode: data.mode,
                ino: data.id.ino,
                dev: data.id.dev,
                mnt: data.id.mnt,
                file: file.try_clone()?,
            });
        }
        let handles = self.handle_map.handles.read().unwrap();
        let mut open = Vec::with_capacity(handles.len());
        for (&handle, data) in handles.iter() {
            open.push(TableHandle {
                handle,
                inode: data.inode,
                flags: data.get_flags(),
                file: data.get_file().try_clone()?,
            });
        }
        Ok(Table {
            inodes: exported,
            handles: open,
            next_inode: self.next_inode.load(Ordering::Relaxed),
            next_handle: self.next_handle.load(Ordering::Relaxed),
            options: TableOptions {
                writeback: self.writeback.load(Ordering::Relaxed),
                no_open: self.no_open.load(Ordering::Relaxed),
                no_opendir: self.no_opendir.load(Ordering::Relaxed),
                killpriv_v2: self.killpriv_v2.load(Ordering::Relaxed),
                perfile_dax: self.perfile_dax.load(Ordering::Relaxed),
            },
        })
    }

    /// Replaces this filesystem's table with `table` (instead of `import`). Refuses
    /// (`InvalidInput`, naming the problem) a table without a root, with a node ID,
    /// host file or handle twice, a node ID or handle that is 0 or at or past the next
    /// one to give out, an inode no lookup holds, or a handle on an inode it does not
    /// hold; the descriptors are the caller's to check.
    pub fn import_table(&self, table: Table) -> io::Result<()> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let mut seen = std::collections::BTreeSet::new();
        let mut ids = std::collections::BTreeSet::new();
        for i in &table.inodes {
            if i.inode == 0 || i.inode >= table.next_inode {
                return Err(bad(format!(
                    "node {} is outside 1 to the next node ID ({})",
                    i.inode, table.next_inode
                )));
            }
            if i.refcount == 0 {
                return Err(bad(format!("node {} is held by no lookup", i.inode)));
            }
            if !seen.insert(i.inode) || !ids.insert((i.ino, i.dev, i.mnt)) {
                return Err(bad(format!(
                    "node {} or its host file is listed twice",
                    i.inode
                )));
            }
        }
        if !seen.contains(&fuse::ROOT_ID) {
            return Err(bad("the root node is missing".into()));
        }
        let mut handles = std::collections::BTreeSet::new();
        for h in &table.handles {
            if h.handle == 0 || h.handle >= table.next_handle {
                return Err(bad(format!(
                    "handle {} is outside 1 to the next handle ({})",
                    h.handle, table.next_handle
                )));
            }
            if !seen.contains(&h.inode) || !handles.insert(h.handle) {
                return Err(bad(format!(
                    "handle {} is listed twice or open on a node not held",
                    h.handle
                )));
            }
        }

        let mut inodes = self.inode_map.get_map_mut();
        inodes.clear();
        for i in table.inodes {
            let id = InodeId {
                ino: i.ino,
                dev: i.dev,
                mnt: i.mnt,
            };
            inodes.insert(Arc::new(InodeData::new(
                i.inode,
                InodeHandle::File(i.file),
                i.refcount,
                id,
                i.mode,
            )));
        }
        drop(inodes);
        self.handle_map.clear();
        for h in table.handles {
            self.handle_map
                .insert(h.handle, HandleData::new(h.inode, h.file, h.flags));
        }
        self.next_inode.store(table.next_inode, Ordering::Relaxed);
        self.next_handle.store(table.next_handle, Ordering::Relaxed);
        let o = table.options;
        self.writeback.store(o.writeback, Ordering::Relaxed);
        self.no_open.store(o.no_open, Ordering::Relaxed);
        self.no_opendir.store(o.no_opendir, Ordering::Relaxed);
        self.killpriv_v2.store(o.killpriv_v2, Ordering::Relaxed);
        self.perfile_dax.store(o.perfile_dax, Ordering::Relaxed);
        // As `import` does: the guest sets every mode bit itself.
        // SAFETY: umask only sets this process's file mode creation mask.
        unsafe { libc::umask(0o000) };
        Ok(())
    }
}
