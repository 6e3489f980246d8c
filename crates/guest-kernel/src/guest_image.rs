//! The default guest that `forkvm boot` runs when no kernel is given: Debian's cloud
//! kernel and a busybox initramfs whose `/init` loads the virtio drivers, starts the
//! guest agent (when one was built), prints a ready marker with the guest uptime, runs
//! the command given after ` -- ` on the kernel command line (or a shell), and powers
//! the VM off.

use std::path::{Path, PathBuf};

use crate::{cache_dir, ensure_kernel, resolve_modules, Error, Flavour, InitramfsBuilder};

/// Modules the default guest loads (dependencies are added in load order).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
];

/// Modules the container guest loads besides [`GUEST_MODULES`]: overlayfs assembles the
/// image's read-only root with a private writable layer (ext4 is built into the kernel);
/// virtiofs mounts the host directories shared with the container (volumes).
pub const CONTAINER_MODULES: &[&str] = &["overlay", "virtiofs"];

/// Where the container guest's agent (PID 1) finds the modules to load, one absolute
/// path per line in load order.
pub const MODULE_LIST: &str = "etc/forkvm/modules";

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

/// The default guest's `/init`, given the image paths of its modules in load order.
pub fn init_script(modules: &[PathBuf]) -> String {
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
    // The VMM announces its virtio-mmio devices through ACPI; virtio_mmio binds to them.
    for m in modules {
        let m = m.display();
        s.push_str(&format!(
            "insmod {m} || echo \"forkvm-init: insmod {m} failed\"\n"
        ));
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
    let modules = resolve_modules(&tree, GUEST_MODULES)?;
    let mut b = InitramfsBuilder::new();
    b.busybox_from_host()?;
    b.modules(&modules)?;
    if let Some(agent) = agent {
        b.file_from_host("bin/forkvm-agent", agent, 0o755)?;
    }
    let script = init_script(&b.module_paths());
    b.init_script(&script);
    cached_initramfs(&tree, "initramfs", &b)
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
    let modules = resolve_modules(&tree, &names)?;
    let mut b = InitramfsBuilder::new();
    b.modules(&modules)?;
    b.file_from_host("init", agent, 0o755)?;
    b.file(MODULE_LIST, module_list(&b.module_paths()), 0o644);
    b.dir("rootfs", 0o755);
    cached_initramfs(&tree, "container", &b)
}

/// The contents of [`MODULE_LIST`]: one absolute path per line, in load order.
pub fn module_list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| format!("{}\n", p.display())).collect()
}

/// Keeps `b` in the cache under a name derived from its contents (so an unchanged
/// image is never rebuilt) and returns the kernel + initramfs pair.
fn cached_initramfs(
    tree: &crate::KernelTree,
    kind: &str,
    b: &InitramfsBuilder,
) -> Result<GuestImage, Error> {
    let dir = cache_dir()?.join("guest");
    let initrd = b.store_in(&dir, &format!("{kind}-{}", tree.version()))?;
    Ok(GuestImage {
        kernel: crate::vmlinux::cached_vmlinux(tree)?,
        bzimage: tree.vmlinuz(),
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_modules_in_order_and_powers_off() {
        let s = init_script(&[
            PathBuf::from("/lib/modules/virtio_mmio.ko"),
            PathBuf::from("/lib/modules/virtio_blk.ko"),
        ]);
        assert!(s.contains("insmod /lib/modules/virtio_mmio.ko ||"), "{s}");
        assert!(s.contains("insmod /lib/modules/virtio_blk.ko ||"), "{s}");
        assert!(s.contains(READY_MARKER));
        let agent = s.find("/bin/forkvm-agent").unwrap();
        assert!(
            agent < s.find(READY_MARKER).unwrap(),
            "agent reachable before ready"
        );
        assert!(s.trim_end().ends_with("poweroff -f"));
        let mmio = s.find("virtio_mmio.ko").unwrap();
        let blk = s.find("virtio_blk.ko").unwrap();
        assert!(mmio < blk, "load order kept");
    }

    #[test]
    fn module_list_is_one_absolute_path_per_line_in_order() {
        let l = module_list(&[
            PathBuf::from("/lib/modules/virtio_mmio.ko"),
            PathBuf::from("/lib/modules/overlay.ko"),
        ]);
        assert_eq!(l, "/lib/modules/virtio_mmio.ko\n/lib/modules/overlay.ko\n");
    }
}
