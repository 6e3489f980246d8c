//! The default guest that `forkvm boot` runs when no kernel is given: Debian's cloud
//! kernel and a busybox initramfs whose `/init` loads the virtio drivers, starts the
//! guest agent (when one was built), prints a ready marker with the guest uptime, runs
//! the command given after ` -- ` on the kernel command line (or a shell), and powers
//! the VM off.

use std::path::{Path, PathBuf};

use crate::{
    cache_dir, ensure_kernel, plan_modules, Error, Flavour, InitramfsBuilder, PlannedModule,
};

/// Modules the default guest loads (dependencies are added in load order). The
/// virtio-mmio transport comes first: a driver is loaded only if a device of its type
/// was found ([`plan_modules`]), and the transport is what finds them.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
];

/// Modules the container guest loads besides [`GUEST_MODULES`]: overlayfs assembles the
/// image's read-only root with a private writable layer (ext4 is built into the kernel);
/// virtiofs mounts the host directories shared with the container (volumes). `fuse` is
/// asked for by name so that it loads whatever the devices (a container given
/// `/dev/fuse` needs it without a share), not only as virtiofs's dependency.
pub const CONTAINER_MODULES: &[&str] = &["overlay", "fuse", "virtiofs"];

/// Where the container guest's agent (PID 1) finds the modules to load, one absolute
/// path per line in load order.
pub const MODULE_LIST: &str = "etc/forkvm/modules";

/// Which of [`MODULE_LIST`]'s modules the guest needs only with certain virtio devices:
/// one per line, its path there, then the virtio device types (decimal, comma-separated,
/// e.g. `/lib/modules/failover.ko 1`). A file of its own, so that an agent older than it
/// (or an image without it) loads every module, as agents always did.
pub const MODULE_DEVICES: &str = "etc/forkvm/module-devices";

/// What `/init` prints once the drivers are loaded, followed by the guest uptime.
pub const READY_MARKER: &str = "forkvm-init: ready uptime=";

/// A bootable kernel and initramfs pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel forkvm boots: the uncompressed ELF `vmlinux` (see
    /// [`crate::vmlinux`]).
    pub kernel: PathBuf,
    /// The same kernel as the package ships it (bzImage), for VMMs that need one.
    pub bzimage: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The default guest's `/init`, given its modules in load order ([`plan_modules`]: a
/// driver of a device the VM lacks is skipped).
pub fn init_script(modules: &[PlannedModule]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for w in $(cat /proc/cmdline); do
  case "$w" in
    forkvm.hostname=*) hostname "${w#forkvm.hostname=}" ;;
  esac
done
"#,
    );
    // The VMM announces its virtio-mmio devices through ACPI; virtio_mmio (loaded
    // first, unconditionally) binds to them and lists each with its type in sysfs.
    s.push_str(
        "has_virtio() { for t in \"$@\"; do grep -qx \"$(printf 0x%04x \"$t\")\" \
         /sys/bus/virtio/devices/*/device 2>/dev/null && return 0; done; return 1; }\n",
    );
    for m in modules {
        let path = InitramfsBuilder::image_path(&m.path);
        let path = path.display();
        let insmod = format!("insmod {path} || echo \"forkvm-init: insmod {path} failed\"");
        match &m.virtio {
            None => s.push_str(&format!("{insmod}\n")),
            Some(types) => {
                let types: Vec<String> = types.iter().map(u32::to_string).collect();
                s.push_str(&format!(
                    "if has_virtio {}; then {insmod}; fi\n",
                    types.join(" ")
                ));
            }
        }
    }
    s.push_str(&format!(
        r#"ip link set lo up 2>/dev/null
# The agent binds its vsock port, then detaches: once it returns, the host can reach it.
[ -x /bin/forkvm-agent ] && /bin/forkvm-agent
echo "{READY_MARKER}$(cut -d' ' -f1 /proc/uptime)"
if [ "$#" -gt 0 ]; then
  "$@"
  echo "forkvm-init: exit $?"
else
  setsid cttyhack sh
fi
sync
poweroff -f
"#
    ));
    s
}

