#!/usr/bin/env bash
# Tollgate benchmark harness.
#
# Starts the mock upstream (tollgate-mock, one tokio thread), the Tollgate data plane and nginx
# (a plain keep-alive reverse proxy) as separate processes on 127.0.0.1, drives the same load at
# each of (a) the upstream directly, (b) Tollgate, (c) nginx with wrk, and prints requests/s,
# p50/p99 latency, the ratios between them and the idle RSS of both proxies. With --limits it
# also starts a second, identical Tollgate whose key and model carry rate limits and a budget
# that never refuse, measures it as a fourth target (tollgate+limits) and reports its cost. With
# --redis it also starts a redis-server and a third Tollgate, tollgate+limits plus --redis-url, as
# a fifth target (tollgate+redis), and reports the cost of limits and budgets kept in Redis.
# With --routing it also starts three more Tollgates whose model group has 8 deployments instead
# of 1 (all on the same mock), one per routing strategy, measures each as a target
# (tollgate+8, tollgate+8-least-busy, tollgate+8-latency) and reports the cost of picking among
# 8 routes on every request.
#
# Usage: bench/run.sh [options]
#   --markdown FILE        also write the results as markdown tables to FILE
#   --duration SECS        length of each measured load run (default 5)
#   --warmup SECS          unmeasured run before each measured one (default 1)
#   --rounds N             measure every (scenario, target) N times, report the median (default 2)
#   --gateway-threads N    Tollgate worker threads (default 2)
#   --nginx-workers N      nginx worker processes (default 2)
#   --chunks N             content chunks per streamed response (default 20)
#   --limits               add the target tollgate+limits: a second Tollgate (same flags) whose
#                          key has rpm/tpm/maxParallel limits and a budget, and whose model has
#                          rpm/tpm/maxParallel limits, all too high to refuse; reports
#                          tollgate+limits / tollgate per scenario and the added p50 at c=1
#   --redis                implies --limits; starts redis-server on a free 127.0.0.1 port (no
#                          persistence) and adds the target tollgate+redis: a third Tollgate like
#                          tollgate+limits plus --redis-url, so every request runs a reserve and a
#                          settle script in Redis; reports tollgate+redis / tollgate next to
#                          tollgate+limits / tollgate, and redis-server's CPU time per request
#   --routing              add three targets, each a Tollgate (same flags) whose model "bench" is
#                          8 LLMModels on the same mock: tollgate+8 (no RoutePolicy: the default
#                          simple-shuffle, weighted random), tollgate+8-least-busy and
#                          tollgate+8-latency (a RoutePolicy with strategy least-busy or
#                          latency-based); reports tollgate+8* / tollgate per scenario and the
#                          added p50 at c=1
#   --bare                 add the target hyper-floor: dataplane/examples/bare_proxy.rs, a
#                          pass-through proxy on the same HTTP stack as Tollgate (hyper's server,
#                          the data plane's h1 upstream client, per-thread runtimes and pool,
#                          same threads) doing nothing else; reports what Tollgate's own work
#                          costs on top of it
#   --busy-poll DUR        add the target tollgate+busy-poll: a second Tollgate (same flags) with
#                          --busy-poll DUR (its threads poll their sockets for DUR after their
#                          last work before sleeping); reports tollgate+busy-poll / tollgate per
#                          scenario, its CPU, and its added p50 at c=1 over direct
#   --ab DIR               add the target tollgate-b: the tollgate-dataplane binary in DIR (another
#                          build, e.g. a branch's target/release), same flags and manifests, measured
#                          back to back with tollgate in the same rounds; reports tollgate-b /
#                          tollgate per scenario, CPU and added p50 at c=1: a same-run A/B
#   --pin                  pin wrk + mock to CPU 0 and the proxy under test to CPU 1
#                          (use with --gateway-threads 1 --nginx-workers 1)
#   --perf DIR             afterwards, profile Tollgate with `perf record` under load and count
#                          syscalls per request of Tollgate and nginx; reports go to DIR
#   --no-build             use the binaries already in target/release
#   --bin-dir DIR          where tollgate-dataplane and tollgate-mock are (default target/release)
#   -h, --help
#
# Needs wrk and nginx (installed with apt-get when missing), curl and cargo; --redis also needs
# redis-server and redis-cli (apt-get install redis-server when missing). The load takes
# 3 * targets * rounds * (duration + warmup) seconds: 3 targets (108 s by default), 1 more with
# --limits (144 s), 2 more with --redis (180 s), 3 more with --routing (216 s; 288 s with
# --redis --routing), plus startup, the build and --perf.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION=5
WARMUP=1
ROUNDS=2
GW_THREADS=2
NGINX_WORKERS=2
CHUNKS=20
LIMITS=0
REDIS=0
ROUTING=0
BARE=0
BUSY_POLL="" # --busy-poll's duration
AB_DIR="" # --ab's directory
ROUTES=8 # deployments in the group of the --routing targets
PIN=0
PERF_DIR=""
BUILD=1
MARKDOWN=""
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
KEY="$BENCH_KEY"
BODY="$BENCH_BODY"
STREAM_BODY='{"model":"bench","messages":[{"role":"user","content":"hello"}],"stream":true}'

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[bench] $*" >&2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --markdown) MARKDOWN="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --gateway-threads) GW_THREADS="$2"; shift 2 ;;
        --nginx-workers) NGINX_WORKERS="$2"; shift 2 ;;
        --chunks) CHUNKS="$2"; shift 2 ;;
        --pin) PIN=1; shift ;;
        --limits) LIMITS=1; shift ;;
        --redis) REDIS=1; LIMITS=1; shift ;;
        --routing) ROUTING=1; shift ;;
        --bare) BARE=1; shift ;;
        --busy-poll) BUSY_POLL="$2"; shift 2 ;;
        --ab) AB_DIR="$2"; shift 2 ;;
        --perf) PERF_DIR="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ -n "$MARKDOWN" && "$MARKDOWN" != /* ]] && MARKDOWN="$PWD/$MARKDOWN"
