"""The command line in a real process: `python -m app` with uvicorn on loopback.

- it starts, opens its socket at once (/healthz) and turns ready, answers a classify;
- SIGTERM with requests in flight: /readyz turns 503, new work gets not_ready, every accepted request is
  answered 200, and the process exits 0;
- a checkpoint that cannot be loaded ends the process with status 1 and one error line, no traceback.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from app.checkpoints import native
from app.model import VisionTransformer, ViTConfig
from app.preprocess import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4)
    net = VisionTransformer(config)
    torch.nn.init.normal_(net.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    native.save(path, config, net.state_dict(), PreprocessConfig(resize=36, crop=(32, 32)), ["a", "b", "c", "d"])
    return path


def photo_png() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "PNG")
    return buf.getvalue()


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """The server in its own process, its output to `log` (a pipe nobody reads would fill and stall it)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIT_")}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env={**clean, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_until(url: str, status: int, proc: subprocess.Popen, timeout: float = 180) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == status:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}")


def queue_depth(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("vit_queue_depth{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_serves_then_drains_on_sigterm_without_losing_a_request(checkpoint, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # served at 320 x 320 (1600 patches), one image per forward, so that requests stay in flight a while
    args = ["--model", f"tiny={checkpoint}", "--image-size", "320", "--port", str(port), "--max-batch-size", "1"]
    log = tmp_path / "server.log"
    proc = start([*args, "--device", "cpu", "--decode-workers", "1", "--max-wait-ms", "0"], log)
    try:
        wait_until(f"{base}/healthz", 200, proc)  # the socket is open (possibly before ready)
        assert wait_until(f"{base}/readyz", 200, proc).json() == {"status": "ready", "models": ["tiny"]}
        png = photo_png()
        first = httpx.post(f"{base}/v1/classify?top_k=2", content=png, headers={"content-type": "image/png"})
        assert first.status_code == 200 and len(first.json()["results"][0]["predictions"]) == 2

        files = [("images", (f"{i}.png", png, "image/png")) for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            url = f"{base}/v1/classify?top_k=4"  # the model has 4 classes

            def post(i: int) -> httpx.Response:
                return httpx.post(url, files=files, headers={"X-Request-ID": f"r{i}"}, timeout=120)

            posts = [pool.submit(post, i) for i in range(8)]
            deadline = time.monotonic() + 60
            while queue_depth(base) < 48:  # all 8 x 6 images accepted, none answered yet
                assert time.monotonic() < deadline, "the requests were never all in flight"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            readyz = httpx.get(f"{base}/readyz", timeout=10)
            late = httpx.post(f"{base}/v1/classify", content=png, headers={"content-type": "image/png"}, timeout=10)
            answers = [p.result() for p in posts]
        assert readyz.status_code == 503 and readyz.json()["error"]["code"] == "not_ready"
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        assert [r.status_code for r in answers] == [200] * 8
        assert all(len(r.json()["results"]) == 6 for r in answers)
        assert proc.wait(timeout=60) == 0
        assert "r3 POST /v1/classify model=tiny images=6 status=200" in log.read_text()  # one line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# the CLI with a device that never answers: every forward, and every other computation on it, blocks its thread
# for good, as a hung GPU kernel does
HUNG_DEVICE = """
import sys, threading
import app.engine, app.tasks

app.engine.Model.__call__ = lambda self, *args, **kwargs: threading.Event().wait()
app.tasks.position_similarity = lambda model: threading.Event().wait()
from app.__main__ import main

main(sys.argv[1:])
"""


def test_a_hung_forward_ends_the_process_with_1(checkpoint, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    args = ["--model", f"tiny={checkpoint}", "--port", str(port), "--device", "cpu", "--decode-workers", "0"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIT_")}
    with open(log, "w") as out:
        command = [sys.executable, "-c", HUNG_DEVICE, *args, "--warmup", "false", "--forward-timeout-s", "0.5"]
        proc = subprocess.Popen(command, cwd=ROOT, env=clean, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(f"{base}/readyz", 200, proc)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # a thread of asyncio's own pool stuck in the device: the shutdown would wait for it for ever
            pool.submit(httpx.get, f"{base}/v1/models/tiny/position-similarity", timeout=60)
            time.sleep(0.5)
            png = {"content": photo_png(), "headers": {"content-type": "image/png"}}
            pool.submit(httpx.post, f"{base}/v1/classify?top_k=2", **png, timeout=60)  # its forward never ends
            # neither thread can be joined: the process must leave without them, and say why
            assert proc.wait(timeout=60) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    # (uvicorn logs the stuck similarity request's cancellation at the end of its graceful shutdown)
    assert "CRITICAL" in out and "a forward has run for" in out and "--forward-timeout-s 0.5" in out


def test_a_bad_checkpoint_exits_1_with_one_message(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    log = tmp_path / "server.log"
    args = ["--port", str(free_port()), "--device", "cpu", "--decode-workers", "0"]
    proc = start(args, log, env={"VIT_MODEL": str(bad)})
    try:
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "ERROR" in line or "cannot load" in line]
    assert len(errors) == 1, out
    assert str(bad) in errors[0] and "'broken'" in errors[0]
    assert "Traceback" not in out


def test_bad_options_exit_2_and_help_works():
    proc = subprocess.run([sys.executable, "-m", "app", "--max-queue", "1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "max_queue" in proc.stderr
    script = Path(sys.executable).parent / "vit-serve"
    assert script.exists()
    help_run = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_run.returncode == 0 and "--max-images-per-request" in help_run.stdout


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
        ({"GOMP_SPINCOUNT": "3000"}, {"GOMP_SPINCOUNT": "3000"}),
    ],
)
def test_openmp_threads_sleep_unless_the_user_chose_otherwise(given, expected):
    from app.process import sleeping_openmp_threads

    environ = dict(given)
    sleeping_openmp_threads(environ)
    assert environ == expected
