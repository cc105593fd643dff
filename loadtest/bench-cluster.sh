#!/usr/bin/env bash
# The cluster figures of docs/BENCHMARKS.md, in one run on this machine: a real redis-server
# and `greyhound serve` nodes (release build, loopback, data directories of their own).
#
#   loadtest/bench-cluster.sh [SECONDS_PER_MEASUREMENT [ROUNDS [NEW_PER_SEC]]]
#
# 1. on vs off: node A of a two-node cluster (A, B) against a single node S with the same
#    settings, ROUNDS times (which goes first alternates), native TCP 8 × pipeline 16, the
#    default request mix;
# 2. lag: a fresh two-node cluster; NEW_PER_SEC (default 100000) new triplets per second into
#    one node, the other's replication lag p50/p99 (GET /status, every batch since start);
# 3. apply rate: a third node joins that cluster afterwards and reads both streams from the
#    start; records applied per second until it is caught up;
# 4. Redis memory per retained record: used_memory growth over the records published.
# Prints Markdown. Needs redis-server (Debian's package). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-3}
new_rate=${3:-100000}
cargo build --release --locked -q -p greyhound -p greyhound-loadtest
bin=$PWD/target/release
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
    > "$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$rport" ping > /dev/null 2>&1 && break; sleep 0.1; done
redis_mem() { redis-cli -p "$rport" info memory | tr -d '\r' | grep '^used_memory:' | cut -d: -f2; }
mem0=$(redis_mem)

declare -A native metrics
# start_node NAME [SERVE_FLAGS...]: starts a node, waits for `ready`, records its ports.
start_node() {
    local name=$1
    shift
    mkdir -p "$work/$name"
    if [ -f "$work/hash.key" ]; then cp "$work/hash.key" "$work/$name/hash.key"; fi
    "$bin/greyhound" serve --data-dir "$work/$name" --delay 1s --native 127.0.0.1:0 \
        --policy 127.0.0.1:0 --metrics 127.0.0.1:0 "$@" 2> "$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q ' ready ' "$work/$name.log" && break; sleep 0.1; done
    native[$name]=$(grep -o 'native=[0-9.:]*' "$work/$name.log" | head -1 | cut -d= -f2)
    metrics[$name]=$(grep -o 'metrics=[0-9.:]*' "$work/$name.log" | head -1 | cut -d= -f2)
    [ -n "${native[$name]}" ] || { cat "$work/$name.log"; exit 1; }
    [ -f "$work/hash.key" ] || cp "$work/$name/hash.key" "$work/hash.key"
}
status() { curl -sf "http://${metrics[$1]}/status"; }
cluster() { echo --cluster-redis "redis://127.0.0.1:$rport" --cluster-name "$1" --node-id "$2"; }

# shellcheck disable=SC2046
start_node a $(cluster onoff a)
# shellcheck disable=SC2046
start_node b $(cluster onoff b)
start_node s
run() { # run NODE [FLAGS...] → JSON of one measurement
    local node=$1
    shift
    "$bin/greyhound-loadtest" run --proto native-tcp --target "${native[$node]}" -c 8 -p 16 \
        -d "$secs" --server-delay 1 --json "$@"
}
echo "## On vs off (native TCP, 8 × pipeline 16, default mix, $secs s each)"
echo
echo "| round | replication on (node A) | off (single node) | on / off | client CPU on · off |"
echo "|---:|---:|---:|---:|---|"
ons=()
offs=()
for r in $(seq "$rounds"); do
    # Alternating which goes first, so a drift over the run (the tables grow, the known pool
    # gets whitelisted) weighs on both sides alike.
    if [ $((r % 2)) -eq 1 ]; then
        run a > "$work/on.json"
        run s > "$work/off.json"
    else
        run s > "$work/off.json"
        run a > "$work/on.json"
    fi
    read -r on off line < <(python3 - "$r" "$work/on.json" "$work/off.json" <<'PY'
import json, sys
r, on, off = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
a, b = on["decisions_per_sec"], off["decisions_per_sec"]
sat = lambda j: " (client saturated)" if j["cpu"]["client_saturated"] else ""
print(a, b, f"| {r} | {a/1e3:,.0f} k/s | {b/1e3:,.0f} k/s | {a/b:.0%} | {on['cpu']['client_cores']:.2f}{sat(on)} · {off['cpu']['client_cores']:.2f}{sat(off)} |")
PY
)
    echo "$line"
    ons+=("$on")
    offs+=("$off")