[[ -n "$PERF_DIR" && "$PERF_DIR" != /* ]] && PERF_DIR="$PWD/$PERF_DIR"

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
APT_UPDATED=0
apt_install() {
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    if [[ $APT_UPDATED -eq 0 ]]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}
command -v wrk >/dev/null || apt_install wrk
command -v nginx >/dev/null || apt_install nginx-light || apt_install nginx
command -v curl >/dev/null || apt_install curl
if [[ $REDIS -eq 1 ]] && ! { command -v redis-server && command -v redis-cli; } >/dev/null; then
    apt_install redis-server
fi
if [[ -n "$PERF_DIR" ]] && ! command -v perf >/dev/null; then
    apt_install linux-perf || log "linux-perf not installable; skipping the profile"
fi
command -v wrk >/dev/null && command -v nginx >/dev/null || die "wrk and nginx are needed"
if [[ $REDIS -eq 1 ]]; then
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || die "--redis needs redis-server and redis-cli"
fi

PIN_LOAD=()
PIN_PROXY=()
if [[ $PIN -eq 1 ]]; then
    [[ $(nproc) -ge 2 ]] || die "--pin needs 2 CPUs"
    PIN_LOAD=(taskset -c 0)
    PIN_PROXY=(taskset -c 1)
fi

if [[ $BUILD -eq 1 ]]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p tollgate-dataplane) || die "cargo build failed"
    if [[ $BARE -eq 1 ]]; then
        (cd "$ROOT" && cargo build --release -q -p tollgate-dataplane --example bare_proxy) || die "cargo build failed"
    fi
fi
BARE_BIN="$BIN_DIR/examples/bare_proxy"
[[ $BARE -eq 0 || -x "$BARE_BIN" ]] || die "no $BARE_BIN (cargo build --release -p tollgate-dataplane --example bare_proxy)"
GATEWAY="$BIN_DIR/tollgate-dataplane"
MOCK="$BIN_DIR/tollgate-mock"
[[ -x "$GATEWAY" && -x "$MOCK" ]] || die "no binaries in $BIN_DIR (build with cargo build --release -p tollgate-dataplane)"

# ---------------------------------------------------------------------------------------------
# Processes (everything started here is stopped on exit)
# ---------------------------------------------------------------------------------------------
TMP="$(mktemp -d -t tollgate-bench.XXXXXX)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for "listening on 127.0.0.1:PORT" in a log and prints the port.
wait_listening() {
    local name="$1" file="$2" pid="$3" i port
    for ((i = 0; i < 300; i++)); do
        port="$(grep -o 'listening on 127\.0\.0\.1:[0-9]*' "$file" 2>/dev/null | head -n1 | cut -d: -f2 || true)"
        if [[ -n "$port" ]]; then
            echo "$port"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$file" >&2; die "$name exited during startup"; }
        sleep 0.1
    done
    cat "$file" >&2
    die "$name did not start within 30 s"
}

# A port nothing listens on, for servers that need one named (nginx, redis-server). Taken below
# the kernel's ephemeral range, which every port-0 listener and outgoing connection (the tests',
# when they run alongside) draws from, so it can't be taken between this check and the bind.
free_port() {
    local p i low
    low="$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
    ((low > 12000)) || low=32768
    for ((i = 0; i < 100; i++)); do
        p=$((10000 + RANDOM % (low - 10000)))
        if [[ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]]; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

cpu_ticks() { # pids... -> their utime + stime, in clock ticks
    local sum=0 p
    for p in "$@"; do
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$sum"
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
children() { ps -o pid= --ppid "$1" | tr -d ' '; }

# The upstream: one tokio thread, a fixed reply, 20 content chunks per stream.
"${PIN_LOAD[@]}" "$MOCK" --listen 127.0.0.1:0 --threads 1 --chunks "$CHUNKS" \
    --prompt-tokens 12 --completion-tokens 25 >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
MOCK_PORT="$(wait_listening tollgate-mock "$TMP/mock.log" "$MOCK_PID")"

# Tollgate: one model on the mock, one virtual key; auth and cost accounting are on (the
# manifests are bench/lib.sh's write_bench_manifests).
write_bench_manifests "$TMP/manifests.yaml" "$MOCK_PORT"
"${PIN_PROXY[@]}" "$GATEWAY" --manifests "$TMP/manifests.yaml" --listen 127.0.0.1:0 \
    --worker-threads "$GW_THREADS" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
GW_PORT="$(wait_listening tollgate-dataplane "$TMP/gateway.log" "$GW_PID")"

# With --limits: the same data plane, same flags, on the limited manifests.
if [[ $LIMITS -eq 1 ]]; then
    write_bench_manifests "$TMP/manifests-limits.yaml" "$MOCK_PORT" --limits
    "${PIN_PROXY[@]}" "$GATEWAY" --manifests "$TMP/manifests-limits.yaml" --listen 127.0.0.1:0 \
        --worker-threads "$GW_THREADS" >"$TMP/gateway-limits.log" 2>&1 &
    GWL_PID=$!
    PIDS+=("$GWL_PID")
    GWL_PORT="$(wait_listening tollgate-dataplane "$TMP/gateway-limits.log" "$GWL_PID")"
fi

# With --redis: a redis-server without persistence (next to the mock when pinned: it is a
# service the proxy calls, like the upstream), and a third data plane, the same as
# tollgate+limits plus --redis-url, so its counters live in Redis.
if [[ $REDIS -eq 1 ]]; then
    REDIS_PORT="$(free_port)"
    "${PIN_LOAD[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$TMP" >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for ((i = 0; i < 300; i++)); do
        [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && break
        kill -0 "$REDIS_PID" 2>/dev/null || { cat "$TMP/redis.log" >&2; die "redis-server exited during startup"; }
        sleep 0.1
    done
    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] || { cat "$TMP/redis.log" >&2; die "redis-server did not start within 30 s"; }
    REDIS_VERSION="$(redis-cli -p "$REDIS_PORT" info server | tr -d '\r' | sed -n 's/^redis_version://p')"
    "${PIN_PROXY[@]}" "$GATEWAY" --manifests "$TMP/manifests-limits.yaml" --listen 127.0.0.1:0 \
        --worker-threads "$GW_THREADS" --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
        >"$TMP/gateway-redis.log" 2>&1 &
    GWR_PID=$!
    PIDS+=("$GWR_PID")
    GWR_PORT="$(wait_listening tollgate-dataplane "$TMP/gateway-redis.log" "$GWR_PID")"
fi

# With --routing: one more data plane per strategy, same flags, whose group "bench" has $ROUTES
# deployments on the same mock (they share the upstream connection pool, which is per
# authority), so against tollgate the only difference is picking a route per request.
# ROUTING_TARGETS lists them as "target|strategy" ("" for no RoutePolicy: simple-shuffle).
ROUTING_TARGETS=(
    "tollgate+$ROUTES|"
    "tollgate+$ROUTES-least-busy|least-busy"
    "tollgate+$ROUTES-latency|latency-based"
)
declare -A RT_PID RT_PORT RT_STRATEGY
if [[ $ROUTING -eq 1 ]]; then
    for rt in "${ROUTING_TARGETS[@]}"; do
        IFS='|' read -r t strategy <<<"$rt"
        f="$TMP/manifests-$t.yaml"
        write_bench_manifests "$f" "$MOCK_PORT" --deployments "$ROUTES" --strategy "$strategy"
        "${PIN_PROXY[@]}" "$GATEWAY" --manifests "$f" --listen 127.0.0.1:0 \
            --worker-threads "$GW_THREADS" >"$TMP/gateway-$t.log" 2>&1 &
        RT_PID[$t]=$!
        PIDS+=("${RT_PID[$t]}")
        RT_PORT[$t]="$(wait_listening tollgate-dataplane "$TMP/gateway-$t.log" "${RT_PID[$t]}")"
        RT_STRATEGY[$t]="${strategy:-simple-shuffle}"
    done
fi

# --busy-poll: the same data plane, same flags and manifests, polling after its work.
if [[ -n "$BUSY_POLL" ]]; then
    "${PIN_PROXY[@]}" "$GATEWAY" --manifests "$TMP/manifests.yaml" --listen 127.0.0.1:0 \
        --worker-threads "$GW_THREADS" --busy-poll "$BUSY_POLL" >"$TMP/gateway-busy-poll.log" 2>&1 &
    GWB_PID=$!
    PIDS+=("$GWB_PID")
    GWB_PORT="$(wait_listening tollgate-dataplane "$TMP/gateway-busy-poll.log" "$GWB_PID")"
fi

# --ab: another build of the data plane, same flags and manifests.
if [[ -n "$AB_DIR" ]]; then
    [[ -x "$AB_DIR/tollgate-dataplane" ]] || die "no $AB_DIR/tollgate-dataplane"
    "${PIN_PROXY[@]}" "$AB_DIR/tollgate-dataplane" --manifests "$TMP/manifests.yaml" --listen 127.0.0.1:0 \
        --worker-threads "$GW_THREADS" >"$TMP/gateway-b.log" 2>&1 &
    GWAB_PID=$!
    PIDS+=("$GWAB_PID")
    GWAB_PORT="$(wait_listening tollgate-dataplane "$TMP/gateway-b.log" "$GWAB_PID")"
fi

# --bare: the HTTP stack alone, same threads, same upstream.
if [[ $BARE -eq 1 ]]; then
    "${PIN_PROXY[@]}" "$BARE_BIN" 127.0.0.1:0 "127.0.0.1:$MOCK_PORT" "$GW_THREADS" >"$TMP/bare.log" 2>&1 &
    BARE_PID=$!
    PIDS+=("$BARE_PID")
    BARE_PORT="$(wait_listening bare_proxy "$TMP/bare.log" "$BARE_PID")"
fi

# nginx: a plain keep-alive reverse proxy to the same mock.
NGINX_PORT="$(free_port)"
write_nginx_conf "$TMP/nginx" "$NGINX_PORT" "$MOCK_PORT" "$NGINX_WORKERS"
"${PIN_PROXY[@]}" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
for ((i = 0; i < 300; i++)); do
    [[ -n "$(ss -Htln "sport = :$NGINX_PORT" 2>/dev/null)" ]] && break
    kill -0 "$NGINX_PID" 2>/dev/null || { cat "$TMP/nginx/error.log" "$TMP/nginx/stdout.log" >&2 || true; die "nginx exited during startup"; }
    sleep 0.1
done
for ((i = 0; i < 100; i++)); do
    [[ $(children "$NGINX_PID" | wc -l) -ge $NGINX_WORKERS ]] && break
    sleep 0.1
done
sleep 1 # let every process settle before sampling idle memory

GW_IDLE_KB="$(rss_kb "$GW_PID")"
NGINX_IDLE_KB="$(rss_kb "$NGINX_PID")"
for c in $(children "$NGINX_PID"); do
    NGINX_IDLE_KB=$((NGINX_IDLE_KB + $(rss_kb "$c")))
done
MOCK_IDLE_KB="$(rss_kb "$MOCK_PID")"

declare -A URL=(
    [direct]="http://127.0.0.1:$MOCK_PORT/v1/chat/completions"
    [tollgate]="http://127.0.0.1:$GW_PORT/v1/chat/completions"
    [nginx]="http://127.0.0.1:$NGINX_PORT/v1/chat/completions"
)
TARGETS=(direct tollgate nginx)
TW=9 # width of the target column in the text table
if [[ $LIMITS -eq 1 ]]; then
    URL[tollgate+limits]="http://127.0.0.1:$GWL_PORT/v1/chat/completions"
    TARGETS+=(tollgate+limits)
    TW=15
fi
if [[ $REDIS -eq 1 ]]; then
    URL[tollgate+redis]="http://127.0.0.1:$GWR_PORT/v1/chat/completions"
    TARGETS+=(tollgate+redis)
fi
if [[ -n "$BUSY_POLL" ]]; then
    URL[tollgate+busy-poll]="http://127.0.0.1:$GWB_PORT/v1/chat/completions"
    TARGETS+=(tollgate+busy-poll)
    ((TW >= 18)) || TW=18
fi
if [[ -n "$AB_DIR" ]]; then
    URL[tollgate-b]="http://127.0.0.1:$GWAB_PORT/v1/chat/completions"
    TARGETS+=(tollgate-b)
    ((TW >= 10)) || TW=10
fi
if [[ $BARE -eq 1 ]]; then
    URL[hyper-floor]="http://127.0.0.1:$BARE_PORT/v1/chat/completions"
    TARGETS+=(hyper-floor)
    ((TW >= 11)) || TW=11
fi
RTARGETS=() # the --routing targets
if [[ $ROUTING -eq 1 ]]; then
    for rt in "${ROUTING_TARGETS[@]}"; do
        t="${rt%%|*}"
        URL[$t]="http://127.0.0.1:${RT_PORT[$t]}/v1/chat/completions"
        TARGETS+=("$t")
        RTARGETS+=("$t")
        ((${#t} <= TW)) || TW=${#t}
    done
fi
# The process(es) doing the serving for each target, whose CPU time is counted.
target_pids() {
    case "$1" in
        direct) echo "$MOCK_PID" ;;
        tollgate) echo "$GW_PID" ;;
        tollgate+limits) echo "$GWL_PID" ;;
        tollgate+redis) echo "$GWR_PID" ;;
        tollgate+busy-poll) echo "$GWB_PID" ;;
        tollgate-b) echo "$GWAB_PID" ;;
        tollgate+*) echo "${RT_PID[$1]}" ;;
        nginx) children "$NGINX_PID" ;;
        hyper-floor) echo "$BARE_PID" ;;
    esac
}
# The order in which a round measures the targets: direct, then every Tollgate target back to
# back (so drift hits them alike), then nginx. The Tollgates run in the order of TARGETS
# (tollgate, tollgate+limits, tollgate+redis, the --routing ones) in odd rounds and in the
# reverse order in even rounds, so each goes first as often as last.
run_order() { # round
    local t gws=()
    for t in "${TARGETS[@]}"; do
        [[ $t == tollgate* ]] || continue
        if (($1 % 2)); then gws+=("$t"); else gws=("$t" "${gws[@]}"); fi
    done
    echo direct "${gws[@]}" nginx "$( ((BARE)) && echo hyper-floor)"
}
CLK_TCK="$(getconf CLK_TCK)"
log "mock :$MOCK_PORT (pid $MOCK_PID), tollgate :$GW_PORT (pid $GW_PID, $GW_THREADS threads), nginx :$NGINX_PORT (pid $NGINX_PID, $NGINX_WORKERS workers)"
if [[ $LIMITS -eq 1 ]]; then
    log "tollgate+limits :$GWL_PORT (pid $GWL_PID, $GW_THREADS threads; key and model limits, key budget)"
fi
if [[ $REDIS -eq 1 ]]; then
    log "tollgate+redis :$GWR_PORT (pid $GWR_PID; as tollgate+limits, counters in redis-server $REDIS_VERSION :$REDIS_PORT, pid $REDIS_PID)"
fi
for t in "${RTARGETS[@]}"; do
    log "$t :${RT_PORT[$t]} (pid ${RT_PID[$t]}, $GW_THREADS threads; $ROUTES deployments, ${RT_STRATEGY[$t]})"
done

# ---------------------------------------------------------------------------------------------
# Sanity: every target answers 200 with the same body; Tollgate really authenticates and prices.
# ---------------------------------------------------------------------------------------------
post() { # url body [extra curl args...] -> headers + body on stdout
    local url="$1" body="$2"
    shift 2
    curl -sS -i --max-time 5 -H 'Content-Type: application/json' -H "Authorization: Bearer $KEY" \
        --data-binary "$body" "$@" "$url"
}
STREAM_EVENTS=0
for t in "${TARGETS[@]}"; do
    out="$(post "${URL[$t]}" "$BODY")" || die "$t: request failed"
    grep -q '^HTTP/1.1 200' <<<"$out" || { echo "$out" >&2; die "$t: non-streaming request did not return 200"; }
    grep -q '"chat.completion"' <<<"$out" || { echo "$out" >&2; die "$t: unexpected non-streaming body"; }
    out="$(post "${URL[$t]}" "$STREAM_BODY")" || die "$t: streaming request failed"
    grep -q '^HTTP/1.1 200' <<<"$out" || { echo "$out" >&2; die "$t: streaming request did not return 200"; }
    grep -q 'data: \[DONE\]' <<<"$out" || { echo "$out" >&2; die "$t: stream did not end with [DONE]"; }
    STREAM_EVENTS="$(grep -c '^data: ' <<<"$out")"
done
out="$(post "${URL[tollgate]}" "$BODY")"
grep -qi '^x-tollgate-cost-usd:' <<<"$out" || { echo "$out" >&2; die "tollgate: no x-tollgate-cost-usd header (cost accounting off?)"; }
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
    -H 'Authorization: Bearer sk-wrong' --data-binary "$BODY" "${URL[tollgate]}")"
[[ "$code" == 401 ]] || die "tollgate: a wrong key got $code, not 401 (auth off?)"
log "sanity ok: 200 everywhere, $STREAM_EVENTS SSE events per stream, tollgate prices and rejects bad keys"
if [[ $LIMITS -eq 1 ]]; then
    # The limited gateway reserves and settles (its key's limits show in x-ratelimit-*); the
    # plain one must not, or the comparison measures nothing.
    out="$(post "${URL[tollgate+limits]}" "$BODY" | tr -d '\r')" || die "tollgate+limits: request failed"
    grep -qix 'x-ratelimit-limit-requests: 1000000000' <<<"$out" ||
        { echo "$out" >&2; die "tollgate+limits: no x-ratelimit-limit-requests: 1000000000 header (limits off?)"; }
    grep -qi '^x-tollgate-cost-usd:' <<<"$out" || { echo "$out" >&2; die "tollgate+limits: no x-tollgate-cost-usd header"; }
    out="$(post "${URL[tollgate]}" "$BODY" | tr -d '\r')" || die "tollgate: request failed"
    ! grep -qi '^x-ratelimit-' <<<"$out" || { echo "$out" >&2; die "tollgate: has x-ratelimit-* headers, but should run without limits"; }
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
        -H 'Authorization: Bearer sk-wrong' --data-binary "$BODY" "${URL[tollgate+limits]}")"
    [[ "$code" == 401 ]] || die "tollgate+limits: a wrong key got $code, not 401 (auth off?)"
    log "sanity ok: tollgate+limits enforces (x-ratelimit-limit-requests: 1000000000), tollgate has no limits"
fi
if [[ $REDIS -eq 1 ]]; then
    # The Redis gateway enforces the same limits, and its counters really are in Redis.
    out="$(post "${URL[tollgate+redis]}" "$BODY" | tr -d '\r')" || die "tollgate+redis: request failed"
    grep -qix 'x-ratelimit-limit-requests: 1000000000' <<<"$out" ||
        { echo "$out" >&2; die "tollgate+redis: no x-ratelimit-limit-requests: 1000000000 header (limits off?)"; }
    grep -qi '^x-tollgate-cost-usd:' <<<"$out" || { echo "$out" >&2; die "tollgate+redis: no x-tollgate-cost-usd header"; }
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
        -H 'Authorization: Bearer sk-wrong' --data-binary "$BODY" "${URL[tollgate+redis]}")"
    [[ "$code" == 401 ]] || die "tollgate+redis: a wrong key got $code, not 401 (auth off?)"
    sleep 0.2 # settlement runs after the response
    REDIS_KEYS="$(redis-cli -p "$REDIS_PORT" --scan --pattern 'tollgate:limits:*' | sort)"
    [[ -n "$REDIS_KEYS" ]] || { cat "$TMP/gateway-redis.log" >&2; die "tollgate+redis: no tollgate:limits:* keys in Redis (counters not shared?)"; }
    log "sanity ok: tollgate+redis enforces, Redis holds $(paste -sd' ' <<<"$REDIS_KEYS")"
fi
if [[ $ROUTING -eq 1 ]]; then
    # /health lists the deployments of each group and its strategy: tollgate must have 1, each
    # routing gateway $ROUTES under its own strategy, or the comparison measures nothing. Each
    # routing gateway prices, and spreads 32 sequential requests over several deployments
    # (x-tollgate-deployment names the one that served).
    deployments() { # health JSON -> number of distinct deployment ids
        grep -o '"id":"[^"]*"' <<<"$1" | sort -u | wc -l || true
    }
    health="$(curl -sS --max-time 5 "http://127.0.0.1:$GW_PORT/health")" || die "tollgate: GET /health failed"
    n="$(deployments "$health")"
    [[ $n -eq 1 ]] || { echo "$health" >&2; die "tollgate: /health lists $n deployments, not 1"; }
    for t in "${RTARGETS[@]}"; do
        health="$(curl -sS --max-time 5 "http://127.0.0.1:${RT_PORT[$t]}/health")" || die "$t: GET /health failed"
        n="$(deployments "$health")"
        [[ $n -eq $ROUTES ]] || { echo "$health" >&2; die "$t: /health lists $n deployments, not $ROUTES"; }
        grep -q "\"strategy\":\"${RT_STRATEGY[$t]}\"" <<<"$health" ||
            { echo "$health" >&2; die "$t: /health does not show strategy ${RT_STRATEGY[$t]}"; }
        out="$(post "${URL[$t]}" "$BODY" | tr -d '\r')" || die "$t: request failed"
        grep -qi '^x-tollgate-cost-usd:' <<<"$out" || { echo "$out" >&2; die "$t: no x-tollgate-cost-usd header"; }
        seen="$(for ((i = 0; i < 32; i++)); do
            post "${URL[$t]}" "$BODY" | tr -d '\r' | sed -n 's/^x-tollgate-deployment: *//Ip'
        done | sort -u)"
        nseen="$(grep -c . <<<"$seen" || true)"
        [[ $nseen -ge 4 ]] || { cat "$TMP/gateway-$t.log" >&2; die "$t: 32 requests reached only $nseen deployment(s): $(paste -sd' ' <<<"$seen")"; }
        log "sanity ok: $t serves bench from $n deployments (${RT_STRATEGY[$t]}); 32 requests reached $nseen of them"
    done
fi

# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
write_lua() { # file body
    cat >"$1" <<EOF
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d io_errors=%d status_errors=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
}
write_lua "$TMP/plain.lua" "$BODY"
write_lua "$TMP/stream.lua" "$STREAM_BODY"

# Scenarios: name|lua|connections
SCENARIOS=(
    "plain-c1|plain.lua|1"
    "plain-c64|plain.lua|64"
    "stream-c16|stream.lua|16"
)
declare -A RPS P50 P99 ERR CPU RCPU RCALLS RSCRIPT
SAMPLES="$TMP/samples"
: >"$SAMPLES"

run_wrk() { # lua connections seconds url -> BENCH line
    "${PIN_LOAD[@]}" wrk -t1 -c"$2" -d"$3"s --timeout 5s -s "$TMP/$1" "$4" | grep '^BENCH' || true
}
median1() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$2"; }
median() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.0f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

unit() { [[ "$1" == stream-* ]] && echo "streams/s" || echo "req/s"; }

# Script calls Redis has served so far (EVALSHA, and EVAL when a script was not cached yet), and
# the µs it spent running them: "calls usec".
redis_calls() {
    redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' |
        awk -F'[:=,]' '$1 == "cmdstat_evalsha" || $1 == "cmdstat_eval" {n += $3; u += $5} END {print n + 0, u + 0}'
}
# tollgate_redis_errors_total of the Redis gateway, summed over ops (0 when never incremented).
redis_errors() {
    curl -s --max-time 5 "http://127.0.0.1:$GWR_PORT/metrics" |
        awk '/^tollgate_redis_errors_total[{ ]/ {s += $NF} END {printf "%.0f\n", s}'
}

for ((round = 1; round <= ROUNDS; round++)); do
    for sc in "${SCENARIOS[@]}"; do
        IFS='|' read -r name lua conns <<<"$sc"
        for t in $(run_order "$round"); do
            # The bare proxy passes a stream through one write per event (no coalescing): no floor.
            [[ $t == hyper-floor && $name == stream-* ]] && continue
            [[ "$WARMUP" != 0 ]] && run_wrk "$lua" "$conns" "$WARMUP" "${URL[$t]}" >/dev/null
            # shellcheck disable=SC2046
            cpu0="$(cpu_ticks $(target_pids "$t"))"
            if [[ $t == tollgate+redis ]]; then
                rcpu0="$(cpu_ticks "$REDIS_PID")"
                read -r rcalls0 rusec0 <<<"$(redis_calls)"
            fi
            line="$(run_wrk "$lua" "$conns" "$DURATION" "${URL[$t]}")"
            # shellcheck disable=SC2046
            cpu1="$(cpu_ticks $(target_pids "$t"))"
            extra=""
            extra_log=""
            if [[ $t == tollgate+redis ]]; then
                # redis-server's CPU and script calls per request: what the gateway's column
                # leaves out. Settlement runs after the response, so a few may land after this.
                rcpu1="$(cpu_ticks "$REDIS_PID")"
                read -r rcalls1 rusec1 <<<"$(redis_calls)"
                reqs="$(field requests "$line")"
                extra="$(awk -v c=$((rcpu1 - rcpu0)) -v n=$((rcalls1 - rcalls0)) -v u=$((rusec1 - rusec0)) \
                    -v hz="$CLK_TCK" -v r="${reqs:-0}" \
                    'BEGIN {printf " %.1f %.2f %.1f", r ? c * 1e6 / hz / r : 0, r ? n / r : 0, r ? u / r : 0}')"
                read -r rc rn ru <<<"$extra"
                extra_log=", redis-server CPU $rc µs/req ($ru in scripts), $rn Redis calls/req"
            fi
            [[ -n "$line" ]] || die "wrk printed no result for $name $t"
            reqs="$(field requests "$line")"
            dur="$(field duration_us "$line")"
            rps="$(awk -v r="$reqs" -v d="$dur" 'BEGIN {printf "%.0f", r / (d / 1e6)}')"
            errs=$(($(field io_errors "$line") + $(field status_errors "$line")))
            cpu="$(awk -v c=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v r="$reqs" 'BEGIN {printf "%.1f", r ? c * 1e6 / hz / r : 0}')"
            echo "$name $t $rps $(field p50_us "$line") $(field p99_us "$line") $errs $cpu$extra" >>"$SAMPLES"
            echo "$round $name $t $rps" >>"$SAMPLES.rounds"
            log "round $round $name $t: $rps $(unit "$name"), p50 $(field p50_us "$line") µs, p99 $(field p99_us "$line") µs, errors $errs, CPU $cpu µs/req$extra_log"
        done
    done
done

for sc in "${SCENARIOS[@]}"; do
    IFS='|' read -r name _ _ <<<"$sc"
    for t in "${TARGETS[@]}"; do
        RPS[$name,$t]="$(awk -v n="$name" -v t="$t" '$1 == n && $2 == t {print $3}' "$SAMPLES" | median)"
        P50[$name,$t]="$(awk -v n="$name" -v t="$t" '$1 == n && $2 == t {print $4}' "$SAMPLES" | median)"
        P99[$name,$t]="$(awk -v n="$name" -v t="$t" '$1 == n && $2 == t {print $5}' "$SAMPLES" | median)"
        CPU[$name,$t]="$(awk -v n="$name" -v t="$t" '$1 == n && $2 == t {print $7}' "$SAMPLES" | median1)"
        ERR[$name,$t]="$(awk -v n="$name" -v t="$t" '$1 == n && $2 == t {s += $6} END {print s + 0}' "$SAMPLES")"
    done
    if [[ $REDIS -eq 1 ]]; then
        RCPU[$name]="$(awk -v n="$name" '$1 == n && $2 == "tollgate+redis" {print $8}' "$SAMPLES" | median1)"
        RCALLS[$name]="$(awk -v n="$name" '$1 == n && $2 == "tollgate+redis" {print $9}' "$SAMPLES" | sort -n | awk '{a[NR] = $1} END {printf "%.2f", NR ? a[int((NR + 1) / 2)] : 0}')"
        RSCRIPT[$name]="$(awk -v n="$name" '$1 == n && $2 == "tollgate+redis" {print $10}' "$SAMPLES" | median1)"
    fi
done
if [[ $REDIS -eq 1 ]]; then
    REDIS_ERRORS="$(redis_errors)"
    [[ "$REDIS_ERRORS" == 0 ]] || log "WARNING: tollgate+redis counted $REDIS_ERRORS Redis errors (those requests fell back to in-memory counters)"
fi

GW_HWM_KB="$(hwm_kb "$GW_PID")"
GW_AFTER_KB="$(rss_kb "$GW_PID")"
NGINX_AFTER_KB="$(rss_kb "$NGINX_PID")"
for c in $(children "$NGINX_PID"); do
    NGINX_AFTER_KB=$((NGINX_AFTER_KB + $(rss_kb "$c")))
done

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }
# round_ratios SCENARIO A B: A's rate over B's in each round (measured minutes apart at most, so
# less exposed to the machine's drift than a ratio of medians), then their median.
round_ratios() {
    awk -v n="$1" -v a="$2" -v b="$3" '$2 == n && $3 == a {x[$1] = $4} $2 == n && $3 == b {y[$1] = $4}
        END {for (r in x) if (r in y && y[r] > 0) printf "%.2f\n", x[r] / y[r]}' "$SAMPLES.rounds" |
        sort -n | awk '{a[NR] = $1; s = s (NR > 1 ? " " : "") $1}
            END {if (NR == 0) print "n/a"; else printf "%s (median %s)", s, (NR % 2) ? a[(NR + 1) / 2] : sprintf("%.2f", (a[NR / 2] + a[NR / 2 + 1]) / 2)}'
}
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
verdict() { [[ "$1" == 1 ]] && echo "MET" || echo "MISSED"; }

sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", a - b}'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN {print (a >= b) ? 1 : 0}'; }
ADDED_GW="$(sub "${P50[plain-c1,tollgate]}" "${P50[plain-c1,direct]}")"
ADDED_NGINX="$(sub "${P50[plain-c1,nginx]}" "${P50[plain-c1,direct]}")"
THR_GN="$(ratio "${RPS[plain-c64,tollgate]}" "${RPS[plain-c64,nginx]}")"
STR_GN="$(ratio "${RPS[stream-c16,tollgate]}" "${RPS[stream-c16,nginx]}")"
T_THR="$(ge "${RPS[plain-c64,tollgate]}" "${RPS[plain-c64,nginx]}")"
T_LAT="$(ge 50 "$ADDED_GW")"
T_STR="$(ge "${RPS[stream-c16,tollgate]}" "${RPS[stream-c16,nginx]}")"
T_RSS=$((GW_IDLE_KB <= 30 * 1024 ? 1 : 0))
sdiff() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%+.1f", a - b}'; }
if [[ $LIMITS -eq 1 ]]; then
    ADDED_LIM="$(awk -v a="${P50[plain-c1,tollgate+limits]}" -v b="${P50[plain-c1,tollgate]}" 'BEGIN {printf "%+.0f", a - b}')"
