#!/usr/bin/env bash
# The image test (slow: it needs the release binaries, so it is not part of scripts/test.sh):
# builds both images with scripts/image.sh, then runs them with buildah as a container would:
#   - each image's config: non-root user 65532, its entrypoint, the OCI labels (version = the
#     chart's appVersion), and no shell inside;
#   - the data-plane image's entrypoint, run with `buildah run` against the quickstart
#     manifests (mounted read-only), as UID 65532, serves a streamed chat completion over
#     loopback;
#   - the operator image's entrypoint answers `--help`;
#   - the OCI archives are complete (oci-layout, index.json, the blobs they name).
# Usage: scripts/test-image.sh [--no-build]   (--no-build: use target/release as it is)
# Ends with "N passed, N failed"; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }
passed=0
failed=0
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "ok: $what"
  else
    failed=$((failed + 1))
    echo "FAILED: $what"
  fi
}

command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/tollgate/Chart.yaml)
dist="${TOLLGATE_DIST:-dist}"
root="${TOLLGATE_BUILDAH_ROOT:-$HOME/.cache/tollgate/buildah}"
bah=(buildah --root "$root/storage" --runroot "$root/run" --storage-driver vfs)

start=$(date +%s)
scripts/image.sh "$@" >/dev/null
log "images built in $(($(date +%s) - start)) s"
dp="ghcr.io/tollgate-dev/tollgate-dataplane:$version"
op="ghcr.io/tollgate-dev/tollgate-operator:$version"

containers=()
pgid=
cleanup() {
  [ -z "$pgid" ] || kill -- "-$pgid" 2>/dev/null || true
  local c
  for c in "${containers[@]}"; do "${bah[@]}" rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

config() { "${bah[@]}" inspect --type image --format "$2" "$1"; }

for image in "$dp" "$op"; do
  name=${image%:*}
  name=${name##*/}
  log "$image"
  check "$name runs as 65532:65532" [ "$(config "$image" '{{.OCIv1.Config.User}}')" = 65532:65532 ]
  check "$name entrypoint" [ "$(config "$image" '{{.OCIv1.Config.Entrypoint}}')" = "[/usr/local/bin/$name]" ]
  for label in "org.opencontainers.image.version=$version" \
    org.opencontainers.image.licenses=Apache-2.0 \
    org.opencontainers.image.source=https://github.com/tollgate-dev/tollgate; do
    check "$name label $label" [ "$(config "$image" "{{index .OCIv1.Config.Labels \"${label%%=*}\"}}")" = "${label#*=}" ]
  done
  ctr=$("${bah[@]}" from --pull-never --name "test-$name" "$image")
  containers+=("$ctr")
  check "$name has no shell" bash -c "! ${bah[*]} run --isolation chroot $ctr -- /bin/sh -c true 2>/dev/null"
  archive="$dist/$name-$version.oci.tar"
  check "$name OCI archive: oci-layout, index.json and every blob of the manifest" \
    python3 - "$archive" <<'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
names = set(t.getnames())
blob = lambda d: json.load(t.extractfile("blobs/" + d.replace(":", "/")))
assert "oci-layout" in names and "index.json" in names, names
index = json.load(t.extractfile("index.json"))
manifest = blob(index["manifests"][0]["digest"])
for d in [manifest["config"]] + manifest["layers"]:
    assert "blobs/" + d["digest"].replace(":", "/") in names, d
PY
  echo "$name: image $(du -h "$archive" | cut -f1) (OCI archive, compressed), $("${bah[@]}" images --format '{{.Size}}' "$image") unpacked"
done

# --- the data plane's entrypoint, as a pod would run it ----------------------------------
log "data plane: the entrypoint against the quickstart manifests"
entrypoint=$(config "$dp" '{{index .OCIv1.Config.Entrypoint 0}}')
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
logfile=$(mktemp)
setsid "${bah[@]}" run --isolation chroot -v "$PWD/examples/quickstart:/etc/tollgate/manifests:ro" \
  "${containers[0]}" -- "$entrypoint" --manifests /etc/tollgate/manifests --listen "127.0.0.1:$port" \
  >"$logfile" 2>&1 &
pgid=$!
ready=
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/health/readiness" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.1
done
check "data plane ready on 127.0.0.1:$port" [ -n "$ready" ]
uid=$(ps -eo uid=,args= | awk -v p="--listen 127.0.0.1:$port" 'index($0, p) && $2 == "'"$entrypoint"'" {print $1; exit}')
check "data plane process runs as UID 65532 (got ${uid:-none})" [ "$uid" = 65532 ]
stream=$(curl -sSN --max-time 20 "http://127.0.0.1:$port/v1/chat/completions" \
  -H 'Authorization: Bearer sk-tollgate-demo-key-0001' -H 'Content-Type: application/json' \
  -d '{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}' || true)
check "streamed chat completion: chunks, then [DONE]" \
  bash -c '[ "$(grep -c "^data: {" <<<"$1")" -ge 3 ] && grep -q "^data: \[DONE\]" <<<"$1" && grep -q "\"content\":\"Hello" <<<"$1"' _ "$stream"
text=$(grep '^data: {' <<<"$stream" | sed 's/^data: //' | python3 -c '
import json, sys
print("".join(c["delta"].get("content") or "" for l in sys.stdin for c in json.loads(l).get("choices", [])))')
echo "streamed reply: $text"
check "the reply is the quickstart model's" [ "$text" = "Hello from Tollgate! This reply is streamed word by word." ]
kill -- "-$pgid" 2>/dev/null || true
wait "$pgid" 2>/dev/null || true
pgid=
[ "$failed" = 0 ] || { echo "data plane log:"; cat "$logfile"; }
rm -f "$logfile"

# --- the operator's entrypoint -----------------------------------------------------------
log "operator: the entrypoint's --help"
entrypoint=$(config "$op" '{{index .OCIv1.Config.Entrypoint 0}}')
help=$("${bah[@]}" run --isolation chroot "${containers[1]}" -- "$entrypoint" --help 2>&1 || true)
check "operator --help lists its flags" bash -c 'grep -q -- "--config-namespace" <<<"$1" && grep -q -- "--lease-name" <<<"$1"' _ "$help"

echo
echo "image tests: $passed passed, $failed failed"
[ "$failed" = 0 ]
