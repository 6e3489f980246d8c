//! Tests of virtio-fs: a mock driver sends FUSE requests, encoded as the guest kernel
//! encodes them, through the activated device on an event loop, against a real host
//! directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use event_manager::{EventManager, SubscriberId, SubscriberOps};
use fuse_backend_rs::abi::fuse_abi::{
    Attr, CreateIn, EntryOut, InHeader, InitIn, InitOut, MkdirIn, MknodIn, Opcode, OpenIn, OpenOut,
    OutHeader, ReadIn, WriteIn,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;
use crate::virtio::test_driver::{Driver, DriverQueue};

const ROOT: u64 = 1;
const REQUEST_QUEUE: usize = 1;
const REPLY_LEN: u32 = 8192;

/// A guest with the device mounted: the driver, its queues and the event loop.
struct Guest {
    drv: Driver,
    queues: Vec<DriverQueue>,
    em: EventManager<Fs>,
    id: SubscriberId,
    unique: u64,
}

/// A FUSE reply: the error (0 or a negative errno) and the bytes after the header.
struct Reply {
    error: i32,
    body: Vec<u8>,
}

impl Reply {
    fn ok<T: ByteValued>(self) -> T {
        assert_eq!(self.error, 0, "the request failed");
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .expect("a reply this long")
    }
}

impl Guest {
    fn mount(config: FsConfig) -> Guest {
        let mut g = Guest::attach(Fs::new(config).unwrap());
        g.init(0);
        g
    }

    /// A guest driving `dev` as it is (a restored device: no INIT).
    fn attach(mut dev: Fs) -> Guest {
        let (drv, queues) = Driver::activate(&mut dev);
        let mut em = EventManager::<Fs>::new().unwrap();
        let id = em.add_subscriber(dev);
        let mut g = Guest {
            drv,
            queues,
            em,
            id,
            unique: 0,
        };
        g.run();
        g
    }

    fn device(&mut self) -> &mut Fs {
        self.em.subscriber_mut(self.id).unwrap()
    }

    /// FUSE INIT, the guest offering `flags`.
    fn init(&mut self, flags: u32) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 20,
            flags,
        };
        self.call(Opcode::Init, 0, init.as_slice()).ok::<InitOut>()
    }

    fn run(&mut self) {
        while self.em.run_with_timeout(20).unwrap() > 0 {}
    }

    /// Queues a request from `uid`/`gid` without running the device; where its reply
    /// goes.
    fn queue(&mut self, opcode: Opcode, nodeid: u64, ids: (u32, u32), body: &[u8]) -> u64 {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            uid: ids.0,
            gid: ids.1,
            pid: 1,
            padding: 0,
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(body);
        let input = self.drv.alloc(request.len() as u32);
        self.drv
            .mem
            .write_slice(&request, GuestAddress(input))
            .unwrap();
        let output = self.drv.alloc(REPLY_LEN);
        self.queues[REQUEST_QUEUE].add_chain(
            &self.drv.mem,
            &[
                (input, request.len() as u32, false),
                (output, REPLY_LEN, true),
            ],
        );
        output
    }

    fn call_as(&mut self, opcode: Opcode, nodeid: u64, ids: (u32, u32), body: &[u8]) -> Reply {
        let output = self.queue(opcode, nodeid, ids, body);
        self.drv.kicks[REQUEST_QUEUE].write(1).unwrap();
        self.run();
        let used = self.queues[REQUEST_QUEUE]
            .pop_used(&self.drv.mem)
            .expect("a reply");
        let header: OutHeader = self.drv.mem.read_obj(GuestAddress(output)).unwrap();
        assert_eq!(header.unique, self.unique);
        // The reply is what its header says (the kernel reads that much); the used
        // length (request included) may count a whole reply struct the header cut short
        // for an older protocol minor.
        let len = header.len as usize;
        assert!((16..=REPLY_LEN as usize).contains(&len) && len <= used.len());
        let mut body = vec![0u8; len - 16];
        self.drv
            .mem
            .read_slice(&mut body, GuestAddress(output + 16))
            .unwrap();
        Reply {
            error: header.error,
            body,
        }
    }

    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Reply {
        self.call_as(opcode, nodeid, (0, 0), body)
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(Opcode::Lookup, parent, &cstr(name))
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Reply {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, nodeid, open.as_slice())
    }

    fn read(&mut self, nodeid: u64, fh: u64, size: u32) -> Vec<u8> {
        let read = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        let reply = self.call(Opcode::Read, nodeid, read.as_slice());
        assert_eq!(reply.error, 0);
        reply.body
    }

    fn create_as(&mut self, ids: (u32, u32), parent: u64, name: &str) -> Reply {
        let create = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o640,
            umask: 0o022,
            fuse_flags: 0,
        };
        let mut body = create.as_slice().to_vec();
        body.extend(cstr(name));
        self.call_as(Opcode::Create, parent, ids, &body)
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Reply {
        let mkdir = MkdirIn {
            mode: 0o755,
            umask: 0o022,
        };
        let mut body = mkdir.as_slice().to_vec();
        body.extend(cstr(name));
        self.call(Opcode::Mkdir, parent, &body)
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn share(dir: &Path, read_only: bool) -> FsConfig {
    FsConfig {
        tag: "data".into(),
        host_path: dir.to_owned(),
        read_only,
    }
}

#[test]
fn configuration_space_names_the_tag_and_queues() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Fs::new(share(dir.path(), false)).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(
        dev.queue_max_sizes().len(),
        2,
        "high priority + one request queue"
    );
    let mut space = [0xffu8; 40];
    dev.read_config(0, &mut space);
    assert_eq!(&space[..4], b"data");
    assert!(space[4..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(space[36..].try_into().unwrap()), 1);
    let mut tail = [0xffu8; 8];
    dev.read_config(38, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0], "past the end reads zeros");
    // One descriptor per file the guest looks up: the soft limit is raised to the hard
    // one (or beyond, where the process may).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit that lives across the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    assert_eq!(lim.rlim_cur, lim.rlim_max);
}