fi
if [[ $REDIS -eq 1 ]]; then
    ADDED_RED="$(awk -v a="${P50[plain-c1,tollgate+redis]}" -v b="${P50[plain-c1,tollgate]}" 'BEGIN {printf "%+.0f", a - b}')"
fi
declare -A ADDED_RT
for t in "${RTARGETS[@]}"; do
    ADDED_RT[$t]="$(awk -v a="${P50[plain-c1,$t]}" -v b="${P50[plain-c1,tollgate]}" 'BEGIN {printf "%+.0f", a - b}')"
done

describe() {
    case "$1" in
        plain-c1) echo "non-streaming, c=1" ;;
        plain-c64) echo "non-streaming, c=64" ;;
        stream-c16) echo "streaming, c=16" ;;
    esac
}

SETUP="$(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), wrk 1 thread, mock 1 thread, tollgate $GW_THREADS worker threads, nginx $NGINX_WORKERS workers, $( [[ $PIN -eq 1 ]] && echo "pinned: wrk+mock on CPU 0, proxy on CPU 1" || echo "not pinned"), ${DURATION}s per run after ${WARMUP}s warm-up, median of $ROUNDS round(s), $STREAM_EVENTS SSE events per stream"
if [[ $LIMITS -eq 1 ]]; then
    SETUP="$SETUP; tollgate+limits: a second tollgate, same flags, key with rpm/tpm/maxParallel limits and a monthly budget, model with rpm/tpm/maxParallel limits, none ever reached; tollgate and tollgate+limits measured back to back, alternating which goes first"
