#!/usr/bin/env bash
# Concurrent large uploads against `fedtune coord`: COUNT listed clients each upload one signed
# payload of MIB MiB at the same moment (examples/upload_memory.rs: random bytes, correctly
# signed, so each is streamed to disk, read in and checked like an honest update, then
# rejected as not an adapter). Prints, for the coordinator's default upload memory budget
# (512 MiB), a 64 MiB budget and the budget lifted (every completed upload read in at once,
# as before the budget existed), the coordinator's RSS once every client has its plan, its
# peak RSS (VmHWM) and the seconds until every upload was answered.
#   bench/upload_memory.sh [COUNT] [MIB]        (default 16 clients, 64 MiB each)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-16}
MIB=${2:-64}
NAMES=$(for i in $(seq 1 "$COUNT"); do printf ' site%s' "$i"; done)
EXAMPLE=upload_memory FEDERATION=uploads CLIENTS=$NAMES
# shellcheck source=bench/federation_setup.sh
source bench/federation_setup.sh
for budget in 512 64 1000000; do
  rm -rf "$WORK/data"
  cat > "$WORK/coord.toml" <<EOF2
federation = "uploads"
model = "$MODEL"
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
ca = "$WORK/ca"
rounds = 1
rank = 4
lora_alpha = 8.0
min_results = $COUNT
round_timeout_s = 600
max_payload_mb = $((MIB + 1))
upload_memory_mb = $budget
rule = { kind = "fed_avg_exact" }
target_rank = 4
sampling = { fraction = 1.0, min_clients = $COUNT }

[local]
learning_rate = 5e-3
local_steps = 3
batch_size = 4

$ENTRIES
EOF2
  "$BIN" coord --config "$WORK/coord.toml" > "$WORK/coord.out" 2>&1 &
  COORD=$!
  sleep 1
  # shellcheck disable=SC2086
  "$PROBE" "127.0.0.1:$PORT" "$WORK/ca" "$MIB" $NAMES > "$WORK/probe.out" 2>&1 &
  PROBE_PID=$!
  BEFORE=""
  PEAK=0
  while kill -0 "$PROBE_PID" 2>/dev/null; do
    if [ -z "$BEFORE" ] && grep -q '^ready' "$WORK/probe.out"; then
      BEFORE=$(awk '/VmRSS/ {print $2}' "/proc/$COORD/status")
    fi
    H=$(awk '/VmHWM/ {print $2}' "/proc/$COORD/status" 2>/dev/null || echo 0)
    [ -n "$H" ] && [ "$H" -gt "$PEAK" ] && PEAK=$H
    sleep 0.1
  done
  wait "$PROBE_PID" || { echo "probe failed:"; cat "$WORK/probe.out"; cat "$WORK/coord.out"; exit 1; }
  H=$(awk '/VmHWM/ {print $2}' "/proc/$COORD/status")
  [ "$H" -gt "$PEAK" ] && PEAK=$H
  kill "$COORD"
  wait "$COORD" || true
  echo "upload_memory_mb = $budget: coordinator RSS $((${BEFORE:-0} / 1024)) MiB with every plan sent, peak $((PEAK / 1024)) MiB; $(grep -v "^ready" "$WORK/probe.out")"
done
