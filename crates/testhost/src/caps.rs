//! Owns host capability detection: CPU virtualization flags, whether `/dev/kvm`
//! opens, and whether we already run inside the virtual host.

use std::fmt;
use std::path::{Path, PathBuf};

/// Virtualization-related CPU flags from `/proc/cpuinfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFlags {
    /// Intel VT-x.
    pub vmx: bool,
    /// AMD-V.
    pub svm: bool,
    /// Running under some hypervisor.
    pub hypervisor: bool,
}

/// Parses the first `flags` line of `/proc/cpuinfo` text.
pub fn parse_cpu_flags(cpuinfo: &str) -> CpuFlags {
    let line = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .unwrap_or("");
    let mut flags = CpuFlags::default();
    for f in line.split_whitespace() {
        match f {
            "vmx" => flags.vmx = true,
            "svm" => flags.svm = true,
            "hypervisor" => flags.hypervisor = true,
            _ => {}
        }
    }
    flags
}

/// What this machine offers for running KVM guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// CPU flags.
    pub cpu: CpuFlags,
    /// `Ok(api_version)` if `/dev/kvm` opened, else why not.
    pub kvm: Result<i32, String>,
    /// Loaded KVM modules (`kvm_amd`, `kvm_intel`, `kvm_pvm`, ...), from `/sys/module`.
    pub kvm_modules: Vec<String>,
    /// Whether this process runs inside the virtual host (`FORKVM_IN_TESTHOST=1`).
    pub in_test_host: bool,
    /// The QEMU binary used for the virtual host, if found on `PATH`.
    pub qemu: Option<PathBuf>,
}

impl Capabilities {
    /// Probes the running machine.
    pub fn detect() -> Self {
        let cpu = parse_cpu_flags(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Ok(kvm.get_api_version()),
            Err(e) => Err(format!("cannot open /dev/kvm: {e}")),
        };
        let kvm_modules = ["kvm", "kvm_amd", "kvm_intel", "kvm_pvm"]
            .iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(|m| (*m).to_owned())
            .collect();
        Self {
            cpu,
            kvm,
            kvm_modules,
            in_test_host: in_test_host(),
            qemu: find_in_path(crate::virt::QEMU),
        }
    }

    /// Whether `/dev/kvm` opens.
    pub fn kvm_opens(&self) -> bool {
        self.kvm.is_ok()
    }

    /// Real hardware virtualization: a vmx/svm flag AND an openable `/dev/kvm`.
    ///
    /// A `/dev/kvm` backed by a paravirtual module without vmx/svm (e.g.
    /// `kvm_pvm`) does not count: Linux guests do not boot at usable speed there.
    pub fn hardware_kvm(&self) -> bool {
        (self.cpu.vmx || self.cpu.svm) && self.kvm_opens()
    }
}

/// The version of the QEMU binary `qemu` (asked only when shown: it starts QEMU).
fn qemu_version(qemu: &Path) -> Option<String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

/// The version in `qemu-system-x86_64 --version`'s first line (`QEMU emulator version
/// 10.0.2 (Debian ...)` gives `10.0.2`).
pub fn parse_qemu_version(text: &str) -> Option<String> {
    let rest = text
        .lines()
        .next()?
        .strip_prefix("QEMU emulator version ")?;
    let v = rest.split_whitespace().next()?;
    v.starts_with(|c: char| c.is_ascii_digit())
        .then(|| v.to_owned())
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let virt = match (self.cpu.vmx, self.cpu.svm) {
            (true, true) => "vmx (Intel VT-x) and svm (AMD-V)",
            (true, false) => "vmx (Intel VT-x)",
            (false, true) => "svm (AMD-V)",
            (false, false) => "none (no vmx/svm flag)",
        };
        writeln!(f, "CPU virtualization:  {virt}")?;
        writeln!(
            f,
            "under a hypervisor:  {}",
            if self.cpu.hypervisor { "yes" } else { "no" }
        )?;
        match &self.kvm {
            Ok(v) => writeln!(f, "/dev/kvm:            opens, KVM API version {v}")?,
            Err(e) => writeln!(f, "/dev/kvm:            {e}")?,
        }
        let mods = if self.kvm_modules.is_empty() {
            "none".to_owned()
        } else {
            self.kvm_modules.join(", ")
        };
        writeln!(f, "KVM modules loaded:  {mods}")?;
        writeln!(
            f,
            "inside virtual host: {}",
            if self.in_test_host { "yes" } else { "no" }
        )?;
        match &self.qemu {
            Some(q) => writeln!(
                f,
                "QEMU:                {} (version {})",
                q.display(),
                qemu_version(q).as_deref().unwrap_or("unknown")
            )?,
            None => writeln!(
                f,
                "QEMU:                {} not found on PATH",
                crate::virt::QEMU
            )?,
        }
        let verdict = if self.hardware_kvm() {
            "hardware KVM: yes -> commands run directly"
        } else {
            "hardware KVM: no -> commands run in the virtual host (QEMU TCG + nested SVM)"
        };
        write!(f, "{verdict}")
    }
}