fi
if [[ $REDIS -eq 1 ]]; then
    SETUP="${SETUP%; tollgate and tollgate+limits measured*}; tollgate+redis: a third tollgate, the same as tollgate+limits plus --redis-url to a local redis-server $REDIS_VERSION (no persistence, $( [[ $PIN -eq 1 ]] && echo "pinned to CPU 0" || echo "sharing the CPUs")); tollgate, tollgate+limits and tollgate+redis measured back to back, reversing the order every other round"
fi
if [[ $ROUTING -eq 1 ]]; then
    rt_desc=""
    for t in "${RTARGETS[@]}"; do
        rt_desc="${rt_desc:+$rt_desc, }$t ($( [[ ${RT_STRATEGY[$t]} == simple-shuffle ]] && echo "no RoutePolicy: simple-shuffle" || echo "RoutePolicy strategy ${RT_STRATEGY[$t]}"))"
    done
    SETUP="${SETUP%; tollgate* measured back to back*}; $rt_desc: one more tollgate each, same flags, whose model bench is $ROUTES LLMModels on the same mock; every tollgate target measured back to back, reversing the order every other round"
fi

{
    echo
    echo "Tollgate benchmark: $SETUP"
    echo
    printf "%-22s %-${TW}s %16s %8s %8s %12s %7s\n" scenario target "rate" "p50 µs" "p99 µs" "CPU µs/req" errors
    for sc in "${SCENARIOS[@]}"; do
        IFS='|' read -r name _ _ <<<"$sc"
        for t in "${TARGETS[@]}"; do
            [[ $t == hyper-floor && $name == stream-* ]] && continue
            printf "%-22s %-${TW}s %16s %8s %8s %12s %7s\n" "$(describe "$name")" "$t" \
                "${RPS[$name,$t]} $(unit "$name")" "${P50[$name,$t]}" "${P99[$name,$t]}" "${CPU[$name,$t]}" "${ERR[$name,$t]}"
        done
    done
    echo "(CPU µs/req: user + system time of the serving process per request: the mock for direct, the proxy alone for tollgate and nginx$(
        [[ $REDIS -eq 1 ]] && echo "; for tollgate+redis the gateway alone, redis-server's is below"))"
    echo
    echo "Ratios"
    for name in plain-c1 plain-c64 stream-c16; do
        printf '  %-22s tollgate/nginx %s   tollgate/direct %s   nginx/direct %s   (%s)\n' "$(describe "$name")" \
            "$(ratio "${RPS[$name,tollgate]}" "${RPS[$name,nginx]}")" \
            "$(ratio "${RPS[$name,tollgate]}" "${RPS[$name,direct]}")" \
            "$(ratio "${RPS[$name,nginx]}" "${RPS[$name,direct]}")" "$(unit "$name")"
    done
    echo "  added p50 at c=1 over direct: tollgate ${ADDED_GW} µs, nginx ${ADDED_NGINX} µs"
    echo "  tollgate/nginx round by round, sorted: c=64 $(round_ratios plain-c64 tollgate nginx); streams $(round_ratios stream-c16 tollgate nginx)"
    if [[ $BARE -eq 1 ]]; then
        echo
        echo "The HTTP stack alone (hyper-floor: a bare pass-through on hyper, same threads; not run on streams)"
        for name in plain-c1 plain-c64; do
            printf '  %-22s hyper-floor/nginx %s   tollgate/hyper-floor %s   CPU µs/req tollgate %s, hyper-floor %s, nginx %s   (%s)\n' "$(describe "$name")" \
                "$(ratio "${RPS[$name,hyper-floor]}" "${RPS[$name,nginx]}")" \
                "$(ratio "${RPS[$name,tollgate]}" "${RPS[$name,hyper-floor]}")" \
                "${CPU[$name,tollgate]}" "${CPU[$name,hyper-floor]}" "${CPU[$name,nginx]}" "$(unit "$name")"
        done
        echo "  added p50 at c=1 over direct: hyper-floor $(sub "${P50[plain-c1,hyper-floor]}" "${P50[plain-c1,direct]}") µs"
    fi
    if [[ -n "$AB_DIR" ]]; then
        echo
        echo "A/B (tollgate-b: $AB_DIR/tollgate-dataplane, vs tollgate)"
        for name in plain-c1 plain-c64 stream-c16; do
            printf '  %-22s tollgate-b/tollgate %s   tollgate-b/nginx %s   tollgate/nginx %s   CPU µs/req b−a %s   (%s)\n' "$(describe "$name")" \
                "$(ratio "${RPS[$name,tollgate-b]}" "${RPS[$name,tollgate]}")" \
                "$(ratio "${RPS[$name,tollgate-b]}" "${RPS[$name,nginx]}")" \
                "$(ratio "${RPS[$name,tollgate]}" "${RPS[$name,nginx]}")" \
                "$(sdiff "${CPU[$name,tollgate-b]}" "${CPU[$name,tollgate]}")" "$(unit "$name")"
        done
        echo "  added p50 at c=1 over direct: tollgate-b $(sub "${P50[plain-c1,tollgate-b]}" "${P50[plain-c1,direct]}") µs, tollgate ${ADDED_GW} µs"
        echo "  tollgate-b/tollgate round by round, sorted: c=64 $(round_ratios plain-c64 tollgate-b tollgate); streams $(round_ratios stream-c16 tollgate-b tollgate)"
    fi
    if [[ -n "$BUSY_POLL" ]]; then
        echo
        echo "Busy-polling (tollgate+busy-poll: --busy-poll $BUSY_POLL, vs tollgate)"
        for name in plain-c1 plain-c64 stream-c16; do
            printf '  %-22s tollgate+busy-poll/tollgate %s   tollgate+busy-poll/nginx %s   CPU µs/req %s   (%s)\n' "$(describe "$name")" \
                "$(ratio "${RPS[$name,tollgate+busy-poll]}" "${RPS[$name,tollgate]}")" \
                "$(ratio "${RPS[$name,tollgate+busy-poll]}" "${RPS[$name,nginx]}")" \
                "$(sdiff "${CPU[$name,tollgate+busy-poll]}" "${CPU[$name,tollgate]}")" "$(unit "$name")"
        done
        echo "  added p50 at c=1 over direct: tollgate+busy-poll $(sub "${P50[plain-c1,tollgate+busy-poll]}" "${P50[plain-c1,direct]}") µs, tollgate ${ADDED_GW} µs"
    fi
    if [[ $LIMITS -eq 1 ]]; then
        echo
        echo "Cost of limits and budgets (tollgate+limits vs tollgate)"
        for name in plain-c1 plain-c64 stream-c16; do
            printf '  %-22s tollgate+limits/tollgate %s   CPU µs/req %s   (%s)\n' "$(describe "$name")" \
                "$(ratio "${RPS[$name,tollgate+limits]}" "${RPS[$name,tollgate]}")" \
                "$(sdiff "${CPU[$name,tollgate+limits]}" "${CPU[$name,tollgate]}")" "$(unit "$name")"
        done
        echo "  added p50 at c=1 by limits and budgets: ${ADDED_LIM} µs (tollgate+limits p50 - tollgate p50)"
    fi
    if [[ $REDIS -eq 1 ]]; then
        echo
        echo "Cost of limits and budgets in Redis (tollgate+redis vs tollgate)"
        for name in plain-c1 plain-c64 stream-c16; do
            printf '  %-22s tollgate+redis/tollgate %s   CPU µs/req %s   redis-server CPU µs/req %s (%s in scripts)   Redis calls/req %s   (%s)\n' "$(describe "$name")" \
                "$(ratio "${RPS[$name,tollgate+redis]}" "${RPS[$name,tollgate]}")" \
                "$(sdiff "${CPU[$name,tollgate+redis]}" "${CPU[$name,tollgate]}")" \
                "${RCPU[$name]}" "${RSCRIPT[$name]}" "${RCALLS[$name]}" "$(unit "$name")"
        done
        echo "  added p50 at c=1 by limits and budgets in Redis: ${ADDED_RED} µs (tollgate+redis p50 - tollgate p50)"
        echo "  Redis errors counted by tollgate+redis (tollgate_redis_errors_total): $REDIS_ERRORS"
    fi
    if [[ $ROUTING -eq 1 ]]; then
        echo
        echo "Cost of routing among $ROUTES deployments (vs tollgate: 1 deployment)"
        for name in plain-c1 plain-c64 stream-c16; do
            for t in "${RTARGETS[@]}"; do
                printf '  %-22s %-*s %5s   CPU µs/req %6s   (%s)\n' "$(describe "$name")" $((TW + 9)) "$t/tollgate" \
                    "$(ratio "${RPS[$name,$t]}" "${RPS[$name,tollgate]}")" \
                    "$(sdiff "${CPU[$name,$t]}" "${CPU[$name,tollgate]}")" "$(unit "$name")"
            done
        done
        line=""
        for t in "${RTARGETS[@]}"; do
            line="${line:+$line, }$t ${ADDED_RT[$t]} µs"
        done
        echo "  added p50 at c=1 over tollgate (target p50 - tollgate p50): $line"
    fi
    echo
    echo "Memory (VmRSS)"
    echo "  idle:       tollgate $(mb "$GW_IDLE_KB") MB, nginx $(mb "$NGINX_IDLE_KB") MB (master + workers), mock $(mb "$MOCK_IDLE_KB") MB"
    echo "  after load: tollgate $(mb "$GW_AFTER_KB") MB (peak $(mb "$GW_HWM_KB") MB), nginx $(mb "$NGINX_AFTER_KB") MB"
    echo
    echo "Targets"
    echo "  throughput c=64 >= nginx:      $(verdict "$T_THR")  (tollgate/nginx $THR_GN)"
    echo "  added p50 c=1 <= 50 µs:        $(verdict "$T_LAT")  (${ADDED_GW} µs)"
    echo "  streams/s c=16 >= nginx:       $(verdict "$T_STR")  (tollgate/nginx $STR_GN)"
    echo "  idle RSS <= 30 MB:             $(verdict "$T_RSS")  ($(mb "$GW_IDLE_KB") MB)"
}

