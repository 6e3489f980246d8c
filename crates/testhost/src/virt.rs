//! Owns the virtual host: a QEMU/TCG machine (AMD EPYC with SVM) booting
//! Debian's generic kernel from a cached busybox initramfs, with the host root
//! exported read-only over 9p and a per-run scratch directory exported
//! read-write at the same absolute path. Runs take one of a few slots (flocks in the
//! cache directory) across processes.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use forkvm_guest_kernel::{
    ensure_kernel_in, resolve_modules, Flavour, InitramfsBuilder, KernelTree,
};

use crate::error::Error;
use crate::run::{
    harden, new_log_path, open_log, ChildGuard, Mode, Outcome, TestHostOptions, HEARTBEAT_EVERY,
};
use crate::stall;

/// The QEMU binary.
pub(crate) const QEMU: &str = "qemu-system-x86_64";

/// Modules the virtual host loads, in request order (dependencies are added).
pub const TESTHOST_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm_amd",
    // Container networks: TAPs, veth pairs, and the tc ingress redirects that tie them.
    "tun",
    "veth",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    // Engine networks: Docker's and CNI's bridges, and the iptables (nft back end, as
    // Debian's iptables is) rules they add for NAT, published ports and isolation.
    "bridge",
    "br_netfilter",
    // libcrc32c (under nf_tables, nf_conntrack, nf_nat) asks the crypto API for crc32c
    // when it loads: a soft dependency modules.dep does not list.
    "crc32c_generic",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_reject_ipv4",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "xt_addrtype",
    "xt_conntrack",
    "xt_tcpudp",
    "xt_comment",
    "xt_mark",
    "xt_multiport",
    "ipt_REJECT",
];

/// msize for the 9p mounts: larger is faster under TCG.
const MSIZE: u32 = 512_000;

/// The `/init` of the virtual host. `@INSMOD@` is replaced by the module lines.
const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# A host's loopback is up (engines publish ports on 127.0.0.1), and it has a name
# (Docker's --network host gives a container the host's).
ip link set lo up
hostname forkvm-testhost
log() { echo "forkvm-init: $*"; }
off() {
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 10
}
die() { log "FATAL: $*"; off; }
@INSMOD@
SCRATCH=
NRW=0
for x in $(cat /proc/cmdline); do
    case "$x" in
        forkvm_scratch=*) SCRATCH="${x#forkvm_scratch=}" ;;
        forkvm_rw=*) NRW="${x#forkvm_rw=}" ;;
    esac
