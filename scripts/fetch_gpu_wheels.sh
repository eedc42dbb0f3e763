#!/usr/bin/env bash
# Download, on a machine where PyPI is reachable, the wheels that an offline GPU machine lacks for bench/gpu.sh:
# the server's web stack and the peers' (FastAPI, uvicorn with httptools as uvicorn[standard] installs it,
# pydantic, pydantic-settings, python-multipart, orjson, fastapi-offline, LitServe).
# The GPU machine is expected to have torch, torchvision, timm, transformers, onnxruntime, aiohttp, httpx, psutil,
# prometheus-client, safetensors, scikit-image and uvloop already, and no network.
#
#   bash scripts/fetch_gpu_wheels.sh          # -> .whl/ (ignored by git; copy it to the GPU machine)
#
# Versions are pinned to the ones tested with this repository. Python 3.12, manylinux x86-64 (the GPU
# machine's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-python3}
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

PACKAGES=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  pydantic-settings==2.16.3 python-dotenv==1.2.4
  uvicorn==0.54.0 httptools==0.9.0 python-multipart==0.0.34 orjson==3.13.0 anyio==4.16.0
  fastapi-offline==1.7.7
  litserve==0.2.19 pyzmq==27.3.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64 manylinux_2_31_x86_64 \
  manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
du -sh "$DEST"
