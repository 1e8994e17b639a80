# Sourced by the coordinator benchmarks (bench/handshake_flood.sh, bench/upload_memory.sh):
# builds `fedtune` and the example EXAMPLE in release mode and sets
#   BIN (fedtune), PROBE (the example), MODEL (the tiny test model), WORK (a temporary
#   directory, removed on exit unless KEEP is set), KEY (the coordinator_key line of a new
#   federation FEDERATION's CA under $WORK/ca), ENTRIES ([[clients]] entries of the clients
#   named in CLIENTS, issued by that CA) and PORT (a free UDP port on loopback).
cargo build --release -q --bin fedtune --example "$EXAMPLE"
BIN=$PWD/target/release/fedtune
PROBE=$PWD/target/release/examples/$EXAMPLE
MODEL=$PWD/testdata/tiny-llama/model
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
echo "work dir $WORK" >&2
KEY=$("$BIN" ca init --dir "$WORK/ca" --federation "$FEDERATION")
ENTRIES=""
for n in $CLIENTS; do ENTRIES+="$("$BIN" ca issue --dir "$WORK/ca" --client "$n")"$'\n'; done
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
