#!/usr/bin/env bash
# base -> SFT -> DPO on SmolLM2-135M-Instruct with the project's demo data (testdata/demo),
# and the held-out preference table of README.md: for each model, the mean log-probability
# margin (chosen - rejected) and how often chosen wins, and the DPO reward margin/accuracy
# against the base model as reference (beta 0.1). CPU, about 10 minutes on 2 cores.
#   scripts/dpo_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$(bench/fetch_smollm2.sh)}
W=.cache/dpo-demo
HF=.cache/smollm2-hf
mkdir -p "$W"
cargo build --release -q --bin fedtune
F=target/release/fedtune
[ -f "$HF/model.safetensors" ] || $F export --model "$GGUF" --output "$HF" >/dev/null
# Held out: every fourth pair (the same split as the tiny-model test).
awk 'NR % 4 != 0' testdata/demo/prefs.jsonl > "$W/train.jsonl"
awk 'NR % 4 == 0' testdata/demo/prefs.jsonl > "$W/heldout.jsonl"
cat testdata/demo/{hospital,bank,helpdesk}.jsonl > "$W/sft.jsonl"
$F train sft --model "$HF" --data "$W/sft.jsonl" --output "$W/sft" \
  --num-train-epochs 1 --learning-rate 1e-3 --per-device-train-batch-size 8 --seed 1
$F export --model "$HF" --adapter "$W/sft" --output "$W/sft-merged" >/dev/null
$F train dpo --model "$HF" --sft-adapter "$W/sft" --data "$W/train.jsonl" --output "$W/dpo" \
  --num-train-epochs 2 --learning-rate 5e-4 --per-device-train-batch-size 6 --beta 0.1 --seed 1
$F export --model "$W/sft-merged" --adapter "$W/dpo" --output "$W/dpo-merged" >/dev/null
echo "| model | logps/margin (chosen − rejected) | logps/accuracy | rewards/margins vs base (β 0.1) | rewards/accuracies vs base |"
echo "|---|---|---|---|---|"
for row in "base:$HF" "SFT:$W/sft-merged" "SFT→DPO:$W/dpo-merged"; do
  name=${row%%:*}; dir=${row#*:}
  $F eval --model "$dir" --ref-model "$HF" --data "$W/heldout.jsonl" --beta 0.1 --json | tail -1 |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'| $name | {r[\"logps/margin\"]:.3f} | {r[\"logps/accuracy\"]:.2f} | {r[\"rewards/margins\"]:.3f} | {r[\"rewards/accuracies\"]:.2f} |')"
done