done
[ -n "$SCRATCH" ] || die "no forkvm_scratch= on the kernel command line"
R=/mnt/root
mkdir -p $R
O="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$O,ro,cache=loose" hostroot $R || die "cannot mount the host root over 9p"
mount -t proc proc $R/proc || die "mount proc"
mount -t sysfs sysfs $R/sys || die "mount sysfs"
# As a systemd host has it: forkvm's jail puts each VM process in a cgroup v2 group.
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev || die "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || die "mount /tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || die "mount /run"
mkdir -p "$R$SCRATCH" 2>/dev/null
mount -t 9p -o "$O,rw,cache=none" scratch "$R$SCRATCH" || die "cannot mount the scratch dir $SCRATCH"
i=0
while [ "$i" -lt "$NRW" ]; do
    line=$(sed -n "$((i + 1))p" "$R$SCRATCH/rw_paths")
    mode=${line%% *}
    p=${line#* }
    mkdir -p "$R$p" 2>/dev/null
    # Writable shares skip the guest page cache so the host sees every write at once;
    # read-only ones (checkouts hidden under /tmp) are cached like the host root, as
    # paging executables in uncached over 9p crashed this kernel under load.
    if [ "$mode" = ro ]; then c="ro,cache=loose"; else c="rw,cache=none"; fi
    mount -t 9p -o "$O,$c" "rw$i" "$R$p" || die "cannot mount share $p"
    i=$((i + 1))
done
[ -e /dev/kvm ] || log "warning: no /dev/kvm in the virtual host"
# The host root becomes the namespace's root, as on a host: a process that joins a
# mount namespace (setns, nsenter -m) lands on the mount at its root, and must find
# the host's files there, not this initramfs. From here on this script reaches them
# through its working directory, the moved root.
cd $R || die "cd $R"
mount --move . / || die "cannot move the host root onto /"
# The heartbeat the host watches: a virtual host that stops writing it has frozen.
/bin/heartbeat ".$SCRATCH/heartbeat" &
log "running command"
chroot . /bin/sh "$SCRATCH/run.sh"
echo $? > ".$SCRATCH/exit_code.tmp"
mv ".$SCRATCH/exit_code.tmp" ".$SCRATCH/exit_code"
log "command exited with $(cat ".$SCRATCH/exit_code")"
umount "$R$SCRATCH"
off
"#;

/// How long a virtual host silent past its stall limit gets to beat again after an NMI
/// (two heartbeats) before it counts as stalled and is killed.
const NMI_WAIT: Duration = Duration::from_secs(20);

/// `/bin/heartbeat FILE`: writes the time into FILE every @EVERY@ seconds, and the
/// uptime, load and free memory on the console every sixth time (so a stalled run's
/// log shows whether the kernel still ran when the file stopped changing, and whether
/// it ran out of memory or CPU).
const HEARTBEAT: &str = r#"#!/bin/sh
i=0
while :; do
    date +%s > "$1"
    if [ $((i % 6)) -eq 0 ]; then
        m=?
        while read -r k v _; do [ "$k" = MemAvailable: ] && m=$v; done < /proc/meminfo
        echo "forkvm-init: heartbeat uptime $(cut -d' ' -f1 /proc/uptime) load $(cut -d' ' -f1-3 /proc/loadavg) memavail_kib $m" > /dev/console
    fi
    i=$((i + 1))
    sleep @EVERY@
done
"#;

/// Appends what the command wrote so far (its stdout and stderr in the scratch
/// directory) to the run log: a run that stalled or timed out keeps its progress.
fn keep_output(log_path: &Path, scratch: &Path) {
    let Ok(mut l) = open_log(log_path) else {
        return;
    };
    for name in ["stdout", "stderr"] {
        let _ = writeln!(l, "\n--- command {name} ---");
        let _ = l.write_all(&fs::read(scratch.join(name)).unwrap_or_default());
    }
}

/// How long ago the heartbeat file at `path` was last written; `None` before the first
/// beat.
fn since_heartbeat(path: &Path) -> Option<Duration> {
    let written = fs::metadata(path).ok()?.modified().ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(written)
            .unwrap_or_default(),
    )
}

fn io(what: impl Into<String>, source: io::Error) -> Error {
    Error::Io {
        what: what.into(),
        source,
    }
}

/// Builds the virtual host's initramfs and stores it in `<cache>/testhost/`
/// under a hash of its contents; returns its path.
pub fn prepare_initramfs(cache: &Path, kernel: &KernelTree) -> Result<PathBuf, Error> {
    let modules = resolve_modules(kernel, TESTHOST_MODULES)?;
    let mut b = InitramfsBuilder::new();
    b.busybox_from_host()?;
    b.modules(&modules)?;
    let init = INIT
        .replace("@INSMOD@", &b.insmod_script())
        .replace("@MSIZE@", &MSIZE.to_string());
    b.init_script(&init);
    let heartbeat = HEARTBEAT.replace("@EVERY@", &HEARTBEAT_EVERY.as_secs().to_string());
    b.file("bin/heartbeat", heartbeat.into_bytes(), 0o755);
    let path = b.store_in(
        &cache.join("testhost"),
        &format!("initramfs-{}", kernel.version),
    )?;
    tracing::debug!(path = %path.display(), "virtual host initramfs");
    Ok(path)
}

/// One of the machine's virtual-host slots (an exclusive flock on `<dir>/lock.<n>`),
/// held until dropped.
struct HostLock {
    _file: File,
}

