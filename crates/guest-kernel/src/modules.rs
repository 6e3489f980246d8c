//! Owns kernel module dependency handling: parsing `modules.dep`, resolving the
//! load order of a set of modules, and generating `modules.dep` from the
//! `.modinfo` sections of `.ko` files (Debian's packages ship without one; it is
//! normally created by `depmod` at install time).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Error, KernelTree};

/// Canonical module name: `-` and `_` are equivalent in module names.
pub fn normalize_module_name(name: &str) -> String {
    let name = name.rsplit('/').next().unwrap_or(name);
    let name = name
        .strip_suffix(".ko")
        .or_else(|| name.strip_suffix(".ko.xz"))
        .or_else(|| name.strip_suffix(".ko.zst"))
        .or_else(|| name.strip_suffix(".ko.gz"))
        .unwrap_or(name);
    name.replace('-', "_")
}

/// The parsed contents of a `modules.dep` file.
#[derive(Debug, Clone, Default)]
pub struct ModuleDeps {
    /// Normalized name -> (path relative to the modules dir, direct dependency paths).
    by_name: HashMap<String, (PathBuf, Vec<PathBuf>)>,
}

impl ModuleDeps {
    /// Parses `modules.dep` text (`path.ko: dep1.ko dep2.ko` per line).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut by_name = HashMap::new();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (module, deps) = line
                .split_once(':')
                .ok_or_else(|| Error::ModulesDepSyntax {
                    line: lineno + 1,
                    text: line.to_owned(),
                })?;
            let module = PathBuf::from(module.trim());
            let deps = deps.split_whitespace().map(PathBuf::from).collect();
            by_name.insert(
                normalize_module_name(&module.to_string_lossy()),
                (module, deps),
            );
        }
        Ok(Self { by_name })
    }

    /// Number of modules listed.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no module is listed.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Returns the transitive closure of `names`, dependencies first, each once,
    /// as paths relative to the modules directory.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<PathBuf>, Error> {
        let path_to_name: HashMap<&Path, String> = self
            .by_name
            .iter()
            .map(|(n, (p, _))| (p.as_path(), n.clone()))
            .collect();
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in names {
            let key = normalize_module_name(name.as_ref());
            self.visit(
                &key,
                name.as_ref(),
                &path_to_name,
                &mut done,
                &mut visiting,
                &mut order,
            )?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        key: &str,
        requested: &str,
        path_to_name: &HashMap<&Path, String>,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), Error> {
        if done.contains(key) {
            return Ok(());
        }
        let (path, deps) = self
            .by_name
            .get(key)
            .ok_or_else(|| Error::UnknownModule(requested.to_owned()))?;
        if !visiting.insert(key.to_owned()) {
            return Err(Error::ModuleCycle(requested.to_owned()));
        }
        for dep in deps {
            let dep_key = path_to_name
                .get(dep.as_path())
                .cloned()
                .unwrap_or_else(|| normalize_module_name(&dep.to_string_lossy()));
            self.visit(
                &dep_key,
                &dep.to_string_lossy(),
                path_to_name,
                done,
                visiting,
                order,
            )?;
        }
        visiting.remove(key);
        done.insert(key.to_owned());
        order.push(path.clone());
        Ok(())
    }
}

/// The tree's `modules.dep`, parsed.
fn tree_deps(tree: &KernelTree) -> Result<ModuleDeps, Error> {
    let dep_path = tree.modules_dir().join("modules.dep");
    let text = fs::read_to_string(&dep_path).map_err(|source| Error::Io {
        path: dep_path.clone(),
        source,
    })?;
    ModuleDeps::parse(&text)
}

/// Resolves `names` against the tree's `modules.dep`: absolute `.ko` paths,
/// dependencies first, no duplicates. Unknown modules are an error naming them.
pub fn resolve_modules<S: AsRef<str>>(
    tree: &KernelTree,
    names: &[S],
) -> Result<Vec<PathBuf>, Error> {
    Ok(tree_deps(tree)?
        .resolve(names)?
        .into_iter()
        .map(|rel| tree.modules_dir().join(rel))
        .collect())
}

/// A module of an image, in load order, and when the guest needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedModule {
    /// The `.ko` file on this machine.
    pub path: PathBuf,
    /// The virtio device types (IDs as the virtio spec numbers them) whose presence
    /// calls for it; `None`: always loaded.
    pub virtio: Option<BTreeSet<u32>>,
}

