#!/usr/bin/env bash
# Build the challenge image; prints its tag on the last line.
#
# Environment:
#   MODALITY=t1|t2|both   default both; TAG defaults to brainshift[-MODALITY].
#   BASE=IMAGE            base image (default: the Dockerfile's, the CUDA PyTorch image users pull). Where no image
#                         registry is reachable: BASE=brainshift-base:bookworm after docker/offline-base.sh.
#   WHEELHOUSE=1          install Python packages from wheels made here with this machine's own pip settings
#                         (`pip config list`: local wheel folders, mirrors), pinned to the versions of the tested
#                         .venv (`pip freeze`), served to the build on 127.0.0.1 only (the build uses --network host).
#                         No index, host or path of this machine goes into the image's files.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST: passed on as build arguments when set.
#   DOCKER_BUILD_ARGS     more `docker build` options (word-split).
set -euo pipefail
cd "$(dirname "$0")"
MODALITY="${MODALITY:-both}"
TAG="${TAG:-brainshift$([ "$MODALITY" = both ] || echo "-$MODALITY")}"
args=(--network host --build-arg MODALITY="$MODALITY" -t "$TAG")
[ -n "${BASE:-}" ] && args+=(--build-arg BASE="$BASE")
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    [ -n "${!v:-}" ] && args+=(--build-arg "$v=${!v}")
done

server_pid=""
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ "${WHEELHOUSE:-0}" = 1 ]; then
    [ -x .venv/bin/pip ] || make venv >&2
    house=".build/wheelhouse"
    mkdir -p "$house"
    .venv/bin/pip freeze --exclude-editable | grep -v '^brainshift' > .build/constraints.txt
    echo "wheelhouse: pip wheel -r requirements.txt (versions of .venv) -> $house" >&2
    CMAKE_POLICY_VERSION_MINIMUM=3.5 .venv/bin/pip wheel -q -r requirements.txt -c .build/constraints.txt \
        -w "$house" >&2
    port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    .venv/bin/python -m http.server "$port" --bind 127.0.0.1 --directory "$house" >/dev/null 2>&1 &
    server_pid=$!
    sleep 1
    args+=(--build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/")
fi
# shellcheck disable=SC2086
docker build "${args[@]}" ${DOCKER_BUILD_ARGS:-} . >&2
echo "$TAG"
