//! `forkvm bench`: measure forkvm against QEMU's microvm machine, side by side.
//!
//! `forkvm bench boot` boots the same kernel and initramfs with the same memory, vCPUs
//! and command line in both VMMs, alternating them run by run (ABBA order, so drifting
//! machine noise hits both alike). For each run it records the wall time from spawn to
//! the guest init's ready marker on the console, the guest's own uptime printed in
//! that marker, the time until the VMM exits after the guest powers off, and the VMM's
//! RSS at the moment the marker appeared.
//!
//! `forkvm bench fork` forks a running guest into children and measures how soon they
//! run and answer, how long the parent pauses and what each idle child costs in private
//! memory, beside a cold boot of the same guest (see [`fork`]).
//!
//! `forkvm bench net` measures a VM's network against a runc container's (see [`net`]);
//! `forkvm bench fs` a shared directory's file I/O against a runc bind mount's (see
//! [`fs`]).

mod fork;
mod fs;
mod host;
mod net;
mod probe;
mod report;
mod runtime;
mod stats;

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use forkvm_vmm::config::DEFAULT_CMDLINE;

use crate::cli::{BenchBootArgs, BenchCommand, BenchFormat};
use probe::{Launch, Sample, VmmKind};
use report::{Environment, Guest, Report, VmmSetup};

/// Runs a benchmark; returns the process exit code.
pub fn run(what: BenchCommand) -> Result<i32> {
    match what {
        BenchCommand::Boot(a) => boot(a),
        BenchCommand::Fork(a) => fork::run(a),
        BenchCommand::Net(a) => net::run(a),
        BenchCommand::Fs(a) => fs::run(a),
        BenchCommand::Runtime(a) => runtime::run(a),
    }
}

/// The command line both VMMs get: the given one (or forkvm's default) with
/// ` -- true` appended when it names no init command, so init powers off at once.
pub fn bench_cmdline(given: Option<&str>) -> String {
    let base = given.unwrap_or(DEFAULT_CMDLINE).trim();
    if base.contains(" -- ") || base.ends_with(" --") || base.starts_with("-- ") {
        base.to_owned()
    } else {
        format!("{base} -- true")
    }
}

/// The kernel release from a bzImage's setup header (`None` for other formats).
pub fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = usize::from(u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]));
    if off == 0 {
        return None;
    }
    let text = image.get(off + 0x200..)?;
    let end = text.iter().take(512).position(|&b| b == 0)?;
    let s = std::str::from_utf8(&text[..end]).ok()?;
    s.split_whitespace().next().map(str::to_owned)
}

/// The kernel release: from a bzImage's header, or from the name the cache gives an
/// extracted ELF kernel (`vmlinux-<release>`).
fn kernel_version(path: &Path) -> Option<String> {
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    bzimage_version(&head).or_else(|| {
        let name = path.file_name()?.to_str()?;
        name.strip_prefix("vmlinux-").map(str::to_owned)
    })
}

pub use forkvm_registry::time::rfc3339_secs as iso8601_utc;

/// The process a launched VMM's VM runs in: `forkvm boot` runs its VM in a VM process
/// (`forkvm-vmm`) it starts, so its first child; a VMM with no child (QEMU) is its own.
fn vm_process(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// The host: KVM kind, CPU, kernel (no QEMU version).
fn host_environment() -> Environment {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = forkvm_testhost::parse_cpu_flags(&cpuinfo);
    let (kvm, kvm_detail) = if forkvm_testhost::in_test_host() {
        (
            "virtual KVM",
            "nested SVM KVM inside forkvm's QEMU/TCG virtual host; absolute times are slow, compare ratios",
        )
    } else if flags.hypervisor {
        (
            "nested KVM",
            "KVM inside a hardware-accelerated virtual machine",
        )
    } else {
        ("hardware KVM", "bare-metal KVM")
    };
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    Environment {
        kvm: kvm.to_owned(),
        kvm_detail: kvm_detail.to_owned(),
        cpu_model,
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        qemu_version: String::new(),
        forkvm_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

fn environment(qemu: &Path) -> Result<Environment> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (install QEMU or pass --qemu PATH)",
                qemu.display()
            )
        })?;
    if !out.status.success() {
        bail!("{} --version failed: {}", qemu.display(), out.status);
    }
    Ok(Environment {
        qemu_version: String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("QEMU")
            .trim()
            .to_owned(),
        ..host_environment()
    })
}

