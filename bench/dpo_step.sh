#!/usr/bin/env bash
# DPO steps of SmolLM2-135M-Instruct (4 pairs of ~128-word prompts and completions per step,
# LoRA r=16 on all projections, reference = adapter disabled, f32 CPU): fedtune vs TRL's
# DPOTrainer + PEFT, alternating in the same run. Needs bench/.venv (bench/setup.sh).
#   bench/dpo_step.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/use_mkl.sh
ROUNDS=${1:-2}
STEPS=${2:-4}
HF=$(bench/prepare_step.sh bench_dpo)
python3 bench/make_dpo_bench_data.py $((4 * STEPS)) 128 128
DATA=bench/.data/dpo_bench.jsonl
for round in $(seq "$ROUNDS"); do
  ours=$(target/release/examples/bench_dpo "$HF" "$DATA" 4 "$STEPS")
  theirs=$(bench/.venv/bin/python bench/dpo_step.py "$HF" "$DATA" 4 "$STEPS" 2>/dev/null | tail -1)
  echo "$ours"
  echo "$theirs"
  python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f'round $round: pairs/s {a[\"pairs_per_s\"]/b[\"pairs_per_s\"]:.2f}x of TRL ({a[\"pairs_per_s\"]*a[\"tokens_per_pair\"]:.0f} vs {b[\"pairs_per_s\"]*a[\"tokens_per_pair\"]:.0f} tokens/s), peak RSS {a[\"peak_rss_mb\"]/b[\"peak_rss_mb\"]:.2f}x')" "$ours" "$theirs"
done
