#!/usr/bin/env bash
# make test-arm64: the runtime really runs on aarch64 and agrees with x86. A Debian arm64 rootfs under
# qemu-user-static (binfmt) gets the `serve` extra from PyPI's aarch64 wheels; `visionserve serve` runs in it
# (chroot, host network) with one model, MobileNetV2, one session and batch 1 (the only batch this check
# sends, so the only one warmed up): the least emulated work that still proves the point. The cat photo is
# classified from the host and the scores are compared with an x86 server run with the same settings.
#
# Cold (rootfs built: debootstrap + pip under emulation) and warm times on this machine: docs/deploy.md.
# The rootfs is cached under $VISIONSERVE_CONTAINER_TMP/arm64, keyed by the Debian suite, mirror and the
# serve dependency set.
#
# Every process it starts and every mount it makes is undone on success, failure, timeout and Ctrl-C
# (tests/container/lib.sh); a run killed with SIGKILL is swept up by the next one.
#
# Needs root, debootstrap, qemu-user-static and binfmt-support; skips (exit 0, with the reason) without them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source tests/container/lib.sh

HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
REPO=${REPO:-model_repository}
IMAGE=examples/images/cat.jpg
MODEL=mobilenet_v2
READY_BUDGET_S=${READY_BUDGET_S:-300}   # emulated load + warm-up: about 20 s warm here, 15x margin
CLASSIFY_BUDGET_S=${CLASSIFY_BUDGET_S:-120}
STOP_BUDGET_S=${STOP_BUDGET_S:-20}

[[ $(id -u) == 0 ]] || skip "make test-arm64 needs root (debootstrap, chroot, mounts)"
for tool in debootstrap chroot mount update-binfmts; do
    command -v "$tool" >/dev/null || skip "$tool is missing: apt-get install -y qemu-user-static binfmt-support debootstrap"
