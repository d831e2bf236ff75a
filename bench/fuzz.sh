#!/usr/bin/env bash
# Runs the cargo-fuzz targets under fuzz/ (see docs/fuzzing.md) one after the other, each for a
# fixed number of executions, and prints executions and crashes per target. Not run in CI: 10
# million executions of each take hours on 2 cores.
#
# Each target starts from its seed corpus in fuzz/corpus/TARGET (read, never written: the
# inputs libFuzzer finds go to a scratch folder, kept with --keep-corpus). A crash leaves its
# input in fuzz/artifacts/TARGET/; replay it with `cargo fuzz run -s none TARGET FILE`.
#
# Usage: bench/fuzz.sh [--runs N] [--max-time SECONDS] [--keep-corpus DIR] [TARGET...]
#   --runs N            executions per target (default 10000000)
#   --max-time S        also stop each target after S seconds (default: no limit)
#   --keep-corpus DIR   keep the inputs found, in DIR/TARGET
#   TARGET...           some of: json_request usage_response sse_relay h1_response tokens_count
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Only a stable toolchain? It runs with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only flags) and without a sanitizer (-s none):
# the targets are safe Rust, so the checks that matter (panics, overflow, debug assertions)
# are on regardless.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=10000000
MAX_TIME=0
KEEP=""
TARGETS=()
ALL=(json_request usage_response sse_relay h1_response tokens_count)

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --max-time) MAX_TIME="$2"; shift 2 ;;
        --keep-corpus) KEEP="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
cd "$ROOT"
# Build every target once, up front (one cargo build).
cargo fuzz build -s none

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
declare -A EXECS STATUS
for t in "${TARGETS[@]}"; do
    work="${KEEP:+$KEEP/$t}"
    work="${work:-$SCRATCH/$t}"
    mkdir -p "$work" "fuzz/artifacts/$t"
    log="$SCRATCH/$t.log"
    echo "== $t: $RUNS runs" >&2
    set +e
    # One process (no -jobs/-workers): the other core stays free.
    cargo fuzz run -s none "$t" "$work" "fuzz/corpus/$t" -- \
        -runs="$RUNS" -max_total_time="$MAX_TIME" -timeout=30 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    EXECS[$t]="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    if [[ $rc -eq 0 ]]; then
        STATUS[$t]="0 crashes"
    else
        STATUS[$t]="FAILED (exit $rc): $(grep -m1 -o 'Test unit written to .*' "$log" || echo "see $log")"
        cp "$log" "fuzz/artifacts/$t/last-run.log"
    fi
    echo "   ${EXECS[$t]:-?} executions, ${STATUS[$t]}" >&2
done

printf '\n%-18s %14s  %s\n' target executions result
for t in "${TARGETS[@]}"; do
    printf '%-18s %14s  %s\n' "$t" "${EXECS[$t]:-?}" "${STATUS[$t]}"
done
for t in "${TARGETS[@]}"; do
    [[ "${STATUS[$t]}" == "0 crashes" ]] || exit 1
done
