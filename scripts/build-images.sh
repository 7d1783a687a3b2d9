#!/usr/bin/env bash
# Build the project's container images: registrar, operator and etcd (the chart's optional etcd), and the
# example PBX of sidecar mode (examples/sidecar: Debian's Kamailio).
#
#   scripts/build-images.sh            build all three (cached by content; prints the archives' directory)
#   scripts/build-images.sh base       only the Debian base image (buildah path)
#   scripts/build-images.sh pause      the pod sandbox ("pause") image of the test node, from the pause binary
#                                      that `scripts/k8s-rig.sh node` compiles (buildah path only)
#   scripts/build-images.sh archives   print the directory of the image archives (no build)
#
# With a Docker daemon (`docker info` answers) the Dockerfiles are built with `docker build`, as any user
# would. Without one (this project's machines and CI), Debian's buildah builds the same Dockerfiles against
# a base image made here: `debootstrap --variant=minbase bookworm` with Debian's python3, cached by its
# package list outside the repository. No registry is contacted: Python packages come from a wheelhouse
# that pip fills on the host (`build/wheels`, passed in with PIP_NO_INDEX), and each image is written as a
# docker-archive tar under $MIDREG_CACHE/images/<tag>/ for `ctr images import` or `docker load`.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/kube-midregistrar}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
PY="${PY:-.venv/bin/python}"
CACHE="${MIDREG_CACHE:-$HOME/.cache/kube-midregistrar}"
OUT="$CACHE/images/$IMAGE_TAG"
# The Debian base: what debootstrap installs. Changing this list (or the suite) makes a new base.
SUITE=bookworm
BASE_PACKAGES="python3,python3-venv,ca-certificates"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_ID="$(printf '%s %s v1' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/kube-midregistrar/base:$SUITE-$BASE_ID"
# The example PBX of sidecar mode (examples/sidecar): Debian's Kamailio on the same suite.
PBX_PACKAGES="kamailio,ca-certificates"
PBX_BASE_ID="$(printf '%s %s v1' "$SUITE" "$PBX_PACKAGES" | sha256sum | cut -c1-12)"
PBX_BASE_IMAGE="localhost/kube-midregistrar/pbx-base:$SUITE-$PBX_BASE_ID"
# buildah's storage lives in the cache, not in the host's /var/lib/containers.
BUILDAH=(buildah --root "$CACHE/containers/storage" --runroot /run/kube-midregistrar/buildah
    --storage-driver overlay)
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"

log() { printf '[images] %s\n' "$*" >&2; }

