#!/usr/bin/env bash
# Distillation steps of SmolLM2-135M-Instruct (4 conversations of a ~128-word prompt and a
# ~128-word answer per step; student = LoRA r=16 on all projections, teacher = the same model,
# generalized JSD β 0.5, f32 CPU): fedtune vs TRL's GKDTrainer + PEFT, alternating in the same
# run. LMBDA 0 trains on the data's completions (the default here: sampling lengths vary);
# above 0 the student samples its own (up to 64 tokens). Needs bench/.venv (bench/setup.sh).
#   bench/distill_step.sh [ROUNDS] [STEPS] [LMBDA]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
STEPS=${2:-4}
LMBDA=${3:-0}
HF=$(bench/prepare_step.sh bench_distill)
python3 bench/make_dpo_bench_data.py $((2 * STEPS)) 128 128
DATA=bench/.data/distill_bench.jsonl
# The preference pairs' prompt and chosen answer as one user/assistant conversation each
# (TRL's GKD collator reads `messages`).
python3 -c '
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        out.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["chosen"].strip()}]}) + "\n")
' bench/.data/dpo_bench.jsonl "$DATA"
for round in $(seq "$ROUNDS"); do
  ours=$(target/release/examples/bench_distill "$HF" "$DATA" 4 "$STEPS" "$LMBDA")
  theirs=$(bench/.venv/bin/python bench/distill_step.py "$HF" "$DATA" 4 "$STEPS" "$LMBDA" 2>/dev/null | tail -1)
  echo "$ours"
  echo "$theirs"
  python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f'round $round: examples/s {a[\"examples_per_s\"]/b[\"examples_per_s\"]:.2f}x of TRL, peak RSS {a[\"peak_rss_mb\"]/b[\"peak_rss_mb\"]:.2f}x')" "$ours" "$theirs"
done
