# brainshift challenge container (Learn2Reg ReMIND2Reg).
#   docker run --rm --gpus all --network none -v IN:/input:ro -v OUT:/output brainshift
# One image per ReMIND2Reg submission: --build-arg MODALITY=t1 (ceT1, _0001) or t2 (T2, _0002); both by default.
#
# Build arguments:
#   BASE            the CUDA PyTorch image users pull (default). On a machine without an image registry,
#                   an offline Debian base made by docker/offline-base.sh (BASE=brainshift-base:bookworm).
#   TORCH_VERSION   the torch the tests run with. A base with another torch (e.g. 2.5.1 in the default
#                   image) gets this one installed over it from pip's index (PyPI's Linux wheel is the CUDA build).
#   PIP_FIND_LINKS  optional: a wheel folder URL to install from *instead of* any index (pip --no-index), e.g. the
#                   wheelhouse that `WHEELHOUSE=1 ./build.sh` serves on localhost from this machine's pip settings,
#                   with the exact versions of the tested .venv. Empty: pip's index (PyPI, or PIP_INDEX_URL).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST: optional, passed to pip as usual (a private mirror).
# Works with the classic builder (no BuildKit features), so Debian's docker.io builds it too.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

ARG MODALITY=both
ARG TORCH_VERSION=2.13.0
ARG PIP_FIND_LINKS=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ENV BRAINSHIFT_MODALITY=${MODALITY} \
    BRAINSHIFT_MODEL_DIR=/opt/brainshift/model \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/brainshift
COPY requirements.txt ./
# One layer: (without a wheelhouse) a compiler and CMake to build NiftyReg's official binaries from PyPI's
# source package, the pinned torch if the base has another, the requirements, then every package apt added
# goes again but libgomp1 (NiftyReg's OpenMP run time).
RUN set -eux; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_FIND_LINKS; do \
        eval "[ -n \"\${$v}\" ] || unset $v"; done; \
    pip_install="pip install --no-cache-dir ${PIP_FIND_LINKS:+--no-index}"; \
    if [ -z "${PIP_FIND_LINKS:-}" ]; then \
        saved="$(apt-mark showmanual)"; apt-get update; \
        apt-get install -y --no-install-recommends build-essential cmake libgomp1; fi; \
    have="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"; \
    if [ "$have" != "$TORCH_VERSION" ]; then $pip_install "torch==${TORCH_VERSION}"; fi; \
    grep -v '^torch' requirements.txt > /tmp/requirements.txt; \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 $pip_install -r /tmp/requirements.txt; \
    if [ -z "${PIP_FIND_LINKS:-}" ]; then \
        apt-mark auto '.*' > /dev/null; apt-mark manual $saved libgomp1 > /dev/null; \
        apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
            -o APT::AutoRemove::SuggestsImportant=false; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; fi; \
    rm -f /tmp/requirements.txt; \
    python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

COPY pyproject.toml README.md process.py ./
COPY brainshift ./brainshift
COPY model ./model
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import brainshift.niftyreg as n; n.binary('reg_aladin')" \
    && mkdir -p /input /output && chmod 0777 /output

# No network at run time: nothing is downloaded; weights are in /opt/brainshift/model. Runs as any user
# (docker run --user UID:GID): it writes only to /output (which must be writable by that user) and /tmp.
ENTRYPOINT ["python", "/opt/brainshift/process.py"]