#[test]
fn bad_configurations_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let err = |c: FsConfig| Fs::new(c).unwrap_err().to_string();
    let mut c = share(dir.path(), false);
    c.tag = String::new();
    assert!(err(c.clone()).contains("empty"));
    c.tag = "x".repeat(37);
    assert!(err(c.clone()).contains("longer than 36 bytes"));
    c.tag = "a\0b".into();
    assert!(err(c).contains("NUL"));
    let missing = dir.path().join("missing");
    let e = err(share(&missing, false));
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("No such file"),
        "{e}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(err(share(&file, false)).contains("not a directory"));
    // A symlink is resolved once, when the device is made: a dangling one is refused.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&missing, &link).unwrap();
    let e = err(share(&link, false));
    assert!(
        e.contains(&link.display().to_string()) && e.contains("No such file"),
        "{e}"
    );
    // A directory the VM process may not read: made on a thread that has given up
    // root (its credentials alone: the raw system call, not glibc's all-threads one).
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = std::thread::spawn(move || {
        // SAFETY: setresuid changes this thread's credentials only; it reads nothing.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(r, 0, "the tests run as root");
        Fs::new(share(&locked, false)).unwrap_err().to_string()
    })
    .join()
    .unwrap();
    assert!(
        e.contains("locked") && e.contains("Permission denied"),
        "{e}"
    );
}

#[test]
fn requests_of_a_mebibyte_when_the_guest_offers_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::mount(share(dir.path(), false));
    // FUSE_BIG_WRITES (1 << 5) and FUSE_MAX_PAGES (1 << 22).
    let out = g.init((1 << 5) | (1 << 22));
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.max_pages, 256);
    assert_ne!(out.flags & (1 << 22), 0);
}

