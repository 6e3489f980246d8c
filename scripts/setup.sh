#!/usr/bin/env bash
# Installs everything forkvm needs on a fresh Debian/Ubuntu x86_64 machine. Idempotent:
# a second run installs nothing. Called by scripts/demo.sh and scripts/test.sh.
set -euo pipefail

# qemu-system-x86: the virtual KVM test host (and the QEMU side of the benchmarks); on
# Debian 12 it comes from bookworm-backports instead (below). busybox-static: guest and
# test-host initramfs images. e2fsprogs: disk images.
# iproute2: TAP devices for virtio-net. gcc, libc6-dev, linux-libc-dev: static guest
# test helpers (vsock). curl: the API tests talk to a VM's Unix socket with it.
# apt/dpkg (base system) fetch Debian's guest kernels into the cache.
# docker-registry: a local OCI registry the image store's pull tests push to and pull from.
# docker.io, podman, containerd (with runc, conmon): the container engines the OCI runtime
# and the containerd shim are tested under, inside the virtual host; iptables and
# containernetworking-plugins: their networks (Docker's bridge and NAT, podman's CNI).
# iperf3: `forkvm bench net` (throughput of a VM and of a runc container).
# protobuf-compiler: the CRI test client's protos (the k8s-cri crate runs protoc).
PACKAGES=(busybox-static e2fsprogs iproute2 gcc libc6-dev linux-libc-dev curl docker-registry
  docker.io podman containerd runc conmon iptables containernetworking-plugins iperf3
  protobuf-compiler)
BOOKWORM=0
if grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then BOOKWORM=1; fi
if [ "$BOOKWORM" -eq 0 ]; then PACKAGES+=(qemu-system-x86); fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Guest kernels are fetched with `apt-get download`, which needs package lists.
lists_empty=0
if ! compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null; then lists_empty=1; fi
if [ ${#missing[@]} -gt 0 ] || [ "$lists_empty" -eq 1 ]; then
  echo "setup: apt-get update" >&2
  $SUDO apt-get update -q >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go 1.23 builds the OCI runtime-tools validation suite (third_party/runtime-tools) that
# the conformance test runs against forkvm-runtime (and, on demand, runc). Debian 12's
# golang-go (1.19) is too old for the suite's modules; bookworm-backports has
# golang-1.23-go.
LATER=()
GO_PACKAGE=golang-1.23-go
if ! dpkg-query -W -f='${Status}' "$GO_PACKAGE" 2>/dev/null | grep -q "install ok installed"; then
  LATER+=("$GO_PACKAGE")
fi

# QEMU 10 for the virtual KVM test host. Under Debian 12's QEMU 7.2 the nested guests
# ran about half as fast, and its halted vCPU sometimes never took its pending timer
# interrupt (nor an NMI): the virtual host froze and its test had to run again
# (README, "the virtual KVM test host"; docs/benchmarks.md).
qemu_major() {
  command -v qemu-system-x86_64 >/dev/null || return 0
  qemu-system-x86_64 --version 2>/dev/null \
    | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' || true
}
major="$(qemu_major)"
if [ "${major:-0}" -lt 10 ]; then
  if [ "$BOOKWORM" -eq 1 ]; then
    LATER+=(qemu-system-x86)
  else
    echo "setup: warning: QEMU ${major:-(none)} found; the virtual test host is tested with QEMU 10" >&2
  fi
fi

# Those packages in one go: on Debian 12 from bookworm-backports (the suite added if
# the machine lacks it), elsewhere from the system's own archive.
if [ ${#LATER[@]} -gt 0 ]; then
  from=()
  if [ "$BOOKWORM" -eq 1 ]; then
    from=(-t bookworm-backports)
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "setup: adding bookworm-backports (for ${LATER[*]})" >&2
      echo "deb http://deb.debian.org/debian bookworm-backports main" \
        | $SUDO tee /etc/apt/sources.list.d/forkvm-backports.list >/dev/null
    fi
  fi
  echo "setup: apt-get update; installing ${LATER[*]} ${from[*]}" >&2
  $SUDO apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${from[@]}" "${LATER[@]}" >/dev/null
fi

# CNI keeps its address leases in /var/lib/cni: the podman tests mount a tmpfs there in
# the virtual host, whose view of this machine's root is read-only.
[ -d /var/lib/cni ] || $SUDO mkdir -p /var/lib/cni

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
# rust-toolchain.toml pins the toolchain and its components; this makes rustup fetch
# them now rather than halfway through a build.
cd "$(dirname "$0")/.."
rustup show active-toolchain >/dev/null
# The guest agent is a static binary; the target is also listed in rust-toolchain.toml.
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl
fi