/// The guest agent binary: `$FORKVM_AGENT`, else `agent` in `forkvm.toml` (an
/// installed forkvm), else the static (musl) build in the `target` directory that
/// holds the running executable.
pub fn find_agent() -> Option<PathBuf> {
    if let Some(p) = forkvm_config::Setting::Agent.get() {
        return Some(p);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).find_map(|dir| {
        ["release", "debug"]
            .iter()
            .map(|p| {
                dir.join("x86_64-unknown-linux-musl")
                    .join(p)
                    .join("forkvm-agent")
            })
            .find(|p| p.is_file())
    })
}

/// Ensures the default guest (cloud kernel + initramfs with the agent from
/// [`find_agent`], if built) is in the cache and returns it. The initramfs is rebuilt
/// only when its contents would change.
pub fn default_guest() -> Result<GuestImage, Error> {
    default_guest_with(find_agent().as_deref())
}

/// [`default_guest`] with an explicit agent binary (or none).
pub fn default_guest_with(agent: Option<&Path>) -> Result<GuestImage, Error> {
    let tree = ensure_kernel(Flavour::CloudAmd64)?;
    let busybox = InitramfsBuilder::host_busybox();
    let inputs: Vec<&Path> = [Some(busybox), agent].into_iter().flatten().collect();
    let memo = Memo::new(&guest_cache()?, &tree, "initramfs", &inputs, GUEST_MODULES);
    if let Some(initrd) = memo.as_ref().and_then(Memo::image) {
        return guest_image(&tree, initrd);
    }
    let modules = plan_modules(&tree, GUEST_MODULES)?;
    let mut b = InitramfsBuilder::new();
    b.busybox(busybox)?;
    for m in &modules {
        b.module(&m.path)?;
    }
    if let Some(agent) = agent {
        b.file_from_host("bin/forkvm-agent", agent, 0o755)?;
    }
    b.init_script(&init_script(&modules));
    cached_initramfs(&tree, "initramfs", &b, memo)
}

/// Ensures the container guest is in the cache and returns it: Debian's cloud kernel and
/// an initramfs holding only the modules and the guest agent as `/init` (PID 1). The
/// agent loads the modules listed in [`MODULE_LIST`], assembles the container's root
/// from the disk named by `forkvm.rootfs=` and runs the processes the host asks for.
pub fn container_guest(agent: &Path) -> Result<GuestImage, Error> {
    let tree = ensure_kernel(Flavour::CloudAmd64)?;
    let names: Vec<&str> = GUEST_MODULES
        .iter()
        .chain(CONTAINER_MODULES)
        .copied()
        .collect();
    let memo = Memo::new(&guest_cache()?, &tree, "container", &[agent], &names);
    if let Some(initrd) = memo.as_ref().and_then(Memo::image) {
        return guest_image(&tree, initrd);
    }
    let modules = plan_modules(&tree, &names)?;
    let mut b = InitramfsBuilder::new();
    for m in &modules {
        b.module(&m.path)?;
    }
    b.file_from_host("init", agent, 0o755)?;
    b.file(MODULE_LIST, module_list(&modules), 0o644);
    b.file(MODULE_DEVICES, module_devices(&modules), 0o644);
    b.dir("rootfs", 0o755);
    cached_initramfs(&tree, "container", &b, memo)
}

/// The contents of [`MODULE_LIST`]: one image path per line, in load order.
pub fn module_list(modules: &[PlannedModule]) -> String {
    modules
        .iter()
        .map(|m| format!("{}\n", InitramfsBuilder::image_path(&m.path).display()))
        .collect()
}

/// The contents of [`MODULE_DEVICES`]: for each module the guest needs only with certain
/// virtio devices, its image path and their types.
pub fn module_devices(modules: &[PlannedModule]) -> String {
    modules
        .iter()
        .filter_map(|m| {
            let types: Vec<String> = m.virtio.as_ref()?.iter().map(u32::to_string).collect();
            Some(format!(
                "{} {}\n",
                InitramfsBuilder::image_path(&m.path).display(),
                types.join(",")
            ))
        })
        .collect()
}

/// Keeps `b` in the cache under a name derived from its contents (so an unchanged
/// image is never rebuilt), notes it in `memo`, and returns the kernel + initramfs pair.
fn cached_initramfs(
    tree: &crate::KernelTree,
    kind: &str,
    b: &InitramfsBuilder,
    memo: Option<Memo>,
) -> Result<GuestImage, Error> {
    let initrd = b.store_in(&guest_cache()?, &format!("{kind}-{}", tree.version()))?;
    if let Some(memo) = memo {
        memo.record(&initrd);
    }
    guest_image(tree, initrd)
}

