#!/usr/bin/env bash
# A federation on this machine with the real daemons over QUIC + mutual TLS: a CA, one
# coordinator and three clients (hospital, bank, helpdesk from testdata/demo), 3 rounds of
# federated LoRA SFT. MODEL defaults to the tiny test model (seconds); set
# MODEL=.cache/smollm2-hf for SmolLM2-135M (`fedtune export --model <gguf> --output .cache/smollm2-hf`).
#   scripts/federation_demo.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-.cache/federation-demo}
MODEL=${MODEL:-testdata/tiny-llama/model}
PORT=${PORT:-7443}
cargo build --release -q --bin fedtune
F=$PWD/target/release/fedtune
rm -rf "$W" && mkdir -p "$W"
coordinator_key=$($F ca init --dir "$W/ca" --federation demo)
entries=""
for site in hospital bank helpdesk; do
  entries+="$($F ca issue --dir "$W/ca" --client "$site")"$'\n'
  head -32 "testdata/demo/$site.jsonl" > "$W/$site-train.jsonl"
  tail -8 "testdata/demo/$site.jsonl" > "$W/$site-eval.jsonl"
  cat > "$W/$site.toml" <<TOML
federation = "demo"
coordinator = "127.0.0.1:$PORT"
$coordinator_key
ca = "$W/ca"
name = "$site"
model = "$MODEL"
rank = 8
lora_alpha = 16.0
train_data = "$W/$site-train.jsonl"
eval_data = "$W/$site-eval.jsonl"
log = "$W/$site.log.jsonl"
TOML
done
cat > "$W/coord.toml" <<TOML
federation = "demo"
model = "$MODEL"
listen = "127.0.0.1:$PORT"
data_dir = "$W/coord-data"
ca = "$W/ca"
rounds = 3
rank = 8
lora_alpha = 16.0
min_results = 2
round_timeout_s = 600
rule = { kind = "fed_avg_exact" }
target_rank = 8
sampling = { fraction = 1.0, min_clients = 3 }

[local]
learning_rate = 2e-3
local_steps = 8
batch_size = 4

$entries
TOML
$F coord --config "$W/coord.toml" > "$W/coord.out" 2>&1 &
coord=$!
pids=()
for site in hospital bank helpdesk; do
  $F client --config "$W/$site.toml" > "$W/$site.out" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
wait "$coord"
echo "rounds (eval_loss: example-weighted mean of the clients' held-out losses after local training):"
python3 - "$W/coord-data/rounds.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == "round_closed":
        m = e["metrics"]
        print(f"  round {e['round']}: {len(e['used'])} updates, train_loss {m.get('train_loss', float('nan')):.3f}, "
              f"eval_loss {m.get('eval_loss', float('nan')):.3f}, {e['seconds']:.1f} s")
PY
echo "global adapters: $W/coord-data/store/global/; round log: $W/coord-data/rounds.jsonl"
