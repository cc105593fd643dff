#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 20) from its committed corpus
# (fuzz/corpus/<target>/), on stable Rust (`--sanitizer none`); fails on the first crash,
# whose input libFuzzer writes under fuzz/artifacts/<target>/. New inputs the runs find go to a
# temporary directory, so the committed corpora stay small. See docs/FUZZING.md.
#
#   fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo fuzz build --sanitizer none
for target in $(cargo fuzz list); do
    mkdir -p "$work/$target"
    log="$work/$target.log"
    if ! cargo fuzz run --sanitizer none "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $target FAILED (input under fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    echo "fuzz: $target ok, ${runs:-?} inputs in ${secs}s"
done