/// forkvm and QEMU microvm command lines for the same guest.
fn launches(args: &BenchBootArgs, guest: &Guest) -> Result<Vec<(Launch, String)>> {
    let me =
        forkvm_config::find_program("forkvm").context("cannot locate the forkvm executable")?;
    let mut forkvm: Vec<OsString> = vec![
        "boot".into(),
        "--kernel".into(),
        guest.kernel.clone().into(),
        "--initrd".into(),
        guest.initrd.clone().into(),
        "--vcpus".into(),
        args.vcpus.to_string().into(),
        "--mem".into(),
        args.mem.to_string().into(),
        "--cmdline".into(),
        guest.cmdline.clone().into(),
    ];
    let mut forkvm_devices =
        "ttyS0 (16550 UART), i8042 (reset only), ACPI power-off port, in-kernel PIC/IOAPIC/PIT"
            .to_owned();
    // QEMU microvm: ACPI (GED) for power-off, the ISA UART, in-kernel irqchip and PIT,
    // no RTC (forkvm has none), no option ROMs, and the qboot firmware, named: it loads
    // the kernel itself, where the SeaBIOS build that QEMU 10 defaults to needs the
    // option ROMs to (and finds no bootable device without them).
    let mut qemu: Vec<OsString> = [
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=on",
        "-bios",
        "qboot.rom",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
    ]
    .map(OsString::from)
    .to_vec();
    qemu.extend([
        args.mem.to_string().into(),
        "-smp".into(),
        args.vcpus.to_string().into(),
    ]);
    qemu.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ]
        .map(OsString::from),
    );
    let mut qemu_devices =
        "ttyS0 (isa-serial), ACPI GED power-off, in-kernel PIC/IOAPIC/PIT, qboot firmware"
            .to_owned();
    if args.no_rng {
        forkvm.push("--no-rng".into());
    } else {
        forkvm_devices.push_str(", virtio-mmio rng");
        qemu.extend(["-device".into(), "virtio-rng-device".into()]);
        qemu_devices.push_str(", virtio-mmio rng");
    }
    qemu.extend([
        "-kernel".into(),
        guest.kernel.clone().into(),
        "-initrd".into(),
        guest.initrd.clone().into(),
        "-append".into(),
        guest.cmdline.clone().into(),
    ]);
    Ok(vec![
        (
            Launch {
                kind: VmmKind::Forkvm,
                program: me,
                args: forkvm,
            },
            forkvm_devices,
        ),
        (
            Launch {
                kind: VmmKind::Qemu,
                program: args.qemu.clone(),
                args: qemu,
            },
            qemu_devices,
        ),
    ])
}

fn describe(s: &Sample) -> String {
    format!(
        "init {:.0} ms (guest uptime {:.0} ms), exit {:.0} ms, RSS {}",
        s.boot_to_init_ms,
        s.guest_uptime_ms,
        s.total_ms,
        s.rss_kib
            .map_or_else(|| "?".to_owned(), |k| report::size(k * 1024))
    )
}

