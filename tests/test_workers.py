"""`--workers N` in real processes: a supervisor and N server processes on one port.

- two workers answer what the engine computes, both serve, and `/metrics` in either one counts the requests
  and images of both (prometheus-client's multiprocess mode), also those of a worker that has died;
- a worker killed with SIGKILL is replaced by a new process (a new pid, which serves once its models are
  ready) while the other keeps answering; SIGTERM drains both, the supervisor exits 0 and removes its metrics
  directory; SIGTERM while a replacement still loads stops it before it is ready;
- a checkpoint that cannot be loaded ends the supervisor with status 1 and one error line; a worker whose device
  hangs while serving exits 1 and is replaced; a port in use ends the supervisor with status 3;
- workers whose supervisor is killed drain and leave;
- the option itself: `--workers` / `VIT_WORKERS`, at least 1; the supervisor imports no torch."""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_main import ROOT, free_port, start, wait_until

import app
from app.__main__ import parse_settings
from app.process import log_config, worker_environment
from app.settings import available_cpus

sys.path.insert(0, str(ROOT / "tests" / "http"))
from http_support import encode, photo, save_tiny

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (32 x 32, patch 8, width 32, depth 1): two copies load in a second or two."""
    return save_tiny(tmp_path_factory.mktemp("workers") / "tiny.safetensors", num_classes=4, depth=1)


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return [encode(photo(name).convert("RGB"), "PNG") for name in ("chelsea", "astronaut", "coffee")]


@pytest.fixture(scope="module")
def expected(checkpoint, uploads) -> list[torch.Tensor]:
    """The engine's probabilities for each upload, loaded in this process: the reference for every answer."""
    model = app.load_model(str(checkpoint), device="cpu", dtype="float32")
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in uploads]
    return list(model(model.preprocess(images)).logits.softmax(-1))


