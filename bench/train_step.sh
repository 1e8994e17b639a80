#!/usr/bin/env bash
# LoRA and QLoRA SFT steps of SmolLM2-135M-Instruct (batch 4 x 256, r=16, all seven
# projections, f32, CPU): fedtune vs PyTorch+PEFT (+bitsandbytes NF4 with double
# quantisation), alternating in the same run. Needs bench/.venv (bench/setup.sh).
#   bench/train_step.sh [ROUNDS] [STEPS]
# MODES="lora-gc qlora-gc" measures gradient checkpointing on both sides, MODES=dora DoRA
# (use_dora) on both, MODES=lora-bf16 bf16 (fedtune's --dtype bf16 against TRL's bf16=True
# on a CPU: f32 weights under torch.autocast("cpu", bfloat16)); BATCH and SEQ change
# the shape (default 4 x 256).
# fedtune's products go through oneMKL from bench/.venv when it is there (bench/use_mkl.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
STEPS=${2:-4}
MODES=${MODES:-lora qlora}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
. bench/use_mkl.sh
# Both sides read the same Hugging Face directory (the GGUF dequantised to f32).
HF=$(bench/prepare_step.sh bench_train)
for mode in $MODES; do
  for round in $(seq "$ROUNDS"); do
    ours=$(target/release/examples/bench_train "$HF" "$BATCH" "$SEQ" 16 "$STEPS" "$mode")
    theirs=$(bench/.venv/bin/python bench/train_step.py "$HF" "$BATCH" "$SEQ" 16 "$STEPS" "$mode" 2>/dev/null | tail -1)
    echo "$ours"
    echo "$theirs"
    python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f'$mode round $round: tokens/s {a[\"tokens_per_s\"]/b[\"tokens_per_s\"]:.2f}x, peak RSS {a[\"peak_rss_mb\"]/b[\"peak_rss_mb\"]:.2f}x of the peer')" "$ours" "$theirs"
  done
done
