#!/usr/bin/env bash
# Save the built image as a gzipped tarball for upload: brainshift[-MODALITY].tar.gz
set -euo pipefail
cd "$(dirname "$0")"
TAG="$(./build.sh | tail -n 1)"
docker save "$TAG" | gzip -c > "$TAG.tar.gz"
echo "$TAG.tar.gz"
