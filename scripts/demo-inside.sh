#!/usr/bin/env bash
# Runs on a KVM host (see demo.sh): boots the default guest and reports the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
FORKVM=target/release/forkvm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'hello from a virtio-blk disk\n' > "$work/disk.img"
truncate -s 1M "$work/disk.img"
start=$(date +%s%N)
"$FORKVM" boot --vcpus 2 --mem 256 --disk "$work/disk.img,ro" --vsock "cid=3,uds=$work/vsock" \
  --cmdline 'console=ttyS0 quiet reboot=k panic=-1 pci=off -- sh -c "echo; echo guest: kernel $(uname -r), $(nproc) vCPUs, $(ls /sys/bus/virtio/devices | wc -l) virtio devices; echo guest: disk says: $(head -n1 /dev/vda); read up idle < /proc/uptime; echo guest: up $up s"'
end=$(date +%s%N)
echo "host: forkvm boot ran the guest to poweroff in $(( (end - start) / 1000000 )) ms (wall, including the guest's run and poweroff)"
