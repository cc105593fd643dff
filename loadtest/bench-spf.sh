#!/usr/bin/env bash
# The SPF identity's figure of docs/BENCHMARKS.md (DESIGN §10: "SPF pools on, warm cache, vs
# off, same run ≥ 90 %"), on this machine: a private dnsmasq gives every sender domain of the
# load generator's workload an SPF record that passes for any address; one server runs with
# `--client-identity spf,name,prefix`, one without spf (`name,prefix`, the default). After a
# warm-up that fills the SPF cache (every (address, domain) pair of the workload), they are
# measured in turn, ROUNDS times, native TCP 8 × pipeline 16, the default request mix.
#
#   loadtest/bench-spf.sh [SECONDS_PER_MEASUREMENT [ROUNDS [SENDERS]]]
#
# Prints Markdown. Needs dnsmasq (Debian's dnsmasq-base). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-3}
senders=${3:-200}
[ -x /usr/sbin/dnsmasq ] || {
    echo "bench-spf.sh needs /usr/sbin/dnsmasq: apt-get install -y dnsmasq-base" >&2
    exit 1
}
cargo build --release --locked -q -p greyhound -p greyhound-loadtest
cargo build --release --locked -q -p greyhound-loadtest --example sender_domains
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

# Every sender domain passes SPF from any address (so every request gets its spf identity).
dport=$(free_port)
args=(--port "$dport" --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts
    --keep-in-foreground --local-ttl=3600)
ndomains=0
while read -r d; do
    args+=("--txt-record=$d,v=spf1 ip4:0.0.0.0/0 ip6:::/0 -all")
    ndomains=$((ndomains + 1))
done < <("$bin/examples/sender_domains" "$senders")
/usr/sbin/dnsmasq "${args[@]}" 2> "$work/dnsmasq.log" &
pids+=($!)
sleep 0.5

declare -A native metrics
start_node() { # start_node NAME [SERVE_FLAGS...]
    local name=$1
    shift
    mkdir -p "$work/$name"
    "$bin/greyhound" serve --data-dir "$work/$name" --delay 1s --native 127.0.0.1:0 \
        --policy 127.0.0.1:0 --metrics 127.0.0.1:0 "$@" 2> "$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q ' ready ' "$work/$name.log" && break; sleep 0.1; done
    native[$name]=$(grep -o 'native=[0-9.:]*' "$work/$name.log" | head -1 | cut -d= -f2)
    metrics[$name]=$(grep -o 'metrics=[0-9.:]*' "$work/$name.log" | head -1 | cut -d= -f2)
    [ -n "${native[$name]}" ] || { cat "$work/$name.log"; exit 1; }
}
metric() { curl -sf "http://${metrics[$1]}/metrics" | grep "^$2 " | cut -d' ' -f2; }
start_node on --client-identity spf,name,prefix --dns-server "127.0.0.1:$dport"
start_node off --client-identity name,prefix
run() { # run NODE [FLAGS...] → JSON of one measurement
    local node=$1
    shift
    "$bin/greyhound-loadtest" run --proto native-tcp --target "${native[$node]}" -c 8 -p 16 \
        -d "$secs" --server-delay 1 --senders "$senders" --json "$@"
}

# Warm-up: until a whole measurement's worth of requests finds every result cached.
for i in $(seq 20); do
    m0=$(metric on greyhound_spf_cache_misses_total)
    run on > /dev/null
    m1=$(metric on greyhound_spf_cache_misses_total)
    [ "$m0" = "$m1" ] && break
done
run off > /dev/null
echo "## SPF identity on (warm cache) vs off (native TCP, 8 × pipeline 16, default mix, $senders senders, $secs s each)"
echo
echo "Sender domains with an SPF record: $ndomains; SPF results cached: $(metric on greyhound_spf_cache_entries); lookups: $(metric on greyhound_spf_lookups_total)."
echo
echo "| round | spf,name,prefix | name,prefix | on / off | cache misses in round | client CPU on · off |"
echo "|---:|---:|---:|---:|---:|---|"
ons=()
offs=()
for r in $(seq "$rounds"); do
    m0=$(metric on greyhound_spf_cache_misses_total)
    if [ $((r % 2)) -eq 1 ]; then
        run on > "$work/on.json"
        run off > "$work/off.json"
    else
        run off > "$work/off.json"
        run on > "$work/on.json"
    fi
    m1=$(metric on greyhound_spf_cache_misses_total)
    read -r on off line < <(python3 - "$r" "$work/on.json" "$work/off.json" "$((${m1%.*} - ${m0%.*}))" <<'PY'
import json, sys
r, on, off, misses = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), sys.argv[4]
a, b = on["decisions_per_sec"], off["decisions_per_sec"]
sat = lambda j: " (client saturated)" if j["cpu"]["client_saturated"] else ""
print(a, b, f"| {r} | {a/1e3:,.0f} k/s | {b/1e3:,.0f} k/s | {a/b:.0%} | {misses} | {on['cpu']['client_cores']:.2f}{sat(on)} · {off['cpu']['client_cores']:.2f}{sat(off)} |")
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
print(f"| median | {statistics.median(on)/1e3:,.0f} k/s | {statistics.median(off)/1e3:,.0f} k/s | {statistics.median(on)/statistics.median(off):.0%} | | |")
# The rounds are pairs run back to back, so the median of the pairs' ratios is the steadier
# figure when the machine's speed drifts over the run; both are printed.
pairs = statistics.median(a / b for a, b in zip(on, off))
print(f"\nMedian of the rounds' own ratios (on / off of each round): {pairs:.0%}.")
PY
echo
echo "SPF results at the end: $(curl -sf "http://${metrics[on]}/metrics" | grep '^greyhound_spf_results_total' | tr '\n' ' ')"
