# Shared by bench/instructions.sh and bench/perfdiff.sh (sourced, not run): the benchmark's
# manifests and waiting for a process's port. bench/run.sh writes its own, with the variants
# (limits, routing) only it needs.

BENCH_KEY="sk-bench-0123456789abcdef"
BENCH_BODY='{"model":"bench","messages":[{"role":"user","content":"hello"}]}'

# write_bench_manifests FILE MOCK_PORT [UPSTREAM_MODEL]: one model "bench" on the mock, with
# pricing, and one virtual key ($BENCH_KEY) without limits.
write_bench_manifests() {
    cat >"$1" <<EOF2
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: bench}
spec:
  modelName: bench
  provider: openai-compatible
  url: http://127.0.0.1:$2/v1
  pricing: {inputPerMillion: 2.5, outputPerMillion: 10}
${3:+  upstreamModel: $3}
---
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
EOF2
}

# bench_tmp NAME: a new temporary folder in TMP; on exit every pid in PIDS is stopped and the
# folder removed.
PIDS=()
bench_tmp() {
    TMP="$(mktemp -d -t "tollgate-$1.XXXXXX")"
    trap bench_cleanup EXIT
}
bench_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}

# wait_port LOG PID: the port from the process's "listening on 127.0.0.1:PORT" line.
wait_port() {
    local i port
    for ((i = 0; i < 600; i++)); do
        port="$(grep -o 'listening on 127\.0\.0\.1:[0-9]*' "$1" 2>/dev/null | head -n1 | cut -d: -f2 || true)"
        [[ -n "$port" ]] && { echo "$port"; return 0; }
        kill -0 "$2" 2>/dev/null || { cat "$1" >&2; echo "a process exited during startup" >&2; exit 1; }
        sleep 0.1
    done
    echo "no 'listening on' in $1 within 60 s" >&2
    exit 1
}
