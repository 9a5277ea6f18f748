#!/usr/bin/env bash
# make test-arm64: the runtime really runs on aarch64. A Debian arm64 rootfs under qemu-user-static
# (binfmt) gets the `serve` extra from PyPI's aarch64 wheels; `visionserve serve` runs in it (chroot, host
# network), the cat photo is classified from the host, and the scores are compared with the x86 server.
#
# First run ≈ 7 min on 2 cores (debootstrap ≈ 4.5 min + pip ≈ 1.5 min under emulation); the rootfs is cached under
# $VISIONSERVE_CONTAINER_TMP/arm64, keyed by the Debian suite, mirror and the serve dependency set, and
# later runs take about a minute (most of it the model loading and warm-up under emulation).
#
# Needs root, debootstrap, qemu-user-static and binfmt-support; skips (exit 0, with the reason) without them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source tests/container/lib.sh

HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
REPO=${REPO:-model_repository}
IMAGE=examples/images/cat.jpg

[[ $(id -u) == 0 ]] || skip "make test-arm64 needs root (debootstrap, chroot, mounts)"
for tool in debootstrap chroot mount update-binfmts; do
    command -v "$tool" >/dev/null || skip "$tool is missing: apt-get install -y qemu-user-static binfmt-support debootstrap"
done
QEMU=$(command -v qemu-aarch64-static || true)
[[ -n $QEMU ]] || skip "qemu-aarch64-static is missing: apt-get install -y qemu-user-static binfmt-support"
[[ -x $HOST_PY ]] || die "$HOST_PY missing: run make setup"
if [[ ! -f $REPO/mobilenet_v2/1/manifest.json ]]; then
    log "no $REPO/mobilenet_v2: make models"
    make -s models REPO="$REPO"
fi

if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || skip "cannot mount binfmt_misc (not allowed in this sandbox?)"
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || skip "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64)"