/// The open flags of `nodeid`'s OPEN (or OPENDIR when `dir`).
fn open_flags(g: &mut Guest, nodeid: u64, dir: bool) -> u32 {
    let (opcode, flags) = match dir {
        true => (Opcode::Opendir, libc::O_RDONLY | libc::O_DIRECTORY),
        false => (Opcode::Open, libc::O_RDONLY),
    };
    let open = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    g.call(opcode, nodeid, open.as_slice())
        .ok::<OpenOut>()
        .open_flags
}

/// The guest keeps file contents and listings across opens (an exec is an open) only
/// where it agreed to drop them when it sees the host changed them
/// (`FUSE_AUTO_INVAL_DATA`, which the kernel acts on; `run_e2e` checks it in a guest);
/// the agreement survives a save and restore (a fork child's guest holds it).
#[test]
fn cached_contents_are_kept_across_opens_only_where_the_guest_drops_changed_ones() {
    const FOPEN_KEEP_CACHE: u32 = 1 << 1;
    const FOPEN_CACHE_DIR: u32 = 1 << 3;
    const FUSE_AUTO_INVAL_DATA: u32 = 1 << 12;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("program"), "code").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let flags = |g: &mut Guest| {
        let file: EntryOut = g.lookup(ROOT, "program").ok();
        let sub: EntryOut = g.lookup(ROOT, "sub").ok();
        (
            open_flags(g, file.nodeid, false),
            open_flags(g, sub.nodeid, true),
        )
    };

    // Not offered: not claimed, and every open drops what the guest cached.
    let mut g = Guest::mount(share(dir.path(), false));
    assert_eq!(g.init(0).flags & FUSE_AUTO_INVAL_DATA, 0);
    let (file, sub) = flags(&mut g);
    assert_eq!(file & FOPEN_KEEP_CACHE, 0, "{file:#x}");
    assert_eq!(sub & (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR), 0, "{sub:#x}");
    let state = g.device().save().unwrap();
    assert!(!state.table.auto_inval_data);

    // Offered: taken, and contents and listings are kept.
    let mut g = Guest::mount(share(dir.path(), false));
    assert_ne!(g.init(FUSE_AUTO_INVAL_DATA).flags & FUSE_AUTO_INVAL_DATA, 0);
    let (file, sub) = flags(&mut g);
    assert_ne!(file & FOPEN_KEEP_CACHE, 0, "{file:#x}");
    assert_eq!(sub & FOPEN_CACHE_DIR, FOPEN_CACHE_DIR, "{sub:#x}");

    // Restored (no INIT): as the saved guest agreed.
    let state = g.device().save().unwrap();
    assert!(state.table.auto_inval_data);
    let mut child = Guest::attach(Fs::restore(share(dir.path(), false), &state).unwrap());
    let (file, _) = flags(&mut child);
    assert_ne!(file & FOPEN_KEEP_CACHE, 0, "{file:#x}");
}

#[test]
fn guest_reads_host_files_and_creates_files_with_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), "from the host\n").unwrap();
    let mut g = Guest::mount(share(dir.path(), false));

    let entry: EntryOut = g.lookup(ROOT, "hello").ok();
    assert_eq!(entry.attr.size, 14);
    let open: OpenOut = g.open(entry.nodeid, libc::O_RDONLY).ok();
    assert_eq!(g.read(entry.nodeid, open.fh, 4096), b"from the host\n");

    // A file the guest creates as uid/gid 1000 is the host's, owned by 1000.
    let reply = g.create_as((1000, 1000), ROOT, "made-inside");
    assert_eq!(reply.error, 0);
    let entry_len = std::mem::size_of::<EntryOut>();
    let entry = *EntryOut::from_slice(&reply.body[..entry_len]).unwrap();
    let open =
        *OpenOut::from_slice(&reply.body[entry_len..][..std::mem::size_of::<OpenOut>()]).unwrap();
    let meta = std::fs::metadata(dir.path().join("made-inside")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(meta.mode() & 0o777, 0o640);
    assert_eq!(entry.attr.uid, 1000);

    let data = b"written by the guest";
    let write = WriteIn {
        fh: open.fh,
        offset: 0,
        size: data.len() as u32,
        ..Default::default()
    };
    let mut body = write.as_slice().to_vec();
    body.extend_from_slice(data);
    let reply = g.call_as(Opcode::Write, entry.nodeid, (1000, 1000), &body);
    assert_eq!(reply.error, 0);
    assert_eq!(std::fs::read(dir.path().join("made-inside")).unwrap(), data);
}

