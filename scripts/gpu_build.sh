#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on the GPU machine (which has no cargo) into gpu-bin/:
# the GPU test binaries, the fedtune CLI and the gpu_forward and gpu_step examples, without
# debug info.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu-bin
cargo build --release --bin fedtune
cargo build --release -p fedtune-engine --example gpu_forward --example gpu_step
json=$(cargo test --release -p fedtune-engine --test cuda_device --test cuda_attention --test cuda_train --test cuda_train_runs --test cuda_kernels --no-run --message-format=json 2>/dev/null)
for t in cuda_device cuda_attention cuda_train cuda_train_runs cuda_kernels; do
  exe=$(printf '%s\n' "$json" | python3 -c "import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get('reason')=='compiler-artifact' and m.get('target',{}).get('name')=='$t' and m.get('executable'): print(m['executable'])" | tail -1)
  cp "$exe" "gpu-bin/$t"
done
cp target/release/fedtune target/release/examples/gpu_forward target/release/examples/gpu_step gpu-bin/
strip gpu-bin/* 2>/dev/null || objcopy --strip-debug gpu-bin/*
ls -la gpu-bin