def log_until(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    """Wait for a line of the server's log that matches `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the log:\n{log.read_text()}")


class Client:
    """Classify requests of one or two images, each on a new connection (so any worker may accept it)."""

    def __init__(self, base: str, uploads: list[bytes], expected: list[torch.Tensor]):
        self.base, self.uploads, self.expected = base, uploads, expected
        self.requests = self.images = 0

    def one(self, i: int) -> httpx.Response:
        picks = [i % len(self.uploads), (i + 1) % len(self.uploads)][: 1 + i % 2]
        files = [("images", (f"{k}.png", self.uploads[k], "image/png")) for k in picks]
        r = httpx.post(f"{self.base}/v1/classify?top_k=4", files=files, headers={"X-Request-ID": f"q{i}"}, timeout=60)
        assert r.status_code == 200, r.text
        for result, k in zip(r.json()["results"], picks, strict=True):
            top = self.expected[k].topk(4)
            assert [p["index"] for p in result["predictions"]] == top.indices.tolist()
            np.testing.assert_allclose([p["score"] for p in result["predictions"]], top.values.numpy(), atol=ATOL)
        return r

    def send(self, n: int) -> None:
        first = self.requests
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(self.one, range(first, first + n)))
        self.requests += n
        self.images += sum(1 + i % 2 for i in range(first, first + n))


def serving_pids(text: str) -> set[str]:
    """The pids of the workers that logged a request in `text` (a part of the server's log)."""
    return set(re.findall(r"\[(\d+)\] q\d+ POST /v1/classify model=tiny", text))


def metric_sum(base: str, name: str, **labels: str) -> tuple[float, int]:
    """The sum of `name`'s samples whose labels include `labels`, and how many samples there were."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    return sum(s.value for s in samples), len(samples)


def test_two_workers_serve_count_together_survive_a_kill_and_drain(checkpoint, uploads, expected, tmp_path):
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    base, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    args = ["--workers", "2", "--model", f"tiny={checkpoint}", "--port", str(port), "--device", "cpu"]
    proc = start([*args, "--decode-workers", "0", "--max-batch-size", "2"], log, env={"TMPDIR": str(tmp)})
    try:
        pids = log_until(log, r"supervisor: 2 workers \(pids (\d+), (\d+)\)", proc).groups()
        log_until(log, r"supervisor: all 2 workers ready", proc)
        assert len(list(tmp.glob("vitserve-metrics-*"))) == 1  # the supervisor's private directory

        client = Client(base, uploads, expected)
        for _ in range(5):  # the kernel hands each new connection to whichever worker accepts first
            client.send(20)
            if serving_pids(log.read_text()) == set(pids):
                break
        assert serving_pids(log.read_text()) == set(pids), "one worker took every request"
        assert metric_sum(base, "vit_requests_total", endpoint="/v1/classify", status="200")[0] == client.requests
        assert metric_sum(base, "vit_images_total", endpoint="/v1/classify", model="tiny")[0] == client.images

        os.kill(int(pids[0]), signal.SIGKILL)
        log_until(log, rf"worker 0 \(pid {pids[0]}\) was killed by SIGKILL; starting a new one", proc)
        killed_at = len(log.read_text())  # the supervisor has seen it dead: nothing of it after this point
        while not (ready := re.search(r"supervisor: worker 0 \(pid (\d+)\) ready", log.read_text())):
            client.send(4)  # the other worker answers meanwhile; the new one joins once ready
            assert proc.poll() is None
            time.sleep(0.2)  # leave the cores to the new worker's start
        new = ready.group(1)
        assert new not in pids
        with pytest.raises(ProcessLookupError):
            os.kill(int(pids[0]), 0)  # the killed worker is gone
        for _ in range(10):
            client.send(20)
            if new in serving_pids(log.read_text()[killed_at:]):
                break
        after_the_kill = serving_pids(log.read_text()[killed_at:])
        assert new in after_the_kill and pids[0] not in after_the_kill
        text = log.read_text()
        # the replacement took no request before its models were ready
        assert text.index(f"[{new}] ready: serving tiny") < text.index(f"[{new}] q")
        # the dead worker's counts stay in the sums; gauges combine the live workers into one sample
        assert metric_sum(base, "vit_requests_total", endpoint="/v1/classify", status="200")[0] == client.requests
        assert metric_sum(base, "vit_images_total", endpoint="/v1/classify", model="tiny")[0] == client.images
        assert metric_sum(base, "vit_queue_depth", model="tiny") == (0.0, 1)
        load_seconds, samples = metric_sum(base, "vit_model_load_seconds", model="tiny")
        assert samples == 1 and load_seconds > 0
        assert wait_until(f"{base}/readyz", 200, proc).json() == {"status": "ready", "models": ["tiny"]}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert list(tmp.glob("vitserve-metrics-*")) == []
        assert log.read_text().count("Finished server process") == 2  # the survivor and the replacement
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_checkpoint_stops_every_worker_with_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    tmp, log = tmp_path / "tmp", tmp_path / "server.log"
    tmp.mkdir()
    args = ["--workers", "2", "--port", str(free_port()), "--device", "cpu", "--decode-workers", "0"]
    proc = start(args, log, env={"VIT_MODEL": str(bad), "TMPDIR": str(tmp)})
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    errors = [line for line in out.splitlines() if "ERROR" in line or "cannot load" in line]
    assert (code, len(errors), "Traceback" in out) == (1, 1, False), out  # the supervisor's line, no worker's
    assert str(bad) in errors[0] and "'broken'" in errors[0]
    assert list(tmp.glob("vitserve-metrics-*")) == []


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its new parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_workers_drain_and_leave_when_their_supervisor_is_killed(checkpoint, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    args = ["--workers", "2", "--model", f"tiny={checkpoint}", "--port", str(port), "--device", "cpu"]
    proc = start([*args, "--decode-workers", "0"], log)
    pids: list[int] = []
    try:
        pids = [int(p) for p in log_until(log, r"supervisor: 2 workers \(pids (\d+), (\d+)\)", proc).groups()]
        log_until(log, r"supervisor: all 2 workers ready", proc)
        proc.kill()  # SIGKILL: the supervisor cannot tell its workers
        proc.wait()
        deadline = time.monotonic() + 60
        while not all(gone(pid) for pid in pids):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert log.read_text().count("the supervisor has gone; draining") == 2
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_while_a_replacement_loads_stops_it_before_it_listens(checkpoint, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    args = ["--workers", "2", "--model", f"tiny={checkpoint}", "--port", str(port), "--device", "cpu"]
    proc = start([*args, "--decode-workers", "0"], log)
    try:
        pids = log_until(log, r"supervisor: 2 workers \(pids (\d+), (\d+)\)", proc).groups()
        log_until(log, r"supervisor: all 2 workers ready", proc)
        os.kill(int(pids[0]), signal.SIGKILL)
        log_until(log, r"starting a new one", proc)
        proc.send_signal(signal.SIGTERM)  # the replacement is still importing torch, or loading
        assert proc.wait(timeout=60) == 0, log.read_text()
        out = log.read_text()
        new = re.findall(r"\[(\d+)\] Started server process", out)[-1]
        assert new not in pids and f"[{new}] Finished server process" in out  # it stopped, exit status 0
        assert f"[{new}] ready:" not in out and f"(pid {new}) ready" not in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_ends_the_supervisor_with_3_and_starts_no_worker(tmp_path):
    log = tmp_path / "server.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start(["--workers", "2", "--port", str(port)], log)
        code = proc.wait(timeout=60)
    out = log.read_text()
    assert code == 3 and "Address already in use" in out and "supervisor:" not in out, out


# imported by every Python process started with this folder on PYTHONPATH (the supervisor's spawned workers
# too): a device that never answers, as a hung GPU kernel does
HUNG_DEVICE = """
import threading
import app.engine

app.engine.Model.__call__ = lambda self, *args, **kwargs: threading.Event().wait()
"""


def test_a_worker_whose_device_hangs_exits_1_and_is_replaced(checkpoint, uploads, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HUNG_DEVICE)
    port, log = free_port(), tmp_path / "server.log"
    args = ["--workers", "2", "--model", f"tiny={checkpoint}", "--port", str(port), "--device", "cpu"]
    args += ["--decode-workers", "0", "--warmup", "false", "--forward-timeout-s", "0.5"]
    proc = start(args, log, env={"PYTHONPATH": str(tmp_path)})
    try:
        pids = log_until(log, r"supervisor: 2 workers \(pids (\d+), (\d+)\)", proc).groups()
        log_until(log, r"supervisor: all 2 workers ready", proc)
        png = {"content": uploads[0], "headers": {"content-type": "image/png"}}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/classify?top_k=2", **png, timeout=60)
        assert answer.status_code == 503  # the batch in the hung forward
        failed = log_until(log, r"worker (\d) \(pid (\d+)\) exited with status 1 \(model 'tiny': a forward", proc)
        assert failed.group(2) in pids
        replaced = log_until(log, rf"supervisor: worker {failed.group(1)} \(pid (\d+)\) ready", proc).group(1)
        assert replaced not in pids and gone(int(failed.group(2)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_that_fails_before_ready_stops_all_one_that_fails_while_serving_is_replaced(tmp_path):
    import multiprocessing

    from app.process import Supervisor, Worker
    from app.settings import Settings

    ctx = multiprocessing.get_context("spawn")
    outcomes = []
    for ready in (False, True):
        supervisor = Supervisor(Settings(workers=2), sock=None, metrics_dir=str(tmp_path))
        process = ctx.Process(target=time.sleep, args=(0.1,))
        process.start()
        ours, theirs = ctx.Pipe()
        worker = Worker(0, process, ours)
        supervisor.workers = [worker]
        if ready:
            theirs.send(("ready",))
        theirs.send(("fatal", "model 'tiny': its device failed and cannot recover"))
        supervisor.read(worker)
        process.join()
        outcomes.append((supervisor.stopping, supervisor.exit_code, worker.fatal))
    assert outcomes[0][:2] == (True, 1)  # a load failure: every worker stops, the supervisor exits 1
    assert outcomes[1][:2] == (False, 0) and "device failed" in outcomes[1][2]  # replaced when it exits


def test_workers_option_and_variable(monkeypatch):
    monkeypatch.delenv("VIT_WORKERS", raising=False)
    assert parse_settings([]).workers == 1
    assert parse_settings(["--workers", "3"]).workers == 3
    monkeypatch.setenv("VIT_WORKERS", "2")
    assert parse_settings([]).workers == 2
    assert parse_settings(["--workers", "4"]).workers == 4  # the flag wins
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--workers", "0"])
    assert exit_info.value.code == 2


def test_each_worker_gets_its_share_of_the_cpus_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = available_cpus()
    env = worker_environment(2, "/some/dir")
    assert env == {"PROMETHEUS_MULTIPROC_DIR": "/some/dir", "OMP_NUM_THREADS": str(max(1, cpus // 2))}
    assert worker_environment(4 * cpus, "/d")["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "OMP_NUM_THREADS" not in worker_environment(2, "/d")
    assert "[%(process)d]" in log_config("info", pid=True)["formatters"]["default"]["fmt"]
    assert "[%(process)d]" not in log_config("info")["formatters"]["default"]["fmt"]


def test_the_supervisor_imports_neither_torch_nor_the_app():
    code = "import sys, app.__main__, app.process; print([m for m in ('torch', 'app.http') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