/// Resolves `names` like [`resolve_modules`] and says of each module which virtio
/// devices need it: a requested module whose `.modinfo` names virtio device aliases
/// (`virtio:d00000001v*`: a driver) is needed by those devices; a dependency, by what
/// needs the modules that depend on it; whatever an unconditional module needs (the
/// virtio-mmio transport, overlayfs) is loaded always, and comes first. A guest skips
/// the drivers of devices its VM does not have: each costs tens of milliseconds of its
/// boot under emulation (module signature check, relocation, init).
pub fn plan_modules<S: AsRef<str>>(
    tree: &KernelTree,
    names: &[S],
) -> Result<Vec<PlannedModule>, Error> {
    let deps = tree_deps(tree)?;
    let order = deps.resolve(names)?;
    // Each module's condition: unset until a requested module that needs it is seen.
    let mut needs: HashMap<PathBuf, Option<BTreeSet<u32>>> = HashMap::new();
    for name in names {
        let closure = deps.resolve(&[name.as_ref()])?;
        let top = tree
            .modules_dir()
            .join(closure.last().expect("resolves to itself"));
        let bytes = fs::read(&top).map_err(|source| Error::Io {
            path: top.clone(),
            source,
        })?;
        // A module whose `.modinfo` cannot be read here (a compressed `.ko.xz`) is
        // loaded always.
        let devices = read_modinfo(&bytes)
            .ok()
            .and_then(|info| virtio_devices(&info));
        for rel in closure {
            let entry = needs.entry(rel).or_insert_with(|| Some(BTreeSet::new()));
            match (entry.as_mut(), &devices) {
                (Some(set), Some(d)) => set.extend(d),
                _ => *entry = None,
            }
        }
    }
    let mut plan: Vec<PlannedModule> = order
        .into_iter()
        .map(|rel| PlannedModule {
            virtio: needs.get(&rel).cloned().flatten(),
            path: tree.modules_dir().join(rel),
        })
        .collect();
    // What is loaded always first, each group in its order (still an order that loads
    // dependencies first: what an unconditional module needs is unconditional): the
    // transports that find the devices come before any driver that asks for them,
    // whatever order the names came in.
    plan.sort_by_key(|m| m.virtio.is_some());
    Ok(plan)
}

/// The virtio device types a module's `.modinfo` fields name in `alias=virtio:dNv*`
/// lines (`N` hexadecimal); `None` when it names none (not a virtio driver).
fn virtio_devices(modinfo: &[(String, String)]) -> Option<BTreeSet<u32>> {
    let set: BTreeSet<u32> = modinfo
        .iter()
        .filter(|(k, _)| k == "alias")
        .filter_map(|(_, v)| {
            let id = v.strip_prefix("virtio:d")?;
            let end = id
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(id.len());
            u32::from_str_radix(&id[..end], 16).ok()
        })
        .collect();
    (!set.is_empty()).then_some(set)
}

/// Reads the NUL-separated `key=value` strings of an ELF64 `.ko` file's `.modinfo` section.
pub fn read_modinfo(ko: &[u8]) -> io::Result<Vec<(String, String)>> {
    fn bad(msg: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
    }
    let u16_at = |o: usize| -> io::Result<u16> {
        ko.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("truncated ELF"))
    };
    let u32_at = |o: usize| -> io::Result<u32> {
        ko.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("truncated ELF"))
    };
    let u64_at = |o: usize| -> io::Result<usize> {
        ko.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| bad("truncated ELF"))
    };
    if ko.get(..4) != Some(b"\x7fELF") || ko.get(4) != Some(&2) || ko.get(5) != Some(&1) {
        return Err(bad("not a little-endian ELF64 file"));
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> io::Result<(u32, usize, usize)> {
        let base = shoff + i * shentsize;
        Ok((u32_at(base)?, u64_at(base + 0x18)?, u64_at(base + 0x20)?))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = ko
        .get(str_off..str_off + str_size)
        .ok_or_else(|| bad("truncated section name table"))?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = ko
                .get(off..off + size)
                .ok_or_else(|| bad("truncated .modinfo"))?;
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect());
        }
    }
    Ok(Vec::new())
}

