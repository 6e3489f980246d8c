//! A container VM's root filesystem ([`crate::vm::Root`]), made by `create` once the
//! hooks ran ([`prepare`]):
//!
//! - [`RootMode::Shared`]: the bundle's root directory itself, and the bind-mounted host
//!   files of the plan ([`ContainerPlan::files`]) copied into a directory of their own
//!   ([`FILES_DIR`], the `i`th as file `i`), which the VM shares read-only and the guest
//!   agent binds at their destinations.
//! - [`RootMode::Disk`]: the bundle's root directory turned into an ext4 file with
//!   `mkfs.ext4 -d` (as image root filesystems are), then the files written into it with
//!   `debugfs`. The disk is the VM's read-only `vda`; the guest agent lays a private
//!   writable overlay over it, so the container's writes stay in its VM and never reach
//!   the bundle.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use forkvm_image::system_tool;

use crate::bundle::{ContainerPlan, FileCopy, RootMode};
use crate::vm::Root;

/// The container's root disk ([`RootMode::Disk`]), in the container's directory.
pub const ROOT_DISK: &str = "rootfs.ext4";
/// The copies of the files it binds in ([`RootMode::Shared`]), in the container's
/// directory.
pub const FILES_DIR: &str = "files";

/// Why the root disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// `mkfs.ext4 -d` failed.
    #[error("cannot make the root disk from {}: {source}", rootfs.display())]
    Mkfs {
        /// The bundle's root directory.
        rootfs: PathBuf,
        /// The cause.
        source: forkvm_image::Error,
    },
    /// A destination is not an absolute path of plain names.
    #[error("mount {}: the destination must be an absolute path without `..`", .0.display())]
    Destination(PathBuf),
    /// `debugfs` could not write a file in.
    #[error("cannot copy {} into the root disk as {}: {reason}", file.source.display(), file.destination.display())]
    Copy {
        /// The file.
        file: FileCopy,
        /// What debugfs said.
        reason: String,
    },
    /// The directory of the copies of bound files could not be made.
    #[error("cannot make {}, for the copies of the files the container binds: {source}", dir.display())]
    FilesDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A bound file could not be copied for a shared root.
    #[error("mount {}: cannot copy the host file {}: {source}", file.destination.display(), file.source.display())]
    CopyFile {
        /// The file.
        file: FileCopy,
        /// The cause.
        source: std::io::Error,
    },
}

/// The root the VM of `plan` boots with, once [`prepare`]d in the container's
/// directory `dir`.
pub fn root(plan: &ContainerPlan, dir: &Path) -> Root {
    match plan.root_mode {
        RootMode::Disk => Root::Disk(dir.join(ROOT_DISK)),
        RootMode::Shared => Root::Shared {
            dir: plan.rootfs.clone(),
            files: (!plan.files.is_empty()).then(|| dir.join(FILES_DIR)),
        },
    }
}

/// Makes what [`root`] names in `dir`: the root disk, or the copies of the bound files.
pub fn prepare(plan: &ContainerPlan, dir: &Path) -> Result<(), RootfsError> {
    match root(plan, dir) {
        Root::Disk(img) => build(plan, &img),
        Root::Shared { files: None, .. } | Root::None => Ok(()),
        Root::Shared {
            files: Some(files), ..
        } => {
            use std::os::unix::fs::MetadataExt;
            std::fs::create_dir(&files).map_err(|source| RootfsError::FilesDir {
                dir: files.clone(),
                source,
            })?;
            for (i, file) in plan.files.iter().enumerate() {
                // With the file's mode and owner, as the container would see the file.
                let copy = files.join(i.to_string());
                std::fs::copy(&file.source, &copy)
                    .and_then(|_| std::fs::metadata(&file.source))
                    .and_then(|m| std::os::unix::fs::chown(&copy, Some(m.uid()), Some(m.gid())))
                    .map_err(|source| RootfsError::CopyFile {
                        file: file.clone(),
                        source,
                    })?;
            }
            Ok(())
        }
    }
}

