use std::time::{Duration, SystemTime};

use super::*;
use crate::service::{read_pid, timestamp};

fn any(type_url: &str, msg: &Options) -> Any {
    Any {
        type_url: type_url.into(),
        value: msg.write_to_bytes().unwrap(),
        ..Default::default()
    }
}

#[test]
fn runc_options_are_read() {
    let opts = Options {
        binary_name: "/usr/sbin/runc".into(),
        root: "/srv/rt".into(),
        no_pivot_root: true,
        ..Default::default()
    };
    let got = runtime_options(Some(&any("containerd.runc.v1.Options", &opts))).unwrap();
    assert_eq!(got.runc.binary_name, "/usr/sbin/runc");
    assert_eq!(got.runc.root, "/srv/rt");
    assert!(got.runc.no_pivot_root);
    // A host-prefixed type URL (protobuf's Any::pack) reads the same.
    let got = runtime_options(Some(&any(
        "type.googleapis.com/containerd.runc.v1.Options",
        &opts,
    )))
    .unwrap();
    assert_eq!(got.runc.binary_name, "/usr/sbin/runc");
}

#[test]
fn legacy_create_options_only_give_no_pivot() {
    // Field 1 is no_pivot_root in both messages; field 6 is a string in both but
    // means something else in CreateOptions, and must not become the binary.
    let opts = Options {
        no_pivot_root: true,
        binary_name: "empty-namespace".into(),
        ..Default::default()
    };
    let got = runtime_options(Some(&any("containerd.linux.runc.CreateOptions", &opts))).unwrap();
    assert!(got.runc.no_pivot_root);
    assert_eq!(got.runc.binary_name, "");
}

#[test]
fn no_or_unknown_options_are_the_defaults() {
    assert_eq!(runtime_options(None).unwrap(), RuntimeOptions::default());
    let other = Any {
        type_url: "io.containerd.other.v1.Options".into(),
        value: vec![10, 3, b'a', b'b', b'c'],
        ..Default::default()
    };
    assert_eq!(
        runtime_options(Some(&other)).unwrap(),
        RuntimeOptions::default()
    );
    let broken = Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: vec![0xff, 0xff],
        ..Default::default()
    };
    assert!(runtime_options(Some(&broken)).is_err());
}

#[test]
fn cri_config_path_options_name_a_json_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("shim.json");
    std::fs::write(
        &file,
        r#"{"BinaryName": "/usr/local/bin/forkvm-runtime", "Root": "/srv/forkvm"}"#,
    )
    .unwrap();
    // runtimeoptions.v1.Options { type_url = 1, config_path = 2 }, hand-encoded.
    let encode = |path: &str| {
        let mut v = vec![0x0a, 3, b'x', b'y', b'z', 0x12, path.len() as u8];
        v.extend_from_slice(path.as_bytes());
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v,
            ..Default::default()
        }
    };
    let got = runtime_options(Some(&encode(file.to_str().unwrap()))).unwrap();
    assert_eq!(got.runc.binary_name, "/usr/local/bin/forkvm-runtime");
    assert_eq!(got.runc.root, "/srv/forkvm");
    assert!(!got.runc.no_pivot_root);
    assert_eq!(got.pod_template, None);
    // forkvm's own: the pod template the handler's pods fork from.
    std::fs::write(&file, r#"{"PodTemplate": "/var/lib/forkvm/pod"}"#).unwrap();
    let got = runtime_options(Some(&encode(file.to_str().unwrap()))).unwrap();
    assert_eq!(
        got.pod_template.as_deref(),
        Some(Path::new("/var/lib/forkvm/pod"))
    );
    std::fs::write(&file, r#"{"PodTemplate": "pod"}"#).unwrap();
    let err = runtime_options(Some(&encode(file.to_str().unwrap()))).unwrap_err();
    assert!(
        err.to_string()
            .contains("PodTemplate pod is not an absolute path"),
        "{err}"
    );
    // No ConfigPath: the defaults.
    let none = Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value: vec![0x0a, 1, b'x'],
        ..Default::default()
    };
    assert_eq!(
        runtime_options(Some(&none)).unwrap(),
        RuntimeOptions::default()
    );
    // A misspelt key is an error, not a silent default.
    std::fs::write(&file, r#"{"Binary": "x"}"#).unwrap();
    let err = runtime_options(Some(&encode(file.to_str().unwrap()))).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    let err = runtime_options(Some(&encode("/nonexistent.json"))).unwrap_err();
    assert!(err.to_string().contains("/nonexistent.json"), "{err}");
}

#[test]
fn pid_files() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("init.pid");
    std::fs::write(&p, "1234").unwrap();
    assert_eq!(read_pid(&p).unwrap(), 1234);
    std::fs::write(&p, "1234\n").unwrap();
    assert_eq!(read_pid(&p).unwrap(), 1234);
    std::fs::write(&p, "x").unwrap();
    assert!(read_pid(&p).is_err());
    std::fs::write(&p, "0").unwrap();
    assert!(read_pid(&p).is_err());
    assert!(read_pid(&tmp.path().join("none")).is_err());
}

#[test]
fn runtime_records_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let r = RuntimeRecord {
        binary: "/usr/sbin/runc".into(),
        root: "/run/containerd/forkvm/default".into(),
    };
    r.save(tmp.path()).unwrap();
    assert_eq!(RuntimeRecord::load(tmp.path()).unwrap(), r);
}

#[test]
fn timestamps() {
    let t = SystemTime::UNIX_EPOCH + Duration::new(5, 7);
    let ts = timestamp(t);
    assert_eq!((ts.seconds, ts.nanos), (5, 7));
}