/// Generates `modules.dep` text for every `.ko` under `modules_dir` from their
/// `.modinfo` `name=` and `depends=` fields. Lists direct dependencies only
/// (resolution computes the closure), sorted by path for determinism.
pub fn generate_modules_dep(modules_dir: &Path) -> Result<String, Error> {
    let mut kos = Vec::new();
    collect_kos(modules_dir, modules_dir, &mut kos)?;
    // name -> (relative path, depends names)
    let mut info: BTreeMap<PathBuf, (String, Vec<String>)> = BTreeMap::new();
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    for rel in kos {
        let abs = modules_dir.join(&rel);
        let bytes = fs::read(&abs).map_err(|source| Error::Io {
            path: abs.clone(),
            source,
        })?;
        let fields = read_modinfo(&bytes).map_err(|source| Error::Io {
            path: abs.clone(),
            source,
        })?;
        let mut name = normalize_module_name(&rel.to_string_lossy());
        let mut depends = Vec::new();
        for (k, v) in fields {
            match k.as_str() {
                "name" => name = normalize_module_name(&v),
                "depends" => depends.extend(
                    v.split(',')
                        .filter(|d| !d.is_empty())
                        .map(normalize_module_name),
                ),
                _ => {}
            }
        }
        by_name.insert(name.clone(), rel.clone());
        info.insert(rel, (name, depends));
    }
    let mut out = String::new();
    for (rel, (_, depends)) in &info {
        out.push_str(&rel.to_string_lossy());
        out.push(':');
        for dep in depends {
            let dep_path = by_name.get(dep).ok_or_else(|| {
                Error::UnknownModule(format!("{dep} (needed by {})", rel.display()))
            })?;
            out.push(' ');
            out.push_str(&dep_path.to_string_lossy());
        }
        out.push('\n');
    }
    Ok(out)
}