if [[ -n "$MARKDOWN" ]]; then
    {
        echo "Setup: $SETUP."
        echo
        echo "| scenario | target | rate | p50 µs | p99 µs | CPU µs/req | errors |"
        echo "|---|---|---:|---:|---:|---:|---:|"
        for sc in "${SCENARIOS[@]}"; do
            IFS='|' read -r name _ _ <<<"$sc"
            for t in "${TARGETS[@]}"; do
                [[ $t == hyper-floor && $name == stream-* ]] && continue
                echo "| $(describe "$name") | $t | ${RPS[$name,$t]} $(unit "$name") | ${P50[$name,$t]} | ${P99[$name,$t]} | ${CPU[$name,$t]} | ${ERR[$name,$t]} |"
            done
        done
        echo
        echo "CPU µs/req: user + system time of the serving process(es) per request: the mock for direct, the proxy alone (not the mock) for tollgate and nginx$(
            [[ $REDIS -eq 1 ]] && echo "; for tollgate+redis the gateway alone (redis-server's is below)")."
        echo
        echo "| ratio | non-streaming c=1 | non-streaming c=64 | streaming c=16 |"
        echo "|---|---:|---:|---:|"
        for pair in "tollgate nginx" "tollgate direct" "nginx direct"; do
            read -r a b <<<"$pair"
            echo "| $a / $b | $(ratio "${RPS[plain-c1,$a]}" "${RPS[plain-c1,$b]}") | $(ratio "${RPS[plain-c64,$a]}" "${RPS[plain-c64,$b]}") | $(ratio "${RPS[stream-c16,$a]}" "${RPS[stream-c16,$b]}") |"
        done
        echo
        echo "Tollgate/nginx round by round (each round's own pair of runs, sorted): c=64 $(round_ratios plain-c64 tollgate nginx); streams c=16 $(round_ratios stream-c16 tollgate nginx)."
        echo
        echo "Added p50 latency at c=1 over direct: Tollgate **${ADDED_GW} µs**, nginx ${ADDED_NGINX} µs."
        if [[ -n "$BUSY_POLL" ]]; then
            echo
            echo "| busy-polling (--busy-poll $BUSY_POLL) | non-streaming c=1 | non-streaming c=64 | streaming c=16 |"
            echo "|---|---:|---:|---:|"
            echo "| rate, tollgate+busy-poll / tollgate | $(ratio "${RPS[plain-c1,tollgate+busy-poll]}" "${RPS[plain-c1,tollgate]}") | $(ratio "${RPS[plain-c64,tollgate+busy-poll]}" "${RPS[plain-c64,tollgate]}") | $(ratio "${RPS[stream-c16,tollgate+busy-poll]}" "${RPS[stream-c16,tollgate]}") |"
            echo "| rate, tollgate+busy-poll / nginx | $(ratio "${RPS[plain-c1,tollgate+busy-poll]}" "${RPS[plain-c1,nginx]}") | $(ratio "${RPS[plain-c64,tollgate+busy-poll]}" "${RPS[plain-c64,nginx]}") | $(ratio "${RPS[stream-c16,tollgate+busy-poll]}" "${RPS[stream-c16,nginx]}") |"
            echo "| CPU µs/req, tollgate+busy-poll − tollgate | $(sdiff "${CPU[plain-c1,tollgate+busy-poll]}" "${CPU[plain-c1,tollgate]}") | $(sdiff "${CPU[plain-c64,tollgate+busy-poll]}" "${CPU[plain-c64,tollgate]}") | $(sdiff "${CPU[stream-c16,tollgate+busy-poll]}" "${CPU[stream-c16,tollgate]}") |"
            echo
            echo "Added p50 latency at c=1 over direct with busy-polling: **$(sub "${P50[plain-c1,tollgate+busy-poll]}" "${P50[plain-c1,direct]}") µs** (tollgate+busy-poll), ${ADDED_GW} µs without (tollgate)."
        fi
        if [[ $LIMITS -eq 1 ]]; then
            echo
            echo "| $( [[ $REDIS -eq 1 ]] && echo "limits vs none (tollgate)" || echo "tollgate+limits vs tollgate") | non-streaming c=1 | non-streaming c=64 | streaming c=16 |"
            echo "|---|---:|---:|---:|"
            echo "| rate, tollgate+limits / tollgate | $(ratio "${RPS[plain-c1,tollgate+limits]}" "${RPS[plain-c1,tollgate]}") | $(ratio "${RPS[plain-c64,tollgate+limits]}" "${RPS[plain-c64,tollgate]}") | $(ratio "${RPS[stream-c16,tollgate+limits]}" "${RPS[stream-c16,tollgate]}") |"
            if [[ $REDIS -eq 1 ]]; then
                echo "| rate, tollgate+redis / tollgate | $(ratio "${RPS[plain-c1,tollgate+redis]}" "${RPS[plain-c1,tollgate]}") | $(ratio "${RPS[plain-c64,tollgate+redis]}" "${RPS[plain-c64,tollgate]}") | $(ratio "${RPS[stream-c16,tollgate+redis]}" "${RPS[stream-c16,tollgate]}") |"
            fi
            echo "| CPU µs/req, tollgate+limits − tollgate | $(sdiff "${CPU[plain-c1,tollgate+limits]}" "${CPU[plain-c1,tollgate]}") | $(sdiff "${CPU[plain-c64,tollgate+limits]}" "${CPU[plain-c64,tollgate]}") | $(sdiff "${CPU[stream-c16,tollgate+limits]}" "${CPU[stream-c16,tollgate]}") |"
            if [[ $REDIS -eq 1 ]]; then
                echo "| CPU µs/req, tollgate+redis − tollgate (gateway only) | $(sdiff "${CPU[plain-c1,tollgate+redis]}" "${CPU[plain-c1,tollgate]}") | $(sdiff "${CPU[plain-c64,tollgate+redis]}" "${CPU[plain-c64,tollgate]}") | $(sdiff "${CPU[stream-c16,tollgate+redis]}" "${CPU[stream-c16,tollgate]}") |"
                echo "| redis-server CPU µs/req (tollgate+redis runs) | ${RCPU[plain-c1]} | ${RCPU[plain-c64]} | ${RCPU[stream-c16]} |"
                echo "| of which running the scripts (INFO commandstats) | ${RSCRIPT[plain-c1]} | ${RSCRIPT[plain-c64]} | ${RSCRIPT[stream-c16]} |"
                echo "| Redis script calls per request | ${RCALLS[plain-c1]} | ${RCALLS[plain-c64]} | ${RCALLS[stream-c16]} |"
            fi
            echo
            if [[ $REDIS -eq 1 ]]; then
                echo "Added p50 latency at c=1 over tollgate (no limits): limits and budgets in memory (tollgate+limits) **${ADDED_LIM} µs**, in Redis (tollgate+redis) **${ADDED_RED} µs**. Redis errors counted by tollgate+redis: $REDIS_ERRORS."
            else
                echo "Added p50 latency at c=1 by limits and budgets (tollgate+limits p50 − tollgate p50): **${ADDED_LIM} µs**."
            fi
        fi
        if [[ $ROUTING -eq 1 ]]; then
            echo
            echo "| $ROUTES deployments vs 1 (tollgate) | non-streaming c=1 | non-streaming c=64 | streaming c=16 |"
            echo "|---|---:|---:|---:|"
            for t in "${RTARGETS[@]}"; do
                echo "| rate, $t / tollgate | $(ratio "${RPS[plain-c1,$t]}" "${RPS[plain-c1,tollgate]}") | $(ratio "${RPS[plain-c64,$t]}" "${RPS[plain-c64,tollgate]}") | $(ratio "${RPS[stream-c16,$t]}" "${RPS[stream-c16,tollgate]}") |"
            done
            for t in "${RTARGETS[@]}"; do
                echo "| CPU µs/req, $t − tollgate | $(sdiff "${CPU[plain-c1,$t]}" "${CPU[plain-c1,tollgate]}") | $(sdiff "${CPU[plain-c64,$t]}" "${CPU[plain-c64,tollgate]}") | $(sdiff "${CPU[stream-c16,$t]}" "${CPU[stream-c16,tollgate]}") |"
            done
            echo
            line=""
            for t in "${RTARGETS[@]}"; do
                line="${line:+$line, }$t (${RT_STRATEGY[$t]}) **${ADDED_RT[$t]} µs**"
            done
            echo "Added p50 latency at c=1 over tollgate (1 deployment): $line."
        fi
        echo
        echo "| memory (VmRSS) | idle | after the load runs |"
        echo "|---|---:|---:|"
        echo "| tollgate-dataplane | $(mb "$GW_IDLE_KB") MB | $(mb "$GW_AFTER_KB") MB (peak $(mb "$GW_HWM_KB") MB) |"
        echo "| nginx (master + $NGINX_WORKERS workers) | $(mb "$NGINX_IDLE_KB") MB | $(mb "$NGINX_AFTER_KB") MB |"
        echo
        echo "| target | result | measured |"
        echo "|---|---|---|"
        echo "| throughput at c=64 ≥ nginx | $(verdict "$T_THR") | tollgate/nginx $THR_GN |"
        echo "| added p50 at c=1 ≤ 50 µs | $(verdict "$T_LAT") | ${ADDED_GW} µs |"
        echo "| streams/s at c=16 ≥ nginx | $(verdict "$T_STR") | tollgate/nginx $STR_GN |"
        echo "| idle RSS ≤ 30 MB | $(verdict "$T_RSS") | $(mb "$GW_IDLE_KB") MB |"
    } >"$MARKDOWN"
    log "markdown written to $MARKDOWN"