t0=$SECONDS
MIRROR=$(debian_mirror) || skip "no Debian mirror found in this machine's apt sources"
PACKAGES="python3,python3-venv,ca-certificates"
# The serve dependency set, as pyproject.toml declares it: a change there rebuilds the rootfs.
SERVE_DEPS=$("$HOST_PY" - <<'PY'
import tomllib
print("\n".join(sorted(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve"])))
PY
)
KEY=$(printf '%s\n' v1 "$VS_SUITE" "$MIRROR" "$PACKAGES" "$SERVE_DEPS" | sha256sum | cut -c1-12)
ROOTFS=$VS_TMP/arm64/rootfs-$KEY
mkdir -p "$VS_TMP/arm64"

MOUNTS=()
SERVER_PID=""
X86_PID=""
cleanup() {
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    [[ -n $X86_PID ]] && kill "$X86_PID" 2>/dev/null && wait "$X86_PID" 2>/dev/null || true
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
    done
    MOUNTS=()
}
trap cleanup EXIT

bind() {  # bind SRC DST [ro]
    mount --bind "$1" "$2"
    MOUNTS+=("$2")
    [[ ${3:-} == ro ]] && mount -o remount,bind,ro "$2"
    return 0
}

# qemu 7.2 passes the host's /proc/cpuinfo through; onnxruntime's cpuinfo then reads x86 flags on an ARM
# CPU and crashes on import. Show it an ARM CPU instead: two Cortex-A78AE cores (Jetson Orin's CPU).
write_fake_cpuinfo() {
    local i
    for i in 0 1; do
        cat <<EOF
processor	: $i
BogoMIPS	: 62.50
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd42
CPU revision	: 1

EOF
    done
}

mount_system() {
    bind /proc "$ROOTFS/proc"
    write_fake_cpuinfo >"$VS_TMP/arm64/cpuinfo"
    bind "$VS_TMP/arm64/cpuinfo" "$ROOTFS/proc/cpuinfo" ro
    bind /sys "$ROOTFS/sys" ro
    bind /dev "$ROOTFS/dev"
    # This machine's resolver and CA bundle (PyPI may sit behind a TLS proxy): copied in, never committed.
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
}

CHROOT_ENV=(/usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1)
in_chroot() { chroot "$ROOTFS" "${CHROOT_ENV[@]}" "$@"; }

WHEEL_DIR=$(mktemp -d "$VS_TMP/arm64/wheel.XXXX")
"$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$WHEEL_DIR" . >"$WHEEL_DIR/build.log" 2>&1 \
    || { cat "$WHEEL_DIR/build.log"; die "cannot build the visionserve wheel"; }
WHEEL=$(basename "$WHEEL_DIR"/*.whl)

if [[ ! -f $ROOTFS/.complete ]]; then
    rm -rf "$ROOTFS"
    log "arm64 rootfs (one-off, cached as $ROOTFS): debootstrap $VS_SUITE from $MIRROR"
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$PACKAGES" "$VS_SUITE" "$ROOTFS" "$MIRROR" \
        >"$VS_TMP/arm64/debootstrap-$KEY.log" 2>&1 || { tail -20 "$VS_TMP/arm64/debootstrap-$KEY.log"; die "debootstrap (first stage) failed"; }
    cp "$QEMU" "$ROOTFS/usr/bin/"
    log "debootstrap second stage under qemu"
    chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$VS_TMP/arm64/debootstrap-$KEY.log" 2>&1 \
        || { tail -20 "$VS_TMP/arm64/debootstrap-$KEY.log"; die "debootstrap (second stage) failed"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb
    mount_system
    log "pip install the serve extra (aarch64 wheels from PyPI) under qemu"
    cp "$WHEEL_DIR/$WHEEL" "$ROOTFS/tmp/"
    in_chroot python3 -m venv /opt/visionserve
    in_chroot /opt/visionserve/bin/pip install -q "/tmp/$WHEEL[serve]"
    in_chroot /opt/visionserve/bin/python -c "import onnxruntime, platform; print('onnxruntime', onnxruntime.__version__, platform.machine())"
    cleanup
    touch "$ROOTFS/.complete"
    log "rootfs ready after $((SECONDS - t0)) s"
fi

t1=$SECONDS
mount_system
# This checkout's code (the dependencies come from the cache).
cp "$WHEEL_DIR/$WHEEL" "$ROOTFS/tmp/"
in_chroot /opt/visionserve/bin/pip install -q --no-deps --force-reinstall "/tmp/$WHEEL"
rm -rf "$WHEEL_DIR"
rm -rf "$ROOTFS/models" && mkdir -p "$ROOTFS/models"
bind "$(realpath "$REPO")" "$ROOTFS/models" ro
in_chroot /opt/visionserve/bin/python -c "import platform; assert platform.machine() == 'aarch64', platform.machine(); print('python', platform.python_version(), 'on', platform.machine())"

free_port() { "$HOST_PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ARM_PORT=$(free_port)
X86_PORT=$(free_port)
log "starting visionserve serve on aarch64 (qemu) at 127.0.0.1:$ARM_PORT"
# A plain command (not the in_chroot function, which would fork a subshell): $! is the server itself.
chroot "$ROOTFS" "${CHROOT_ENV[@]}" /opt/visionserve/bin/visionserve serve --repository /models \
    --host 127.0.0.1 --port "$ARM_PORT" >"$VS_TMP/arm64/serve.log" 2>&1 &
SERVER_PID=$!
"$ROOT/.venv/bin/visionserve" serve --repository "$REPO" --host 127.0.0.1 --port "$X86_PORT" \
    >"$VS_TMP/arm64/serve-x86.log" 2>&1 &
X86_PID=$!

"$HOST_PY" - "$ARM_PORT" "$X86_PORT" "$IMAGE" "$SERVER_PID" <<'PY' || { tail -30 "$VS_TMP/arm64/serve.log"; die "aarch64 server check failed"; }
import json, os, sys, time, urllib.request

arm, x86, image, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def wait_ready(port, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if port == arm:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                sys.exit("the aarch64 server exited")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
            return time.monotonic() - t0
        except Exception:
            time.sleep(1)
    sys.exit(f"server on {port} not ready after {limit} s")

def classify(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/mobilenet_v2/classify?top_k=5",
                                 data=open(image, "rb").read(), headers={"Content-Type": "image/jpeg"})
    t0 = time.monotonic()
    body = json.load(urllib.request.urlopen(req, timeout=300))
    return body, time.monotonic() - t0

print(f"aarch64 server ready after {wait_ready(arm, 600):.1f} s", flush=True)
wait_ready(x86, 120)
a, ta = classify(arm)
classify(arm)
a2, ta2 = classify(arm)
b, _ = classify(x86)
print(f"aarch64 classify: {ta:.2f} s first, {ta2:.2f} s warm (emulated)")
for pa, pb in zip(a["predictions"], b["predictions"]):
    print(f"  {pa['index']:4d} {pa['label'][:24]:24s} aarch64 {pa['score']:.6f}   x86 {pb['score']:.6f}")
top = a["predictions"][0]
assert 281 <= top["index"] <= 285, f"top-1 is not a cat: {top}"
assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]], "top-5 differs"
diff = max(abs(pa["score"] - pb["score"]) for pa, pb in zip(a["predictions"], b["predictions"]))
print(f"max |score difference| aarch64 vs x86: {diff:.2e}")
assert diff < 1e-3, diff
PY

kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
# uvicorn re-raises the signal after its graceful shutdown, so "clean" is 0 or 128+15, with the shutdown logged.
[[ $rc == 0 || $rc == 143 ]] && grep -q "Application shutdown complete" "$VS_TMP/arm64/serve.log" \
    || { tail -20 "$VS_TMP/arm64/serve.log"; die "aarch64 server exited with $rc after SIGTERM, no clean shutdown"; }
log "aarch64 server stopped cleanly on SIGTERM (exit $rc)"
log "PASS: test-arm64 in $((SECONDS - t0)) s ($((SECONDS - t1)) s after the cached rootfs)"