fn collect_kos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let rd = fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    for entry in rd {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        if ft.is_dir() {
            collect_kos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "ko") {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/drivers/crypto/ccp/ccp.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
";

    fn pos(v: &[PathBuf], suffix: &str) -> usize {
        v.iter()
            .position(|p| p.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} missing from {v:?}"))
    }

    #[test]
    fn closure_is_dependency_ordered_without_duplicates() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        assert_eq!(deps.len(), 11);
        let order = deps.resolve(&["9p", "9pnet_virtio", "9pnet"]).unwrap();
        assert_eq!(order.len(), 7, "{order:?}");
        assert!(pos(&order, "/netfs.ko") < pos(&order, "/fscache.ko"));
        assert!(pos(&order, "/fscache.ko") < pos(&order, "/9p.ko"));
        assert!(pos(&order, "/9pnet.ko") < pos(&order, "/9p.ko"));
        assert!(pos(&order, "/virtio.ko") < pos(&order, "/9pnet_virtio.ko"));
        assert!(pos(&order, "/9pnet.ko") < pos(&order, "/9pnet_virtio.ko"));
        let unique: HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
    }

    #[test]
    fn dash_and_underscore_are_equivalent() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        let a = deps.resolve(&["kvm_amd"]).unwrap();
        let b = deps.resolve(&["kvm-amd"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        assert!(a.last().unwrap().ends_with("kvm-amd.ko"));
        assert!(pos(&a, "/irqbypass.ko") < pos(&a, "/kvm.ko"));
    }

    #[test]
    fn unknown_module_is_named() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        match deps.resolve(&["9p", "no_such_mod"]) {
            Err(Error::UnknownModule(m)) => assert_eq!(m, "no_such_mod"),
            other => panic!("expected UnknownModule, got {other:?}"),
        }
    }

    #[test]
    fn cycles_and_syntax_errors_are_reported() {
        let deps = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(deps.resolve(&["a"]), Err(Error::ModuleCycle(_))));
        assert!(matches!(
            ModuleDeps::parse("garbage line\n"),
            Err(Error::ModulesDepSyntax { line: 1, .. })
        ));
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize_module_name("kernel/x/kvm-amd.ko"), "kvm_amd");
        assert_eq!(normalize_module_name("virtio-rng"), "virtio_rng");
        assert_eq!(normalize_module_name("9p.ko.xz"), "9p");
    }

    /// Builds a minimal ELF64 relocatable with a `.modinfo` section.
    fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        let modinfo_off = f.len();
        f.extend_from_slice(modinfo);
        let str_off = f.len();
        f.extend_from_slice(shstrtab);
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            s
        };
        let null = sh(0, 0, 0);
        let mi = sh(1, modinfo_off, modinfo.len());
        let st = sh(10, str_off, shstrtab.len());
        f.extend(null);
        f.extend(mi);
        f.extend(st);
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        f
    }

    #[test]
    fn drivers_and_what_only_they_need_wait_for_their_devices() {
        let dir = tempfile::tempdir().unwrap();
        let tree = KernelTree {
            package: "linux-image-6.1.0-1-cloud-amd64".into(),
            version: "6.1.0-1-cloud-amd64".into(),
            root: dir.path().to_owned(),
        };
        let m = dir.path().join("lib/modules/6.1.0-1-cloud-amd64");
        fs::create_dir_all(&m).unwrap();
        let kos: &[(&str, &[u8], &str)] = &[
            ("virtio_ring", b"name=virtio_ring\0", ""),
            ("virtio", b"name=virtio\0", ""),
            (
                "virtio_mmio",
                b"alias=acpi*:LNRO0005:*\0name=virtio_mmio\0",
                "virtio.ko virtio_ring.ko",
            ),
            ("failover", b"name=failover\0", ""),
            (
                "virtio_net",
                b"alias=virtio:d00000001v*\0name=virtio_net\0",
                "failover.ko virtio.ko virtio_ring.ko",
            ),
            (
                "vsock_t",
                b"alias=virtio:d00000013v*\0name=vsock_t\0",
                "failover.ko virtio.ko",
            ),
            (
                "virtiofs",
                b"alias=virtio:d0000001Av*\0alias=fs-virtiofs\0name=virtiofs\0",
                "virtio.ko",
            ),
            ("overlay", b"alias=fs-overlay\0name=overlay\0", ""),
        ];
        let mut dep = String::new();
        for (name, info, deps) in kos {
            fs::write(m.join(format!("{name}.ko")), fake_ko(info)).unwrap();
            dep += &format!("{name}.ko: {deps}\n");
        }
        fs::write(m.join("modules.dep"), dep).unwrap();

        // A driver asked for before the transport still loads after it.
        let plan = plan_modules(
            &tree,
            &[
                "virtio_net",
                "virtio_mmio",
                "vsock_t",
                "virtiofs",
                "overlay",
            ],
        )
        .unwrap();
        let got: Vec<(String, Option<Vec<u32>>)> = plan
            .iter()
            .map(|p| {
                (
                    p.path.file_name().unwrap().to_string_lossy().into_owned(),
                    p.virtio.as_ref().map(|s| s.iter().copied().collect()),
                )
            })
            .collect();
        let want: Vec<(String, Option<Vec<u32>>)> = [
            ("virtio.ko", None),
            ("virtio_ring.ko", None),
            ("virtio_mmio.ko", None),
            ("overlay.ko", None),
            // Needed by the net and the vsock drivers only.
            ("failover.ko", Some(vec![1, 0x13])),
            ("virtio_net.ko", Some(vec![1])),
            ("vsock_t.ko", Some(vec![0x13])),
            ("virtiofs.ko", Some(vec![0x1a])),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        assert_eq!(got, want);
        assert_eq!(plan[0].path, m.join("virtio.ko"));
    }

    #[test]
    fn modules_dep_generated_from_modinfo() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/arch/x86/kvm");
        fs::create_dir_all(&k).unwrap();
        fs::create_dir_all(dir.path().join("kernel/virt")).unwrap();
        fs::write(
            k.join("kvm-amd.ko"),
            fake_ko(b"license=GPL\0depends=kvm\0name=kvm_amd\0"),
        )
        .unwrap();
        fs::write(k.join("kvm.ko"), fake_ko(b"depends=irqbypass\0name=kvm\0")).unwrap();
        fs::write(
            dir.path().join("kernel/virt/irqbypass.ko"),
            fake_ko(b"depends=\0name=irqbypass\0"),
        )
        .unwrap();
        let text = generate_modules_dep(dir.path()).unwrap();
        assert!(text.contains("kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko\n"));
        let deps = ModuleDeps::parse(&text).unwrap();
        let order = deps.resolve(&["kvm-amd"]).unwrap();
        assert_eq!(
            order,
            vec![
                PathBuf::from("kernel/virt/irqbypass.ko"),
                PathBuf::from("kernel/arch/x86/kvm/kvm.ko"),
                PathBuf::from("kernel/arch/x86/kvm/kvm-amd.ko"),
            ]
        );
    }
}
