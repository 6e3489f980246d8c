#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests (which
# run inside the virtual KVM host when this machine has no hardware virtualization).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A CI run compiles everything once, from a clean clone: incremental compilation's
# caches would only be written, never read (and slow that one build).
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== host capabilities"
cargo xtask caps
cargo xtask prepare-guest
# The OCI runtime-tools validation suite the conformance test runs (third_party/runtime-tools).
cargo xtask prepare-conformance
echo "== cargo build (every program: the end-to-end tests install and run them)"
cargo build --workspace --bins --locked
# Host tests as cargo runs them; end-to-end tests one process per test, as many at once
# as there are virtual-host slots (`cargo xtask test --help`).
cargo xtask test 2>&1
