//! One shared host directory as the FUSE server sees it: fuse-backend-rs's passthrough
//! filesystem, with read-only shares enforced on the host.
//!
//! [`Share`] forwards to [`PassthroughFs`] only the operations it lists: what the
//! passthrough filesystem does not implement, and the DAX mapping requests (this device
//! has no DAX window), keep the trait's default answer (`ENOSYS`). A read-only share
//! answers every operation that would change the directory with `EROFS` before it
//! reaches the host filesystem, whatever the guest's mount options say: opens for
//! writing or truncating, creation, removal, renames, links, attribute and extended
//! attribute changes, writes and allocation.
//!
//! Every share is `nodev` on the host side: the guest cannot make a block or character
//! device node in it (`EPERM`), and opening one that is there fails (`EACCES`). A
//! hostile guest that could make `b 8:0` in a share and open it through the server
//! would read and write the host's disk with the VMM's rights.

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::SetattrValid;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

/// Most bytes of directory entries one readdir request reads from the host (the server
/// allocates that much; the guest kernel asks for a page).
pub const MAX_DIR_READ: u32 = 128 * 1024;

/// A host directory served to the guest.
pub struct Share {
    fs: PassthroughFs,
    read_only: bool,
    /// The guest agreed to `FUSE_AUTO_INVAL_DATA`: it may keep file contents and
    /// directory listings across opens (it drops them when it sees the host changed
    /// them). Without it every open drops them, as it must.
    keep_cache: AtomicBool,
}

impl Share {
    /// Serves `fs` (already imported), refusing every change when `read_only`.
    pub fn new(fs: PassthroughFs, read_only: bool) -> Self {
        Self {
            fs,
            read_only,
            keep_cache: AtomicBool::new(false),
        }
    }

    /// Whether the guest keeps what it cached across opens (INIT agreed on
    /// `FUSE_AUTO_INVAL_DATA`); saved with the device.
    pub fn keeps_cache(&self) -> bool {
        self.keep_cache.load(Ordering::Relaxed)
    }

    /// Restores [`Share::keeps_cache`] (a restored device gets no INIT).
    pub fn set_keeps_cache(&self, keep: bool) {
        self.keep_cache.store(keep, Ordering::Relaxed)
    }

    /// `opts` without the cache-keeping flags unless the guest keeps its cache.
    fn cache(&self, mut opts: OpenOptions) -> OpenOptions {
        if !self.keeps_cache() {
            opts.remove(OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR);
        }
        opts
    }

    /// The passthrough filesystem behind it.
    pub fn passthrough(&self) -> &PassthroughFs {
        &self.fs
    }

    /// `EROFS` on a read-only share.
    fn writable(&self) -> io::Result<()> {
        match self.read_only {
            true => Err(io::Error::from_raw_os_error(libc::EROFS)),
            false => Ok(()),
        }
    }

    /// `EACCES` when `inode` is a block or character device (a `nodev` mount's answer).
    fn not_a_device(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        let (st, _) = self.fs.getattr(ctx, inode, None)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFBLK | libc::S_IFCHR => Err(io::Error::from_raw_os_error(libc::EACCES)),
            _ => Ok(()),
        }
    }

    /// `EROFS` on a read-only share when `flags` (open(2) flags) would write or truncate.
    fn check_open(&self, flags: u32) -> io::Result<()> {
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.writable()?;
        }
        Ok(())
    }
}

impl FileSystem for Share {
    type Inode = u64;
    type Handle = u64;

    /// The passthrough filesystem's options, and requests of up to 1 MiB
    /// (`BIG_WRITES`, `MAX_PAGES`) where the guest offers them: without them the guest
    /// splits reads and writes into 8 KiB requests, each a round trip through the queue.
    /// And `AUTO_INVAL_DATA`: the guest keeps file contents across opens
    /// (`KEEP_CACHE`), so it must drop them when it sees the host changed the file's
    /// modification time (a size change drops them anyway).
    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = FsOptions::BIG_WRITES | FsOptions::MAX_PAGES | FsOptions::AUTO_INVAL_DATA;
        let agreed = self.fs.init(capable)? | (capable & wanted);
        self.set_keeps_cache(agreed.contains(FsOptions::AUTO_INVAL_DATA));
        Ok(agreed)
    }

    fn destroy(&self) {
        self.fs.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.fs.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.fs.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.fs.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.fs.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.fs.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.fs.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        // The type as the host will make it: the server applies the umask to the
        // whole mode, so type bits could hide there; only permission bits may.
        let mode = mode & !(umask & 0o7777);
        if !matches!(
            mode & libc::S_IFMT,
            0 | libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK
        ) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.fs.mknod(ctx, parent, name, mode, rdev, 0)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.fs.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.fs.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.fs.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        self.fs.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.check_open(flags)?;
        self.not_a_device(ctx, inode)?;
        let (handle, opts, passthrough) = self.fs.open(ctx, inode, flags, fuse_flags)?;
        Ok((handle, self.cache(opts), passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        let (entry, handle, opts, passthrough) = self.fs.create(ctx, parent, name, args)?;
        Ok((entry, handle, self.cache(opts), passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.fs
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.fs.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.fs.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.fs.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.fs
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.fs.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.fs.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.fs.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.fs.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.fs.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let (handle, opts) = self.fs.opendir(ctx, inode, flags)?;
        Ok((handle, self.cache(opts)))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(MAX_DIR_READ);
        self.fs.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // The server reads this much from the host; each entry it sends back is about
        // four times as large (attributes and an entry), so reading a quarter keeps what
        // it must hold back for the next request small.
        let size = (size / 4).clamp(size.min(1024), MAX_DIR_READ / 4);
        self.fs
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.fs.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.fs.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.fs.lseek(ctx, inode, handle, offset, whence)
    }
}
