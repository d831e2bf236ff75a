#!/usr/bin/env bash
# bench/tokenizer-memory.sh [BIN_DIR] [N]: the data plane's RSS with budgets on (docs/benchmarks.md,
# "Memory with budgets on"): idle, after a model without a tokenizer, after N requests to an
# o200k_base model, after N to a cl100k_base one, after both at once. BIN_DIR defaults to
# target/release (build it first: cargo build --release -p tollgate-dataplane --bins). Bounded:
# 200 + 4 N requests over 4 connections, each run cut at 120 s; 127.0.0.1 only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
BIN="${1:-$ROOT/target/release}"; N="${2:-3000}"; LOAD="$ROOT/bench/tokenizer_load.py"
export BENCH_KEY
bench_tmp tokenizer-memory
"$BIN/tollgate-mock" --listen 127.0.0.1:0 --threads 1 --prompt-tokens 12 --completion-tokens 25 >"$TMP/mock.log" 2>&1 & PIDS+=($!)
MP="$(wait_port "$TMP/mock.log" "${PIDS[-1]}")"
far="{rpm: 1000000000, tpm: 1000000000000, maxParallel: 100000}"
{ for m in plain:llama-3 o200k:gpt-4o cl100k:gpt-4; do cat <<E
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: ${m%%:*}}
spec:
  modelName: ${m%%:*}
  provider: openai-compatible
  url: http://127.0.0.1:$MP/v1
  upstreamModel: ${m#*:}
  pricing: {inputPerMillion: 2.5, outputPerMillion: 10}
  limits: $far
---
E
done; cat <<E
apiVersion: v1
kind: Secret
metadata: {name: bench-key}
stringData: {key: $BENCH_KEY}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {name: bench}
spec:
  secretRef: {name: bench-key}
  limits: $far
  budget: {maxUsd: 1000000, duration: monthly}
E
} >"$TMP/m.yaml"
"$BIN/tollgate-dataplane" --manifests "$TMP/m.yaml" --listen 127.0.0.1:0 --worker-threads 2 >"$TMP/gw.log" 2>&1 & GW=$!; PIDS+=($GW)
GP="$(wait_port "$TMP/gw.log" "$GW")"
rss() { awk '/^VmRSS:|^RssAnon:|^RssFile:|^VmHWM:/ {printf "%s %.1f  ", $1, $2/1024}' /proc/$GW/status; echo; }
sleep 1; echo "idle:          $(rss)"
python3 "$LOAD" $GP plain 200 4; sleep 0.5; echo "after plain:   $(rss)"
python3 "$LOAD" $GP o200k $N 4; sleep 0.5; echo "after o200k:   $(rss)"
python3 "$LOAD" $GP cl100k $N 4; sleep 0.5; echo "after cl100k:  $(rss)"
python3 "$LOAD" $GP o200k $N 4 & L=$!; python3 "$LOAD" $GP cl100k $N 4 stream; wait $L; sleep 0.5; echo "after mixed:   $(rss)"
sleep 3; echo "3 s later:     $(rss)"
grep -i "error\|warn" "$TMP/gw.log" | head -3 || true
