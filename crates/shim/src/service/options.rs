//! Which runtime binary and root serve a container: containerd's runtime options (or a
//! CRI `ConfigPath` file), and the record of them kept in the bundle for `delete`.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::Options;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file in a container's bundle that records which runtime serves it, for the
/// shim's `delete` action (cleanup after the shim is gone).
pub const RUNTIME_RECORD: &str = "forkvm-shim.json";

/// Which runtime binary and root serve a container (the bundle's [`RUNTIME_RECORD`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RuntimeRecord {
    /// The runtime binary.
    pub binary: PathBuf,
    /// Its `--root`.
    pub root: PathBuf,
}

impl RuntimeRecord {
    /// Reads `bundle`'s record.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join(RUNTIME_RECORD);
        let text = std::fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    pub(super) fn save(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(RUNTIME_RECORD);
        let text = serde_json::to_vec(self).expect("a record serializes");
        std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))
    }
}

/// The runtime options containerd passes with a task:
///
/// - `containerd.runc.v1.Options`, as for runc-v2 (`BinaryName`, `Root`, `NoPivotRoot`,
///   ...): what a client that sets runc options sends;
/// - `runtimeoptions.v1.Options`, what containerd's CRI sends for a runtime type other
///   than runc's: its `ConfigPath` names a JSON file (see [`ConfigFile`]) with the same
///   keys;
/// - `containerd.linux.runc.CreateOptions`, what ctr's `--no-pivot` sends for a
///   non-runc runtime: only its field 1, `no_pivot_root`, is honoured (field 1 in both
///   messages).
///
/// Other types are ignored, with a log line.
pub fn runtime_options(any: Option<&Any>) -> Result<RuntimeOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(RuntimeOptions::default());
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let parse = || {
        Options::parse_from_bytes(&any.value)
            .map_err(|e| Error::InvalidArgument(format!("runtime options {name}: {e}")))
    };
    let runc = |runc| RuntimeOptions {
        runc,
        pod_template: None,
    };
    match name {
        "containerd.runc.v1.Options" => parse().map(runc),
        "containerd.linux.runc.CreateOptions" => Ok(runc(Options {
            no_pivot_root: parse()?.no_pivot_root,
            ..Options::default()
        })),
        "runtimeoptions.v1.Options" => {
            let path = config_path(&any.value)
                .map_err(|e| Error::InvalidArgument(format!("runtime options {name}: {e}")))?;
            if path.is_empty() {
                return Ok(RuntimeOptions::default());
            }
            ConfigFile::load(Path::new(&path))
        }
        other => {
            tracing::warn!(
                type_url = other,
                "ignoring runtime options of an unknown type"
            );
            Ok(RuntimeOptions::default())
        }
    }
}

/// What serves a task: runc's options, and forkvm's own from a CRI `ConfigPath` file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeOptions {
    /// runc's options (`BinaryName`, `Root`, `NoPivotRoot`, ...).
    pub runc: Options,
    /// The pod template a pod sandbox's VM is forked from (`PodTemplate`): the runtime
    /// is told it at `create` (`--pod-template`).
    pub pod_template: Option<PathBuf>,
}

/// `ConfigPath` (field 2) of an encoded `runtimeoptions.v1.Options`.
fn config_path(
    bytes: &[u8],
) -> std::result::Result<String, containerd_shim::protos::protobuf::Error> {
    use containerd_shim::protos::protobuf::rt::WireType;
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(bytes);
    let mut path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let wire_type = WireType::new(tag & 7).ok_or_else(|| {
            containerd_shim::protos::protobuf::Error::from(std::io::Error::other(format!(
                "bad wire type in tag {tag}"
            )))
        })?;
        if tag >> 3 == 2 && wire_type == WireType::LengthDelimited {
            path = input.read_string()?;
        } else {
            input.skip_field(wire_type)?;
        }
    }
    Ok(path)
}

/// The JSON file a CRI runtime's `ConfigPath` option names: the runc options the shim
/// uses, by their runc names.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The runtime binary (as `BinaryName`).
    #[serde(rename = "BinaryName", default)]
    pub binary_name: String,
    /// The runtime's root (as `Root`); the namespace is appended.
    #[serde(rename = "Root", default)]
    pub root: String,
    /// runc's `--no-pivot` (as `NoPivotRoot`).
    #[serde(rename = "NoPivotRoot", default)]
    pub no_pivot_root: bool,
    /// (forkvm) A pod template's directory (absolute): the pods of this runtime
    /// handler start by fork (`forkvm-runtime pod-template`, docs/kubernetes.md).
    #[serde(rename = "PodTemplate", default)]
    pub pod_template: Option<PathBuf>,
}

impl ConfigFile {
    fn load(path: &Path) -> Result<RuntimeOptions> {
        let text = std::fs::read(path).map_err(Error::io(format!("read {}", path.display())))?;
        let c: ConfigFile = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        if let Some(t) = c.pod_template.as_ref().filter(|t| !t.is_absolute()) {
            return Err(Error::InvalidArgument(format!(
                "{}: PodTemplate {} is not an absolute path",
                path.display(),
                t.display()
            )));
        }
        Ok(RuntimeOptions {
            runc: Options {
                binary_name: c.binary_name,
                root: c.root,
                no_pivot_root: c.no_pivot_root,
                ..Options::default()
            },
            pod_template: c.pod_template,
        })
    }
}

#[cfg(test)]
mod tests;
