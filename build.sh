#!/usr/bin/env bash
# Build the challenge image. MODALITY=t1|t2|both (default both); TAG defaults to brainshift[-MODALITY].
set -euo pipefail
cd "$(dirname "$0")"
MODALITY="${MODALITY:-both}"
TAG="${TAG:-brainshift$([ "$MODALITY" = both ] || echo "-$MODALITY")}"
docker build --build-arg MODALITY="$MODALITY" -t "$TAG" .
echo "$TAG"
