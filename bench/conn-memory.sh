#!/usr/bin/env bash
# Memory per idle keep-alive client connection: Tollgate against nginx (as a plain reverse proxy,
# 2 workers, the benchmark's configuration) in one run.
#
# Starts the mock upstream, the data plane and nginx; for each proxy, opens N connections, sends
# one chat request on each and reads its answer, leaves them all open and idle, and reports the
# growth of the proxy's resident memory (VmRSS; nginx's master and workers summed) per
# connection. Freed memory the allocator has not yet returned to the kernel still counts, so
# the figure is an upper bound on what a connection holds.
#
# Usage: bench/conn-memory.sh [--connections N] [--no-build]
# Needs nginx (apt-get install nginx-light), python3, cargo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
N=2000
BUILD=1
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --connections) N="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "conn-memory.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
    esac
done
command -v nginx >/dev/null || { echo "conn-memory.sh: needs nginx" >&2; exit 1; }
if [[ $BUILD -eq 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p tollgate-dataplane --bins)
fi
# Each connection is a file descriptor here and in the proxy.
ulimit -n "$((N * 2 + 256))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[[ $(ulimit -n) -gt $((N + 64)) ]] || { echo "conn-memory.sh: open-file limit $(ulimit -n) is too low for $N" >&2; exit 1; }

bench_tmp connmem

start_mock_and_tollgate

NGINX_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
write_nginx_conf "$TMP/nginx" "$NGINX_PORT" "$MOCK_PORT" 2 "$((N + 256))"
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" >"$TMP/nginx/out.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
for ((i = 0; i < 100; i++)); do
    [[ -n "$(ss -Htln "sport = :$NGINX_PORT" 2>/dev/null)" ]] && break
    sleep 0.1
done

python3 - "$N" "$BENCH_KEY" "$BENCH_BODY" "tollgate:$GW_PORT:$GW_PID" "nginx:$NGINX_PORT:$NGINX_PID" <<'PY'
import re, socket, subprocess, sys, time

n, key, body = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer "
       + key.encode() + b"\r\ncontent-type: application/json\r\ncontent-length: "
       + str(len(body)).encode() + b"\r\n\r\n" + body)

def rss_kib(pid):
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                     text=True).stdout.split()]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return total

def answer(s):
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("a connection closed before its answer")
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"not a 200: {got[:200]!r}")

rows = []
for target in sys.argv[4:]:
    name, port, pid = target.split(":")
    port, pid = int(port), int(pid)
    for _ in range(20):  # warm the proxy's pools and allocator
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(req); answer(s)
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        conns.append(s)
    for s in conns:
        answer(s)
    time.sleep(1)
    after = rss_kib(pid)
    rows.append((name, before, after))
    for s in conns:
        s.close()
    time.sleep(0.5)

print(f"{n} idle keep-alive connections, each after one chat request:")
print(f"{'proxy':<10} {'RSS before':>12} {'RSS with them':>14} {'per connection':>15}")
for name, before, after in rows:
    print(f"{name:<10} {before:>9} KiB {after:>10} KiB {(after - before) / n:>11.1f} KiB")
PY