fn boot(args: BenchBootArgs) -> Result<i32> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        (Some(_), None) => bail!("--kernel needs --initrd (an init that prints the ready marker)"),
        (None, initrd) => {
            let g = forkvm_guest_kernel::default_guest()
                .context("cannot prepare the default guest kernel and initramfs")?;
            (g.kernel, initrd.clone().unwrap_or(g.initrd))
        }
    };
    // After the default guest is prepared: the virtual host cannot write the cache.
    let caps = forkvm_testhost::Capabilities::detect();
    if !caps.hardware_kvm() {
        bail!(
            "forkvm bench needs hardware-accelerated KVM (vmx/svm and a usable /dev/kvm), \
             which this machine lacks:\n{caps}\nRun it in the virtual KVM host: \
             `cargo xtask testhost -- target/release/forkvm bench boot`"
        );
    }
    let initrd_bytes = std::fs::metadata(&initrd)
        .with_context(|| format!("cannot read the initramfs {}", initrd.display()))?
        .len();
    std::fs::metadata(&kernel)
        .with_context(|| format!("cannot read the kernel {}", kernel.display()))?;
    let guest = Guest {
        kernel_version: kernel_version(&kernel),
        kernel: kernel.display().to_string(),
        initrd: initrd.display().to_string(),
        initrd_bytes,
        mem_mib: args.mem,
        vcpus: args.vcpus,
        cmdline: bench_cmdline(args.cmdline.as_deref()),
    };
    let environment = environment(&args.qemu)?;
    let launches = launches(&args, &guest)?;
    let timeout = Duration::from_secs(args.timeout);
    tracing::info!(?guest, kvm = %environment.kvm, "benchmarking boot");

    let total = args.warmup + args.runs;
    let mut samples = Vec::with_capacity(2 * args.runs);
    let mut retried = Vec::new();
    for i in 0..total {
        let measured = i >= args.warmup;
        let label = if measured {
            format!("run {}/{}", i - args.warmup + 1, args.runs)
        } else {
            format!("warm-up {}/{}", i + 1, args.warmup)
        };
        // ABBA: forkvm first on even rounds, QEMU first on odd ones.
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for &k in &order {
            let (launch, _) = &launches[k];
            let mut attempt = 0;
            let run = loop {
                match probe::run_once(launch, timeout) {
                    Ok(run) => break run,
                    Err(e) if attempt < args.retries => {
                        attempt += 1;
                        let first = format!("{e:#}").lines().next().unwrap_or("").to_owned();
                        eprintln!(
                            "{label:>14} {:<6}  FAILED, retrying ({attempt}/{}): {first}",
                            launch.kind.name(),
                            args.retries
                        );
                        tracing::warn!("{label}: {} failed: {e:#}", launch.kind.name());
                        retried.push(format!("{label} {}: {first}", launch.kind.name()));
                    }
                    Err(e) => {
                        let partial = report::summarise(&samples);
                        if !partial.is_empty() {
                            eprintln!("forkvm bench: a run failed; the runs completed so far:");
                            eprint!("{}", report::metrics_table(&partial));
                        }
                        return Err(e).with_context(|| {
                            format!("{label}: the {} boot failed", launch.kind.name())
                        });
                    }
                }
            };
            if let Some(dir) = &args.console_dir {
                let file = dir.join(format!(
                    "{}-{}.log",
                    launch.kind.name(),
                    label.replace(['/', ' '], "-")
                ));
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&file, probe::console_text(&run.console)))
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            let s = run.sample;
            eprintln!("{label:>14} {:<6}  {}", launch.kind.name(), describe(&s));
            if measured {
                samples.push(s);
            }
        }
    }

    let report = Report {
        date_utc: iso8601_utc(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        runs: args.runs,
        warmup: args.warmup,
        environment,
        guest,
        vmms: launches
            .iter()
            .map(|(l, devices)| VmmSetup {
                vmm: l.kind,
                command: l.display(),
                devices: devices.clone(),
            })
            .collect(),
        metrics: report::summarise(&samples),
        samples,
        retried,
    };
    print_report(args.format, &report, report::render)
}

/// Prints `report` as `format` asks: `table` renders it, JSON is its serde form.
fn print_report<R: serde::Serialize>(
    format: BenchFormat,
    report: &R,
    table: impl FnOnce(&R) -> String,
) -> Result<i32> {
    match format {
        BenchFormat::Table => print!("{}", table(report)),
        BenchFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).context("cannot serialise the report")?
        ),
    }
    Ok(0)
}

/// A benchmark's scratch directory, removed at the end.
struct Scratch(std::path::PathBuf);

/// What `forkvm bench VERB` runs with: the `forkvm` executable and a scratch directory
/// of its own (removed when the [`Scratch`] drops). Refuses, saying how to run it in the
/// virtual KVM host, where KVM is not hardware-accelerated.
fn bench_setup(verb: &str) -> Result<(std::path::PathBuf, std::path::PathBuf, Scratch)> {
    let caps = forkvm_testhost::Capabilities::detect();
    if !caps.hardware_kvm() {
        bail!(
            "forkvm bench needs hardware-accelerated KVM (vmx/svm and a usable /dev/kvm), \
             which this machine lacks:\n{caps}\nRun it in the virtual KVM host: \
             `cargo xtask testhost --mem 8192 -- target/release/forkvm bench {verb}`"
        );
    }
    let exe =
        forkvm_config::find_program("forkvm").context("cannot locate the forkvm executable")?;
    let dir = std::env::temp_dir().join(format!("forkvm-bench-{verb}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir.clone());
    Ok((exe, dir, scratch))
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_an_init_command() {
        assert_eq!(
            bench_cmdline(Some("console=ttyS0 quiet")),
            "console=ttyS0 quiet -- true"
        );
        assert_eq!(
            bench_cmdline(Some("console=ttyS0 -- echo hi")),
            "console=ttyS0 -- echo hi"
        );
        assert!(bench_cmdline(None).starts_with(DEFAULT_CMDLINE));
        assert!(bench_cmdline(None).ends_with(" -- true"));
    }

    #[test]
    fn bzimage_header_version() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
        let v = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(
            bzimage_version(&img).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        img[0x202] = b'X';
        assert_eq!(bzimage_version(&img), None);
        assert_eq!(bzimage_version(&[0u8; 16]), None);
    }
}
