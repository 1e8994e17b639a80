#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test of the workspace (optimised build,
# because the numeric tests run ~20x slower unoptimised). README.md and .ci/run call exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --release
