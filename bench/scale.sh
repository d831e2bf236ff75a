#!/usr/bin/env bash
# Tollgate scale benchmarks (docs/scale.md):
#
#  1. compile/publish cost: crds/examples/scale.rs generates --keys VirtualKeys (each with its
#     own Secret) and --models LLMModels in memory and times compile(), the content hash,
#     encode() (JSON + gzip + shards), decode() and parsing the same objects as YAML; prints
#     the config's JSON and gzipped sizes and its shard count.
#  2. propagation: operator/examples/propagation.rs starts a real API server (etcd +
#     kube-apiserver 1.20.2, see docs/testing-kubernetes.md), the operator and one data plane in
#     cluster mode, and times `kubectl apply` -> first response with the change, for LLMModel
#     edits and new VirtualKeys: once with an almost empty cluster, once after importing
#     --propagation-keys VirtualKeys (which also times the import and the operator's first
#     status writes for all of them).
#
# Usage: bench/scale.sh [options]
#   --markdown FILE          also write the results as markdown to FILE
#   --keys N                 VirtualKeys for the compile benchmark (default 10000)
#   --models N               LLMModels for the compile benchmark (default 1000)
#   --iters N                iterations of each compile-benchmark step (default 10)
#   --rounds N               LLMModel edits measured per propagation run (default 30)
#   --key-rounds N           new VirtualKeys measured per propagation run (default 10)
#   --propagation-keys N     VirtualKeys imported before the second propagation run
#                            (default 10000; 0 skips that run)
#   --skip-compile           skip part 1
#   --skip-propagation       skip part 2
#   --no-build               use the binaries already in target/release
#   -h, --help
#
# Needs cargo, and for part 2 etcd on the PATH and the API server built by
# scripts/kube-test-env.sh. Part 1 takes well under a minute; part 2 about a minute for the
# small run and, on 2 cores, several minutes for the 10,000-key import.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MARKDOWN=""
KEYS=10000
MODELS=1000
ITERS=10
ROUNDS=30
KEY_ROUNDS=10
PROP_KEYS=10000
COMPILE=1
PROPAGATION=1
BUILD=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --markdown) MARKDOWN="$2"; shift 2 ;;
    --keys) KEYS="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --iters) ITERS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --key-rounds) KEY_ROUNDS="$2"; shift 2 ;;
    --propagation-keys) PROP_KEYS="$2"; shift 2 ;;
    --skip-compile) COMPILE=0; shift ;;
    --skip-propagation) PROPAGATION=0; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
REL="$TARGET/release"
cd "$ROOT"

if [[ $BUILD == 1 ]]; then
  echo "building (release) ..." >&2
  cargo build --release -q -p tollgate-crds --example scale
  if [[ $PROPAGATION == 1 ]]; then
    cargo build --release -q -p tollgate-operator -p tollgate-dataplane --bins
    cargo build --release -q -p tollgate-operator --example propagation
  fi
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

if [[ $COMPILE == 1 ]]; then
  echo "== compile and publish: $KEYS keys, $MODELS models ==" >&2
  "$REL/examples/scale" --keys "$KEYS" --models "$MODELS" --iters "$ITERS" | tee "$OUT/compile.txt"
fi

if [[ $PROPAGATION == 1 ]]; then
  echo "== propagation, (almost) empty cluster ==" >&2
  "$REL/examples/propagation" --rounds "$ROUNDS" --key-rounds "$KEY_ROUNDS" --keys 0 \
    --operator-bin "$REL/tollgate-operator" --dataplane-bin "$REL/tollgate-dataplane" \
    | tee "$OUT/propagation-0.txt"
  if [[ $PROP_KEYS -gt 0 ]]; then
    echo "== propagation with $PROP_KEYS VirtualKeys ==" >&2
    "$REL/examples/propagation" --rounds "$ROUNDS" --key-rounds "$KEY_ROUNDS" --keys "$PROP_KEYS" \
      --operator-bin "$REL/tollgate-operator" --dataplane-bin "$REL/tollgate-dataplane" \
      | tee "$OUT/propagation-n.txt"
  fi
fi

# The examples print markdown tables and headings; other lines become list items, indented
# lines (metrics) stay a code block.
to_md() {
  awk '
    /^\|/ || /^#/ || /^$/ { print; next }
    /^    / { print; next }
    { print "- " $0 }
  ' "$1"
}

if [[ -n $MARKDOWN ]]; then
  {
    echo "# Tollgate scale benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [[ -f $OUT/compile.txt ]]; then
      echo
      echo "## Compile and publish ($KEYS VirtualKeys, $MODELS LLMModels)"
      echo
      to_md "$OUT/compile.txt"
    fi
    if [[ -f $OUT/propagation-0.txt ]]; then
      echo
      echo "## Propagation, (almost) empty cluster"
      echo
      to_md "$OUT/propagation-0.txt" | sed 's/^## /### /'
    fi
    if [[ -f $OUT/propagation-n.txt ]]; then
      echo
      echo "## Propagation with $PROP_KEYS VirtualKeys"
      echo
      to_md "$OUT/propagation-n.txt" | sed 's/^## /### /'
    fi
  } > "$MARKDOWN"
  echo "wrote $MARKDOWN" >&2
fi
