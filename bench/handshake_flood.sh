#!/usr/bin/env bash
# A QUIC handshake flood against `fedtune coord` while an honest federation runs (two clients,
# the tiny model, 2 rounds): COUNT Initial packets that never finish their handshakes
# (examples/handshake_flood.rs) are sent, and the clients start while they arrive. Prints, for the coordinator
# with its default handshake limits ("protected") and with the limits lifted ("unlimited":
# every attempt accepted, handshakes kept until the QUIC idle timeout, as before the limits
# existed), the coordinator's peak RSS (VmHWM), the seconds until both rounds closed, and
# the coordinator's count of accepted / retried / refused attempts.
#   bench/handshake_flood.sh [COUNT]        (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-20000}
EXAMPLE=handshake_flood FEDERATION=flood CLIENTS="hospital bank"
# shellcheck source=bench/federation_setup.sh
source bench/federation_setup.sh
FLOOD=$PROBE
for n in hospital bank; do
  cat > "$WORK/$n.toml" <<EOF
federation = "flood"
coordinator = "127.0.0.1:$PORT"
$KEY
ca = "$WORK/ca"
name = "$n"
model = "$MODEL"
rank = 4
lora_alpha = 8.0
train_data = "$PWD/testdata/demo/$n.jsonl"
EOF
done
for mode in protected unlimited; do
  rm -rf "$WORK/data"
  LIMITS=""
  if [ "$mode" = unlimited ]; then
    LIMITS=$'[handshakes]\nretry_above = 1000000000\nmax_pending = 1000000000\nper_address = 1000000000\ntimeout_s = 3600\n'
  fi
  cat > "$WORK/coord.toml" <<EOF
federation = "flood"
model = "$MODEL"
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
ca = "$WORK/ca"
rounds = 2
rank = 4
lora_alpha = 8.0
min_results = 2
round_timeout_s = 120
rule = { kind = "fed_avg_exact" }
target_rank = 4
sampling = { fraction = 1.0, min_clients = 2 }

[local]
learning_rate = 5e-3
local_steps = 3
batch_size = 4

$LIMITS
$ENTRIES
EOF
  "$BIN" coord --config "$WORK/coord.toml" > "$WORK/coord.out" 2>&1 &
  COORD=$!
  sleep 2
  START=$(date +%s.%N)
  "$FLOOD" "127.0.0.1:$PORT" "$COUNT" "$WORK/ca/ca.pem" > "$WORK/flood.out" &
  # The clients start once the flood is being sent (making the Initials takes ~0.8 s).
  sleep 1
  CLIENTS=""
  for n in hospital bank; do
    "$BIN" client --config "$WORK/$n.toml" > "$WORK/$n.out" 2>&1 &
    CLIENTS+=" $!"
  done
  PEAK=0
  while kill -0 "$COORD" 2>/dev/null; do
    H=$(awk '/VmHWM/ {print $2}' "/proc/$COORD/status" 2>/dev/null || echo 0)
    [ -n "$H" ] && [ "$H" -gt "$PEAK" ] && PEAK=$H
    if [ -z "${DONE:-}" ] && [ -f "$WORK/data/rounds.jsonl" ] \
       && [ "$(grep -c '"round_closed"' "$WORK/data/rounds.jsonl")" -ge 2 ]; then
      DONE=$(python3 -c "import time; print(f'{time.time() - $START:.1f}')")
    fi
    sleep 0.1
  done
  wait "$COORD" || { echo "coordinator failed:"; cat "$WORK/coord.out"; exit 1; }
  sleep 3
  kill $CLIENTS 2>/dev/null || true
  wait
  echo "$mode: coordinator peak RSS $((PEAK / 1024)) MiB; 2 rounds closed after ${DONE:-?} s; $(grep -o 'QUIC attempts: [^;]*' "$WORK/coord.out"); flood $(cat "$WORK/flood.out")"
  unset DONE
done
