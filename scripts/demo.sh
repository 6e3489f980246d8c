#!/usr/bin/env bash
# The main job: show forkvm's headline as far as it works today. Boots a stock Debian
# kernel under forkvm with 2 vCPUs and its devices, on a real KVM: directly where this
# machine has hardware virtualization, otherwise inside the virtual KVM test host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p forkvm -p forkvm-vm-process -p xtask
echo "== host capabilities"
cargo xtask caps
cargo xtask prepare-guest
echo "== boot a guest (2 vCPUs, 256 MiB, vsock + rng) and fork it"
cargo xtask testhost --timeout 900 -- bash scripts/demo-inside.sh
