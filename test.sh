#!/usr/bin/env bash
# End-to-end test of the challenge container, the way the challenge runs it.
#
#   ./test.sh                 2 simulated cases (96^3 at 1.5 mm, by `brainshift simulate`)
#   ./test.sh DATASET_DIR     your own ReMIND2Reg folder with landmarks (dataset layout: imagesTr/ + landmarksTr/,
#                             or the flat layout with landmarks/): the local evaluation
#
# Steps: build the image (build.sh; BASE / WHEELHOUSE as there), copy the fixed/moving images into the flat
# challenge layout, run the container on it with --network none, read-only /input, --memory 16g and a non-root
# user; run `brainshift run` on the same input outside the container with the same method and thread settings;
# check that every field is byte-identical; score the container's fields with `brainshift evaluate` (TRE, SDlogJ).
# Then (simulated data only) the grand-challenge .mha layout, and bad input (a corrupt case among good ones).
#
# Environment: THREADS (default: the cores of this machine; set the same inside and outside, see below),
# RUN_USER (default 1000:1000; the container's non-root user), KEEP=1 keeps the work folder,
# METHOD (default brainshift), SKIP_BUILD=1 uses the already built TAG.
set -euo pipefail
cd "$(dirname "$0")"
DATASET="${1:-}"
METHOD="${METHOD:-brainshift}"
THREADS="${THREADS:-$(nproc)}"
RUN_USER="${RUN_USER:-1000:1000}"
# torch's intra-op threads and OpenMP (NiftyReg) change floating-point summation order, hence the last bits of a
# field: both runs get the same count, explicitly (torch reads OMP_NUM_THREADS; NiftyReg gets -omp via --threads).
THREAD_ENV=(OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS")
log() { printf '[test.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

command -v docker >/dev/null && docker info >/dev/null 2>&1 || {
    echo "error: no Docker daemon here (as root: dockerd --bridge=none --iptables=false &)" >&2; exit 2; }
make venv >/dev/null
WORK="$(mktemp -d "${TMPDIR:-/tmp}/brainshift-test.XXXXXX")"
[ "${KEEP:-0}" = 1 ] && log "work folder kept: $WORK" || trap 'rm -rf "$WORK"' EXIT

if [ "${SKIP_BUILD:-0}" = 1 ]; then
    TAG="${TAG:-brainshift}"
else
    log "building the image (BASE=${BASE:-Dockerfile default}, WHEELHOUSE=${WHEELHOUSE:-0})"
    t0=$SECONDS
    TAG="$(./build.sh 2> "$WORK/build.log" | tail -n 1)" || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
    log "build time: $((SECONDS - t0)) s"
fi
log "image $TAG: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1 / 1e9}')," \
    "torch $(docker run --rm --network none --entrypoint python "$TAG" -c 'import torch; print(torch.__version__)')"

# ---- input: simulated, or the user's folder -----------------------------------------------------------------------
if [ -z "$DATASET" ]; then
    DATA="$WORK/data"
    log "simulating 2 cases (96^3, 1.5 mm)"
    .venv/bin/brainshift simulate --out "$DATA" --cases 2 --shape 96 --spacing 1.5 --quiet
else
    DATA="$(cd "$DATASET" && pwd)"
fi
IN="$WORK/input"
mkdir -p "$IN"
find "$DATA" -maxdepth 2 -name 'ReMIND2Reg_*_000[0-2].nii*' -exec cp {} "$IN/" \;   # the flat challenge layout
[ -n "$(ls -A "$IN")" ] || { echo "error: no ReMIND2Reg_XXXX_000N.nii.gz image in $DATA or its subfolders" >&2; exit 1; }
chmod -R a+rX "$WORK"

# run IMAGE on INPUT_DIR -> OUTPUT_DIR (created, writable by RUN_USER) as the challenge does; extra env as -e args
run_container() {
    local input="$1" output="$2"; shift 2
    mkdir -p "$output" && chmod 0777 "$output"
    docker run --rm --network none --memory 16g --user "$RUN_USER" \
        -e OMP_NUM_THREADS="$THREADS" -e MKL_NUM_THREADS="$THREADS" -e BRAINSHIFT_METHOD="$METHOD" "$@" \
        -v "$input":/input:ro -v "$output":/output "$TAG" --threads "$THREADS"
}

# ---- flat layout through the container ---------------------------------------------------------------------------
n_pairs=$(ls "$IN" | grep -c '_000[12]\.nii' || true)
log "container on the flat layout: $n_pairs pairs (--network none, /input:ro, --memory 16g, --user $RUN_USER, $THREADS threads)"
t0=$SECONDS
run_container "$IN" "$WORK/out_container"
t_container=$((SECONDS - t0))
log "container run: ${t_container} s for $n_pairs pairs ($(awk "BEGIN {printf \"%.1f\", $t_container / $n_pairs}") s per pair, including start-up)"

log "the same outside the container: brainshift run --method $METHOD --threads $THREADS --no-qc"
t0=$SECONDS
env "${THREAD_ENV[@]}" .venv/bin/brainshift run --input "$IN" --output "$WORK/out_cli" --method "$METHOD" \
    --threads "$THREADS" --no-qc --quiet
log "CLI run: $((SECONDS - t0)) s"

# ---- byte identity -----------------------------------------------------------------------------------------------
fail=0
count=0
for f in "$WORK"/out_cli/disp_*.nii.gz; do
    name="$(basename "$f")"
    count=$((count + 1))
    if cmp -s "$f" "$WORK/out_container/$name"; then
        log "byte-identical: $name ($(sha256sum < "$f" | cut -c1-16))"
    else
        log "DIFFERENT: $name"; fail=1
    fi
done
extra="$(cd "$WORK/out_container" && ls -A | grep -v '^disp_' || true)"
[ "$(ls "$WORK"/out_container/disp_*.nii.gz | wc -l)" = "$count" ] && [ -z "$extra" ] || {
    log "DIFFERENT file sets (container extra: ${extra:-none})"; fail=1; }
[ "$fail" = 0 ] && log "byte identity: all $count fields identical" || log "byte identity: FAILED"

# ---- score -------------------------------------------------------------------------------------------------------
log "TRE of the container's fields (brainshift evaluate)"
.venv/bin/brainshift evaluate --input "$DATA" --output "$WORK/out_container" --quiet || fail=1

if [ -z "$DATASET" ]; then
    # ---- grand-challenge layout: images/fixed/*.mha + images/moving/*.mha -> images/displacement-field/*.mha ---
    GC="$WORK/gc_input"
    mkdir -p "$GC/images/fixed" "$GC/images/moving"
    env "${THREAD_ENV[@]}" .venv/bin/python - "$DATA/imagesTr" "$GC/images" <<'EOF'
import sys
from pathlib import Path

from brainshift.io import load_volume, save_volume

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
save_volume(dst / "fixed" / "case0001.mha", load_volume(src / "ReMIND2Reg_0001_0000.nii.gz"))
save_volume(dst / "moving" / "case0001.mha", load_volume(src / "ReMIND2Reg_0001_0001.nii.gz"))
EOF
    chmod -R a+rX "$GC"
    log "container on the grand-challenge layout (images/fixed, images/moving .mha)"
    run_container "$GC" "$WORK/out_gc"
    gc_field="$WORK/out_gc/images/displacement-field/case0001.mha"
    [ -f "$gc_field" ] || { log "grand-challenge layout: NO FIELD"; fail=1; }
    if [ -f "$gc_field" ]; then
        .venv/bin/python - "$gc_field" "$WORK/out_container/disp_0001_0000_0001_0001.nii.gz" <<'EOF' || fail=1
import sys

import numpy as np

from brainshift.fields import read_field

mha, nii = (read_field(p) for p in sys.argv[1:3])
diff = float(np.abs(mha - nii).max())
print(f"[test.sh] grand-challenge field {mha.shape}: max |mha - flat-layout field| = {diff:.3g} voxels")
sys.exit(0 if diff < 0.05 else 1)  # same pair; only the .mha geometry round trip differs
EOF
        ls -l "$WORK/out_gc/images/displacement-field/"
    fi

    # ---- bad input: a corrupt case among good ones -> exit 1, good fields written, nothing partial -------------
    BAD="$WORK/bad_input"
    mkdir -p "$BAD"
    cp "$IN"/ReMIND2Reg_0001_000[01].nii.gz "$BAD/"
    head -c 3000 "$IN/ReMIND2Reg_0002_0000.nii.gz" > "$BAD/ReMIND2Reg_0002_0000.nii.gz"   # truncated iUS
    cp "$IN/ReMIND2Reg_0002_0001.nii.gz" "$BAD/"
    : > "$BAD/ReMIND2Reg_0003_0000.nii.gz"                                                 # 0 bytes
    cp "$IN/ReMIND2Reg_0002_0001.nii.gz" "$BAD/ReMIND2Reg_0003_0001.nii.gz"
    cp "$IN/ReMIND2Reg_0002_0001.nii.gz" "$BAD/ReMIND2Reg_0005_0001.nii.gz"                # MR without its iUS
    .venv/bin/python - "$IN" "$BAD" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from brainshift.io import load_volume, save_volume

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
us = load_volume(src / "ReMIND2Reg_0002_0000.nii.gz")
us.data[10, 10, 10] = np.nan                                                   # a NaN voxel in the iUS
save_volume(dst / "ReMIND2Reg_0004_0000.nii.gz", us)
save_volume(dst / "ReMIND2Reg_0004_0001.nii.gz", load_volume(src / "ReMIND2Reg_0002_0001.nii.gz"))
EOF
    chmod -R a+rX "$BAD"
    log "bad input through the container (truncated, empty and NaN iUS, an MR without its iUS, among a good" \
        "case; identity method)"
    rc=0
    METHOD=identity run_container "$BAD" "$WORK/out_bad" 2> "$WORK/bad.err" || rc=$?
    sed 's/^/    stderr: /' "$WORK/bad.err" | grep -v '^    stderr: *$' | head -n 8
    written="$(cd "$WORK/out_bad" && ls -A)"
    if [ "$rc" = 1 ] && [ "$written" = "disp_0001_0000_0001_0001.nii.gz" ]; then
        log "bad input: exit 1, the good field written, nothing else (no partial or temporary file)"
    else
        log "bad input: FAILED (exit $rc, files: $written)"; fail=1
    fi
fi

[ "$fail" = 0 ] && log "PASSED" || log "FAILED"
exit "$fail"
