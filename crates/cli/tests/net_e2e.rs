//! End to end, in a KVM host: virtio-net on a TAP. The guest configures eth0 with the
//! MAC given on the command line, pings the host end of the TAP, and exchanges a line
//! with a TCP listener on it. The TAP lives in the virtual host's own network namespace:
//! nothing leaves the machine.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    assert_clean_guest_run, guest_cmdline, run_forkvm, sh, warm_default_guest, GUEST_TIMEOUT,
};

const TAP: &str = "fvtap0";
const HOST_IP: &str = "172.30.0.1";
const GUEST_IP: &str = "172.30.0.2";
const GUEST_MAC: &str = "02:00:5e:10:20:30";
const TCP_PORT: u16 = 7000;

/// Loads the `tun` driver if `/dev/net/tun` is missing. The virtual host's kernel has it
/// as a module that its initramfs does not load; its `.ko` is in the forkvm kernel cache,
/// which the virtual host sees read-only.
fn ensure_tun() {
    if std::path::Path::new("/dev/net/tun").exists() {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let release = release.trim();
    let cache = forkvm_guest_kernel::cache_dir().unwrap();
    let pkg = cache.join("kernels").join(format!("linux-image-{release}"));
    let ko: PathBuf = ["lib", "usr/lib"]
        .iter()
        .map(|l| {
            pkg.join(l)
                .join("modules")
                .join(release)
                .join("kernel/drivers/net/tun.ko")
        })
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no tun.ko for kernel {release} under {}", pkg.display()));
    let f = std::fs::File::open(&ko).unwrap();
    // SAFETY: finit_module(2) reads the module from the fd and the empty, NUL-terminated
    // parameter string; neither is retained after the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    assert!(
        rc == 0,
        "cannot load {}: {}",
        ko.display(),
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::path::Path::new("/dev/net/tun").exists() {
        assert!(
            Instant::now() < deadline,
            "no /dev/net/tun after loading tun"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_reaches_the_host_over_a_tap_with_the_given_mac() {
    warm_default_guest();
    forkvm_testhost::on_kvm_host(forkvm_testhost::test_path!(), || {
        ensure_tun();
        sh("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"]);
        sh("ip", &["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        sh("ip", &["link", "set", TAP, "up"]);

        let listener = TcpListener::bind((HOST_IP, TCP_PORT)).unwrap();
        let host = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + GUEST_TIMEOUT;
            let (s, peer) = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(
                            Instant::now() < deadline,
                            "no TCP connection from the guest"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            // While the guest is up (its link drops with the VMM): the host learnt the
            // guest's address from frames carrying the MAC given with --net.
            let neigh = sh("ip", &["neigh", "show", GUEST_IP, "dev", TAP]);
            (&s).write_all(format!("net-ack:{}\n", line.trim_end()).as_bytes())
                .unwrap();
            (peer, line, neigh)
        });

        let script = format!(
            "echo mac=$(cat /sys/class/net/eth0/address); \
             ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && \
             ping -c 1 -W 10 {HOST_IP} && echo ping-ok && \
             echo net-hello | nc {HOST_IP} {TCP_PORT}"
        );
        let out = run_forkvm(
            &[
                "boot",
                "--net",
                &format!("tap={TAP},mac={GUEST_MAC}"),
                "--cmdline",
                &guest_cmdline(&script),
            ],
            GUEST_TIMEOUT,
        );
        assert_clean_guest_run(&out);
        assert!(
            out.stdout.contains(&format!("mac={GUEST_MAC}")),
            "eth0 does not have the MAC given with --net\n{out}"
        );
        assert!(out.stdout.contains("ping-ok"), "{out}");
        assert!(
            out.stdout.contains("net-ack:net-hello"),
            "the guest did not get the host's TCP answer\n{out}"
        );
        let (peer, line, neigh) = host.join().expect("the host's TCP side");
        assert_eq!(line.trim_end(), "net-hello");
        assert_eq!(peer.ip().to_string(), GUEST_IP);
        assert!(
            neigh.contains(GUEST_MAC),
            "the host's neighbour entry for {GUEST_IP}: {neigh:?}"
        );
        sh("ip", &["link", "del", TAP]);
    });
}
