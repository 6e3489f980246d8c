//! End to end, in a KVM host: virtio-vsock through the host Unix socket (Firecracker's
//! convention). Host to guest: `CONNECT <port>` on the socket reaches a guest listener
//! that echoes bytes back. Guest to host: a guest connection to CID 2 reaches the host's
//! `<uds>_<port>` listener, both ways.
//!
//! The guest side is `tests/guest/vsock_helper.c`, built with `gcc -static` on the host
//! and handed to the guest as the raw bytes of a read-only disk.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_clean_guest_run, guest_cmdline, warm_default_guest, Forkvm, GUEST_TIMEOUT};

const GUEST_CID: u32 = 3;
/// The guest listens here; the host connects.
const GUEST_PORT: u32 = 5000;
/// The host listens here; the guest connects.
const HOST_PORT: u32 = 5001;
const ECHO_BYTES: usize = 256 << 10;

/// The helper's source, and where its static build goes (under the target directory,
/// which the virtual host sees read-only).
fn helper_paths() -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/vsock_helper.c");
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsock_helper");
    (src, bin)
}

/// Builds the guest helper (on the real host: inside the virtual host `/` is read-only).
fn build_helper() {
    let (src, bin) = helper_paths();
    let tmp = bin.with_extension(format!("tmp{}", std::process::id()));
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("cannot run gcc (needed to build the guest's vsock helper)");
    assert!(
        out.status.success(),
        "gcc -static {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &bin).unwrap();
}

/// Reads one `\n`-terminated line; panics on EOF or a timeout.
fn read_line(r: &mut impl BufRead, what: &str) -> String {
    let mut line = String::new();
    let n = r
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading {what}: {e}"));
    assert!(
        n > 0 && line.ends_with('\n'),
        "{what}: got {line:?} then EOF"
    );
    line.trim_end().to_owned()
}

/// Accepts one connection on `listener` within `timeout`.
fn accept_within(listener: &UnixListener, timeout: Duration) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection from the guest");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn vsock_connects_host_to_guest_and_guest_to_host() {
    warm_default_guest();
    if !forkvm_testhost::in_test_host() {
        build_helper();
    }
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        let dir = tempfile::tempdir().unwrap();
        let (_, helper) = helper_paths();
        let helper = std::fs::read(&helper).unwrap_or_else(|e| {
            panic!("{}: {e} (built before the virtual host)", helper.display())
        });
        let disk = dir.path().join("helper.img");
        let mut img = helper.clone();
        img.resize(helper.len().div_ceil(512) * 512, 0);
        std::fs::write(&disk, &img).unwrap();

        let uds = dir.path().join("vsock.sock");
        // Guest-initiated connections to CID 2 port P come to `<uds>_P`.
        let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
        let guest_to_host = std::thread::spawn(move || {
            let s = accept_within(&host_listener, GUEST_TIMEOUT);
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let line = read_line(&mut r, "the guest's line");
            (&s).write_all(format!("ack:{line}\n").as_bytes()).unwrap();
            line
        });

        let script = format!(
            "head -c {len} /dev/vda > /tmp/vh && chmod +x /tmp/vh && \
             /tmp/vh send 2 {HOST_PORT} hello-from-the-guest && /tmp/vh listen {GUEST_PORT}",
            len = helper.len()
        );
        let mut vm = Forkvm::spawn(
            &[
                "boot",
                "--disk",
                &format!("{},ro", disk.display()),
                "--vsock",
                &format!("cid={GUEST_CID},uds={}", uds.display()),
                "--cmdline",
                &guest_cmdline(&script),
            ],
            GUEST_TIMEOUT,
        );

        // Guest to host.
        vm.wait_for_stdout("vsock-helper: reply ");
        let line = guest_to_host
            .join()
            .expect("the host side of guest-to-host");
        assert_eq!(line, "hello-from-the-guest");

        // Host to guest: the guest listener echoes what the host sends.
        vm.wait_for_stdout(&format!("vsock-helper: listening on port {GUEST_PORT}"));
        let s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        (&s).write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let ok = read_line(&mut r, "the reply to CONNECT");
        let host_port = ok
            .strip_prefix("OK ")
            .unwrap_or_else(|| panic!("CONNECT {GUEST_PORT} answered {ok:?}"));
        host_port
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("CONNECT answered {ok:?}: no port number"));
        let payload: Vec<u8> = (0..ECHO_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        let writer = {
            let s = s.try_clone().unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || (&s).write_all(&payload).unwrap())
        };
        let mut echoed = vec![0u8; ECHO_BYTES];
        r.read_exact(&mut echoed)
            .unwrap_or_else(|e| panic!("reading the echo: {e}\n{}", vm.stdout_so_far()));
        writer.join().unwrap();
        assert!(echoed == payload, "the echo differs from what was sent");
        // Closing the stream ends the guest's echo loop, and with it the guest.
        drop(r);
        drop(s);

        let out = vm.finish();
        assert_clean_guest_run(&out);
        assert!(
            out.stdout
                .contains("vsock-helper: reply ack:hello-from-the-guest"),
            "the guest did not get the host's answer\n{out}"
        );
        assert!(
            out.stdout
                .contains(&format!("vsock-helper: echoed {ECHO_BYTES} bytes")),
            "{out}"
        );
    });
}
