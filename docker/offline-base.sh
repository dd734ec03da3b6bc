#!/usr/bin/env bash
# Build an offline base image for machines that cannot pull from an image registry.
#
#   docker/offline-base.sh [TAG]          (as root; default TAG brainshift-base:bookworm)
#
# A Debian 12 (bookworm) root file system made by debootstrap from a Debian package mirror, with
# Python 3.11 (the version of the CPU torch wheels the tests run with) in a virtual environment at
# /opt/venv on PATH, `docker import`ed. It holds no torch: the Dockerfile installs the pinned torch
# (TORCH_VERSION) into any base that lacks it. Use it with
#   BASE=brainshift-base:bookworm ./build.sh
#
# Settings (environment):
#   DEBIAN_MIRROR  the Debian archive to bootstrap from; default: the first Debian URI found in this
#                  machine's apt sources (/etc/apt/sources.list*), else debootstrap's own default.
#   SUITE          default bookworm.
# Needs: debootstrap and a running dockerd (apt-get install -y debootstrap docker.io).
set -euo pipefail
TAG="${1:-brainshift-base:bookworm}"
SUITE="${SUITE:-bookworm}"
if [ -z "${DEBIAN_MIRROR:-}" ]; then
    DEBIAN_MIRROR="$( (grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
                         /etc/apt/sources.list.d/*.list 2>/dev/null || true) \
                      | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ')"
fi
[ "$(id -u)" = 0 ] || { echo "error: debootstrap and chroot need root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap not installed (apt-get install -y debootstrap)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: no Docker daemon (start one: dockerd --bridge=none --iptables=false &)" >&2; exit 1; }

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/brainshift-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap $SUITE from ${DEBIAN_MIRROR:-the default mirror of debootstrap} into $ROOTFS" >&2
# minbase + what the image needs at run time: Python with venv, libgomp (NiftyReg's OpenMP), CA certificates.
debootstrap --variant=minbase --include=python3,python3-venv,libgomp1,ca-certificates \
    "$SUITE" "$ROOTFS" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >&2
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOTFS" /bin/sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /root/.cache'
: > "$ROOTFS/etc/resolv.conf"   # the build machine's resolver settings stay out of the image
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    - "$TAG" >&2
docker run --rm --network none "$TAG" python -c 'import sys, venv; print("python", sys.version.split()[0])' >&2
echo "$TAG"
