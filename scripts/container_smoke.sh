#!/usr/bin/env bash
# Container smoke check without a container engine: perform the Dockerfile's install steps in a fresh
# virtualenv, start the server the way the image does (from a directory with no ./models, so the bundled
# model must come from inside the installed wheel), and classify one image over HTTP.
#
#   Dockerfile                                         here
#   builder:  COPY pyproject.toml README.md app models   copy the same files (the .dockerignore allow-list)
#             pip wheel --no-deps --wheel-dir /dist .    the same command
#   runtime:  pip install torch==$TORCH_VERSION (CPU)    pip install $VITSERVE_SMOKE_TORCH (a local CPU wheel here)
#             pip install /tmp/dist/vitserve-*.whl       the same command
#             ENTRYPOINT vit-serve, HEALTHCHECK /readyz  vit-serve --host 127.0.0.1 --port FREE, poll /readyz
#
# Environment: PYTHON (default python3.11, else python3), VITSERVE_SMOKE_TORCH (default torch==2.13.0),
# VITSERVE_SMOKE_READY_TIMEOUT_S (default 300), VITSERVE_SMOKE_KEEP=1 keeps the work folder.
# Exit status: 0 when every step passed, 1 otherwise (the failing step and the server log are printed).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${VITSERVE_SMOKE_TORCH:-torch==2.13.0}
ready_timeout_s=${VITSERVE_SMOKE_READY_TIMEOUT_S:-300}
stop_timeout_s=75 # docker-compose.yml's stop_grace_period
python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  python_bin=$(command -v python3.11 || command -v python3)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vitserve-smoke.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "${VITSERVE_SMOKE_KEEP:-0}" = 1 ]; then
    echo "kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

step() { printf '== %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  if [ -s "$work/server.log" ]; then
    echo "--- server log (last 40 lines) ---" >&2
    tail -n 40 "$work/server.log" >&2
  fi
  exit 1
}

step "build context: pyproject.toml README.md app/ models/ (the .dockerignore allow-list)"
mkdir -p "$work/src" "$work/dist" "$work/run"
(cd "$repo" && tar --exclude='__pycache__' --exclude='*.py[cod]' -cf - pyproject.toml README.md app models) |
  tar -xf - -C "$work/src"
[ -n "$(find "$work/src/models" -mindepth 2 -type f 2>/dev/null)" ] ||
  fail "models/ holds no model folder: there is no bundled model to ship"

step "fresh virtualenv ($("$python_bin" --version))"
"$python_bin" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
pip() { "$venv_python" -m pip --disable-pip-version-check -q "$@"; }

step "torch: $torch_spec"
pip install "$torch_spec"

step "builder stage: pip wheel --no-deps --wheel-dir dist ."
(cd "$work/src" && "$venv_python" -m pip --disable-pip-version-check -q wheel --no-deps --wheel-dir "$work/dist" .)
wheel=$(ls "$work/dist"/vitserve-*.whl)
"$venv_python" -m zipfile -l "$wheel" >"$work/wheel-files.txt"
grep -q "app/_models/" "$work/wheel-files.txt" || fail "the wheel lacks app/_models (the bundled model repository)"
echo "$(basename "$wheel"): $(grep -c "app/_models/" "$work/wheel-files.txt") entries under app/_models/"

step "runtime stage: pip install the wheel (dependencies from pyproject.toml)"
pip install "$wheel"
pip check
# The image runs as a non-root user: the bundled model files must be readable by anyone once installed.
unreadable=$("$venv_python" -c "
import stat
from pathlib import Path

import app

root = Path(app.__file__).parent / '_models'
print(' '.join(str(p) for p in root.rglob('*') if p.is_file() and not p.stat().st_mode & stat.S_IROTH))
")
[ -z "$unreadable" ] || fail "installed model files a non-root user cannot read: $unreadable"
"$venv_python" -c "import torch; print('torch', torch.__version__)"

# Run outside the repository, with none of the caller's VIT_* settings: only the installed package counts.
cd "$work/run"
for var in $(compgen -e | grep '^VIT_' || true); do unset "$var"; done
installed=$("$venv_python" -c "import app; print(app.__file__)")
case "$installed" in
  "$work/venv/"*) echo "app imported from $installed" ;;
  *) fail "app was imported from $installed, not from the virtualenv" ;;
esac

port=$("$venv_python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
base="http://127.0.0.1:$port"
step "start: vit-serve --host 127.0.0.1 --port $port (cwd $work/run)"
"$work/venv/bin/vit-serve" --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
server_pid=$!

step "wait for /readyz (at most ${ready_timeout_s}s)"
start=$(date +%s)
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz")" = 200 ]; do
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited before it was ready"
  [ $(($(date +%s) - start)) -lt "$ready_timeout_s" ] || fail "not ready within ${ready_timeout_s}s"
  sleep 1
done
echo "ready after $(($(date +%s) - start))s: $(curl -s "$base/readyz")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/healthz")" = 200 ] || fail "/healthz is not 200"

step "classify one image with curl"
"$venv_python" - "$work/digit.png" <<'EOF'
import sys

from PIL import Image, ImageDraw

# A hand-drawn-looking "7": white strokes on black, like the digits the bundled model knows.
img = Image.new("L", (64, 64), 0)
draw = ImageDraw.Draw(img)
draw.line([(14, 14), (50, 14)], fill=255, width=7)
draw.line([(50, 14), (26, 54)], fill=255, width=7)
img.convert("RGB").save(sys.argv[1])
EOF
code=$(curl -s -o "$work/classify.json" -D "$work/classify.headers" -w '%{http_code}' \
  -F "images=@$work/digit.png;type=image/png" "$base/v1/classify?top_k=3")
[ "$code" = 200 ] || fail "POST /v1/classify answered $code: $(cat "$work/classify.json")"
"$venv_python" - "$work/classify.json" <<'EOF' || fail "the classify answer has the wrong shape: $(cat "$work/classify.json")"
import json
import sys

body = json.load(open(sys.argv[1]))
assert isinstance(body["model"], str) and body["model"], body
assert len(body["results"]) == 1, body
result = body["results"][0]
assert result["filename"] == "digit.png", result
predictions = result["predictions"]
assert 1 <= len(predictions) <= 3, predictions
for p in predictions:
    assert set(p) >= {"index", "label", "score"}, p
    assert isinstance(p["index"], int) and isinstance(p["label"], str) and 0.0 <= p["score"] <= 1.0, p
scores = [p["score"] for p in predictions]
assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-4, scores
top = predictions[0]
print(f"model {body['model']}: top-1 {top['label']!r} (index {top['index']}, score {top['score']:.3f})")
EOF
grep -qi '^x-request-id:' "$work/classify.headers" || fail "the answer carries no X-Request-ID"
curl -s -o "$work/metrics.txt" "$base/metrics"
grep -q '^vit_requests_total{' "$work/metrics.txt" || fail "/metrics has no vit_requests_total: $(head -c 600 "$work/metrics.txt")"

step "stop: SIGTERM, exit within ${stop_timeout_s}s (compose stop_grace_period)"
kill -TERM "$server_pid"
for _ in $(seq "$stop_timeout_s"); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 1
done
kill -0 "$server_pid" 2>/dev/null && fail "still running ${stop_timeout_s}s after SIGTERM"
status=0
wait "$server_pid" || status=$?
server_pid=""
[ "$status" = 0 ] || fail "the server exited with status $status after SIGTERM"

echo "container smoke: PASSED"