/// Builds `img` (which must not exist) for `plan`.
pub fn build(plan: &ContainerPlan, img: &Path) -> Result<(), RootfsError> {
    forkvm_image::make_ext4(&plan.rootfs.display().to_string(), &plan.rootfs, img).map_err(
        |source| RootfsError::Mkfs {
            rootfs: plan.rootfs.clone(),
            source,
        },
    )?;
    for file in &plan.files {
        copy_in(img, file)?;
    }
    Ok(())
}

/// The debugfs commands that put `file` at its destination: make the parent
/// directories (an existing one just fails to be made), replace what is there.
fn script(file: &FileCopy) -> Result<String, RootfsError> {
    let bad = || RootfsError::Destination(file.destination.clone());
    let mut names = Vec::new();
    for c in file.destination.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => names.push(n.to_str().ok_or_else(bad)?),
            _ => return Err(bad()),
        }
    }
    let (name, parents) = names.split_last().ok_or_else(bad)?;
    if !file.destination.is_absolute() || names.iter().any(|n| n.contains(['"', '\n', ' '])) {
        return Err(bad());
    }
    let mut s = String::from("cd /\n");
    for dir in parents {
        let _ = writeln!(s, "mkdir {dir}\ncd {dir}");
    }
    let _ = writeln!(s, "rm {name}");
    let _ = writeln!(s, "write {} {name}", file.source.display());
    Ok(s)
}

