#!/usr/bin/env bash
# Every GPU test and benchmark, on the GPU machine, from binaries built on the CPU machine by
# scripts/gpu_build.sh (gpu-bin/). Needs an NVIDIA driver, the CUDA 13 libraries (toolkit or
# pip wheels) and, for the peer, PyTorch + transformers. Writes summary.txt, all.log (every
# step's output) and results.jsonl to $OUT (or gpu-out/); under 8 minutes on an H200.
#   1. tests/cuda_device: every kernel against the host kernel on awkward shapes; whole models
#      against the host engine and transformers (f32), bf16/f16 deviation.
#   1a. tests/cuda_attention: attention forward and backward against the host kernels (f32)
#      and the tensor-core kernels against the f32 one (bf16/f16).
#   1b. tests/cuda_train: the training step (every gradient) on the GPU against the host step
#      for LoRA, QLoRA, DoRA, full and last-layer training, gradient checkpointing; the device
#      optimiser against the host's.
#   1c. tests/cuda_train_runs: 20 SFT and 5 DPO steps against the host's curve, checkpoints
#      resumed across devices, bf16 against f32, a distillation step, 6 reward-model steps
#      and 3 GRPO steps (a reward model on the device) against the host.
#   2. tests/cuda_kernels: NVRTC compile for sm_80/sm_90 and no spills (with ptxas if found).
#   3. the CLI: fedtune eval and generate --device cuda on an HF directory and a GGUF file;
#      train sft --device cuda for 20 steps and the same on the CPU, each adapter evaluated;
#      fedtune sim on the GPU (scripts/gpu_sim.toml) with 1 and 4 jobs side by side, compared.
#   4. a random-weight Llama-3.2-1B shape made with transformers: log-probabilities against
#      the host engine (f32), the forward's parts, the forward throughput against transformers
#      (alternating rounds), the NF4 forward, and greedy decoding against transformers.
#   5. training speed and memory against PyTorch + PEFT (bench/gpu_step.sh, into $OUT/step/):
#      1B-shape LoRA SFT and DPO, one round each, one profiled run; the 8B QLoRA figure only
#      with STEP_8B=1 (making an 8B model takes minutes; run bench/gpu_step.sh alone for it).
# SKIP_COMPARE=1 / SKIP_KERNEL_COMPILE=1 / SKIP_STEP_BENCH=1 leave out step 4's comparison, 2
# and 5 when time is short.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export FEDTUNE_REPO=$PWD FEDTUNE_REQUIRE_GPU=1 FEDTUNE_CACHE_DIR=${FEDTUNE_CACHE_DIR:-/tmp/fedtune-cache}
export RUST_BACKTRACE=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() { # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "/tmp/gpu-step-$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc in $(( $(date +%s) - t0 )) s"
  { echo "===== $name (exit $rc)"; cat "/tmp/gpu-step-$name.log"; } >> "$OUT/all.log"
  grep -E '"impl"|"compare"|"parts"' "/tmp/gpu-step-$name.log" >> "$OUT/results.jsonl"
  tail -n 12 "/tmp/gpu-step-$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
step half_reference 60 python3 bench/gpu_forward.py bf16 testdata/tiny-llama/model /tmp/half_reference.json
export FEDTUNE_HALF_REFERENCE=/tmp/half_reference.json
step tests_device 120 gpu-bin/cuda_device --test-threads=1 --nocapture
step tests_attention 60 gpu-bin/cuda_attention --test-threads=1 --nocapture
step tests_train 90 gpu-bin/cuda_train --test-threads=1 --nocapture
step tests_train_runs 120 gpu-bin/cuda_train_runs --test-threads=1 --nocapture
if [ "${SKIP_KERNEL_COMPILE:-}" != 1 ]; then
  step tests_kernels 60 gpu-bin/cuda_kernels --nocapture
fi
step cli_eval 45 gpu-bin/fedtune eval --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --device cuda --json
step cli_eval_cpu 45 gpu-bin/fedtune eval --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --json
step cli_generate_gguf 45 gpu-bin/fedtune generate --model testdata/gguf/tiny.gguf --prompt "The patient" --device cuda --max-new-tokens 12
step cli_train_cuda 90 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/gpu-train-sft --max-steps 20 --device cuda
step cli_train_cuda_bf16 90 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/gpu-train-bf16 --max-steps 20 --device cuda --bf16
step cli_train_cuda_fp16 90 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/gpu-train-fp16 --max-steps 20 --device cuda --fp16
step cli_train_cuda_ckpt 90 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/gpu-train-ckpt --max-steps 20 --device cuda --gradient-checkpointing
step cli_train_cuda_tf32 90 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/gpu-train-tf32 --max-steps 20 --device cuda --tf32
step cli_train_cuda_eval 45 gpu-bin/fedtune eval --model testdata/tiny-llama/model --adapter /tmp/gpu-train-sft --data testdata/demo/hospital.jsonl --json
step cli_train_cpu 120 gpu-bin/fedtune train sft --model testdata/tiny-llama/model --data testdata/demo/hospital.jsonl --output /tmp/cpu-train-sft --max-steps 20
step cli_train_cpu_eval 45 gpu-bin/fedtune eval --model testdata/tiny-llama/model --adapter /tmp/cpu-train-sft --data testdata/demo/hospital.jsonl --json
# The simulator's clients on the GPU, one job at a time and four side by side: the same
# global adapters byte for byte, and one job's measured pool peak (events.jsonl).
step sim_cuda_p1 120 gpu-bin/fedtune sim --config scripts/gpu_sim.toml --tiny --parallel 1 --output /tmp/gpu-sim-p1
step sim_cuda_p4 120 gpu-bin/fedtune sim --config scripts/gpu_sim.toml --tiny --parallel 4 --output /tmp/gpu-sim-p4
if cmp -s /tmp/gpu-sim-p1/global/final/adapter_model.safetensors /tmp/gpu-sim-p4/global/final/adapter_model.safetensors; then
  log "sim_cuda: parallel 4 trains the same global adapter as parallel 1, byte for byte"
else
  log "sim_cuda: FAILED: parallel 4 and parallel 1 global adapters differ (or are missing)"
fi
grep -h job_memory /tmp/gpu-sim-p1/events.jsonl /tmp/gpu-sim-p4/events.jsonl | tee -a "$OUT/summary.txt"
step cli_generate_gguf_cpu 45 gpu-bin/fedtune generate --model testdata/gguf/tiny.gguf --prompt "The patient" --max-new-tokens 12
M1B=/tmp/llama-1b
step make_1b 90 python3 bench/gpu_forward.py make $M1B 1b
step parts_mma 60 gpu-bin/gpu_forward parts 8 1024
step parts_simt 60 env FEDTUNE_ATTENTION=simt gpu-bin/gpu_forward parts 8 1024
if [ "${SKIP_COMPARE:-}" != 1 ]; then
  step compare_1b 120 gpu-bin/gpu_forward compare $M1B 2 48
fi
for round in 1 2; do
  step "fedtune_1b_r$round" 90 gpu-bin/gpu_forward bench $M1B bf16 8 1024 5
  step "transformers_1b_r$round" 90 python3 bench/gpu_forward.py bench $M1B 8 1024 5
done
step fedtune_1b_nf4 120 gpu-bin/gpu_forward bench $M1B bf16-nf4dq 8 1024 5
step fedtune_1b_gen 90 gpu-bin/gpu_forward gen $M1B bf16 64 128
step transformers_1b_gen 90 python3 bench/gpu_forward.py gen $M1B 64 128
if [ "${SKIP_STEP_BENCH:-}" != 1 ]; then
  t0=$(date +%s)
  OUT="$OUT/step" M1B=$M1B ROUNDS=${STEP_ROUNDS:-1} SKIP_8B=$([ "${STEP_8B:-}" = 1 ] && echo 0 || echo 1) \
    timeout 420 bench/gpu_step.sh > /tmp/gpu-step-bench.log 2>&1
  log "step_bench: exit $? in $(( $(date +%s) - t0 )) s (details in step/)"
  tail -n 20 /tmp/gpu-step-bench.log
fi
cat "$OUT/results.jsonl"
