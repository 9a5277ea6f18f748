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
        rm -rf "$rootfs"
        log "debootstrap $VS_SUITE ($arch, minbase + $include) from $mirror (one-off, cached as $tarball)"
        debootstrap --arch="$arch" --variant=minbase --include="$include" "$VS_SUITE" "$rootfs" "$mirror" \
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
