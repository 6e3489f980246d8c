//! End to end, in a KVM host: `forkvm boot` runs the default guest's command on the
//! requested vCPUs, and the guest's poweroff and reboot both end the VMM with exit 0.

mod common;

use common::{
    assert_clean_guest_run, guest_cmdline, run_forkvm, warm_default_guest, GUEST_TIMEOUT,
};

/// Boot to init with two vCPUs, run a command, power off; then a guest that reboots.
#[test]
fn guest_runs_its_command_and_its_poweroff_or_reboot_ends_the_vmm() {
    warm_default_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        // Poweroff: init runs the command, reports its exit code and powers off.
        let out = run_forkvm(
            &[
                "boot",
                "--vcpus",
                "2",
                "--cmdline",
                &guest_cmdline("echo hello-from-the-guest; echo nproc=$(nproc)"),
            ],
            GUEST_TIMEOUT,
        );
        assert_clean_guest_run(&out);
        let ready = out.stdout.find(forkvm_guest_kernel::READY_MARKER).unwrap();
        let hello = out
            .stdout
            .find("hello-from-the-guest")
            .unwrap_or_else(|| panic!("no command output\n{out}"));
        assert!(
            ready < hello,
            "the command ran before init was ready\n{out}"
        );
        assert!(
            out.stdout.lines().any(|l| l.trim() == "nproc=2"),
            "the guest does not see 2 vCPUs\n{out}"
        );

        // Reboot: the VMM does not restart the guest; it exits 0 and the command's
        // later output never appears.
        let out = run_forkvm(
            &[
                "boot",
                "--cmdline",
                &guest_cmdline("echo rebooting-now; reboot -f; sleep 30; echo still-running"),
            ],
            GUEST_TIMEOUT,
        );
        assert!(out.stdout.contains("rebooting-now"), "{out}");
        assert!(!out.stdout.contains("still-running"), "{out}");
        assert!(
            !out.stdout.contains("forkvm-init: exit"),
            "init went on after reboot -f\n{out}"
        );
        assert_eq!(out.status.code(), Some(0), "forkvm exit status\n{out}");
        assert_eq!(
            out.stdout
                .matches(forkvm_guest_kernel::READY_MARKER)
                .count(),
            1,
            "the guest booted again after its reboot\n{out}"
        );
    });
}
