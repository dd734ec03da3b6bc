#!/usr/bin/env bash
# Build the image, run it on a small simulated input folder the way the challenge does
# (read-only input, no network, 16 GB memory), then score its fields with the official TRE.
set -euo pipefail
cd "$(dirname "$0")"
make venv
TAG="$(./build.sh | tail -n 1)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
.venv/bin/brainshift simulate --out "$WORK/data" --cases 2 --shape 96 --spacing 1.5 --quiet
mkdir -p "$WORK/input" "$WORK/output"
cp "$WORK"/data/imagesTr/*.nii.gz "$WORK/input/"          # the flat challenge layout
docker run --rm --network none --memory 16g -v "$WORK/input":/input:ro -v "$WORK/output":/output "$TAG"
.venv/bin/brainshift evaluate --input "$WORK/data" --output "$WORK/output"