done
QEMU=$(command -v qemu-aarch64-static || true)
[[ -n $QEMU ]] || skip "qemu-aarch64-static is missing: apt-get install -y qemu-user-static binfmt-support"
[[ -x $HOST_PY ]] || die "$HOST_PY missing: run make setup"
if [[ -z $(ls "$REPO/$MODEL"/*/manifest.json 2>/dev/null) ]]; then
    log "no $REPO/$MODEL: make models"
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

track_state "$VS_TMP/arm64/state" "$VS_TMP/arm64"  # stops and unmounts what an earlier, killed run left
[[ -z $(awk -v d="$VS_TMP/arm64/" 'index($5, d) == 1' /proc/self/mountinfo) ]] \
    || die "mounts are left under $VS_TMP/arm64 and cannot be removed"

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

# Device nodes of its own instead of a bind mount of the host's /dev: one mount fewer to leave behind.
make_devices() {
    local spec name
    for spec in null:3 zero:5 random:8 urandom:9; do
        name=${spec%%:*}
        [[ -c $ROOTFS/dev/$name ]] || { rm -f "$ROOTFS/dev/$name"; mknod -m 666 "$ROOTFS/dev/$name" c 1 "${spec#*:}"; }
    done
}

mount_system() {
    bind /proc "$ROOTFS/proc"
    write_fake_cpuinfo >"$VS_TMP/arm64/cpuinfo"
    bind "$VS_TMP/arm64/cpuinfo" "$ROOTFS/proc/cpuinfo" ro
    bind /sys "$ROOTFS/sys" ro
    make_devices
    # This machine's resolver and CA bundle (PyPI may sit behind a TLS proxy): copied in, never committed.
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
}

CHROOT_ENV=(/usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1)
in_chroot() { run chroot "$ROOTFS" "${CHROOT_ENV[@]}" "$@"; }

rm -rf "$VS_TMP"/arm64/wheel.*
WHEEL_DIR=$(mktemp -d "$VS_TMP/arm64/wheel.XXXX")
run "$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$WHEEL_DIR" . >"$WHEEL_DIR/build.log" 2>&1 \
    || { cat "$WHEEL_DIR/build.log"; die "cannot build the visionserve wheel"; }
WHEEL=$(basename "$WHEEL_DIR"/*.whl)

if [[ ! -f $ROOTFS/.complete ]]; then
    rm -rf "$ROOTFS"
    log "arm64 rootfs (one-off, cached as $ROOTFS): debootstrap $VS_SUITE from $MIRROR"
    run debootstrap --arch=arm64 --foreign --variant=minbase --include="$PACKAGES" "$VS_SUITE" "$ROOTFS" \
        "$MIRROR" >"$VS_TMP/arm64/debootstrap-$KEY.log" 2>&1 \
        || { tail -20 "$VS_TMP/arm64/debootstrap-$KEY.log"; die "debootstrap (first stage) failed"; }
    cp "$QEMU" "$ROOTFS/usr/bin/"
    log "debootstrap second stage under qemu"
    run chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$VS_TMP/arm64/debootstrap-$KEY.log" 2>&1 \
        || { tail -20 "$VS_TMP/arm64/debootstrap-$KEY.log"; die "debootstrap (second stage) failed"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb
    mount_system
    log "pip install the serve extra (aarch64 wheels from PyPI) under qemu"
    cp "$WHEEL_DIR/$WHEEL" "$ROOTFS/tmp/"
    in_chroot python3 -m venv /opt/visionserve
    in_chroot /opt/visionserve/bin/pip install -q "/tmp/$WHEEL[serve]"
    in_chroot /opt/visionserve/bin/python -c "import onnxruntime, platform; print('onnxruntime', onnxruntime.__version__, platform.machine())"
    release_mounts
    touch "$ROOTFS/.complete"
    log "rootfs ready after $((SECONDS - t0)) s"
fi

t1=$SECONDS
mount_system
# This checkout's code (the dependencies come from the cache).
cp "$WHEEL_DIR/$WHEEL" "$ROOTFS/tmp/"
in_chroot /opt/visionserve/bin/pip install -q --no-deps --force-reinstall "/tmp/$WHEEL"
rm -rf "$WHEEL_DIR"
# One model, its newest version, copied in (no mount to leave behind); the x86 server serves the same files.
VERSION=$(ls "$REPO/$MODEL" | grep -E '^[0-9]+$' | sort -n | tail -1)
rm -rf "$ROOTFS/models" && mkdir -p "$ROOTFS/models/$MODEL"
cp -r "$REPO/$MODEL/$VERSION" "$ROOTFS/models/$MODEL/"
in_chroot /opt/visionserve/bin/python -c "import platform; assert platform.machine() == 'aarch64', platform.machine(); print('python', platform.python_version(), 'on', platform.machine())"

free_port() { "$HOST_PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ARM_PORT=$(free_port)
X86_PORT=$(free_port)
# The warm-up covers the batch sizes this check sends (1), on one session.
SERVE_ARGS=(--host 127.0.0.1 --instances 1 --max-batch-size 1)
log "starting visionserve serve on aarch64 (qemu) at 127.0.0.1:$ARM_PORT"
# chroot and env exec: the spawned PID is the server itself.
spawn chroot "$ROOTFS" "${CHROOT_ENV[@]}" /opt/visionserve/bin/visionserve serve --repository /models \
    "${SERVE_ARGS[@]}" --port "$ARM_PORT" >"$VS_TMP/arm64/serve.log" 2>&1
SERVER_PID=$SPAWNED
spawn "$ROOT/.venv/bin/visionserve" serve --repository "$ROOTFS/models" "${SERVE_ARGS[@]}" --port "$X86_PORT" \
    >"$VS_TMP/arm64/serve-x86.log" 2>&1

run "$HOST_PY" tests/container/compare_arm64.py "$ARM_PORT" "$X86_PORT" "$IMAGE" "$SERVER_PID" "$MODEL" \
    "$READY_BUDGET_S" "$CLASSIFY_BUDGET_S" || { tail -30 "$VS_TMP/arm64/serve.log"; die "aarch64 server check failed"; }

t_stop=$SECONDS
kill -TERM "$SERVER_PID"
for ((i = 0; i < STOP_BUDGET_S * 10; i++)); do alive "$SERVER_PID" || break; sleep 0.1; done
alive "$SERVER_PID" && die "the aarch64 server did not stop within ${STOP_BUDGET_S} s of SIGTERM"
rc=0
wait "$SERVER_PID" || rc=$?
# A drained server exits 0 (uvicorn would re-raise the signal: 143); either way the shutdown is logged.
[[ $rc == 0 || $rc == 143 ]] && grep -q "Application shutdown complete" "$VS_TMP/arm64/serve.log" \
    || { tail -20 "$VS_TMP/arm64/serve.log"; die "aarch64 server exited with $rc after SIGTERM, no clean shutdown"; }
log "aarch64 server stopped cleanly on SIGTERM in $((SECONDS - t_stop)) s (exit $rc)"
log "PASS: test-arm64 in $((SECONDS - t0)) s ($((SECONDS - t1)) s after the cached rootfs)"