#[test]
fn read_only_share_refuses_every_change_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), "original").unwrap();
    let mut g = Guest::mount(share(dir.path(), true));
    let erofs = -libc::EROFS;

    assert_eq!(g.create_as((0, 0), ROOT, "new").error, erofs);
    assert_eq!(g.mkdir(ROOT, "dir").error, erofs);
    let keep = g.lookup(ROOT, "keep").ok::<EntryOut>().nodeid;
    assert_eq!(g.open(keep, libc::O_WRONLY).error, erofs);
    assert_eq!(g.open(keep, libc::O_RDWR).error, erofs);
    assert_eq!(g.open(keep, libc::O_RDONLY | libc::O_TRUNC).error, erofs);
    assert_eq!(g.call(Opcode::Unlink, ROOT, &cstr("keep")).error, erofs);
    // Reading still works.
    let open: OpenOut = g.open(keep, libc::O_RDONLY).ok();
    assert_eq!(g.read(keep, open.fh, 100), b"original");

    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"]);
    assert_eq!(std::fs::read(dir.path().join("keep")).unwrap(), b"original");
}

#[test]
fn a_share_is_nodev_no_device_node_made_or_opened() {
    let dir = tempfile::tempdir().unwrap();
    // A device node the host put there (the host's null device).
    let null = std::ffi::CString::new(dir.path().join("null").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    let made = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
    let mut g = Guest::mount(share(dir.path(), false));
    let mknod = |g: &mut Guest, name: &str, mode: u32, rdev: u32| {
        let args = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let mut body = args.as_slice().to_vec();
        body.extend_from_slice(&cstr(name));
        g.call(Opcode::Mknod, ROOT, &body).error
    };
    // The host's disk, as a guest would ask for it: refused, nothing made.
    let sda = libc::makedev(8, 0) as u32;
    assert_eq!(
        mknod(&mut g, "sda", libc::S_IFBLK | 0o600, sda),
        -libc::EPERM
    );
    assert_eq!(
        mknod(
            &mut g,
            "mem",
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 1) as u32
        ),
        -libc::EPERM
    );
    assert!(!dir.path().join("sda").exists() && !dir.path().join("mem").exists());
    // A type hidden in the umask (the server masks the whole mode with it).
    let args = MknodIn {
        mode: 0o160600, // block (0o060000) once 0o100000 is masked off
        rdev: sda,
        umask: 0o100000,
        padding: 0,
    };
    let mut body = args.as_slice().to_vec();
    body.extend_from_slice(&cstr("hidden"));
    assert_eq!(g.call(Opcode::Mknod, ROOT, &body).error, -libc::EPERM);
    assert!(!dir.path().join("hidden").exists());
    // A FIFO is not a device.
    assert_eq!(mknod(&mut g, "fifo", libc::S_IFIFO | 0o600, 0), 0);
    assert!(dir.path().join("fifo").exists());
    // The node that is there is listed, and not opened.
    let node: EntryOut = g.lookup(ROOT, "null").ok();
    assert_eq!(node.attr.mode & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(g.open(node.nodeid, libc::O_RDONLY).error, -libc::EACCES);
    assert_eq!(g.open(node.nodeid, libc::O_RDWR).error, -libc::EACCES);
}

#[test]
fn lookups_stay_inside_the_shared_directory() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), "host only").unwrap();
    let dir = outer.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(outer.path().join("secret"), dir.join("link")).unwrap();
    let mut g = Guest::mount(share(&dir, false));

    let root: Attr = g.lookup(ROOT, ".").ok::<EntryOut>().attr;
    // `..` of the shared directory is the shared directory.
    let up: EntryOut = g.lookup(ROOT, "..").ok();
    assert_eq!(up.attr.ino, root.ino);
    assert_eq!(g.lookup(ROOT, "../secret").error, -libc::EINVAL);
    assert_eq!(g.lookup(ROOT, "secret").error, -libc::ENOENT);
    // A symlink is served as a link (the guest resolves it in its own tree), never
    // followed on the host.
    let link: EntryOut = g.lookup(ROOT, "link").ok();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    let target = g.call(Opcode::Readlink, link.nodeid, &[]);
    assert_eq!(target.error, 0);
    assert_eq!(
        target.body,
        outer.path().join("secret").as_os_str().as_encoded_bytes()
    );
    // Opening the link itself does not open what it points to.
    assert!(g.open(link.nodeid, libc::O_RDONLY).error < 0);
}

