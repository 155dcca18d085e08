# medzero: `docker build -t medzero .` then
#   docker run -p 8000:8000 -p 11112:11112 -v medzero-data:/data medzero medzero serve --demo
# (docker/compose.yaml adds Orthanc, Prometheus and Grafana; docker/README.md says how they are wired).
#
# CPU by default. For NVIDIA GPUs pick the PyTorch CUDA wheel index with COMPUTE and run with --gpus all:
#   docker build --build-arg COMPUTE=cu124 -t medzero:cu124 .
#   docker run --gpus all -p 8000:8000 -v medzero-data:/data medzero:cu124
# COMPUTE names a folder of https://download.pytorch.org/whl/: cpu, cu121, cu124, cu126, cu128, ... Those wheels
# carry their own CUDA libraries (nvidia-* packages), so the base stays python:3.11-slim: the host needs the NVIDIA
# driver and the container toolkit, not a CUDA image. An index holds only some torch releases (cu121: up to 2.5,
# cu124: 2.4 to 2.6, ...); pip takes the newest one there within the bounds below.
# FAISS: faiss-cpu in the CPU build. A CUDA build swaps it for faiss-gpu-cu12, pyproject.toml's gpu extra: the two
# install the same `faiss` module and with both installed `import faiss` fails, so the builder uninstalls both and
# reinstalls the GPU wheel alone. The CPU IndexFlatIP stays the description index that is saved and searched by
# default; MEDZERO_INDEX_DEVICE=auto searches per-class copies of it on the GPU when the encoder runs there and a
# trial search at start-up agrees with the CPU (app/knowledge/index.py weighs the two), MEDZERO_INDEX_DEVICE=cpu never.
# The PyPI wheel holds kernels for compute capability 7.0-8.9 (Volta to Ada) only, so on Hopper that trial search
# should fail and the index stay on the CPU; and it adds CUDA 12 runtime and cuBLAS wheels (about 1 GB) where
# torch's COMPUTE did not bring them already.
#
# Without --demo the server loads MEDZERO_MODEL_NAME (BiomedCLIP by default) and refuses to start when those
# weights are neither on disk nor downloadable. Real weights, three ways:
#   1. mount a Hugging Face cache that holds them:
#        -v ~/.cache/huggingface:/home/medzero/.cache/huggingface
#   2. mount a checkpoint at the /weights mount point and point at it:
#        -v /srv/weights:/weights:ro -e MEDZERO_MODEL_NAME=ViT-B-16 -e MEDZERO_PRETRAINED=/weights/model.pt
#      (or -e MEDZERO_MODEL_NAME=local-dir:/weights/biomedclip for a folder with open_clip_config.json)
#   3. bake them into the image at build time (the build needs the hub; the container then does not):
#        docker build --build-arg BAKE_MODEL_NAME=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 .
#      and run it with the same MEDZERO_MODEL_NAME (that one is the default) and MEDZERO_PRETRAINED.

# ---- builder: /opt/venv with torch, the dependencies and medzero (editable, from /opt/medzero) ----------------------
# The same base as the runtime stage: the venv's interpreter links to /usr/local/bin/python3.11 of that image.
# Every dependency ships manylinux wheels, so no compiler is needed here either.
FROM python:3.11-slim AS builder

# cpu | cu121 | cu124 | cu126 | ...: the PyTorch wheel index torch and torchvision come from.
ARG COMPUTE=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /opt/medzero

# Dependencies first, so editing app/ does not reinstall torch. The bounds repeat pyproject.toml's; keep them in
# step. The first `pip install .` only brings the dependencies: app/ is not copied yet.
COPY pyproject.toml README.md ./
RUN pip install --index-url "https://download.pytorch.org/whl/${COMPUTE}" \
        "torch>=2.3,<=2.14.1" "torchvision>=0.18,<=0.29.1" \
    && pip install --extra-index-url "https://download.pytorch.org/whl/${COMPUTE}" .
# CUDA builds: faiss-gpu-cu12 (with its CUDA wheels) in place of faiss-cpu, as pyproject.toml's gpu extra describes;
# the bound repeats that extra's.
RUN if [ "$COMPUTE" != "cpu" ]; then \
        pip install "faiss-gpu-cu12>=1.8,<2" \
        && pip uninstall -y faiss-cpu faiss-gpu-cu12 \
        && pip install --no-deps "faiss-gpu-cu12>=1.8,<2"; \
    fi

# The editable install records /opt/medzero/app in the venv; the runtime stage puts the same tree at the same path.
COPY app/ app/
RUN pip install --no-deps --editable .

# ---- runtime: the venv and the source tree, nothing else ---------------------------------------------------------
FROM python:3.11-slim

ARG COMPUTE=cpu
LABEL org.opencontainers.image.title="medzero" \
      org.opencontainers.image.description="Zero-shot medical image classification (HTTP, DICOM C-STORE, STOW-RS)" \
      io.medzero.compute="${COMPUTE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# /data: database, label sets, indexes, adapters (a volume). /weights: where a checkpoint is mounted read-only.
RUN groupadd --gid 10001 medzero \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin medzero \
    && mkdir /data /weights \
    && chown medzero:medzero /data

COPY --from=builder /opt/venv /opt/venv

WORKDIR /opt/medzero

# The source tree the builder installed in editable mode, at the same path: medzero finds models/ and
# knowledge_base/ beside app/ (settings.BUNDLED_MODEL_DIR), as in a checkout. knowledge_base/ may be empty; it
# must exist. Owned by root: the server cannot rewrite its own code. (The package metadata, entry point
# included, is in the venv's dist-info; pyproject.toml is not needed at run time.)
COPY app/ app/
COPY models/ models/
COPY knowledge_base/ knowledge_base/
# Proves the editable install resolves here and that the slim stage has every shared library torch and faiss need.
RUN python -c "import app.main, faiss, torch; print('medzero ready; torch', torch.__version__)"

USER 10001:10001

# Optional: download real weights now, through the server's own loader, into /home/medzero/.cache/huggingface.
ARG BAKE_MODEL_NAME=""
ARG BAKE_PRETRAINED=""
RUN if [ -n "$BAKE_MODEL_NAME" ]; then \
        env MEDZERO_MODEL_NAME="$BAKE_MODEL_NAME" ${BAKE_PRETRAINED:+"MEDZERO_PRETRAINED=$BAKE_PRETRAINED"} \
        python -c "from app.encoders.loader import load_encoder; from app.settings import Settings; load_encoder(Settings())"; \
    fi

# HTTP on 8000 (API, STOW-RS at /dicomweb, /metrics); the DICOM C-STORE / C-ECHO SCP on 11112 as AE MEDZERO.
ENV MEDZERO_HOST=0.0.0.0 \
    MEDZERO_PORT=8000 \
    MEDZERO_DATA_DIR=/data \
    MEDZERO_DICOM_PORT=11112 \
    MEDZERO_DICOM_AE_TITLE=MEDZERO
VOLUME ["/data"]
EXPOSE 8000 11112

# /healthz answers as soon as HTTP is up (the model may still be loading; /readyz says when it is warm).
# No curl in the slim image, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MEDZERO_PORT', '8000') + '/healthz', timeout=4).status != 200)"]

CMD ["medzero", "serve"]
