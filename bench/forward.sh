#!/usr/bin/env bash
# Forward throughput of SmolLM2-135M-Instruct (batch 4 x 256, f32, CPU): fedtune vs transformers,
# in the same run. Needs bench/.venv (see bench/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$(bench/fetch_smollm2.sh)}
cargo build --release -q -p fedtune-engine --example bench_forward
for round in 1 2; do
  ours=$(target/release/examples/bench_forward "$GGUF" 4 256 3)
  theirs=$(bench/.venv/bin/python bench/forward.py "$GGUF" 4 256 3 2>/dev/null | tail -1)
  echo "$ours"
  echo "$theirs"
  python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f'round $round: fedtune/transformers = {a[\"tokens_per_s\"]/b[\"tokens_per_s\"]:.2f}x')" "$ours" "$theirs"
done
