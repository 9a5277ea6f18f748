#!/usr/bin/env bash
# make test-container: build the `cpu` image with podman (no Docker engine needed), run it like a user
# would, classify the cat photo over HTTP, check /metrics and the HEALTHCHECK, SIGTERM it and check it
# exits cleanly, and report the image size.
#
# No registry is reachable, so the base image is made here: a debootstrap minbase Debian with python3
# (cached under $VISIONSERVE_CONTAINER_TMP, default /tmp/visionserve-container), passed as BASE_IMAGE.
# The default model repository (make models) is baked in with MODELS=context.
#
# Every process it starts is stopped and the test container removed on success, failure, timeout and Ctrl-C
# (tests/container/lib.sh); what a run killed with SIGKILL left behind is removed by the next run.
#
# Skips (exit 0, with the reason) where podman is missing or not root.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source tests/container/lib.sh

REPO=${REPO:-model_repository}
TAG=${TAG:-localhost/visionserve:test-cpu}
SIZE_LIMIT_MB=${SIZE_LIMIT_MB:-450}
IMAGE=examples/images/cat.jpg

command -v podman >/dev/null || skip "podman is missing (apt-get install -y podman buildah runc debootstrap)"
[[ $(id -u) == 0 ]] || skip "make test-container runs podman as root (rootless podman is not set up here)"
command -v runc >/dev/null || skip "runc is missing (apt-get install -y runc)"
command -v curl >/dev/null || skip "curl is missing"

t0=$SECONDS
podman_env
NAME=visionserve-test-$$
remove_test_containers() {  # this test's containers, and buildah's working containers of a killed build
    podman ps -a --format '{{.Names}}' 2>/dev/null | grep '^visionserve-test-' | xargs -r podman rm -f -t 0 \
        >/dev/null 2>&1 || true
    buildah rm --all >/dev/null 2>&1 || true
}
track_state "$VS_TMP/container-state" "$VS_TMP/cache"
remove_test_containers
VS_CLEANUP_HOOKS+=(remove_test_containers)
if [[ ! -f $REPO/mobilenet_v2/1/manifest.json ]]; then
    log "no $REPO/mobilenet_v2: make models"
    make -s models REPO="$REPO"
fi
BASE=$(ensure_base_image)
t_base=$SECONDS

log "podman build --target cpu (BASE_IMAGE=$BASE, MODELS=context)"
# pip inside the build uses this machine's CA bundle (PyPI may sit behind a TLS proxy): mounted for the
# build only, never copied into an image layer.
run podman build --format docker --target cpu \
    --build-arg BASE_IMAGE="$BASE" --build-arg MODELS=context \
    -v /etc/ssl/certs:/etc/ssl/certs:ro \
    -t "$TAG" . >"$VS_TMP/build.log" 2>&1 \
    || { tail -40 "$VS_TMP/build.log"; die "podman build failed (log: $VS_TMP/build.log)"; }
t_build=$SECONDS

size=$(podman image inspect --format '{{.Size}}' "$TAG")
size_mb=$((size / 1000000))
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
[[ $user == 10001:0 ]] || die "image user is '$user', expected the non-root 10001:0"
[[ $health == *"/v2/health/ready"* ]] || die "no HEALTHCHECK on /v2/health/ready in the image config: $health"
podman run --rm --network none --no-healthcheck --entrypoint sh "$TAG" -c \
    '! python3 -c "import torch" 2>/dev/null && ls /models/mobilenet_v2' >/dev/null \
    || die "the image has torch, or no baked models"

PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
log "podman run $TAG on 127.0.0.1:$PORT (read-only root, tmpfs /tmp, as in the Helm chart)"
# --health-interval=disable: no systemd here to run the timer; the check is run by hand below.
podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp:rw,size=256m \
    --health-interval=disable -e VISIONSERVE_PORT="$PORT" -e VISIONSERVE_HOST=127.0.0.1 \
    "$TAG" 2> >(grep -v 'systemd connection' >&2) >/dev/null
URL=http://127.0.0.1:$PORT

for _ in $(seq 120); do
    curl -fsS "$URL/v2/health/ready" >/dev/null 2>&1 && break
    [[ $(podman inspect --format '{{.State.Running}}' "$NAME") == true ]] \
        || { podman logs "$NAME" | tail -30; die "the container exited before it was ready"; }
    sleep 1
done
curl -fsS "$URL/v2/health/ready" >/dev/null || { podman logs "$NAME" | tail -30; die "not ready after 120 s"; }
t_ready=$SECONDS
curl -fsS "$URL/v2/health/live" >/dev/null || die "/v2/health/live failed"
podman healthcheck run "$NAME" >/dev/null || die "the image's HEALTHCHECK failed on a ready server"

answer=$(curl -fsS --data-binary @"$IMAGE" -H 'Content-Type: image/jpeg' \
    "$URL/v1/models/mobilenet_v2/classify?top_k=3")
echo "classify cat.jpg: $answer"
python3 - "$answer" <<'PY' || die "the cat was not classified as a cat"
import json, sys
top = json.loads(sys.argv[1])["predictions"][0]
assert 281 <= top["index"] <= 285 and top["score"] > 0.3, top
PY
metrics=$(curl -fsS "$URL/metrics")
grep -q '^visionserve_requests_total{.*model="mobilenet_v2"' <<<"$metrics" \
    || die "/metrics has no visionserve_requests_total for mobilenet_v2"
grep -q '^visionserve_model_ready{.*model="mobilenet_v2".*} 1' <<<"$metrics" \
    || die "/metrics does not say mobilenet_v2 is ready"

log "SIGTERM"
t_stop=$SECONDS
podman kill --signal TERM "$NAME" >/dev/null
rc=$(timeout 60 podman wait "$NAME") || die "the container did not exit within 60 s of SIGTERM"
# uvicorn re-raises the signal after its graceful shutdown; as PID 1 that ends in exit 0, elsewhere in 143.
stop_s=$((SECONDS - t_stop))
logs=$(podman logs "$NAME" 2>&1)
[[ $rc == 0 || $rc == 143 ]] && grep -q "Application shutdown complete" <<<"$logs" \
    || { tail -20 <<<"$logs"; die "the container exited with $rc after SIGTERM, no clean shutdown"; }
tail -3 <<<"$logs"

echo
echo "test-container: PASS"
echo "  image        $TAG  ${size_mb} MB (limit ${SIZE_LIMIT_MB} MB), user $user, models baked in"
echo "  timings      base image $((t_base - t0)) s, build $((t_build - t_base)) s, start to ready $((t_ready - t_build)) s, exit $rc ${stop_s} s after SIGTERM, total $((SECONDS - t0)) s"
((size_mb <= SIZE_LIMIT_MB)) || die "image is ${size_mb} MB, over the ${SIZE_LIMIT_MB} MB budget"
