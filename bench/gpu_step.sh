#!/usr/bin/env bash
# Training speed and memory on one GPU, fedtune against PyTorch + transformers + PEFT in the
# same run, alternating (issue #18's figures):
#   - bf16 GEMM peak of the card (fedtune's cuBLASLt path and torch.matmul), for MFU;
#   - Llama-3.2-1B shape, LoRA r=16 on all seven projections, SFT batch 8 x 1024;
#   - the same model, DPO with 4 pairs x 1024;
#   - Llama-3.1-8B shape, QLoRA (NF4 + double quantisation) with gradient checkpointing,
#     batch 1 x 2048 (the peer in NF4 through bitsandbytes when it is installed, else in bf16);
#   - one profiled fedtune SFT run: device time per kernel (CUDA events).
# The models are made here with transformers from their configs (random bf16 weights: the
# speed does not depend on the values). fedtune's side is gpu-bin/gpu_step, built on the CPU
# machine by scripts/gpu_build.sh. Results: $OUT/results.jsonl (one JSON line a run),
# $OUT/all.log, and $OUT/summary.md (bench/gpu_summary.py: ratios, peak memory, MFU, targets).
#   bench/gpu_step.sh
# ROUNDS (2), STEPS (6 measured + the first), SKIP_8B=1, SKIP_PROFILE=1, OUT (gpu-out/step).
# DEVICE=cpu runs every step of this script on the CPU with the repo's tiny model (the figures
# mean nothing; it checks the script): DEVICE=cpu GPU_STEP=target/debug/examples/gpu_step
# PYTHON=bench/.venv/bin/python bench/gpu_step.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out/step}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-7}
BIN=${GPU_STEP:-gpu-bin/gpu_step}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/all.log"
export FEDTUNE_BENCH_DEVICE=$DEVICE
failed=0
# run NAME SECONDS CMD...: the command's JSON line to results.jsonl, everything to all.log.
run() {
  local name=$1 secs=$2; shift 2
  local t0 log
  t0=$(date +%s)
  log=$(mktemp)
  timeout "$secs" "$@" > "$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/all.log"
  cat "$log" >> "$OUT/all.log"
  if [ "$rc" -ne 0 ]; then
    tail -n 5 "$log"
    failed=1
  fi
  grep -E '^\{.*"impl"' "$log" | tee -a "$OUT/results.jsonl" | cut -c1-240
  rm -f "$log"
}
if [ "$DEVICE" = cpu ]; then
  M1B=testdata/tiny-llama/model
  M8B=testdata/tiny-llama/model
  SFT="2 64"; DPO="2 64"; Q8B="1 128"; PEAK=256
else
  M1B=${M1B:-/tmp/llama-1b}
  M8B=${M8B:-/tmp/llama-8b}
  SFT="8 1024"; DPO="4 1024"; Q8B="1 2048"; PEAK=8192
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  [ -f "$M1B/config.json" ] || run make_1b 120 "$PY" bench/gpu_forward.py make "$M1B" 1b
  if [ "${SKIP_8B:-}" != 1 ] && [ ! -f "$M8B/config.json" ]; then
    run make_8b 240 "$PY" bench/gpu_forward.py make "$M8B" 8b
  fi
fi
# fedtune's GEMM path needs a GPU.
[ "$DEVICE" = cpu ] || run peak_fedtune 60 "$BIN" peak $PEAK
run peak_torch 60 "$PY" bench/gpu_step.py peak $PEAK
for round in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086 # the shapes are two numbers each
  run "sft_fedtune_r$round" 150 "$BIN" sft "$DEVICE" "$M1B" $SFT "$STEPS" lora
  # shellcheck disable=SC2086
  run "sft_peer_r$round" 150 "$PY" bench/gpu_step.py sft "$M1B" $SFT "$STEPS" lora
done
for round in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  run "dpo_fedtune_r$round" 150 "$BIN" dpo "$DEVICE" "$M1B" $DPO "$STEPS"
  # shellcheck disable=SC2086
  run "dpo_peer_r$round" 150 "$PY" bench/gpu_step.py dpo "$M1B" $DPO "$STEPS"
done
if [ "${SKIP_PROFILE:-}" != 1 ]; then
  # shellcheck disable=SC2086
  run sft_fedtune_profile 150 env FEDTUNE_PROFILE=1 "$BIN" sft "$DEVICE" "$M1B" $SFT 4 lora
fi
if [ "${SKIP_8B:-}" != 1 ]; then
  # shellcheck disable=SC2086
  run qlora8b_fedtune 300 "$BIN" sft "$DEVICE" "$M8B" $Q8B 4 qlora-gc
  # shellcheck disable=SC2086
  run qlora8b_peer 300 "$PY" bench/gpu_step.py sft "$M8B" $Q8B 4 qlora-gc
fi
"$PY" bench/gpu_summary.py "$OUT/results.jsonl" "$OUT/summary.md" || failed=1
exit $failed