/// Memory one virtual-host slot counts on: the largest host a test asks for (a
/// container engine's, 6 GiB) with room for QEMU itself.
const SLOT_MEM_MIB: u64 = 7 * 1024;

/// How many virtual hosts may run at once: `FORKVM_TESTHOST_SLOTS`, else one per CPU of
/// this machine (each QEMU runs one TCG thread that keeps a CPU busy) as far as its
/// memory holds [`SLOT_MEM_MIB`] per host (QEMU takes a guest's memory as the guest
/// touches it, so this is what the largest host may come to, not what each takes).
pub fn virtual_host_slots() -> usize {
    let configured = std::env::var("FORKVM_TESTHOST_SLOTS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    configured
        .unwrap_or_else(|| slots_for(cpus, usable_mem_mib()))
        .max(1)
}

/// The memory this process may use, in MiB: the machine's (`MemTotal`), or less where
/// its cgroup says so (a CI job in a container: `MemTotal` is the whole machine's).
fn usable_mem_mib() -> Option<u64> {
    let total = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total_mib(&m));
    let limit = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_limit_mib(&c, Path::new("/sys/fs/cgroup")));
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The lowest memory limit on the cgroups that `/proc/self/cgroup` text `proc_cgroup`
/// names, under the cgroup file system at `root`, in MiB: v2's `memory.max` of the group
/// and each of its parents, v1's `memory/.../memory.limit_in_bytes`. `None` without one.
fn cgroup_limit_mib(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |path: PathBuf| -> Option<u64> {
        // "max" (v2's no limit) does not parse: no limit there.
        fs::read_to_string(path).ok()?.trim().parse().ok()
    };
    let mut limits = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let mut dir = root.join(rel);
            while dir.starts_with(root) {
                limits.extend(read(dir.join("memory.max")));
                if !dir.pop() {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            limits.extend(read(
                root.join("memory").join(rel).join("memory.limit_in_bytes"),
            ));
        }
    }
    limits.into_iter().min().map(|bytes| bytes >> 20)
}