fn guest_cache() -> Result<PathBuf, Error> {
    Ok(cache_dir()?.join("guest"))
}

fn guest_image(tree: &crate::KernelTree, initrd: PathBuf) -> Result<GuestImage, Error> {
    Ok(GuestImage {
        kernel: crate::vmlinux::cached_vmlinux(tree)?,
        bzimage: tree.vmlinuz(),
        initrd,
    })
}

/// Where an earlier call left the image that the same inputs make, so that finding it
/// again reads no more than a few inodes: building an image to learn its name (reading
/// and hashing its 4-5 MiB) was half a second of every container's start in the
/// virtual test host. The memo is a file in the guest cache, `<kind>-<kernel>.<key>.memo`,
/// holding the image's file name; its key hashes the image's kind, the modules asked
/// for, this crate's code (hashed when it is built: the same inputs may make another
/// image after a change here), and, for the kernel's `modules.dep` and the files given
/// (busybox, the agent), their path, size, and modification and change times (not
/// device and inode numbers, which differ where the cache is seen through a share, as
/// in the virtual test host, whose processes find there the memos the host wrote).
/// Without that metadata (an unreadable file) there is no memo: the image is built.
struct Memo {
    path: PathBuf,
}

impl Memo {
    /// The memo in cache directory `dir` for these inputs.
    fn new<S: AsRef<str>>(
        dir: &Path,
        tree: &crate::KernelTree,
        kind: &str,
        files: &[&Path],
        modules: &[S],
    ) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let mut key = blake3::Hasher::new();
        key.update(env!("FORKVM_GUEST_IMAGE_CODE").as_bytes());
        key.update(b"\0");
        key.update(kind.as_bytes());
        for m in modules {
            key.update(b"\0module ");
            key.update(m.as_ref().as_bytes());
        }
        let dep = tree.modules_dir().join("modules.dep");
        for f in files.iter().copied().chain([dep.as_path()]) {
            let m = std::fs::metadata(f).ok()?;
            key.update(
                format!(
                    "\0{} {} {}.{} {}.{}",
                    f.display(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                )
                .as_bytes(),
            );
        }
        let key = key.finalize();
        let short: String = key.as_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = format!("{kind}-{}.{short}.memo", tree.version());
        Some(Self {
            path: dir.join(name),
        })
    }

    /// The image an earlier call noted here, if it is still in the cache.
    fn image(&self) -> Option<PathBuf> {
        let name = std::fs::read_to_string(&self.path).ok()?;
        let name = name.trim();
        if name.is_empty() || name.contains('/') {
            return None;
        }
        let initrd = self.path.parent()?.join(name);
        initrd.is_file().then_some(initrd)
    }