fn copy_in(img: &Path, file: &FileCopy) -> Result<(), RootfsError> {
    let fail = |reason: String| RootfsError::Copy {
        file: file.clone(),
        reason,
    };
    if file
        .source
        .to_str()
        .is_none_or(|s| s.contains([' ', '\n', '"']))
    {
        return Err(fail(
            "the host path has spaces or quotes debugfs cannot take".into(),
        ));
    }
    let cmds = tempfile::NamedTempFile::new().map_err(|e| fail(e.to_string()))?;
    std::fs::write(cmds.path(), script(file)?).map_err(|e| fail(e.to_string()))?;
    let out = Command::new(system_tool("debugfs"))
        .arg("-w")
        .arg("-f")
        .arg(cmds.path())
        .arg(img)
        .output()
        .map_err(|e| fail(format!("cannot run debugfs: {e}")))?;
    // debugfs exits 0 whatever its commands did; what matters is that the file is there.
    let check = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(format!("stat {}", file.destination.display()))
        .arg(img)
        .output()
        .map_err(|e| fail(format!("cannot run debugfs: {e}")))?;
    let stat = String::from_utf8_lossy(&check.stdout);
    if !out.status.success() || !stat.contains("Type: regular") {
        return Err(fail(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&check.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs_cat(img: &Path, path: &str) -> String {
        let out = Command::new(system_tool("debugfs"))
            .args(["-R", &format!("cat {path}")])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A plan for `true` over `rootfs` with `files` copied in.
    fn plan(rootfs: &Path, files: Vec<FileCopy>) -> ContainerPlan {
        ContainerPlan {
            rootfs: rootfs.to_owned(),
            rootfs_readonly: false,
            root_mode: RootMode::Disk,
            process: serde_json::from_value(serde_json::json!({"args": ["true"]})).unwrap(),
            hostname: None,
            vcpus: 1,
            mem_mib: 128,
            cgroup: None,
            files,
            volumes: vec![],
            filesystems: vec![],
            guest_cgroup: Default::default(),
            seccomp: vec![],
            user_namespace: None,
            network: crate::bundle::NetworkPlan::New,
            namespaces: Default::default(),
            pod: None,
            pod_size: Default::default(),
            hooks: Default::default(),
            guest_hooks: Default::default(),
            domainname: None,
            annotations: Default::default(),
            devices: vec![],
            sysctls: Default::default(),
            masked_paths: vec![],
            readonly_paths: vec![],
            pod_pid_path: None,
            warnings: vec![],
        }
    }

    #[test]
    fn a_shared_root_is_the_bundles_directory_and_the_files_copies_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "engine's hosts\n").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mut plan = plan(
            &rootfs,
            vec![FileCopy {
                source: hosts.clone(),
                destination: "/etc/hosts".into(),
            }],
        );
        plan.root_mode = RootMode::Shared;
        std::os::unix::fs::chown(&hosts, Some(1000), Some(1001)).unwrap();
        prepare(&plan, &state).unwrap();
        let meta = std::fs::metadata(state.join("files/0")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid()),
            (1000, 1001),
            "the file's owner kept"
        );
        let e = prepare(&plan, &state).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot make {}", state.join(FILES_DIR).display())),
            "{e}"
        );
        assert_eq!(
            root(&plan, &state),
            Root::Shared {
                dir: rootfs.clone(),
                files: Some(state.join(FILES_DIR)),
            }
        );
        assert_eq!(
            std::fs::read_to_string(state.join("files/0")).unwrap(),
            "engine's hosts\n"
        );
        // A copy: the engine's later changes are not the container's.
        std::fs::write(&hosts, "changed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join("files/0")).unwrap(),
            "engine's hosts\n"
        );
        assert!(!state.join(ROOT_DISK).exists(), "no disk for a shared root");
        assert!(
            !rootfs.join("etc/hosts").exists(),
            "nothing written in the bundle"
        );
        // Without files, no share of them; a file gone is an error naming the mount.
        let bare = ContainerPlan {
            files: vec![],
            ..plan.clone()
        };
        assert_eq!(
            root(&bare, &state),
            Root::Shared {
                dir: rootfs,
                files: None
            }
        );
        std::fs::remove_file(&hosts).unwrap();
        let again = dir.path().join("again");
        std::fs::create_dir(&again).unwrap();
        let e = prepare(&plan, &again).unwrap_err().to_string();
        assert!(
            e.starts_with("mount /etc/hosts: cannot copy the host file") && e.contains("hosts"),
            "{e}"
        );
    }

    #[test]
    fn bundle_tree_and_bound_files_land_in_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/hosts"), "image's hosts\n").unwrap();
        std::fs::write(rootfs.join("hello"), "world\n").unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 engine's hosts\n").unwrap();
        let env = dir.path().join("containerenv");
        std::fs::write(&env, "engine=\"podman\"\n").unwrap();
        let plan = plan(
            &rootfs,
            vec![
                FileCopy {
                    source: hosts,
                    destination: "/etc/hosts".into(),
                },
                FileCopy {
                    source: env,
                    destination: "/run/deep/.containerenv".into(),
                },
            ],
        );
        let img = dir.path().join("root.ext4");
        build(&plan, &img).unwrap();
        assert_eq!(debugfs_cat(&img, "/hello"), "world\n");
        assert_eq!(
            debugfs_cat(&img, "/etc/hosts"),
            "127.0.0.1 engine's hosts\n"
        );
        assert_eq!(
            debugfs_cat(&img, "/run/deep/.containerenv"),
            "engine=\"podman\"\n"
        );
        // The bundle itself is untouched.
        assert_eq!(
            std::fs::read_to_string(rootfs.join("etc/hosts")).unwrap(),
            "image's hosts\n"
        );
    }

    #[test]
    fn bad_destinations_are_refused() {
        for d in ["/", "/etc/../x", "/a b"] {
            let f = FileCopy {
                source: "/etc/hostname".into(),
                destination: d.into(),
            };
            assert!(
                matches!(script(&f), Err(RootfsError::Destination(_))),
                "{d}"
            );
        }
    }

    #[test]
    fn a_missing_tree_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(&dir.path().join("nope"), vec![]);
        let e = build(&plan, &dir.path().join("x.ext4")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
