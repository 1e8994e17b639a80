#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test of the workspace (optimised build, because
# the numeric tests run ~20x slower unoptimised) and the deployment files' linters. README.md and
# .ci/run call exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --release
# The deployment files (container recipe, systemd units, Kubernetes manifests), linted.
./deploy/check.sh