/// `rm -r` on a share: read a page of entries, unlink them, read on from the offset the
/// last one gave. On a host filesystem whose offsets are positions (tmpfs), seeking
/// back to that offset after the unlinks skipped entries and `rmdir` found the
/// directory not empty.
#[test]
fn unlinking_while_reading_a_directory_misses_nothing() {
    in_ramfs(unlink_while_reading);
}

/// Runs `f` on a thread of its own, in a mount namespace of its own, with a fresh ramfs
/// (whose directory offsets are positions, as tmpfs's were before Linux 6.6: the virtual
/// test host's `/tmp` is one) mounted on an empty directory it is given.
fn in_ramfs(f: fn(&Path)) {
    std::thread::spawn(move || {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        // SAFETY: unshare takes no pointers; it gives this thread its own mount
        // namespace (and filesystem information).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        let root = c("/");
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "making mounts private: {}",
            std::io::Error::last_os_error()
        );
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (c("ramfs"), c(dir.path().to_str().unwrap()));
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mounting ramfs: {}", std::io::Error::last_os_error());
        f(dir.path());
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    })
    .join()
    .unwrap();
}

fn unlink_while_reading(dir: &Path) {
    for i in 0..300 {
        std::fs::write(dir.join(format!("file-{i:04}")), "").unwrap();
    }
    let mut g = Guest::mount(share(dir, false));
    let open = OpenIn {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
        fuse_flags: 0,
    };
    let fh = g
        .call(Opcode::Opendir, ROOT, open.as_slice())
        .ok::<OpenOut>()
        .fh;
    let mut offset = 0;
    let mut removed = 0;
    loop {
        let read = ReadIn {
            fh,
            offset,
            size: 512,
            ..Default::default()
        };
        let reply = g.call(Opcode::Readdir, ROOT, read.as_slice());
        assert_eq!(reply.error, 0);
        if reply.body.is_empty() {
            break;
        }
        // fuse_dirent: ino, off, namelen, type, name padded to 8 bytes.
        let mut rest = &reply.body[..];
        while rest.len() >= 24 {
            let off = u64::from_le_bytes(rest[8..16].try_into().unwrap());
            let namelen = u32::from_le_bytes(rest[16..20].try_into().unwrap()) as usize;
            let name = rest[24..24 + namelen].to_vec();
            rest = &rest[(24 + namelen).next_multiple_of(8).min(rest.len())..];
            offset = off;
            if name == b"." || name == b".." {
                continue;
            }
            let mut body = name;
            body.push(0);
            assert_eq!(g.call(Opcode::Unlink, ROOT, &body).error, 0);
            removed += 1;
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{} left after {removed} unlinks: {left:?}",
        left.len()
    );
    assert_eq!(removed, 300);
}

#[test]
fn a_flood_of_requests_is_served_a_budget_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::mount(share(dir.path(), false));
    let n = MAX_CHAINS_PER_EVENT + 36;
    for _ in 0..n {
        g.queue(Opcode::Getattr, ROOT, (0, 0), &[0u8; 16]);
    }
    g.drv.kicks[REQUEST_QUEUE].write(1).unwrap();
    // One event serves one budget and kicks the queue again for the rest.
    assert_eq!(g.em.run_with_timeout(0).unwrap(), 1);
    let mut served = 0;
    while g.queues[REQUEST_QUEUE].pop_used(&g.drv.mem).is_some() {
        served += 1;
    }
    assert_eq!(served, MAX_CHAINS_PER_EVENT);
    g.run();
    while g.queues[REQUEST_QUEUE].pop_used(&g.drv.mem).is_some() {
        served += 1;
    }
    assert_eq!(served, n);
}

