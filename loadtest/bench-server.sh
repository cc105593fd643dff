#!/usr/bin/env bash
# The server figures of docs/BENCHMARKS.md, side by side in one run: for each transport,
# `greyhound-loadtest ceiling` measures the minimal client and the full client against a null
# responder, the full client against a naive server (each in a process of its own), then against
# a real `greyhound serve` started here (release build, loopback, its own data directory).
#
#   loadtest/bench-server.sh [SECONDS_PER_MEASUREMENT [SERVE_FLAGS...]]
#
# SECONDS_PER_MEASUREMENT defaults to 5; SERVE_FLAGS go to `greyhound serve` (e.g. --workers 2).
# Prints a Markdown table.
#
# Run it on a quiet machine: every other process takes CPU from the client or the server.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
shift $(( $# > 0 ? 1 : 0 ))
cargo build --release --locked -q -p greyhound -p greyhound-loadtest
bin=target/release
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/greyhound" serve --data-dir "$work/data" --delay 1s --native 127.0.0.1:0 \
    --policy 127.0.0.1:0 --metrics 127.0.0.1:0 "$@" 2> "$work/log" &
pid=$!
for _ in $(seq 100); do grep -q ' ready ' "$work/log" && break; sleep 0.1; done
native=$(grep -o 'native=[0-9.:]*' "$work/log" | head -1 | cut -d= -f2)
policy=$(grep -o 'policy=[0-9.:]*' "$work/log" | head -1 | cut -d= -f2)
[ -n "$native" ] && [ -n "$policy" ] || { cat "$work/log"; exit 1; }

scenarios=(
    "policy, 8 connections|--proto policy --target $policy -c 8"
    "policy, 64 connections|--proto policy --target $policy -c 64"
    "native TCP, 8 × pipeline 128|--proto native-tcp --target $native -c 8 -p 128"
    "native TCP, 8 × pipeline 16|--proto native-tcp --target $native -c 8 -p 16"
    "native UDP, 1 per datagram, 64 in flight|--proto native-udp --target $native -c 4 -p 16"
    "native UDP, 8 per datagram|--proto native-udp --target $native -c 4 -p 16 --per-datagram 8"
)
echo "| transport | minimal client → null | null | naive | greyhound | greyhound / null | greyhound / naive | client / minimal | CPU client · server (greyhound run) | warnings |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
for s in "${scenarios[@]}"; do
    name=${s%%|*}
    # shellcheck disable=SC2086
    "$bin/greyhound-loadtest" ceiling ${s#*|} -d "$secs" --server-delay 1 --json > "$work/out.json"
    python3 - "$name" "$work/out.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
rate = lambda k: r[k]["decisions_per_sec"] if r.get(k) else float("nan")
m, n, v, t = rate("minimal"), rate("null"), rate("naive"), rate("target")
k = lambda x: f"{x/1000:,.0f} k/s" if x < 1e6 else f"{x/1e6:.2f} M/s"
cpu = r["target"]["cpu"]
warn = []
for side in ("minimal", "null", "naive", "target"):
    c = r[side]["cpu"]
    if c.get("client_saturated"):
        warn.append(f"{side}: client saturated")
print(f"| {name} | {k(m)} | {k(n)} | {k(v)} | {k(t)} | **{t/n:.0%}** | **{t/v:.0%}** | {n/m:.0%} "
      f"| {cpu['client_cores']:.2f} · {cpu.get('server_cores') or 0:.2f} cores, {cpu['machine_idle']:.0%} idle | {'; '.join(warn) or '—'} |")
PY
done
