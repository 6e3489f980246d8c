#!/usr/bin/env bash
# Runs on a KVM host (see demo.sh): boots a guest, forks it into three children, and
# shows that each child resumed the parent's exact state with its own identity.
set -euo pipefail
cd "$(dirname "$0")/.."
FORKVM="$PWD/target/release/forkvm"
work=$(mktemp -d)
root="$work/root"
f() { "$FORKVM" --root "$root" "$@"; }
cleanup() {
  for vm in $(f ps -q 2>/dev/null); do f stop -t 1 "$vm" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The guest counts, and shows its hostname and a fresh random number each tick.
loop='i=0; while true; do read h < /proc/sys/kernel/hostname; set -- $(od -An -N4 -tx4 /dev/urandom); echo tick=$i host=$h random=$1; i=$((i+1)); sleep 1; done'
start=$(date +%s%N)
f boot -d --name demo --vcpus 2 --mem 256 --vsock "cid=3,uds=$work/demo.vsock" \
  --cmdline "console=ttyS0 quiet reboot=k panic=-1 pci=off -- sh -c \"$loop\"" >/dev/null
# (Count lines rather than `grep -q`: with pipefail, grep quitting early would fail
# the pipeline through SIGPIPE.)
ticks() { f logs "$1" | grep -c '^tick=' || true; }
for _ in $(seq 240); do [ "$(ticks demo)" -ge 3 ] && break; sleep 0.5; done
[ "$(ticks demo)" -ge 3 ] || { echo "the guest did not start counting:"; f logs demo | tail -n 20; exit 1; }
echo "== parent booted and counting ($(( ($(date +%s%N) - start) / 1000000 )) ms to tick 2):"
f logs demo | grep '^tick=' | tail -n 2 || true

echo "== forkvm fork demo -n 3"
f fork demo -n 3
sleep 4
echo "== every VM resumed from the parent's counter, with its own hostname and entropy:"
for vm in $(f ps -q); do
  printf '%s  ' "$vm"; f logs "$vm" | grep '^tick=' | tail -n 1 || true
done
echo
f ps