done
python3 - "${ons[*]}" "${offs[*]}" <<'PY'
import statistics, sys
on = [float(x) for x in sys.argv[1].split()]
off = [float(x) for x in sys.argv[2].split()]
print(f"| median | {statistics.median(on)/1e3:,.0f} k/s | {statistics.median(off)/1e3:,.0f} k/s | {statistics.median(on)/statistics.median(off):.0%} | |")
PY
echo
status b | python3 -c 'import json,sys; s=json.load(sys.stdin); print("Node B applied", s["cluster"]["peers"][0]["applied_records"], "records from A; digests A/B equal:", end=" ")'
[ "$(status a | python3 -c 'import json,sys; print(json.load(sys.stdin)["table"]["digest"])')" = \
  "$(status b | python3 -c 'import json,sys; print(json.load(sys.stdin)["table"]["digest"])')" ] \
    && echo yes || echo "no (still applying?)"
echo

echo "## Lag under $new_rate new triplets/s ($secs s)"
echo
# shellcheck disable=SC2046
start_node l1 $(cluster lag l1)
# shellcheck disable=SC2046
start_node l2 $(cluster lag l2)
sleep 1
run l1 --new 1 --early-retry 0 --retry 0 --known 0 --rate "$new_rate" > "$work/lag.json"
sleep 1
python3 - "$work/lag.json" <(status l2) "$new_rate" <<'PY'
import json, sys
run, st = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
lag = st["cluster"]["lag"]
peer = st["cluster"]["peers"][0]
print(f"- sent {run['decisions_per_sec']/1e3:,.0f} k new triplets/s to node l1 (asked {int(sys.argv[3])/1e3:,.0f} k/s, client {run['cpu']['client_cores']:.2f} cores); node l2 applied {peer['applied_records']:,} records in {lag['batches']:,} batches")
print(f"- replication lag at l2: p50 {lag['p50_seconds']*1e3:.0f} ms, p99 {lag['p99_seconds']*1e3:.0f} ms, max {lag['max_seconds']*1e3:.0f} ms")
PY
echo

echo "## Apply rate: a node joining later reads both streams from the start"
echo
published=$(status l1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster"]["published_records"])')
t0=$(date +%s.%N)
# shellcheck disable=SC2046
start_node l3 $(cluster lag l3)
for _ in $(seq 600); do
    done=$(status l3 | python3 -c '
import json, sys
s = json.load(sys.stdin)["cluster"]
peers = {p["node"]: p for p in s["peers"]}
l1 = peers.get("l1", {})
print(1 if l1.get("caught_up") and l1.get("applied_records", 0) > 0 else 0, l1.get("applied_records", 0))')
    [ "${done%% *}" = 1 ] && break
    sleep 0.1
done
t1=$(date +%s.%N)
applied=${done#* }
python3 -c "a=$applied; t=$t1-$t0; print(f'- node l3 applied {a:,} records of l1 (which published {$published:,}) in {t:.2f} s from its start (process start and snapshot-less load included): {a/t/1e3:,.0f} k records/s')"
echo

echo "## Redis memory per retained record"
echo
total=0
for n in a b l1 l2 l3; do
    p=$(status "$n" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster"]["published_records"])')
    total=$((total + p))
done
mem1=$(redis_mem)
python3 -c "d=$mem1-$mem0; n=$total; print(f'- used_memory grew by {d/1e6:,.1f} MB for {n:,} records in the streams: {d/max(n,1):.1f} bytes per record')"
