#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: deterministic where the
# load benchmark (bench/run.sh) is noisy, so it can tell a 2 % change in the gateway's own work
# from the machine's drift. Not a speed measurement (no kernel time, no cache effects, and
# valgrind hides SHA-NI, so the key's SHA-256 counts its software fallback).
#
# Starts the mock upstream and one target under callgrind (one worker thread), sends 400
# warm-up requests, zeroes the counters, sends N requests (4 keep-alive connections, each
# answer checked for 200), dumps, and prints the instructions per request. Targets:
#   tollgate   the data plane on the benchmark's manifests (one model, one key, pricing)
#   floor      dataplane/examples/bare_proxy.rs: hyper's server and h1, doing nothing else:
#              the data plane's HTTP stack alone
#
# Usage: bench/instructions.sh [--target tollgate|floor] [--requests N] [--upstream-model M]
#                              [--bin-dir DIR] [--out FILE] [--no-build]
#   --upstream-model M   set the LLMModel's upstreamModel (e.g. gpt-4o, whose prompts are
#                        counted with a BPE tokenizer when a limit needs it)
#   --out FILE           keep the callgrind profile (callgrind_annotate --inclusive=yes FILE)
# Needs valgrind (apt-get install valgrind when missing), python3, cargo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=tollgate
N=2000
UPSTREAM_MODEL=""
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
OUT=""
BUILD=1
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
KEY="$BENCH_KEY"

die() { echo "instructions.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) TARGET="$2"; shift 2 ;;
        --requests) N="$2"; shift 2 ;;
        --upstream-model) UPSTREAM_MODEL="$2"; shift 2 ;;
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $TARGET == tollgate || $TARGET == floor ]] ||
    die "--target is tollgate or floor"
if ! command -v valgrind >/dev/null; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind >/dev/null
fi
if [[ $BUILD -eq 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p tollgate-dataplane --bins --example bare_proxy) || die "cargo build failed"
fi

bench_tmp instr

"$BIN_DIR/tollgate-mock" --listen 127.0.0.1:0 --threads 1 --chunks 20 \
    --prompt-tokens 12 --completion-tokens 25 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT="$(wait_port "$TMP/mock.log" "${PIDS[-1]}")"

write_bench_manifests "$TMP/manifests.yaml" "$MOCK_PORT" ${UPSTREAM_MODEL:+--upstream-model "$UPSTREAM_MODEL"}

PROFILE="$TMP/callgrind.out"
case "$TARGET" in
    tollgate) CMD=("$BIN_DIR/tollgate-dataplane" --manifests "$TMP/manifests.yaml" --listen 127.0.0.1:0 --worker-threads 1) ;;
    floor) CMD=("$BIN_DIR/examples/bare_proxy" 127.0.0.1:0 "127.0.0.1:$MOCK_PORT" 1) ;;
esac
valgrind --tool=callgrind --callgrind-out-file="$PROFILE" "${CMD[@]}" >"$TMP/target.log" 2>&1 &
TARGET_PID=$!
PIDS+=("$TARGET_PID")
PORT="$(wait_port "$TMP/target.log" "$TARGET_PID")"

load() { # requests
    python3 - "$PORT" "$1" "$KEY" <<'PY'
import http.client, sys, threading
port, n, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
body = '{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
hdr = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
bad = []
def run(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(k):
        c.request("POST", "/v1/chat/completions", body, hdr)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            bad.append(r.status)
threads = [threading.Thread(target=run, args=(n // 4,)) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
if bad:
    sys.exit(f"non-200 answers: {bad[:5]}")
PY
}

load 400
callgrind_control -z "$TARGET_PID" >/dev/null 2>&1
load "$N"
callgrind_control -d "$TARGET_PID" >/dev/null 2>&1
DUMP="$PROFILE.1"
for ((i = 0; i < 100; i++)); do [[ -s "$DUMP" ]] && break; sleep 0.1; done
[[ -s "$DUMP" ]] || die "callgrind wrote no dump"
sleep 0.5
TOTAL="$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')"
[[ -n "$TOTAL" ]] || die "could not read the dump's totals"
echo "$TARGET${UPSTREAM_MODEL:+ (upstreamModel $UPSTREAM_MODEL)}: $((TOTAL / N)) instructions per request ($TOTAL over $N requests)"
[[ -n "$OUT" ]] && cp "$DUMP" "$OUT"
exit 0
