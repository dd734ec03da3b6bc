#!/usr/bin/env bash
# Build the image (build.sh, with the same environment: MODALITY, BASE, WHEELHOUSE, ...) and save it as a gzipped
# tarball for upload: brainshift[-MODALITY].tar.gz, written to a temporary name and renamed (never a partial file).
# Prints the image size and the tarball's path and size. SKIP_BUILD=1 saves the already built TAG.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    MODALITY="${MODALITY:-both}"
    TAG="${TAG:-brainshift$([ "$MODALITY" = both ] || echo "-$MODALITY")}"
else
    TAG="$(./build.sh | tail -n 1)"
fi
out="$TAG.tar.gz"
tmp="$(mktemp ".$out.XXXXXX.tmp")"
trap 'rm -f "$tmp"' EXIT
docker save "$TAG" | gzip -c > "$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$out"
echo "image $TAG: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1 / 1e9}') unpacked;" \
     "$out: $(du -h "$out" | cut -f1)" >&2
echo "$out"
