#!/usr/bin/env bash
# `--dtype bf16` on the CPU against f32: LoRA SFT on SmolLM2-135M-Instruct (8 steps, batch 4,
# lr 2e-4, one quickstart hospital's notes), the two alternating for ROUNDS rounds; prints each
# run's training seconds, peak RSS (GNU time) and logged losses. The products go through the
# BLAS fedtune finds (FEDTUNE_BLAS picks one): with oneMKL a bf16 base's products are bf16
# (AMX / AVX-512-BF16 where the CPU has them), otherwise the base is widened to f32.
#   bench/half_base.sh 3
#   FEDTUNE_BLAS=$PWD/.cache/ci-mkl/mkl-2026.2.1.data/data/lib/libmkl_rt.so.3 bench/half_base.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
GGUF=${GGUF:-$(bench/fetch_smollm2.sh)}
HF=.cache/smollm2-hf
cargo build --release -q --bin fedtune
[ -f "$HF/model.safetensors" ] || target/release/fedtune export --model "$GGUF" --output "$HF" >/dev/null
echo "fedtune BLAS: ${FEDTUNE_BLAS:-first found (oneMKL, then OpenBLAS)}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for dt in f32 bf16; do
    out=$work/$dt-$r
    /usr/bin/time -f "%M" -o "$work/rss" target/release/fedtune train sft --model "$HF" \
      --data examples/quickstart/data/st-mary-cardiology/train.jsonl --output "$out" \
      --max-steps 8 --per-device-train-batch-size 4 --learning-rate 2e-4 --dtype "$dt" \
      -v >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    grep -o "base: .*" "$work/err" || true
    python3 - "$out" "$dt" "$r" "$(cat "$work/rss")" <<'PY'
import json, sys
out, dt, r, rss = sys.argv[1:]
s = json.load(open(out + "/training_summary.json"))
losses = [json.loads(l)["loss"] for l in open(out + "/train_log.jsonl") if '"loss"' in l]
print(f"round {r} {dt}: {s['summary']['seconds']:.1f} s training, peak RSS {int(rss) // 1024} MiB, "
      f"losses {' '.join('%.4f' % l for l in losses)}")
PY
  done
done
