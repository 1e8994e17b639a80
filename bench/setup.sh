#!/usr/bin/env bash
# Creates bench/.venv with the Python peers the benchmarks compare against.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q torch==2.15.0 transformers==5.23.0 peft==0.21.2 trl==1.16.0 \
  bitsandbytes==0.50.2 accelerate==1.15.0 gguf==0.19.0 safetensors numpy datasets
# mergekit for testdata/merge/make_slerp_reference.py (reference data only).
.venv/bin/pip install -q mergekit==0.1.5
# oneMKL's runtime for fedtune (the BLAS PyTorch itself is built with); --no-deps: fedtune
# uses MKL's sequential layer and needs no OpenMP runtime.
.venv/bin/pip install -q --no-deps mkl==2026.2.1