fi

# ---------------------------------------------------------------------------------------------
# Optional profile of the gateway under load (not part of the numbers above)
# ---------------------------------------------------------------------------------------------
if [[ -n "$PERF_DIR" ]] && command -v perf >/dev/null; then
    mkdir -p "$PERF_DIR"
    for sc in "plain-c64|plain.lua|64" "stream-c16|stream.lua|16"; do
        IFS='|' read -r name lua conns <<<"$sc"
        log "profiling tollgate under $name"
        run_wrk "$lua" "$conns" $((DURATION + 2)) "${URL[tollgate]}" >/dev/null &
        wrk_pid=$!
        sleep 1
        if perf record -F 999 -g -p "$GW_PID" -o "$PERF_DIR/$name.data" -- sleep "$DURATION" \
            >/dev/null 2>"$PERF_DIR/$name.record.log"; then
            # perf pads every line with empty parent columns: strip them.
            report() { perf report -i "$PERF_DIR/$name.data" --stdio -g none "$@" 2>/dev/null |
                sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' || true; }
            report --no-children --sort symbol --percent-limit 0.3 >"$PERF_DIR/$name.symbols.txt"
            report --no-children --sort dso >"$PERF_DIR/$name.dso.txt"
            report --no-children --sort dso,symbol --dsos tollgate-dataplane,libc.so.6 \
                --percent-limit 0.2 >"$PERF_DIR/$name.user.txt"
            report --children --sort symbol --percent-limit 2 >"$PERF_DIR/$name.children.txt"
            log "perf reports in $PERF_DIR/$name.*.txt"
        else
            log "perf record failed (see $PERF_DIR/$name.record.log)"
        fi
        wait "$wrk_pid" || true
    done

    # Syscalls per request, Tollgate against nginx, under the same load.
    EVENTS="writev write read recvfrom sendto futex epoll_wait"
    ev_args=()
    for e in $EVENTS; do ev_args+=(-e "syscalls:sys_enter_$e"); done
    {
        printf '%-12s %-9s' scenario proxy
        for e in $EVENTS; do printf ' %10s' "$e"; done
        printf ' %10s\n' total
        for sc in "plain-c64|plain.lua|64" "stream-c16|stream.lua|16"; do
            IFS='|' read -r name lua conns <<<"$sc"
            for t in tollgate nginx; do
                if [[ $t == tollgate ]]; then pids="$GW_PID"; else pids="$(children "$NGINX_PID" | paste -sd,)"; fi
                perf stat -x, "${ev_args[@]}" -p "$pids" -o "$PERF_DIR/$name.$t.stat" 2>/dev/null &
                stat_pid=$!
                sleep 0.5
                line="$(run_wrk "$lua" "$conns" "$DURATION" "${URL[$t]}")"
                kill -INT "$stat_pid" 2>/dev/null || true
                wait "$stat_pid" 2>/dev/null || true
                reqs="$(field requests "$line")"
                printf '%-12s %-9s' "$name" "$t"
                total=0
                for e in $EVENTS; do
                    n="$(awk -F, -v ev="syscalls:sys_enter_$e" '$3 == ev {print $1}' "$PERF_DIR/$name.$t.stat")"
                    [[ "$n" =~ ^[0-9]+$ ]] || n=0
                    total=$((total + n))
                    printf ' %10s' "$(awk -v n="$n" -v r="$reqs" 'BEGIN {printf "%.2f", r ? n / r : 0}')"
                done
                printf ' %10s\n' "$(awk -v n="$total" -v r="$reqs" 'BEGIN {printf "%.2f", r ? n / r : 0}')"
            done
        done
    } >"$PERF_DIR/syscalls.txt"
    echo
    echo "Syscalls per request (perf stat on the proxy's process(es), $PERF_DIR/syscalls.txt)"
    cat "$PERF_DIR/syscalls.txt"
fi
