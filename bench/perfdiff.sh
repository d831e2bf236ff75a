#!/usr/bin/env bash
# Where the gateway's own CPU per request goes, in real time: `perf record` of the data plane and
# of the floor (dataplane/examples/bare_proxy.rs, the same HTTP stack doing nothing else) under
# the same wrk load, each symbol's samples turned into µs per request, and the two diffed.
#
# Use it to choose what to cut. bench/instructions.sh counts instructions, which is
# deterministic but weighs every instruction alike: tight loops (JSON scanning) run several
# instructions per cycle while pointer-chasing and allocator code run below one, so the largest
# instruction counts are not always the largest times (see docs/benchmarks.md).
#
# Usage: bench/perfdiff.sh [--connections N] [--seconds S] [--top N] [--no-build]
# Needs perf (apt-get install linux-perf), wrk, python3, cargo. Numbers include perf's own
# overhead (a few %), the same for both targets; sampling is at 2999 Hz.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
CONNS=64
SECS=6
TOP=30
BUILD=1
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --connections) CONNS="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --top) TOP="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "perfdiff.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
    esac
done
for tool in perf wrk; do
    command -v "$tool" >/dev/null || { echo "perfdiff.sh: needs $tool" >&2; exit 1; }
done
if [[ $BUILD -eq 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p tollgate-dataplane --bins --example bare_proxy)
fi

bench_tmp perfdiff

start_mock_and_tollgate
"$BIN_DIR/examples/bare_proxy" 127.0.0.1:0 "127.0.0.1:$MOCK_PORT" 2 >"$TMP/floor.log" 2>&1 &
PIDS+=($!)
FLOOR_PID=$!
FLOOR_PORT="$(wait_port "$TMP/floor.log" "$FLOOR_PID")"

cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BENCH_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $BENCH_KEY"
EOF

# profile NAME PORT PID: warm up, then record SECS seconds inside a longer wrk run.
profile() {
    local url="http://127.0.0.1:$2/v1/chat/completions"
    wrk -t1 -c"$CONNS" -d2s -s "$TMP/post.lua" "$url" >/dev/null
    wrk -t1 -c"$CONNS" -d"$((SECS + 2))s" -s "$TMP/post.lua" "$url" >"$TMP/$1.wrk" &
    local load=$!
    sleep 1
    perf record -q -F 2999 -p "$3" -o "$TMP/$1.data" -- sleep "$SECS" >/dev/null 2>&1
    wait "$load"
    perf report -i "$TMP/$1.data" --no-children -n --sort dso,symbol --stdio 2>/dev/null >"$TMP/$1.report"
    echo "$(awk '/Requests\/sec/ {print $2}' "$TMP/$1.wrk")" >"$TMP/$1.rate"
}
profile tollgate "$GW_PORT" "$GW_PID"
profile floor "$FLOOR_PORT" "$FLOOR_PID"

python3 - "$TMP" "$SECS" "$TOP" <<'PY'
import collections, re, sys
tmp, secs, top = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
HZ = 2999
def load(name):
    rate = float(open(f"{tmp}/{name}.rate").read())
    per = collections.Counter()
    for line in open(f"{tmp}/{name}.report"):
        m = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)$", line)
        if not m:
            continue
        dso = {"tollgate-dataplane": "binary", "bare_proxy": "binary"}.get(m.group(2), m.group(2))
        sym = re.sub(r"\s+-\s+-\s*$", "", m.group(3)).strip()
        sym = re.sub(r"^(tollgate_dataplane|bare_proxy)::", "", sym)
        per[(dso, sym)] += int(m.group(1)) / (rate * secs) / HZ * 1e6
    return rate, per
(gr, g), (fr, f) = load("tollgate"), load("floor")
print(f"requests/s under perf: tollgate {gr:.0f}, floor {fr:.0f}")
print(f"CPU µs per request:    tollgate {sum(g.values()):.1f}, floor {sum(f.values()):.1f}")
for dso in sorted({k[0] for k in g} | {k[0] for k in f}):
    a = sum(v for k, v in g.items() if k[0] == dso)
    b = sum(v for k, v in f.items() if k[0] == dso)
    if a + b > 0.2:
        print(f"  {dso:<22} tollgate {a:6.2f}  floor {b:6.2f}  difference {a - b:+6.2f}")
print(f"\nLargest differences, µs per request (tollgate - floor; tollgate; floor):")
for k in sorted(set(g) | set(f), key=lambda k: -(g.get(k, 0) - f.get(k, 0)))[:top]:
    print(f"{g.get(k, 0) - f.get(k, 0):+6.2f} {g.get(k, 0):6.2f} {f.get(k, 0):6.2f}  {k[1][:110]}")
PY
