#!/usr/bin/env bash
# test_image.sh - the container image, built and run for real with podman (no registry:
# the base is made by debootstrap, deploy/image-base.sh, cached for a week):
#   1. podman build -f deploy/Dockerfile (from this source tree, Debian packages only);
#   2. podman run IMAGE up ...: a one-container cluster (mpirun inside) serving the bundled
#      model mounted read-only from ../shared; 16 concurrent golden `kvrelay submit` from
#      the machine; `podman stop` ends it cleanly (exit 0);
#   3. podman kube play deploy/k8s/single-pod.yaml (ConfigMap + Deployment; the model
#      volume is a podman volume bound to ../shared/models): golden streams again, its
#      readiness probe, then `podman kube down`.
# The containers sit on an emulated-hosts bridge (emuhosts.sh podman-net: an internal CNI
# network, no gateway, no NAT), so they have a private address on a test network and can
# send nothing anywhere else; the client runs on the machine.
#   test_image.sh TEST_BIN_DIR
# Exit 0 pass, 1 fail, 77 skip (no podman/debootstrap, or no namespaces: reason printed).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
EMU=$HERE/emuhosts.sh
TBIN=$(cd "${1:?TEST_BIN_DIR}" && pwd)
SHARED=$(cd "${KVR_SHARED_DIR:-$SRC/../shared}" && pwd)
BIN=$SRC/build/bin # only the client (kvrelay submit/status) runs outside the container
[ -x "${KVR_CLIENT:-}" ] && BIN=$(dirname "$KVR_CLIENT")

for c in podman debootstrap; do
    command -v $c >/dev/null || { echo "SKIP: $c not installed (scripts/install-deploy-deps.sh installs podman, buildah, runc, debootstrap)"; exit 77; }
done
if ! why=$("$EMU" check); then
    echo "SKIP: $why"
    exit 77
fi

P="im$$"
P=${P:0:11}
T=$(mktemp -d "/var/tmp/kvr-$P.XXXXXX")
export EMUHOSTS_OWNER=$$
# podman as it works on this kind of machine (notes/deploy.md): limits within the hard
# ones, runc (crun refuses cgroup v1 hybrid).
cat >"$T/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$T/containers.conf
IMAGE="localhost/kvrelay:test-$P"
cleanup() {
    local rc=$?
    podman rm -f -t 5 "$P-up" >/dev/null 2>&1 || true
    [ -f "$T/pod.yaml" ] && podman kube down "$T/pod.yaml" >/dev/null 2>&1 || true
    podman volume rm -f "$P-models" >/dev/null 2>&1 || true
    # The image and the compile's layers go (older than 10 minutes: never another run's
    # build in progress); the tagged package stages and the base stay for the next build.
    podman rmi "$IMAGE" >/dev/null 2>&1 || true
    podman image prune -f --filter until=10m >/dev/null 2>&1 || true
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E '^localhost/kvrelay-(buildenv|runenv):' |
        grep -v ":${KEY:-none}\$" || true); do podman rmi "$old" >/dev/null 2>&1 || true; done
    "$EMU" down "$P" || true
    [ $rc -ne 0 ] && [ -f "$T/build.log" ] && tail -n 30 "$T/build.log"
    rm -rf "$T"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
wait_for() {
    local limit=$1 what=$2 t
    shift 2
    t=$(now)
    until "$@"; do
        awk -v a="$t" -v b="$(now)" -v l="$limit" 'BEGIN{exit !(b-a > l)}' && fail "$what: not within $limit s"
        sleep 0.2
    done
}