/// Duplicates of `files`, for one more restore.
fn dups(files: &[File]) -> Vec<File> {
    files.iter().map(|f| f.try_clone().unwrap()).collect()
}

/// A guest that has looked up a file and a directory, and has the file and the
/// directory open: saved, and the host descriptors taken out of the state.
fn saved_guest(dir: &Path) -> (Guest, FsState, Vec<File>, [u64; 4]) {
    std::fs::write(dir.join("kept"), "before the fork\n").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/inner"), "").unwrap();
    let mut g = Guest::mount(share(dir, false));
    let file: EntryOut = g.lookup(ROOT, "kept").ok();
    let fh = g.open(file.nodeid, libc::O_RDWR).ok::<OpenOut>().fh;
    let sub: EntryOut = g.lookup(ROOT, "sub").ok();
    let open = OpenIn {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
        fuse_flags: 0,
    };
    let dh = g
        .call(Opcode::Opendir, sub.nodeid, open.as_slice())
        .ok::<OpenOut>()
        .fh;
    let state = g.device().save().unwrap();
    let files = state.files.take();
    (g, state, files, [file.nodeid, fh, sub.nodeid, dh])
}

#[test]
fn a_restored_share_serves_the_nodes_and_handles_its_guest_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut parent, state, files, [node, fh, sub, dh]) = saved_guest(dir.path());
    // The root, the file and the directory; the file and the directory open.
    assert_eq!(state.table.inodes.len(), 3);
    assert_eq!(state.table.handles.len(), 2);
    assert_eq!(files.len(), state.files_needed());
    assert_eq!(state.table.protocol, (7, 31));

    // Encoded and decoded: the table travels, the descriptors do not.
    let copy: FsState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert!(copy.files.take().is_empty());
    assert_eq!(copy.table, state.table);
    copy.files.put(dups(&files));
    let mut child = Guest::attach(Fs::restore(share(dir.path(), false), &copy).unwrap());
    assert!(
        copy.files.take().is_empty(),
        "the restore took the descriptors"
    );

    // The host renames the file: both guests still read it through their node and
    // handle, as processes that share an open file after fork().
    std::fs::rename(dir.path().join("kept"), dir.path().join("renamed")).unwrap();
    assert_eq!(child.read(node, fh, 4096), b"before the fork\n");
    assert_eq!(parent.read(node, fh, 4096), b"before the fork\n");
    let attr = child.call(Opcode::Getattr, node, &[0u8; 16]);
    assert_eq!(attr.error, 0);

    // The child writes through the handle its parent opened; the host sees it.
    let write = WriteIn {
        fh,
        offset: 0,
        size: 6,
        ..Default::default()
    };
    let mut body = write.as_slice().to_vec();
    body.extend_from_slice(b"BEFORE");
    assert_eq!(child.call(Opcode::Write, node, &body).error, 0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("renamed")).unwrap(),
        "BEFORE the fork\n"
    );

    // The directory handle reads on in the child; a new lookup there gets a node ID
    // the guest has not seen.
    let read = ReadIn {
        fh: dh,
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let listing = child.call(Opcode::Readdir, sub, read.as_slice());
    assert_eq!(listing.error, 0);
    assert!(listing.body.windows(5).any(|w| w == b"inner"));
    let inner: EntryOut = child.lookup(sub, "inner").ok();
    assert!(inner.nodeid >= state.table.next_inode, "{}", inner.nodeid);

    // Each has an open file of its own: the child's guest writing with O_APPEND sets it
    // on the child's description only, and the parent's write at 0 lands at 0.
    let write_at = |g: &mut Guest, flags: i32, data: &[u8]| {
        let write = WriteIn {
            fh,
            offset: 0,
            size: data.len() as u32,
            flags: flags as u32,
            ..Default::default()
        };
        let mut body = write.as_slice().to_vec();
        body.extend_from_slice(data);
        assert_eq!(g.call(Opcode::Write, node, &body).error, 0);
    };
    write_at(&mut child, libc::O_RDWR | libc::O_APPEND, b"+");
    write_at(&mut parent, libc::O_RDWR, b"P");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("renamed")).unwrap(),
        "PEFORE the fork\n+"
    );
    std::fs::write(dir.path().join("renamed"), "BEFORE the fork\n").unwrap();

    // The parent forgets and closes everything; the child keeps serving.
    assert_eq!(
        parent
            .call(
                Opcode::Release,
                node,
                fuse_backend_rs::abi::fuse_abi::ReleaseIn {
                    fh,
                    ..Default::default()
                }
                .as_slice()
            )
            .error,
        0
    );
    drop(parent);
    assert_eq!(child.read(node, fh, 4096), b"BEFORE the fork\n");
}

