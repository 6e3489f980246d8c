//! The VM process's contract with its launchers, without a guest: it answers
//! `--version`, refuses to run by hand, and a VM that cannot boot is reported to the
//! launcher with the reason and recorded as failed in its home.

use std::process::Command;
use std::time::Duration;

use forkvm_registry::{Status, VmHome};
use forkvm_vmm::launch::{ConsoleSpec, HomeSpec, Launch, ProcessOptions, Start, VmProcess};
use forkvm_vmm::VmConfig;

const VMM: &str = env!("CARGO_BIN_EXE_forkvm-vmm");

#[test]
fn answers_version() {
    let out = Command::new(VMM).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("forkvm-vmm "), "{text}");
}

#[test]
fn refuses_to_run_by_hand() {
    for args in [&[][..], &["boot"][..]] {
        let out = Command::new(VMM).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("started by forkvm"), "{args:?}: {err}");
    }
}

#[test]
fn a_vm_that_cannot_boot_is_reported_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let home = VmHome::create(&root, Some("doomed"), None).unwrap();
    let kernel = dir.path().join("no-such-kernel");
    let launch = Launch {
        home: HomeSpec::Registered {
            root: root.clone(),
            id: home.id().to_owned(),
        },
        console: ConsoleSpec::Log,
        start: Start::Boot(VmConfig::new(&kernel)),
        // Jailed as any VM: the failure is still reported and recorded.
        jail: forkvm_jail::JailSpec::default(),
    };
    let mut vm = VmProcess::spawn(&launch, &[], ProcessOptions::owned()).unwrap();
    let err = vm.wait_running(Duration::from_secs(60)).unwrap_err();
    assert!(err.to_string().contains("cannot boot the VM"), "{err}");
    let status = vm.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let state = home.state().unwrap();
    assert_eq!(state.status, Status::Exited);
    let exit = state.exit.expect("an exit record");
    assert_eq!(exit.code, 1);
    assert!(
        matches!(&exit.reason, forkvm_registry::Ending::Failed(why) if why.starts_with("cannot boot the VM")),
        "{exit:?}"
    );
    // The VM process recorded itself, and its messages went to the console log.
    assert_eq!(state.process.map(|p| p.pid), Some(vm.pid()));
    let log = std::fs::read_to_string(home.console_path()).unwrap();
    assert!(log.contains("cannot boot the VM"), "{log}");
}
