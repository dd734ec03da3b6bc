# brainshift challenge container (Learn2Reg ReMIND2Reg).
#   docker run --rm --gpus all -v IN:/input:ro -v OUT:/output brainshift
# One image per ReMIND2Reg submission: --build-arg MODALITY=t1 (ceT1, _0001) or t2 (T2, _0002); both by default.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

ARG MODALITY=both
ENV BRAINSHIFT_MODALITY=${MODALITY} \
    BRAINSHIFT_MODEL_DIR=/opt/brainshift/model \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A compiler and CMake to build NiftyReg's official binaries from PyPI's source package.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/brainshift
COPY requirements.txt ./
# torch comes with the base image (CUDA build); everything else from requirements.txt.
RUN grep -v '^torch' requirements.txt > /tmp/requirements.txt \
    && CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install --no-cache-dir -r /tmp/requirements.txt

COPY pyproject.toml README.md process.py ./
COPY brainshift ./brainshift
COPY model ./model
RUN pip install --no-cache-dir --no-deps . && python -c "import brainshift.niftyreg as n; n.binary('reg_aladin')"

# No network at run time: nothing is downloaded; weights are in /opt/brainshift/model.
ENTRYPOINT ["python", "/opt/brainshift/process.py"]
