#!/usr/bin/env bash
# A real Kubernetes API server for the end-to-end tests of the operator, built offline.
#
# No package registry ships kube-apiserver, so this builds kube-apiserver,
# kube-controller-manager and a kubectl of the same version (1.20.2) from Debian bookworm's
# `kubernetes` source package with Debian's Go 1.19, once, into a cache outside the repo:
#   ${TOLLGATE_KUBE_CACHE:-$HOME/.cache/tollgate/kube-1.20.2}/bin/
# etcd comes from Debian's etcd-server. See docs/testing-kubernetes.md.
#
# Idempotent and non-interactive: a second run, with the binaries there, only checks them.
# Run as root (it installs Debian packages when they are missing). Its only output on stdout is
# the bin dir, so `TOLLGATE_KUBE_BIN=$(scripts/kube-test-env.sh)` works; the rest goes to stderr.
set -euo pipefail
exec 3>&1 1>&2

KUBE_VERSION=1.20.2
cache="${TOLLGATE_KUBE_CACHE:-$HOME/.cache/tollgate/kube-$KUBE_VERSION}"
bin="$cache/bin"
binaries=(kube-apiserver kube-controller-manager kubectl)

log() { printf '\n==> %s\n' "$*"; }

export DEBIAN_FRONTEND=noninteractive
apt_updated=
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

built() {
  local b
  for b in "${binaries[@]}"; do
    [ -x "$bin/$b" ] || return 1
  done
  "$bin/kube-apiserver" --version >/dev/null 2>&1 &&
    "$bin/kube-controller-manager" --version >/dev/null 2>&1 &&
    "$bin/kubectl" version --client >/dev/null 2>&1
}

# What the tests run: etcd from the PATH, openssl for the service-account key.
apt_install etcd-server openssl

if built; then
  log "kube $KUBE_VERSION already built: $("$bin/kube-apiserver" --version)"
  echo "$bin" >&3
  exit 0
fi

# --- the build (once) ---------------------------------------------------------------------
# reflect2 1.0.2 replaces the vendored 1.0.1, which crashes under Go >= 1.18 on the first
# custom-resource create.
apt_install golang-1.19-go golang-github-modern-go-reflect2-dev rsync dpkg-dev make \
  ca-certificates xz-utils findutils diffutils
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2

# apt-get source needs deb-src entries: add them beside the system's deb ones.
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: .*$KUBE_VERSION"; then
  log "enabling deb-src"
  src=/etc/apt/sources.list.d/tollgate-deb-src.sources
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src"
  fi
  if ! grep -q '^Types: deb-src' "$src" 2>/dev/null; then
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
  fi
  apt-get update -qq
  apt_updated=1
fi

scratch="$cache/build"
# A failed build leaves its tree here to look at; the next run starts afresh.
rm -rf "$scratch"
mkdir -p "$scratch" "$bin"

log "fetching Debian's kubernetes $KUBE_VERSION source into $scratch"
# Bookworm's is 1.20.5+really1.20.2: the 1.20.2 release, with Debian's security patches.
(cd "$scratch" && apt-get source -qq kubernetes >/dev/null)
tree=$(find "$scratch" -mindepth 1 -maxdepth 1 -type d -name "kubernetes-*$KUBE_VERSION" | head -n1)
if [ -z "$tree" ] || [ ! -f "$tree/Makefile" ]; then
  echo "no kubernetes source tree in $scratch" >&2
  exit 1
fi

log "replacing the vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
# Only the package's sources (.go, and the empty .s files that allow its go:linkname
# declarations); vendor mode doesn't check that they match the version in vendor/modules.txt.
find -L "$reflect2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
  -exec cp -L {} "$tree/vendor/github.com/modern-go/reflect2/" \;
[ -f "$reflect2/LICENSE" ] && cp -L "$reflect2/LICENSE" "$tree/vendor/github.com/modern-go/reflect2/"

log "building kube-apiserver, kube-controller-manager and kubectl (5 to 15 minutes on 2 cores)"
start=$(date +%s)
(
  cd "$tree"
  export GOROOT=/usr/lib/go-1.19
  export PATH="$GOROOT/bin:$PATH"
  export GOPATH="$scratch/gopath" GOCACHE="$scratch/gocache"
  export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on GOTOOLCHAIN=local
  export CGO_ENABLED=0
  # The version (v1.20.2) comes from the git-archive stamp in hack/lib/version.sh.
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl"
)
out=$(find "$tree/_output" -type f -name kube-apiserver -path '*bin*' -printf '%h\n' | head -n1)
for b in "${binaries[@]}"; do
  install -m 0755 "$out/$b" "$bin/$b"
done
log "built in $(($(date +%s) - start)) s"

# Keep only the binaries: the source tree and Go's caches take gigabytes.
chmod -R u+w "$scratch" 2>/dev/null || true
rm -rf "$scratch"

built || {
  echo "the built binaries do not run" >&2
  exit 1
}
log "kube $KUBE_VERSION built: $("$bin/kube-apiserver" --version)"
echo "$bin" >&3
