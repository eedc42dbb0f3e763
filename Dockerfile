# syntax=docker/dockerfile:1
#
# vitserve container image, two variants from one file:
#   GPU (default): docker build -t vitserve:gpu .
#   CPU:           docker build -t vitserve:cpu --build-arg VARIANT=cpu .
#
# Stages: `builder` turns pyproject.toml + app/ + models/ into one wheel (the bundled model repository
# rides inside it as app/_models); `runtime-gpu` / `runtime-cpu` only bring Python and the right torch
# build; the final stage installs the wheel, so the dependency list lives in pyproject.toml alone.
# Needs BuildKit (the default builder since Docker 23), which builds only the variant's stages.

ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11
# One torch version for both variants, the one CI's container smoke check installs (scripts/container_smoke.sh).
ARG TORCH_VERSION=2.13.0
# The GPU variant's base: the official PyTorch runtime image (CUDA, cuDNN and the CUDA build of torch,
# one copy of each). Keep CUDA_VERSION to a tag that exists for TORCH_VERSION on Docker Hub.
ARG CUDA_VERSION=12.8
ARG CUDNN_VERSION=9

# ---------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
# Only what the wheel is made of (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
# pip fetches the build backend (hatchling) in an isolated build environment.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && python -m zipfile -l /dist/vitserve-*.whl > /tmp/wheel-files.txt \
    && grep -q "app/_models/" /tmp/wheel-files.txt

# ---------------------------------------------------------------------------------------------------
FROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn${CUDNN_VERSION}-runtime AS runtime-gpu
# torch (CUDA build) is already installed in the image's Python; the wheel's `torch>=...` is satisfied by it.
# The NVIDIA container toolkit reads these to mount the driver's compute libraries into the container.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime-cpu
ARG TORCH_VERSION
# The CPU build of torch from PyTorch's CPU index: about 200 MB instead of the CUDA build's several GB.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------
# runtime-${VARIANT} names a stage above, not an image, so hadolint's "tag your image" rule does not apply.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="vitserve" \
      org.opencontainers.image.description="Vision Transformer inference service (${VARIANT} variant)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The package and its dependencies, exactly as pyproject.toml declares them (torch is already satisfied).
COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/vitserve-*.whl \
    && rm -rf /tmp/dist \
    && python -c "import app, torch; print('vitserve ok, torch', torch.__version__)"

# A fixed numeric non-root user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 vitserve \
    && useradd --system --uid 10001 --gid vitserve --create-home --home-dir /home/vitserve vitserve
USER 10001:10001
WORKDIR /home/vitserve
# Caches that torch / huggingface-hub may write (hf-hub: specs) live in the user's home, never in /root.
ENV HOME=/home/vitserve \
    HF_HOME=/home/vitserve/.cache/huggingface \
    TORCH_HOME=/home/vitserve/.cache/torch

# Every option is a VIT_* variable (API.md). No CMD flags: a flag would beat the variable, and
# `docker run -e VIT_PORT=...` / compose / Kubernetes settings must keep working. Arguments given to
# `docker run IMAGE ...` are appended to the entrypoint (for example `--model NAME=SPEC`).
# The working directory has no ./models, so the model repository is VIT_MODELS_DIR when set (a mounted
# volume), else the one that ships inside the installed package (the bundled default model).
ENV VIT_HOST=0.0.0.0 \
    VIT_PORT=8000
EXPOSE 8000

# Ready = every model loaded and warmed up (503 before that and while draining). urllib, because the
# slim base has no curl. The start period covers model loading and warm-up on a cold cache.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VIT_PORT', '8000'), timeout=4)"]

# uvicorn handles SIGTERM: /readyz turns 503, in-flight requests finish (up to VIT_REQUEST_TIMEOUT_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["vit-serve"]
CMD []