#[test]
fn what_the_guest_queued_is_served_before_a_save() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::mount(share(dir.path(), false));
    // More than one event's budget, queued and never kicked, as a paused guest leaves
    // them; one of them makes a directory on the host.
    for _ in 0..MAX_CHAINS_PER_EVENT + 10 {
        g.queue(Opcode::Getattr, ROOT, (0, 0), &[0u8; 16]);
    }
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0o022,
    };
    let mut body = mkdir.as_slice().to_vec();
    body.extend(cstr("made-once"));
    g.queue(Opcode::Mkdir, ROOT, (0, 0), &body);
    g.device().finish_queued();
    assert!(dir.path().join("made-once").is_dir());
    let mut served = 0;
    while g.queues[REQUEST_QUEUE].pop_used(&g.drv.mem).is_some() {
        served += 1;
    }
    assert_eq!(
        served,
        MAX_CHAINS_PER_EVENT + 11,
        "every queued request answered"
    );
}

#[test]
fn a_table_that_does_not_match_its_descriptors_is_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_parent, state, files, _) = saved_guest(dir.path());
    let restore = |table: &SavedTable, files: Vec<File>, features: u64| {
        let state = FsState {
            acked_features: features,
            table: table.clone(),
            files: HostFiles::new(files),
            reopen: false,
        };
        Fs::restore(share(dir.path(), false), &state).map(drop)
    };
    let refused = |table: &SavedTable, files: Vec<File>| {
        restore(table, files, state.acked_features)
            .unwrap_err()
            .to_string()
    };
    let ok = &state.table;
    assert!(restore(ok, dups(&files), state.acked_features).is_ok());

    // A descriptor missing: a state without its files (a template's) is refused.
    let e = refused(ok, dups(&files[1..]));
    assert!(e.contains("4 host descriptors came for 5 entries"), "{e}");
    assert!(refused(ok, Vec::new()).contains("0 host descriptors"));
    // Two inodes' descriptors swapped.
    let mut swapped = dups(&files);
    swapped.swap(0, 1);
    let e = refused(ok, swapped);
    assert!(e.contains("is not the file it names"), "{e}");
    // A handle on a node the table does not hold.
    let mut t = ok.clone();
    t.handles[0].node = 999;
    let e = refused(&t, dups(&files));
    assert!(e.contains("which it does not hold"), "{e}");
    // Node IDs the server would give out again.
    let mut t = ok.clone();
    t.next_inode = 2;
    let e = refused(&t, dups(&files));
    assert!(e.contains("is outside 1 to the next node ID (2)"), "{e}");
    let mut t = ok.clone();
    t.next_handle = 1;
    let e = refused(&t, dups(&files));
    assert!(e.contains("is outside 1 to the next handle (1)"), "{e}");
    // A root that is not a directory.
    let mut t = ok.clone();
    let root = t.inodes.iter().position(|i| i.node == ROOT).unwrap();
    let file = t
        .inodes
        .iter()
        .position(|i| i.node != ROOT && i.mode & libc::S_IFMT == libc::S_IFREG)
        .unwrap();
    let (rn, fnode) = (t.inodes[root].node, t.inodes[file].node);
    t.inodes[root].node = fnode;
    t.inodes[file].node = rn;
    let e = refused(&t, dups(&files));
    assert!(e.contains("the root is not a directory"), "{e}");
    // Another FUSE protocol.
    let mut t = ok.clone();
    t.protocol = (8, 0);
    assert!(refused(&t, dups(&files)).contains("FUSE protocol 8.0"));
    // Features this device does not offer.
    assert!(matches!(
        Fs::restore(
            share(dir.path(), false),
            &FsState {
                acked_features: 1 << 40,
                table: ok.clone(),
                files: HostFiles::new(dups(&files)),
                reopen: false,
            }
        ),
        Err(FsError::BadFeatures(_))
    ));
}

