#!/usr/bin/env bash
# Build the CPU variant of docker/Dockerfile without a Docker daemon: buildah (chroot isolation) on a Debian
# bookworm base made locally with debootstrap, torch from a local CPU wheel when one is found.
#
#   docker/ci-build.sh            -> prints the image name (default localhost/medmamba:ci) on stdout
#
# Why not the real base: registries (docker.io, nvcr.io) cannot be reached from CI, so `FROM` must name an image
# made here. What this proves and what it does not: docker/README.md, "What CI checks".
#
# Needs root and the Debian packages buildah podman runc debootstrap (`make test` installs them when run as root).
# Exit codes: 0 built · 77 skipped (a tool or root missing; the reason is printed as "SKIPPED: …") · else failed.
#
# Environment: MEDMAMBA_CI_IMAGE (tag to build), MEDMAMBA_CI_BASE (base tag), DEBIAN_MIRROR (debootstrap
# mirror; default: the first URIs line of apt's sources, else deb.debian.org), PIP_FIND_LINKS (a folder with a
# torch-*+cpu-cp311 wheel; default: pip's own find-links setting).
set -euo pipefail

IMAGE=${MEDMAMBA_CI_IMAGE:-localhost/medmamba:ci}
BASE=${MEDMAMBA_CI_BASE:-localhost/medmamba-base:bookworm-py311}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

skip() { echo "SKIPPED: $*" >&2; exit 77; }
log() { echo "ci-build: $*" >&2; }

[ "$(id -u)" = 0 ] || skip "building needs root (rootful buildah/podman storage); run as root"
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null || skip "$tool is not installed: apt-get install -y buildah podman runc debootstrap"
done

# 1) the base: Debian bookworm with python3 (3.11), venv and CA certificates; made once, then reused
if ! podman image exists "$BASE"; then
    mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
        | head -n1 | cut -d' ' -f1)}
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /tmp/medmamba-base.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        bookworm "$rootfs" "$mirror" >&2
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE" >&2
    rm -rf "$rootfs"
    trap - EXIT
fi

# 2) torch: the machine's CPU wheel when there is one (200 MB instead of the CUDA build's 3 GB from PyPI)
args=()
wheels=${PIP_FIND_LINKS:-$(pip3 config get global.find-links 2>/dev/null || true)}
wheel=""
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    wheel=$(find "$wheels" -maxdepth 1 -name 'torch-*+cpu-cp311-*.whl' | sort -V | tail -n1)
fi
if [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2)
    args+=(--volume "$wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg "TORCH_SPEC=torch==$version")
    log "torch $version from $wheel"
else
    args+=(--build-arg "TORCH_SPEC=torch")
    log "no local CPU torch wheel: torch comes from PyPI (large download)"
fi

# 3) the HTTPS CA bundle for pip inside the build (this machine's egress is re-signed by a local CA)
bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$bundle" ] && args+=(--secret "id=pip_ca,src=$bundle")

# 4) build; --layers reuses the dependency layer while only medmamba's source changes; the docker format keeps
#    SHELL (OCI drops it, and RUN would lose pipefail)
log "building $IMAGE"
buildah bud --isolation chroot --layers --format docker --quiet -f "$ROOT/docker/Dockerfile" \
    --build-arg "BASE_IMAGE=$BASE" "${args[@]}" -t "$IMAGE" "$ROOT" >&2
echo "$IMAGE"
