# Shared by bench/run.sh, instructions.sh, perfdiff.sh and tokenizer-memory.sh (sourced): the
# benchmark's key, body and manifests; instructions.sh and perfdiff.sh also use the temporary
# folder and port helpers (run.sh has its own, which also stop nginx and redis).

BENCH_KEY="sk-bench-0123456789abcdef"
BENCH_BODY='{"model":"bench","messages":[{"role":"user","content":"hello"}]}'

# write_bench_manifests FILE MOCK_PORT [OPTION...]: the model "bench" on the mock, with pricing,
# and one virtual key ($BENCH_KEY) without limits. Options:
#   --limits            deployment limits, and key limits and a budget, all far above anything
#                       the load reaches: they cost but never refuse
#   --deployments N     "bench" served by N LLMModels bench-1 ... bench-N, all on the mock
#   --strategy S        a RoutePolicy that routes them with strategy S
#   --upstream-model M  the LLMModels' upstreamModel (e.g. gpt-4o, whose prompts are counted
#                       with a BPE tokenizer when a limit needs it)
write_bench_manifests() {
    local file="$1" port="$2" limits=0 n=1 strategy="" upstream="" i name=bench
    shift 2
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --limits) limits=1; shift ;;
            --deployments) n="$2"; shift 2 ;;
            --strategy) strategy="$2"; shift 2 ;;
            --upstream-model) upstream="$2"; shift 2 ;;
            *) echo "write_bench_manifests: unknown option $1" >&2; return 1 ;;
        esac
    done
    local far="{rpm: 1000000000, tpm: 1000000000000, maxParallel: 100000}"
    {
        for ((i = 1; i <= n; i++)); do
            if [[ $n -gt 1 ]]; then name="bench-$i"; fi
            if [[ $i -gt 1 ]]; then echo "---"; fi
            cat <<EOF2
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: $name}
spec:
  modelName: bench
  provider: openai-compatible
  url: http://127.0.0.1:$port/v1
  pricing: {inputPerMillion: 2.5, outputPerMillion: 10}
EOF2
            if [[ -n "$upstream" ]]; then echo "  upstreamModel: $upstream"; fi
            if [[ $limits -eq 1 ]]; then echo "  limits: $far"; fi
        done
        cat <<EOF2
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
        if [[ $limits -eq 1 ]]; then
            echo "  limits: $far"
            echo "  budget: {maxUsd: 1000000, duration: monthly}"
        fi
        if [[ -n "$strategy" ]]; then
            cat <<EOF2
---
apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: {name: bench}
spec: {models: [bench], strategy: $strategy}
EOF2
        fi
    } >"$file"
}

# write_nginx_conf DIR PORT MOCK_PORT WORKERS [CONNECTIONS]: DIR/nginx.conf for nginx as the
# benchmarks' plain keep-alive reverse proxy to the mock (its temp files and pid in DIR), with
# room for CONNECTIONS client connections per worker (default 4096).
write_nginx_conf() {
    local dir="$1" port="$2" mock_port="$3" workers="$4" conns="${5:-4096}"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes $workers;
worker_rlimit_nofile $((conns * 2 + 256));
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections $conns;
}
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    tcp_nodelay on;
    upstream mock {
        server 127.0.0.1:$mock_port;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
}

# start_mock_and_tollgate: in TMP, the mock upstream (one thread) and the data plane (two worker
# threads) on the benchmark's manifests, from BIN_DIR; sets MOCK_PORT, GW_PID and GW_PORT.
start_mock_and_tollgate() {
    "$BIN_DIR/tollgate-mock" --listen 127.0.0.1:0 --threads 1 >"$TMP/mock.log" 2>&1 &
    PIDS+=($!)
    MOCK_PORT="$(wait_port "$TMP/mock.log" "${PIDS[-1]}")"
    write_bench_manifests "$TMP/manifests.yaml" "$MOCK_PORT"
    "$BIN_DIR/tollgate-dataplane" --manifests "$TMP/manifests.yaml" --listen 127.0.0.1:0 \
        --worker-threads 2 >"$TMP/tollgate.log" 2>&1 &
    PIDS+=($!)
    GW_PID=$!
    GW_PORT="$(wait_port "$TMP/tollgate.log" "$GW_PID")"
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