/// The virtual-host slots of a machine with `cpus` CPUs and `mem_mib` MiB of memory
/// (unknown: as many as CPUs).
fn slots_for(cpus: usize, mem_mib: Option<u64>) -> usize {
    let by_mem = mem_mib.map_or(usize::MAX, |m| {
        usize::try_from(m / SLOT_MEM_MIB).unwrap_or(usize::MAX)
    });
    cpus.min(by_mem).max(1)
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl HostLock {
    /// Takes the first free of `slots` slots in `dir`, waiting for one.
    fn acquire(dir: &Path, slots: usize) -> Result<Self, Error> {
        let files = (0..slots)
            .map(|n| {
                let path = dir.join(format!("lock.{n}"));
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io(format!("opening lock {}", path.display()), e))
            })
            .collect::<Result<Vec<File>, Error>>()?;
        let mut waiting = false;
        loop {
            for file in &files {
                // SAFETY: flock on a descriptor we own; no memory is involved.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    let file = file.try_clone().map_err(|e| io("keeping the lock", e))?;
                    return Ok(Self { _file: file });
                }
                let err = io::Error::last_os_error();
                if !matches!(err.raw_os_error(), Some(libc::EWOULDBLOCK | libc::EINTR)) {
                    return Err(io(format!("locking a slot in {}", dir.display()), err));
                }
            }
            if !waiting {
                waiting = true;
                tracing::info!(slots, "waiting for a virtual host slot");
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Single-quotes a string for sh.
fn sh_quote(s: &[u8]) -> String {
    let s = String::from_utf8_lossy(s);
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn valid_env_name(k: &[u8]) -> bool {
    !k.is_empty()
        && !k[0].is_ascii_digit()
        && k.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// The script the guest runs inside the chroot.
fn run_script(cmd: &[OsString], opts: &TestHostOptions, scratch: &Path) -> String {
    let s = |p: &str| sh_quote(scratch.join(p).as_os_str().as_bytes());
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .filter(|(k, _)| k != b"FORKVM_IN_TESTHOST")
        .collect();
    env.push((b"FORKVM_IN_TESTHOST".to_vec(), b"1".to_vec()));
    for (k, v) in &opts.envs {
        env.retain(|(ek, _)| ek != k.as_bytes());
        env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    let mut out = String::from("# generated by forkvm-testhost\n");
    out += &format!("exec </dev/null >{} 2>{}\n", s("stdout"), s("stderr"));
    out += &format!(
        "cd {} || exit 125\n",
        sh_quote(opts.cwd.as_os_str().as_bytes())
    );
    out += "exec env -i";
    for (k, v) in env.iter().filter(|(k, _)| valid_env_name(k)) {
        let mut kv = k.clone();
        kv.push(b'=');
        kv.extend_from_slice(v);
        out += " \\\n  ";
        out += &sh_quote(&kv);
    }
    for arg in cmd {
        out += " \\\n  ";
        out += &sh_quote(arg.as_bytes());
    }
    out.push('\n');
    out
}

/// Follows a file that another machine appends to.
struct Tail {
    path: PathBuf,
    offset: u64,
    to_stderr: bool,
}

impl Tail {
    fn pump(&mut self) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
            self.offset += buf.len() as u64;
            let _ = if self.to_stderr {
                let mut e = io::stderr().lock();
                e.write_all(&buf).and_then(|()| e.flush())
            } else {
                let mut o = io::stdout().lock();
                o.write_all(&buf).and_then(|()| o.flush())
            };
        }
    }
}

fn virtfs(path: &Path, tag: &str, readonly: bool) -> OsString {
    let mut a = OsString::from("local,path=");
    // QEMU option syntax: a comma in a value is written as two commas.
    a.push(path.as_os_str().to_string_lossy().replace(',', ",,"));
    a.push(format!(
        ",mount_tag={tag},security_model=none,multidevs=remap{}",
        if readonly { ",readonly=on" } else { "" }
    ));
    a
}

/// Directories the virtual host hides behind its own tmpfs mounts.
const MASKED: [&str; 3] = ["/tmp", "/run", "/dev/shm"];

/// For each absolute path under a masked directory, the masked directory's child that
/// holds it (e.g. `/tmp/ci` for `/tmp/ci/crates/cli`), to export read-write at the same
/// path. The scratch directories of the virtual host itself are never among them.
pub(crate) fn masked_exports<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        let Ok(p) = p.canonicalize() else { continue };
        for m in MASKED {
            let Ok(rest) = p.strip_prefix(m) else {
                continue;
            };
            let Some(first) = rest.components().next() else {
                continue;
            };
            let top = Path::new(m).join(first);
            let name = top
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !name.starts_with("forkvm-testhost-") && !out.contains(&top) {
                out.push(top);
            }
        }
    }
    out
}

pub(crate) fn run_virtual(cmd: &[OsString], opts: &TestHostOptions) -> Result<Outcome, Error> {
    let cache = forkvm_guest_kernel::cache_dir()?;
    let kernel = ensure_kernel_in(&cache, Flavour::Amd64)?;
    let initramfs = prepare_initramfs(&cache, &kernel)?;
    let qemu = crate::caps::find_in_path(QEMU).ok_or_else(|| Error::Spawn {
        program: QEMU.into(),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            "not on PATH (apt-get install qemu-system-x86)",
        ),
    })?;

    let _lock = HostLock::acquire(&cache.join("testhost"), virtual_host_slots())?;
    let start = Instant::now();
    let log_path = new_log_path("testhost");
    let log = open_log(&log_path)?;

    let scratch_dir = tempfile::Builder::new()
        .prefix("forkvm-testhost-")
        .tempdir()
        .map_err(|e| io("creating the scratch directory", e))?;
    let scratch = scratch_dir.path().to_owned();
    // QEMU's monitor, asked only when the host stalls; not in the scratch directory,
    // which the virtual host sees.
    // In /tmp whatever TMPDIR says: a socket's path must fit in 108 bytes.
    let qmp_dir = tempfile::Builder::new()
        .prefix("forkvm-qmp-")
        .tempdir_in("/tmp")
        .map_err(|e| io("creating the monitor's directory", e))?;
    let qmp_path = qmp_dir.path().join("qmp");
    let script = run_script(cmd, opts, &scratch);
    fs::write(scratch.join("run.sh"), &script).map_err(|e| io("writing run.sh", e))?;
    // (path, writable)
    let mut shares: Vec<(PathBuf, bool)> = Vec::new();
    for p in &opts.writable {
        let p = p
            .canonicalize()
            .map_err(|e| io(format!("writable path {}", p.display()), e))?;
        shares.push((p, true));
    }
    // The virtual host puts fresh tmpfs on /tmp, /run and /dev/shm; a checkout (or a
    // program) living there on this machine must be exported to be seen at all. Like
    // the rest of the host, it is read-only there.
    let program = cmd.first().map(PathBuf::from);
    for p in masked_exports([opts.cwd.as_path()].into_iter().chain(program.as_deref())) {
        if !shares.iter().any(|(w, _)| p.starts_with(w)) {
            shares.push((p, false));
        }
    }
    let mut rw_list = String::new();
    for (p, writable) in &shares {
        rw_list += if *writable { "rw " } else { "ro " };
        rw_list += &p.to_string_lossy();
        rw_list.push('\n');
    }
    fs::write(scratch.join("rw_paths"), &rw_list).map_err(|e| io("writing rw_paths", e))?;

    let append = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0 loglevel=4 panic=-1 mitigations=off \
         rdinit=/init forkvm_scratch={} forkvm_rw={}",
        scratch.display(),
        shares.len()
    );
    let mut qcmd = Command::new(&qemu);
    qcmd.args(["-accel", "tcg", "-cpu", "EPYC,+svm", "-machine", "pc"])
        .args([
            "-smp",
            &opts.smp.to_string(),
            "-m",
            &opts.mem_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        // Named threads (`CPU 0/TCG`, `worker`...): a stall's report says which one spins.
        .args(["-name", "forkvm-testhost,debug-threads=on"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(&append)
        .arg("-virtfs")
        .arg(virtfs(Path::new("/"), "hostroot", true))
        .arg("-virtfs")
        .arg(virtfs(&scratch, "scratch", false));
    for (i, (p, writable)) in shares.iter().enumerate() {
        qcmd.arg("-virtfs")
            .arg(virtfs(p, &format!("rw{i}"), !writable));
    }
    let log_err = log
        .try_clone()
        .map_err(|e| io("duplicating the log fd", e))?;
    qcmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    harden(&mut qcmd);
    {
        let mut l = open_log(&log_path)?;
        let _ = writeln!(
            l,
            "forkvm-testhost: {qcmd:?}\nforkvm-testhost: run.sh:\n{script}"
        );
    }
    tracing::debug!(log = %log_path.display(), "starting virtual host");
    let child = qcmd.spawn().map_err(|source| Error::Spawn {
        program: qemu.display().to_string(),
        source,
    })?;
    let mut guard = ChildGuard::new(child);
    tracing::debug!(pid = guard.pid(), "qemu started");

    let mut tails = [
        Tail {
            path: scratch.join("stdout"),
            offset: 0,
            to_stderr: false,
        },
        Tail {
            path: scratch.join("stderr"),
            offset: 0,
            to_stderr: true,
        },
    ];
    let deadline = start + opts.timeout;
    // When a stalled host was sent an NMI ([`NMI_WAIT`]).
    let mut nmi_sent: Option<Instant> = None;
    let status = loop {
        match guard.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(io("waiting for qemu", e)),
        }
        if opts.stream {
            tails.iter_mut().for_each(Tail::pump);
        }
        match since_heartbeat(&scratch.join("heartbeat")) {
            Some(silent) if silent > opts.stall_after => match nmi_sent {
                None => {
                    // What QEMU's threads and its vCPU do while it is silent tells a
                    // frozen emulator (its vCPU thread spinning or blocked) from a guest
                    // that is slow.
                    let threads = stall::qemu_threads(guard.pid());
                    let mut qmp = stall::Qmp::connect(&qmp_path);
                    let cpu = stall::cpu_report(qmp.as_mut().ok());
                    // The freezes seen so far (QEMU 7.2) were a vCPU halted in the idle
                    // loop whose timer interrupt never came. An NMI would wake a halted
                    // CPU whose QEMU still delivers interrupts; theirs did not take it
                    // either (`stall`), so it is tried before the kill, not relied on.
                    let sent = qmp.and_then(|mut q| q.execute("inject-nmi", None));
                    let mut l = open_log(&log_path)?;
                    let _ = writeln!(
                        l,
                        "\nforkvm-testhost: no heartbeat for {silent:?}\nforkvm-testhost: \
                         qemu's threads:\n{threads}forkvm-testhost: its vCPU:\n{cpu}\
                         forkvm-testhost: NMI sent ({}); waiting {NMI_WAIT:?} for a heartbeat",
                        sent.map_or_else(|e| format!("failed: {e}"), |_| "ok".into())
                    );
                    nmi_sent = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= NMI_WAIT => {
                    guard.kill();
                    let mut l = open_log(&log_path)?;
                    let _ = writeln!(
                        l,
                        "forkvm-testhost: no heartbeat {NMI_WAIT:?} after the NMI either: \
                         the virtual host stalled, qemu killed"
                    );
                    keep_output(&log_path, &scratch);
                    return Err(Error::Stalled { silent, log_path });
                }
                Some(_) => {}
            },
            _ => {
                if let Some(at) = nmi_sent.take() {
                    let mut l = open_log(&log_path)?;
                    let _ = writeln!(
                        l,
                        "forkvm-testhost: the virtual host beat again {:?} after the NMI",
                        at.elapsed()
                    );
                    // Said on the run's output too: whether the NMI revives a frozen
                    // host is what these lines tell over many runs.
                    eprintln!(
                        "forkvm-testhost: the virtual host froze and beat again {:?} after an \
                         NMI; log: {}",
                        at.elapsed(),
                        log_path.display()
                    );
                }
            }
        }
        if Instant::now() >= deadline {
            guard.kill();
            let mut l = open_log(&log_path)?;
            let _ = writeln!(
                l,
                "\nforkvm-testhost: timed out after {:?}, qemu killed",
                opts.timeout
            );
            keep_output(&log_path, &scratch);
            return Err(Error::TimedOut {
                timeout: opts.timeout,
                log_path,
            });
        }
        thread::sleep(Duration::from_millis(50));
    };
    if opts.stream {
        tails.iter_mut().for_each(Tail::pump);
    }
    let wall = start.elapsed();
    let read = |name: &str| fs::read(scratch.join(name)).unwrap_or_default();
    let (stdout, stderr) = (read("stdout"), read("stderr"));
    let code = String::from_utf8_lossy(&read("exit_code"))
        .trim()
        .parse::<i32>();
    keep_output(&log_path, &scratch);
    {
        let mut l = open_log(&log_path)?;
        let _ = writeln!(
            l,
            "\n--- qemu {status}, exit code {code:?}, wall {wall:?} ---"
        );
    }
    let exit_code = code.map_err(|_| Error::NoExitCode {
        qemu_status: status,
        log_path: log_path.clone(),
    })?;
    Ok(Outcome {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        log_path,
        wall,
        mode: Mode::Virtual,
    })
}

#[cfg(test)]
mod masked_tests {
    use super::*;

    #[test]
    fn checkouts_under_tmp_are_exported_by_their_top_directory() {
        let dir = tempfile::Builder::new()
            .prefix("ci-")
            .tempdir_in("/tmp")
            .unwrap();
        let deep = dir.path().join("crates/cli");
        std::fs::create_dir_all(&deep).unwrap();
        let exe = dir.path().join("target/debug/t");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"").unwrap();
        let got = masked_exports([deep.as_path(), exe.as_path()].into_iter());
        assert_eq!(got, vec![dir.path().canonicalize().unwrap()]);
        assert!(masked_exports([Path::new("/usr/bin")].into_iter()).is_empty());
        assert!(masked_exports([Path::new("/nonexistent/x")].into_iter()).is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_one_each_and_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLock::acquire(dir.path(), 2).unwrap();
        let b = HostLock::acquire(dir.path(), 2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        let third = thread::spawn(move || {
            let c = HostLock::acquire(&path, 2).unwrap();
            tx.send(()).unwrap();
            c
        });
        // Both slots are held: the third waits...
        assert!(rx.recv_timeout(Duration::from_millis(800)).is_err());
        drop(a);
        // ...until one is given back.
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a freed slot was not taken");
        drop((b, third.join().unwrap()));
    }

    #[test]
    fn slots_follow_cpus_as_far_as_memory_holds_a_host_each() {
        let gib = |g: u64| Some(g * 1024);
        assert_eq!(slots_for(2, gib(24)), 2);
        assert_eq!(slots_for(8, gib(24)), 3, "24 GiB hold three 7 GiB hosts");
        assert_eq!(slots_for(8, gib(64)), 8);
        assert_eq!(slots_for(4, gib(4)), 1, "always one");
        assert_eq!(slots_for(4, None), 4);
        let meminfo = "MemTotal:       24589852 kB\nMemFree:         1000 kB\n";
        // A cgroup's limit counts where it is lower than the machine's memory.
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("ci/job");
        fs::create_dir_all(&job).unwrap();
        fs::write(job.join("memory.max"), "max\n").unwrap();
        fs::write(root.path().join("ci/memory.max"), "8589934592\n").unwrap();
        assert_eq!(
            cgroup_limit_mib("0::/ci/job\n", root.path()),
            Some(8192),
            "a parent's limit bounds its groups"
        );
        assert_eq!(cgroup_limit_mib("0::/\n", root.path()), None);
        let v1 = root.path().join("memory/job");
        fs::create_dir_all(&v1).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "15032385536\n").unwrap();
        assert_eq!(
            cgroup_limit_mib("4:memory:/job\n1:cpu:/\n", root.path()),
            Some(14336)
        );
        assert_eq!(mem_total_mib(meminfo), Some(24013));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn quoting_and_script() {
        assert_eq!(sh_quote(b"it's"), r"'it'\''s'");
        assert!(valid_env_name(b"RUST_LOG") && !valid_env_name(b"1X") && !valid_env_name(b"A-B"));
        let opts = TestHostOptions {
            envs: vec![("FOO".into(), "a b".into())],
            cwd: "/work dir".into(),
            ..TestHostOptions::default()
        };
        let s = run_script(
            &["sh".into(), "-c".into(), "echo $FOO".into()],
            &opts,
            Path::new("/tmp/x"),
        );
        assert!(
            s.contains("exec </dev/null >'/tmp/x/stdout' 2>'/tmp/x/stderr'"),
            "{s}"
        );
        assert!(s.contains("cd '/work dir' || exit 125"), "{s}");
        assert!(
            s.contains("'FOO=a b'") && s.contains("'FORKVM_IN_TESTHOST=1'"),
            "{s}"
        );
        assert!(
            s.trim_end().ends_with("'sh' \\\n  '-c' \\\n  'echo $FOO'"),
            "{s}"
        );
    }

    #[test]
    fn virtfs_escapes_commas() {
        let a = virtfs(Path::new("/a,b"), "t", true);
        assert_eq!(
            a.to_string_lossy(),
            "local,path=/a,,b,mount_tag=t,security_model=none,multidevs=remap,readonly=on"
        );
    }
}