/// Whether this process runs inside the virtual host (`FORKVM_IN_TESTHOST=1`).
pub fn in_test_host() -> bool {
    std::env::var_os("FORKVM_IN_TESTHOST").is_some_and(|v| v == "1")
}

pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD_SVM: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep svm extapic hypervisor lahf_lm\n\
        bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu\n";
    const INTEL_VMX: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr vmx smx est tm2\nvmx flags\t: vnmi preemption_timer\n";
    // This machine: AMD under kvm_pvm, no svm.
    const PVM: &str = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu vme sse4a misalignsse \
        3dnowprefetch osvw topoext vmmcall fsgsbase hypervisor svm_lock_absent\n";

    fn caps(cpu: CpuFlags, kvm: Result<i32, String>) -> Capabilities {
        Capabilities {
            cpu,
            kvm,
            kvm_modules: vec![],
            in_test_host: false,
            qemu: None,
        }
    }

    #[test]
    fn qemu_version_is_read_from_its_first_line() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
            )
            .as_deref(),
            Some("10.0.2")
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22\n").as_deref(),
            Some("7.2.22")
        );
        assert_eq!(parse_qemu_version("qemu-img version 10.0.2"), None);
        assert_eq!(parse_qemu_version(""), None);
    }

    #[test]
    fn parses_svm_vmx_and_absence() {
        let amd = parse_cpu_flags(AMD_SVM);
        assert!(amd.svm && !amd.vmx && amd.hypervisor);
        let intel = parse_cpu_flags(INTEL_VMX);
        assert!(intel.vmx && !intel.svm && !intel.hypervisor);
        let pvm = parse_cpu_flags(PVM);
        assert!(!pvm.svm && !pvm.vmx && pvm.hypervisor);
        assert_eq!(parse_cpu_flags(""), CpuFlags::default());
        // "vmx flags" is not "flags".
        assert!(!parse_cpu_flags("vmx flags\t: vmx svm\n").vmx);
    }

    #[test]
    fn hardware_kvm_needs_flag_and_device() {
        let amd = parse_cpu_flags(AMD_SVM);
        let pvm = parse_cpu_flags(PVM);
        assert!(caps(amd, Ok(12)).hardware_kvm());
        assert!(!caps(amd, Err("nope".into())).hardware_kvm());
        assert!(!caps(pvm, Ok(12)).hardware_kvm());
    }

    #[test]
    fn display_summarizes() {
        let s = caps(parse_cpu_flags(PVM), Ok(12)).to_string();
        assert!(s.contains("none (no vmx/svm flag)"), "{s}");
        assert!(s.contains("API version 12"), "{s}");
        assert!(s.contains("hardware KVM: no"), "{s}");
        let s = caps(parse_cpu_flags(INTEL_VMX), Ok(12)).to_string();
        assert!(
            s.contains("vmx (Intel VT-x)") && s.contains("hardware KVM: yes"),
            "{s}"
        );
        // The real machine never fails to produce a summary.
        assert!(Capabilities::detect().to_string().contains("hardware KVM"));
    }
}