# ---- 1. build ------------------------------------------------------------------------
t0=$(now)
BASE=$("$SRC/deploy/image-base.sh") || fail "cannot make the Debian base image (deploy/image-base.sh)"
echo "base image $BASE ($(elapsed "$t0") s)"
t0=$(now)
# --network host: the build's apt-get reaches the Debian mirror from the machine itself
# (no container bridge); the layers up to the package installs are cached between runs.
# The package stages are tagged so they survive the pruning below: only the compile runs
# again on a change (Debian's packages are downloaded once a week, with a new base).
KEY=${BASE##*:}
for stage in buildenv runenv; do
    podman build --network host --build-arg "BASE=$BASE" -f "$SRC/deploy/Dockerfile" --target $stage \
        -t "localhost/kvrelay-$stage:$KEY" "$SRC" >>"$T/build.log" 2>&1 || fail "podman build --target $stage failed"
done
podman build --network host --build-arg "BASE=$BASE" -f "$SRC/deploy/Dockerfile" -t "$IMAGE" "$SRC" \
    >>"$T/build.log" 2>&1 || fail "podman build failed"
echo "image built in $(elapsed "$t0") s: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

"$EMU" up "$P" 1 >"$T/env"
NET=$("$EMU" podman-net "$P")
ctr_ip() { podman inspect "$1" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}'; }
serving() { "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 >/dev/null 2>&1; }

# ---- 2. podman run IMAGE up ----------------------------------------------------------
t0=$(now)
podman run -d --name "$P-up" --network "$NET" --hostname "$P-up" \
    -v "$SHARED/models:/models:ro" "$IMAGE" \
    up --model /models/stories260K.bin --tokenizer /models/tok512.bin --port 50051 --host 0.0.0.0 \
    --prefill 1 --decode 1 --threads 1 >/dev/null
ADDR="$(ctr_ip "$P-up"):50051"
wait_for 60 "the container's cluster serving at $ADDR" serving
echo "podman run: serving at $ADDR in $(elapsed "$t0") s"
"$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 ||
    fail "podman run: golden streams"
podman stop -t 30 "$P-up" >/dev/null
code=$(podman inspect "$P-up" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs "$P-up" | tail -n 20; fail "podman run: kvrelay up exited $code after podman stop"; }
podman rm "$P-up" >/dev/null
echo "podman run: stopped cleanly (exit 0)"

# ---- 3. podman kube play deploy/k8s/single-pod.yaml ----------------------------------
# The manifest as committed, with this run's names (podman's names are machine-wide), the
# test image, and the bundled model's file names.
podman volume create --opt type=none --opt o=bind --opt "device=$SHARED/models" "$P-models" >/dev/null
sed -e "s|image: kvrelay:latest|image: $IMAGE|" \
    -e "s|claimName: kvrelay-models|claimName: $P-models|" \
    -e "s|name: kvrelay-config|name: $P-config|" \
    -e "s|^  name: kvrelay$|  name: $P|" \
    -e "s|MODEL: /models/model.bin|MODEL: /models/stories260K.bin|" \
    -e "s|TOKENIZER: /models/tokenizer.bin|TOKENIZER: /models/tok512.bin|" \
    "$SRC/deploy/k8s/single-pod.yaml" >"$T/pod.yaml"
grep -q "$P-config" "$T/pod.yaml" && grep -q "claimName: $P-models" "$T/pod.yaml" || fail "renaming the manifest's objects"
t0=$(now)
podman kube play --network "$NET" "$T/pod.yaml" >"$T/play.log" 2>&1 ||
    { cat "$T/play.log"; fail "podman kube play deploy/k8s/single-pod.yaml"; }
CTR=$(podman ps --filter "pod=$P-pod-0" --format '{{.Names}}' | grep -v -- '-infra$' | head -n1)
[ -n "$CTR" ] || { podman ps -a; fail "kube play: no container in pod $P-pod-0"; }
ADDR="$(ctr_ip "$CTR"):50051"
wait_for 60 "the Deployment's pod serving at $ADDR" serving
echo "kube play: serving at $ADDR in $(elapsed "$t0") s"
"$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 ||
    fail "kube play: golden streams"
# The manifest's readiness probe command, run in the container as the kubelet would.
podman exec "$CTR" kvrelay status --addr 127.0.0.1:50051 --timeout 2 >/dev/null || fail "kube play: the readiness probe command fails"
podman kube down "$T/pod.yaml" >/dev/null
left=$(podman ps -a --format '{{.Names}}' | grep "^$P" || true)
[ -z "$left" ] || fail "kube down left containers: $left"
echo "kube play: readiness probe passes; kube down removed everything"
echo "PASS"
