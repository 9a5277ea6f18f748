# Shared set-up for the container tests (sourced, not run): a private podman configuration under a
# temp dir, the Debian mirror this machine's apt uses, and a cached debootstrap base image.
#
#   VISIONSERVE_CONTAINER_TMP  where the podman storage and the rootfs cache live
#                              (default /tmp/visionserve-container; kept between runs: that is the cache)

VS_TMP=${VISIONSERVE_CONTAINER_TMP:-/tmp/visionserve-container}
VS_SUITE=${VS_SUITE:-bookworm}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# Print a reason and exit 0 (the make target counts as skipped, not failed).
skip() { echo "SKIPPED: $*" >&2; exit 0; }

# The first deb URI of this machine's apt sources (deb822 or one-line format).
debian_mirror() {
    local uri=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    [[ -n $uri ]] || return 1
    echo "$uri"
}

# A podman that uses runc, chroot isolation for builds and overlay storage, all under $VS_TMP.
podman_env() {
    mkdir -p "$VS_TMP/storage" "$VS_TMP/run" "$VS_TMP/cache"
    cat >"$VS_TMP/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
    cat >"$VS_TMP/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$VS_TMP/storage"
runroot = "$VS_TMP/run"
CONF
    export CONTAINERS_CONF="$VS_TMP/containers.conf"
    export CONTAINERS_STORAGE_CONF="$VS_TMP/storage.conf"
    export BUILDAH_ISOLATION=chroot
}

