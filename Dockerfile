# medzero on CPU: `docker build -t medzero .` then `docker run -p 8000:8000 -v medzero-data:/data medzero medzero serve --demo`
# (docker/compose.yaml adds Prometheus). Without --demo the server loads MEDZERO_MODEL_NAME (BiomedCLIP by default)
# and refuses to start when those weights are neither on disk nor downloadable. Real weights, three ways:
#   1. mount a Hugging Face cache that holds them:
#        -v ~/.cache/huggingface:/home/medzero/.cache/huggingface
#   2. mount a checkpoint and point at it:
#        -v /srv/weights:/weights:ro -e MEDZERO_MODEL_NAME=ViT-B-16 -e MEDZERO_PRETRAINED=/weights/model.pt
#      (or -e MEDZERO_MODEL_NAME=local-dir:/weights/biomedclip for a folder with open_clip_config.json)
#   3. bake them into the image at build time (the build needs the hub; the container then does not):
#        docker build --build-arg BAKE_MODEL_NAME=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 .
#      and run it with the same MEDZERO_MODEL_NAME (that one is the default) and MEDZERO_PRETRAINED.
FROM python:3.11-slim

# torch/torchvision come from the PyTorch CPU wheel index: no CUDA libraries (several GB) in a CPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --gid 10001 medzero \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin medzero \
    && python -m venv /opt/venv \
    && mkdir /data \
    && chown medzero:medzero /data

WORKDIR /opt/medzero

# Dependencies first, so editing app/ does not reinstall torch. The bounds repeat pyproject.toml's; keep them in
# step. The first `pip install .` only brings the dependencies: app/ is not copied yet.
COPY pyproject.toml README.md ./
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.3,<=2.14.1" "torchvision>=0.18,<=0.29.1" \
    && pip install --extra-index-url "$TORCH_INDEX_URL" .

# The source tree, installed in editable mode: medzero finds models/ and knowledge_base/ beside app/
# (settings.BUNDLED_MODEL_DIR), as in a checkout. knowledge_base/ may be empty; it must exist.
COPY app/ app/
COPY models/ models/
COPY knowledge_base/ knowledge_base/
RUN pip install --no-deps --editable . \
    && python -c "import app.main"

USER 10001:10001

# Optional: download real weights now, through the server's own loader, into /home/medzero/.cache/huggingface.
ARG BAKE_MODEL_NAME=""
ARG BAKE_PRETRAINED=""
RUN if [ -n "$BAKE_MODEL_NAME" ]; then \
        env MEDZERO_MODEL_NAME="$BAKE_MODEL_NAME" ${BAKE_PRETRAINED:+"MEDZERO_PRETRAINED=$BAKE_PRETRAINED"} \
        python -c "from app.encoders.loader import load_encoder; from app.settings import Settings; load_encoder(Settings())"; \
    fi

ENV MEDZERO_HOST=0.0.0.0 \
    MEDZERO_PORT=8000 \
    MEDZERO_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers as soon as HTTP is up (the model may still be loading; /readyz says when it is warm).
# No curl in the slim image, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MEDZERO_PORT', '8000') + '/healthz', timeout=4).status != 200)"]

CMD ["medzero", "serve"]