#[test]
fn a_share_holding_only_its_root_goes_on_in_the_directory_it_is_given() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(first.path().join("old"), "the template's\n").unwrap();
    std::fs::write(second.path().join("new"), "the pod's\n").unwrap();
    // Mounted (INIT), nothing looked up: the guest holds the root only.
    let mut g = Guest::mount(share(first.path(), false));
    let mut state = g.device().save().unwrap();
    assert!(state.table.holds_only_root(), "{:?}", state.table);
    // A plain fork child goes on with its parent's root, whatever the path leads to now.
    let root = state.files.take();
    assert_eq!(root.len(), 1);
    assert_eq!(state.files_needed(), 1);
    state.files.put(dups(&root));
    let moved = tempfile::tempdir().unwrap();
    let mut forked = Guest::attach(Fs::restore(share(moved.path(), false), &state).unwrap());
    assert_eq!(
        forked.lookup(ROOT, "old").error,
        0,
        "the parent's directory"
    );
    // As a template holds it: no descriptor; restored over another directory.
    state.reopen = true;
    assert_eq!(state.files_needed(), 0);
    let copy: FsState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert!(copy.reopen);
    let mut child = Guest::attach(Fs::restore(share(second.path(), false), &copy).unwrap());
    let new: EntryOut = child.lookup(ROOT, "new").ok();
    assert!(new.nodeid >= state.table.next_inode, "{}", new.nodeid);
    let fh = child.open(new.nodeid, libc::O_RDONLY).ok::<OpenOut>().fh;
    assert_eq!(child.read(new.nodeid, fh, 4096), b"the pod's\n");
    assert_eq!(
        child.lookup(ROOT, "old").error,
        -libc::ENOENT,
        "the first directory is not reached"
    );
    // The parent serves its own directory on.
    assert_eq!(g.lookup(ROOT, "old").error, 0);

    // A directory that is not there is named.
    let gone = second.path().join("gone");
    let e = Fs::restore(share(&gone, false), &copy)
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone"), "{e}");

    // A share its guest never mounted (no INIT: a pod template's) goes on the same way,
    // and its guest mounts it in the new directory.
    let mut never = Guest::attach(Fs::new(share(first.path(), false)).unwrap());
    let mut state = never.device().save().unwrap();
    assert!(state.table.holds_only_root(), "{:?}", state.table);
    drop(state.files.take());
    state.reopen = true;
    let mut child = Guest::attach(Fs::restore(share(second.path(), false), &state).unwrap());
    child.init(0);
    assert_eq!(child.lookup(ROOT, "new").error, 0);
    assert_eq!(child.lookup(ROOT, "old").error, -libc::ENOENT);

    // A guest holding more than its root is not such a share.
    let dir = tempfile::tempdir().unwrap();
    let (_g, held, files, _) = saved_guest(dir.path());
    assert!(!held.table.holds_only_root());
    assert_eq!(held.files_needed(), files.len());
}
