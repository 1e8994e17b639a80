#!/usr/bin/env bash
# GRPO steps of SmolLM2-135M-Instruct (G = 4, up to 64 new tokens, 8 completions per step =
# 2 prompts of ~128 words as user messages; LoRA r=16 on all projections, β 0, dapo, reward
# length:20:200, f32 CPU): fedtune vs TRL's GRPOTrainer + PEFT, alternating in the same run.
# Completion lengths are sampled on each side; both are printed. Needs bench/.venv (bench/setup.sh).
#   bench/grpo_step.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/use_mkl.sh
ROUNDS=${1:-2}
STEPS=${2:-4}
HF=$(bench/prepare_step.sh bench_grpo)
python3 bench/make_dpo_bench_data.py $((2 * STEPS)) 128 128
DATA=bench/.data/grpo_bench.jsonl
python3 -c '
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        out.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n")
' bench/.data/dpo_bench.jsonl "$DATA"
for round in $(seq "$ROUNDS"); do
  ours=$(target/release/examples/bench_grpo "$HF" "$DATA" "$STEPS")
  theirs=$(bench/.venv/bin/python bench/grpo_step.py "$HF" "$DATA" "$STEPS" 2>/dev/null | tail -1)
  echo "$ours"
  echo "$theirs"
  python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f'round $round: completions/s {a[\"completions_per_s\"]/b[\"completions_per_s\"]:.2f}x of TRL, peak RSS {a[\"peak_rss_mb\"]/b[\"peak_rss_mb\"]:.2f}x')" "$ours" "$theirs"
done
