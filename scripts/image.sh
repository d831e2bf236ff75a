#!/usr/bin/env bash
# Builds the two Tollgate images (Containerfile targets `dataplane` and `operator`) from the
# release binaries, offline, with buildah, and writes each as an OCI archive:
#   dist/tollgate-dataplane-<version>.oci.tar   image ghcr.io/tollgate-dev/tollgate-dataplane:<version>
#   dist/tollgate-operator-<version>.oci.tar    image ghcr.io/tollgate-dev/tollgate-operator:<version>
# <version> is the chart's appVersion (the tag the chart deploys by default), checked against
# the binaries' own `--version`. The images also stay in buildah's local storage (a cache
# outside the repo, below), ready for `buildah push` (docs/helm.md#images).
#
# Usage: scripts/image.sh [--registry REGISTRY/PATH] [--no-build]
#   --registry R   name the images R/tollgate-dataplane and R/tollgate-operator instead of
#                  ghcr.io/tollgate-dev/... (then set image.repository in the chart's values)
#   --no-build     use target/release as it is instead of running `cargo build --release`
# Environment: CARGO_TARGET_DIR (where the release binaries are), TOLLGATE_BUILDAH_ROOT
# (buildah's storage, default ~/.cache/tollgate/buildah), TOLLGATE_DIST (default dist/).
#
# Run as root, as buildah needs here: vfs storage and chroot isolation, no daemon, no
# registry (FROM scratch). Installs buildah (Debian) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

registry=ghcr.io/tollgate-dev
build=1
while (($#)); do
  case "$1" in
    --registry) registry="${2%/}"; shift 2 ;;
    --no-build) build=; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if ! command -v buildah >/dev/null; then
  log "installing buildah"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends buildah >/dev/null
fi
for tool in ldd strip; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (binutils, libc-bin)" >&2; exit 1; }
done

version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/tollgate/Chart.yaml)
[ -n "$version" ] || { echo "no appVersion in charts/tollgate/Chart.yaml" >&2; exit 1; }
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
target_dir="${CARGO_TARGET_DIR:-target}"
dist="${TOLLGATE_DIST:-dist}"
root="${TOLLGATE_BUILDAH_ROOT:-$HOME/.cache/tollgate/buildah}"
bah=(buildah --root "$root/storage" --runroot "$root/run" --storage-driver vfs)

if [ -n "$build" ]; then
  log "cargo build --release (tollgate-dataplane, tollgate-operator)"
  cargo build --release --locked -p tollgate-dataplane -p tollgate-operator --bins >&2
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-image.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp Containerfile "$scratch/"

# The root filesystem of one image: the binary (debug info stripped; symbols kept for
# backtraces), every shared library ldd finds for it, CA certificates, the user.
stage() {
  local name=$1 bin="$target_dir/release/$1" rootfs="$scratch/rootfs-${1#tollgate-}"
  [ -x "$bin" ] || { echo "$bin is missing: build it (cargo build --release -p $name)" >&2; exit 1; }
  local got
  got=$("$bin" --version | awk '{print $2}')
  [ "$got" = "$version" ] || { echo "$bin is version $got, the chart's appVersion is $version" >&2; exit 1; }
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs"
  strip --strip-debug -o "$rootfs/usr/local/bin/$name" "$bin"
  local lib
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
  [ -f /etc/ssl/certs/ca-certificates.crt ] || {
    echo "no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)" >&2
    exit 1
  }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\ntollgate:x:65532:65532:tollgate:/nonexistent:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\ntollgate:x:65532:\n' >"$rootfs/etc/group"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$rootfs/etc/hosts"
  chmod -R go-w "$rootfs"
}

mkdir -p "$dist"
for name in tollgate-dataplane tollgate-operator; do
  stage "$name"
  image="$registry/$name:$version"
  log "building $image"
  "${bah[@]}" bud --isolation chroot --target "${name#tollgate-}" --layers=false \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --timestamp 0 -f "$scratch/Containerfile" -t "$image" "$scratch" >&2
  archive="$dist/$name-$version.oci.tar"
  rm -f "$archive"
  "${bah[@]}" push --quiet "$image" "oci-archive:$archive:$image" >&2
  log "$image: $(du -h "$archive" | cut -f1) ($archive)"
  echo "$image"
done