need() {
    local missing=()
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    if ((${#missing[@]})); then
        log "missing: ${missing[*]} (install them with: make node-tools)"
        exit 1
    fi
}

have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

build_base() {  # [image packages id]: the project's base by default
    local image=${1:-$BASE_IMAGE} packages=${2:-$BASE_PACKAGES} id=${3:-$BASE_ID}
    need buildah debootstrap
    if "${BUILDAH[@]}" inspect --type image "$image" >/dev/null 2>&1; then
        log "base $image cached"
        return 0
    fi
    local rootfs="$CACHE/images/rootfs-$SUITE-$id"
    local t0
    t0=$(date +%s)
    rm -rf "$rootfs" "$rootfs.tar"
    mkdir -p "$rootfs"
    log "debootstrap $SUITE (minbase + $packages) from $MIRROR"
    debootstrap --variant=minbase --include="$packages" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        exit 1
    }
    # What a slim image leaves out: package caches and lists, documentation, man pages, locales.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
    tar -C "$rootfs" --numeric-owner -cf "$rootfs.tar" .
    local ctr
    ctr=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" add "$ctr" "$rootfs.tar" / >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit --rm "$ctr" "$image" >/dev/null
    rm -rf "$rootfs" "$rootfs.tar"
    log "base $image built in $(($(date +%s) - t0)) s"
}

wheelhouse() {
    # Every Python package the images install, resolved by the host's pip (and its index settings).
    local stamp="build/wheels/.stamp-$(cat pyproject.toml | sha256sum | cut -c1-12)"
    if [[ -f "$stamp" ]]; then
        rm -f build/wheels/kube_midregistrar-*.whl
        return 0
    fi
    rm -rf build/wheels
    mkdir -p build/wheels
    log "filling build/wheels (pip wheel '.[operator]', setuptools, wheel)"
    "$PY" -m pip wheel -q --wheel-dir build/wheels '.[operator]' setuptools wheel >&2
    # The project's own wheel is rebuilt from the sources inside the image.
    rm -f build/wheels/kube_midregistrar-*.whl
    touch "$stamp"
}

etcd_context() {
    # The etcd binary the test rig already builds (scripts/k8s-rig.sh), copied into the build context.
    local bin
    bin="$(bash scripts/k8s-rig.sh etcd | tail -1)"
    mkdir -p build/etcd
    cp "$bin" build/etcd/etcd
}

image_name() { echo "$IMAGE_REPO/$1:$2"; }

context_id() {  # what an image is built from: its Dockerfile, the base and the files its context holds
    {
        echo "$BASE_IMAGE $PBX_BASE_IMAGE $*"
        find "$1" pyproject.toml README.md registrar operator build/etcd examples/sidecar -type f \
            ! -path '*/__pycache__/*' -print0 |
            sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
}

build_one() {  # name dockerfile tag [build args...]
    local name=$1 file=$2 tag=$3
    shift 3
    local ref id
    ref="$(image_name "$name" "$tag")"
    id="$(context_id "$file" "$ref" "$@")"
    if [[ -f "$OUT/$name.tar" && "$(cat "$OUT/$name.id" 2>/dev/null)" == "$id" ]]; then
        log "$ref up to date ($OUT/$name.tar)"
        return 0
    fi
    local t0
    t0=$(date +%s)
    if have_docker; then
        docker build -f "$file" -t "$ref" "$@" .
        mkdir -p "$OUT"
        docker save -o "$OUT/$name.tar" "$ref"
    else
        "${BUILDAH[@]}" bud --pull=never --network=none --layers -q -f "$file" -t "$ref" \
            --build-arg "BASE=$BASE_IMAGE" --build-arg "PBX_BASE=$PBX_BASE_IMAGE" "$@" . >/dev/null
        mkdir -p "$OUT"
        rm -f "$OUT/$name.tar"
        "${BUILDAH[@]}" push -q "$ref" "docker-archive:$OUT/$name.tar:$ref" >/dev/null
    fi
    echo "$id" >"$OUT/$name.id"
    log "$ref built in $(($(date +%s) - t0)) s: $(du -m "$OUT/$name.tar" | cut -f1) MiB archive"
}

PAUSE_IMAGE="${PAUSE_IMAGE:-localhost/kube-midregistrar/pause:3.10}"

build_pause() {
    need buildah
    local bin
    bin="$(bash scripts/k8s-rig.sh bindir)/pause"
    [[ -x "$bin" ]] || { log "no pause binary at $bin (make node-rig builds it)"; exit 1; }
    mkdir -p "$OUT"
    if [[ -f "$OUT/pause.tar" && "$OUT/pause.tar" -nt "$bin" ]]; then
        log "pause image cached"
        return 0
    fi
    local ctr
    ctr=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" copy "$ctr" "$bin" /pause >/dev/null
    "${BUILDAH[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
    "${BUILDAH[@]}" commit --rm -q "$ctr" "$PAUSE_IMAGE" >/dev/null
    rm -f "$OUT/pause.tar"
    "${BUILDAH[@]}" push -q "$PAUSE_IMAGE" "docker-archive:$OUT/pause.tar:$PAUSE_IMAGE" >/dev/null
    log "$PAUSE_IMAGE built"
}

case "${1:-all}" in
base) build_base ;;
pause)
    build_pause
    echo "$OUT"
    ;;
archives) echo "$OUT" ;;
all)
    if ! have_docker; then
        build_base
    fi
    wheelhouse
    etcd_context
    wheel_args=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/build/wheels)
    build_one registrar Dockerfile.registrar "$IMAGE_TAG" "${wheel_args[@]}"
    build_one operator Dockerfile.operator "$IMAGE_TAG" "${wheel_args[@]}"
    build_one etcd Dockerfile.etcd "$ETCD_VERSION"
    if ! have_docker; then
        build_base "$PBX_BASE_IMAGE" "$PBX_PACKAGES" "$PBX_BASE_ID"
    fi
    build_one pbx-kamailio examples/sidecar/Dockerfile "$IMAGE_TAG"
    if ! have_docker; then
        # Images of earlier builds that no tag names any more: keep the cache to what the tags use.
        "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
    fi
    echo "$OUT"
    ;;
*)
    echo "usage: $0 [all|base|pause|archives]" >&2
    exit 2
    ;;
esac