# Make sure localhost/visionserve-base:<key> exists: a debootstrap minbase rootfs with python3, imported
# into podman. The rootfs tarball is cached under $VS_TMP/cache, keyed by everything that goes into it.
# Prints the image name.
ensure_base_image() {
    local arch=${1:-amd64}
    local include="python3,python3-venv,python3-pip,ca-certificates"
    local mirror key tarball image
    mirror=$(debian_mirror) || skip "no Debian mirror found in this machine's apt sources"
    key=$(printf '%s\n' v2 "$VS_SUITE" "$arch" minbase "$include" "$mirror" | sha256sum | cut -c1-12)
    tarball="$VS_TMP/cache/base-$VS_SUITE-$arch-$key.tar"
    image="localhost/visionserve-base:$VS_SUITE-$arch-$key"
    if podman image exists "$image"; then
        echo "$image"
        return
    fi
    if [[ ! -s $tarball ]]; then
        command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install -y debootstrap)"
        local rootfs="$VS_TMP/cache/rootfs-$key.partial"
        unmount_under "$rootfs"  # never rm -rf through a mount left by a killed debootstrap
        [[ -z $(awk -v d="$(realpath -m "$rootfs")/" 'index($5, d) == 1' /proc/self/mountinfo) ]] \
            || die "mounts are left under $rootfs"
        rm -rf "$rootfs"
        log "debootstrap $VS_SUITE ($arch, minbase + $include) from $mirror (one-off, cached as $tarball)"
        run debootstrap --arch="$arch" --variant=minbase --include="$include" "$VS_SUITE" "$rootfs" "$mirror" \
            >"$VS_TMP/cache/debootstrap-$key.log" 2>&1 \
            || { tail -20 "$VS_TMP/cache/debootstrap-$key.log" >&2; die "debootstrap failed"; }
        # No apt caches, and no docs, man pages or translations (as in the python:*-slim images).
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
            "$rootfs"/usr/share/locale/*
        tar -C "$rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing $tarball as $image"
    podman import --quiet "$tarball" "$image" >/dev/null
    echo "$image"
}

# -- processes and mounts that are always cleaned up --------------------------------------------------
# Every process a test starts goes through `spawn` (its own process group; PID and start time recorded in
# $VS_STATE/pids), every mount through `bind`. On success, failure, timeout (SIGTERM) and Ctrl-C, `cleanup`
# stops the processes (TERM, KILL after a grace period) and unmounts in reverse order. A run killed with
# SIGKILL cannot clean up: the next run's `sweep_stale` stops what its pid file names (if the PID still
# belongs to that process) and unmounts whatever is still mounted under the directories it watches.
VS_PIDS=()
VS_MOUNTS=()
VS_CLEANUP_HOOKS=()
VS_STATE=""
VS_SWEEP_DIRS=()

alive() {  # a process that runs (a zombie does not count)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

stop_pid() {  # stop_pid PID [GRACE_S]: SIGTERM its process group, SIGKILL whatever is left after the grace
    local pid=$1 grace=${2:-10} i
    if alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do alive "$pid" || break; sleep 0.1; done
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

unmount_under() {  # every mount point below DIR, newest first
    local dir m
    dir=$(realpath -m "$1")
    mapfile -t _stale < <(awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | tac)
    for m in "${_stale[@]}"; do
        log "unmounting $m"
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
    done
}

# Stop every process the pid file names that still runs (spawned by an earlier run, or by a subshell of
# this one), then unmount everything under the watched directories.
sweep_stale() {
    local pid start now dir
    if [[ -f $VS_STATE/pids ]]; then
        while read -r pid start; do
            now=$(awk '{print $22}' "/proc/$pid/stat" 2>/dev/null) || continue
            [[ $now == "$start" ]] || continue  # the PID now belongs to another process
            log "stopping process group $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80))"
            stop_pid "$pid" 5
        done <"$VS_STATE/pids"
        rm -f "$VS_STATE/pids"
    fi
    for dir in "${VS_SWEEP_DIRS[@]}"; do unmount_under "$dir"; done
}

release_mounts() {  # unmount what `bind` mounted, newest first
    local i
    for ((i = ${#VS_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${VS_MOUNTS[i]}" 2>/dev/null || umount -l "${VS_MOUNTS[i]}" 2>/dev/null || true
    done
    VS_MOUNTS=()
}

cleanup() {
    local rc=$? i hook
    trap '' INT TERM HUP  # a second Ctrl-C must not cut the clean-up short
    for ((i = ${#VS_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${VS_PIDS[i]}"; done
    VS_PIDS=()
    release_mounts
    # What subshells spawned, and the /proc and /sys that debootstrap mounts itself.
    [[ -n $VS_STATE ]] && sweep_stale
    for hook in "${VS_CLEANUP_HOOKS[@]}"; do eval "$hook" || true; done
    return "$rc"
}

# track_state STATE_DIR [SWEEP_DIR...]: record PIDs in STATE_DIR; sweep what an earlier run left (its
# processes, and the mounts under the SWEEP_DIRs); clean up on every way out.
track_state() {
    VS_STATE=$(realpath -m "$1")
    shift
    local dir
    VS_SWEEP_DIRS=()
    for dir in "$@"; do VS_SWEEP_DIRS+=("$(realpath -m "$dir")"); done
    mkdir -p "$VS_STATE"
    sweep_stale
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    trap 'exit 129' HUP
}

spawn() {  # spawn CMD...: run CMD in the background in a process group of its own; its PID in $SPAWNED
    setsid "$@" </dev/null &
    SPAWNED=$!
    VS_PIDS+=("$SPAWNED")
    echo "$SPAWNED $(awk '{print $22}' "/proc/$SPAWNED/stat" 2>/dev/null)" >>"$VS_STATE/pids"
}

run() {  # run CMD...: like running CMD in the foreground, but a signal to this script is acted on at once
    spawn "$@"
    wait "$SPAWNED"
}

bind() {  # bind SRC DST [ro]
    mount --bind "$1" "$2"
    VS_MOUNTS+=("$2")
    [[ ${3:-} == ro ]] && mount -o remount,bind,ro "$2"
    return 0
}

# within SECONDS CMD...: run CMD, failing the test if it takes longer (on a busy machine too: keep margins wide)
within() {
    local limit=$1
    shift
    spawn "$@"
    local pid=$SPAWNED t=0
    while alive "$pid"; do
        if ((t >= limit * 10)); then
            stop_pid "$pid" 5
            die "'$*' took longer than its ${limit} s budget"
        fi
        sleep 0.1
        t=$((t + 1))
    done
    wait "$pid"
}