    /// Notes `image` for the next call; a memo that cannot be written only costs the
    /// next call a build.
    fn record(&self, image: &Path) {
        if let Some(name) = image.file_name() {
            let _ = crate::kernel::write_cache_file(
                &self.path,
                format!("{}\n", name.to_string_lossy()).as_bytes(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(path: &str, virtio: &[u32]) -> PlannedModule {
        PlannedModule {
            path: PathBuf::from(path),
            virtio: (!virtio.is_empty()).then(|| virtio.iter().copied().collect()),
        }
    }

    #[test]
    fn init_loads_modules_in_order_and_powers_off() {
        let s = init_script(&[
            planned("/k/kernel/drivers/virtio/virtio_mmio.ko", &[]),
            planned("/k/kernel/drivers/block/virtio_blk.ko", &[2]),
            planned("/k/kernel/net/failover.ko", &[1, 19]),
        ]);
        assert!(s.contains("\ninsmod /lib/modules/virtio_mmio.ko ||"), "{s}");
        assert!(
            s.contains("\nif has_virtio 2; then insmod /lib/modules/virtio_blk.ko ||"),
            "{s}"
        );
        assert!(
            s.contains("\nif has_virtio 1 19; then insmod /lib/modules/failover.ko ||"),
            "{s}"
        );
        assert!(s.contains(READY_MARKER));
        let agent = s.find("/bin/forkvm-agent").unwrap();
        assert!(
            agent < s.find(READY_MARKER).unwrap(),
            "agent reachable before ready"
        );
        assert!(s.trim_end().ends_with("poweroff -f"));
        let has = s.find("has_virtio() {").unwrap();
        let mmio = s.find("virtio_mmio.ko").unwrap();
        let blk = s.find("virtio_blk.ko").unwrap();
        assert!(has < mmio && mmio < blk, "load order kept");
    }

    /// `has_virtio` as `/init` defines it, run by this machine's shell against a fake
    /// sysfs: it finds a device by its type, in the format the kernel writes.
    #[test]
    fn init_finds_devices_by_their_virtio_type() {
        let s = init_script(&[]);
        let def = s.lines().find(|l| l.starts_with("has_virtio()")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (dev, id) in [("virtio0", "0x0013"), ("virtio1", "0x001a")] {
            std::fs::create_dir_all(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("device"), format!("{id}\n")).unwrap();
        }
        let def = def.replace("/sys/bus/virtio/devices", &dir.path().to_string_lossy());
        // The guest's shell where this machine has it (the initramfs carries the host's).
        let busybox = InitramfsBuilder::host_busybox();
        let has = |args: &str| {
            let mut sh = std::process::Command::new("sh");
            if busybox.is_file() {
                sh = std::process::Command::new(busybox);
                sh.arg("sh");
            }
            sh.arg("-c")
                .arg(format!("{def}\nhas_virtio {args}"))
                .status()
                .unwrap()
                .success()
        };
        assert!(has("19"));
        assert!(has("1 26"));
        assert!(!has("1"));
        assert!(!has("2 4"));
    }

    /// A memo finds what was noted for the same inputs, and nothing once an input
    /// changes, the modules asked for differ, or the image left the cache.
    #[test]
    fn a_memo_finds_the_image_of_the_same_inputs_only() {
        let dir = tempfile::tempdir().unwrap();
        let tree = crate::KernelTree {
            package: "linux-image-6.1.0-1-cloud-amd64".into(),
            version: "6.1.0-1-cloud-amd64".into(),
            root: dir.path().join("k"),
        };
        std::fs::create_dir_all(tree.modules_dir()).unwrap();
        std::fs::write(tree.modules_dir().join("modules.dep"), "a.ko:\n").unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "one").unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let memo = |modules: &[&str]| Memo::new(&cache, &tree, "container", &[&agent], modules);

        let m = memo(&["a"]).unwrap();
        assert_eq!(m.image(), None);
        let image = cache.join("container-6.1.0-1-cloud-amd64-0011.cpio");
        std::fs::write(&image, "cpio").unwrap();
        m.record(&image);
        assert_eq!(memo(&["a"]).unwrap().image(), Some(image.clone()));
        assert_eq!(memo(&["a", "b"]).unwrap().image(), None);
        // Rewritten, the same size: another modification time.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&agent, "owt").unwrap();
        assert_eq!(memo(&["a"]).unwrap().image(), None);
        let m = memo(&["a"]).unwrap();
        m.record(&image);
        assert_eq!(m.image(), Some(image.clone()));
        std::fs::remove_file(&image).unwrap();
        assert_eq!(m.image(), None);
        // An input that cannot be read: no memo.
        std::fs::remove_file(&agent).unwrap();
        assert!(memo(&["a"]).is_none());
    }

    #[test]
    fn module_list_is_one_image_path_per_line_in_order_and_devices_name_the_drivers() {
        let modules = [
            planned("/k/kernel/drivers/virtio/virtio_mmio.ko", &[]),
            planned("/k/kernel/net/failover.ko", &[1, 19]),
            planned("/k/kernel/fs/overlayfs/overlay.ko", &[]),
            planned("/k/kernel/drivers/block/virtio_blk.ko", &[2]),
        ];
        assert_eq!(
            module_list(&modules),
            "/lib/modules/virtio_mmio.ko\n/lib/modules/failover.ko\n\
             /lib/modules/overlay.ko\n/lib/modules/virtio_blk.ko\n"
        );
        assert_eq!(
            module_devices(&modules),
            "/lib/modules/failover.ko 1,19\n/lib/modules/virtio_blk.ko 2\n"
        );
    }
}
