"""bench/: the benchmarks measure what they claim (same weights everywhere, loopback only, honest summaries)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from bench import common, loadgen

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_gets_the_same_weights():
    """Ours, timm and transformers on one random state dict agree (what the ratios in bench.raw rely on)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from app.model import VisionTransformer

    sd = common.random_state_dict("ti16", seed=3)
    ours = VisionTransformer(common.vit_config("ti16")).eval()
    ours.load_state_dict(sd)
    timm_net = common.timm_model("ti16")
    timm_net.load_state_dict(sd)
    hf = common.hf_model("ti16", sd)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = ours(x)
        assert want.std() > 0.01  # a random head, not a zero one: the comparison has teeth
        torch.testing.assert_close(timm_net(x), want, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=1e-4, rtol=1e-3)


def test_native_checkpoint_loads_in_the_engine(tmp_path):
    from app.engine import load_model

    path = common.write_native_checkpoint("ti16", tmp_path)
    model = load_model(str(path), device="cpu", dtype="float32")
    assert model.info["embed_dim"] == 192 and model.info["num_classes"] == common.NUM_CLASSES


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000/v1/classify", "http://example.com/", "http://0.0.0.0:80/"])
def test_load_generator_refuses_anything_but_loopback(url):
    with pytest.raises(SystemExit, match="loopback"):
        loadgen.check_loopback(url)
    loadgen.check_loopback("http://127.0.0.1:8000/v1/classify")


def test_summary_counts_only_successes_as_throughput():
    samples = [loadgen.Sample(0.1, 200, 2), loadgen.Sample(0.3, 200, 2), loadgen.Sample(0.05, 503, 2)]
    load = loadgen.Load(url="http://127.0.0.1:1/", jpeg=b"", images_per_request=2, concurrency=2)
    row = loadgen.summarise(samples, elapsed=2.0, load=load)
    assert row["images_per_s"] == 2.0 and row["requests"] == 3 and row["ok"] == 2
    assert row["errors"] == {"503": 1}
    assert row["latency_ms"]["p50"] == pytest.approx(200.0)


def test_percentile_interpolates():
    assert common.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert common.percentile([5], 99) == 5


def test_photo_jpeg_has_the_asked_size():
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(loadgen.photo_jpeg(64, 48)))
    assert img.size == (64, 48) and img.format == "JPEG"


def test_raw_bench_runs_and_reports_agreement():
    pytest.importorskip("timm")
    from app.runner import has_onednn_linear
    from bench import raw

    argv = "--shapes ti16 --batch-sizes 1 --dtypes float32 --impls ours,ours-accel,timm --seconds 0 --min-repeats 1"
    result = raw.main([*argv.split(), "--device", "cpu"])
    (entry,) = result["results"]
    assert set(entry["impls"]) == {"ours", "ours-accel", "timm"}
    assert entry["impls"]["timm"]["max_abs_diff_vs_ours"] < 1e-4
    assert entry["impls"]["ours-accel"]["max_abs_diff_vs_ours"] < 1e-4
    assert "ours-accel/timm" in entry["ratios"]
    notes = result["build"]["ti16/float32"]["ours-accel"]
    assert notes["fast_path"] == ("onednn" if has_onednn_linear() else "eager")  # the CPU runner's packed model


def test_raw_bench_family_shapes_run_beside_timm_and_transformers():
    """DINOv2 S/14 (registers) and CLIP B/16: transformers' random weights, loaded by our engine from its files and
    into timm; every implementation gives our default embedding."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from bench import raw

    argv = "--shapes dinov2-s14-reg4,clip-b16 --batch-sizes 1 --dtypes float32 --impls ours,ours-accel,hf,timm"
    result = raw.main([*argv.split(), "--seconds", "0", "--min-repeats", "1", "--device", "cpu"])
    assert [e["shape"] for e in result["results"]] == ["dinov2-s14-reg4", "clip-b16"]
    for entry in result["results"]:
        assert set(entry["impls"]) == {"ours", "ours-accel", "hf", "timm"}, result["build"]
        for name in ("ours-accel", "hf", "timm"):
            assert entry["impls"][name]["max_abs_diff_vs_ours"] < 1e-4
        assert {"ours-accel/hf", "ours-accel/timm"} <= set(entry["ratios"])


def test_float8_bench_reports_accuracy_agreement_and_speed():
    from app.model.float8 import float8_problem
    from bench import float8

    if float8_problem(torch.device("cpu")):
        pytest.skip("no float8 on this CPU")

    result = float8.main(["--device", "cpu", "--shape", "ti16", "--batch-sizes", "1", "--seconds", "0"])
    digits = result["digits"]
    assert digits["images"] == 1000 and digits["float32"]["accuracy"] > 0.95
    assert abs(digits["float8"]["accuracy"] - digits["float32"]["accuracy"]) < 0.01
    assert 0 < digits["bfloat16"]["logits_mean_abs_diff"] < digits["float8"]["logits_mean_abs_diff"]
    assert result["photos"]["float8"]["embedding_cosine_min"] > 0.9
    (row,) = result["speed"]
    assert row["float8"]["images_per_s"] > 0 and row["fast_path"]["float8"] == "eager"

    speed_only = float8.main(
        ["--device", "cpu", "--shape", "ti16", "--batch-sizes", "1", "--seconds", "0", "--speed-only"]
    )
    assert "digits" not in speed_only and "photos" not in speed_only and len(speed_only["speed"]) == 1


def test_raw_windows_time_the_forward_alone_and_as_the_servers_lanes_run_it(tmp_path):
    import argparse

    from app.runner import has_onednn_linear
    from bench.server import RawForward

    ckpt = common.write_native_checkpoint("ti16", tmp_path)
    args = argparse.Namespace(max_batch_size=2, raw_seconds=0.3, device="cpu", dtype="float32", compile="auto")
    raw = RawForward(ckpt, args)
    window = raw.measure()
    assert window["images_per_s"] > 0 and raw.windows == [window]
    assert window["fast_path"] == raw.runner.fast_path == ("onednn" if has_onednn_linear() else "eager")
    if raw.lanes > 1:  # a CPU with 2+ threads: the server's default lanes, timed the same way
        assert window["lanes"] == raw.lanes and window["lanes_images_per_s"] > 0
    else:
        assert "lanes_images_per_s" not in window


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_main_thread_cpu_counts_the_main_thread_only():
    from bench.loadgen import main_thread_cpu_s

    def spin(seconds: float) -> None:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    start = main_thread_cpu_s(os.getpid())
    worker = threading.Thread(target=spin, args=(0.3,))
    worker.start()
    worker.join()
    after_worker = main_thread_cpu_s(os.getpid())
    spin(0.3)
    after_main = main_thread_cpu_s(os.getpid())
    assert after_worker - start < 0.15  # another thread's work is not counted
    assert after_main - after_worker > 0.2


def test_the_prebuilt_multipart_body_is_read_as_the_images_it_holds():
    """The load generator encodes its body once; a real multipart parser (Starlette's) must read every image."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def count(request):
        form = await request.form()
        files = form.getlist("images")
        return JSONResponse({"n": len(files), "sizes": [len(await f.read()) for f in files]})

    jpeg = loadgen.photo_jpeg(64, 48)
    load = loadgen.Load(url="http://127.0.0.1:1/", jpeg=jpeg, images_per_request=3)
    body, content_type = loadgen.multipart_body(load)
    with TestClient(Starlette(routes=[Route("/", count, methods=["POST"])])) as client:
        answer = client.post("/", content=body, headers={"content-type": content_type}).json()
    assert answer == {"n": 3, "sizes": [len(jpeg)] * 3}


# -- the load generator against a real HTTP server on loopback ---------------------------------------------


class _Counting(BaseHTTPRequestHandler):
    """Reads the body, holds the request a little (so requests overlap), answers 200; counts what it saw."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real server

    def do_POST(self):
        srv = self.server
        self.rfile.read(int(self.headers["content-length"]))
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        time.sleep(0.02)
        with srv.lock:
            srv.in_flight -= 1
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def counting_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.in_flight, srv.max_in_flight = threading.Lock(), 0, 0, 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_client_processes_do_not_import_torch():
    """A spawned client imports bench.loadgen and re-imports the parent's main module (bench.server or
    bench.peers): none of them may pull in torch, whose import outlasted the old start-up head start."""
    code = "import sys, bench.loadgen, bench.server, bench.peers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_two_client_processes_share_one_load_window(counting_server):
    """procs=2: both clients are released together, so the reported window is the asked one (it used to span
    the staggered process start-ups), and the requests of both processes are counted."""
    url = f"http://127.0.0.1:{counting_server.server_port}/v1/classify"
    load = loadgen.Load(url=url, jpeg=loadgen.photo_jpeg(64, 48), concurrency=2, seconds=1.5, procs=2)
    row = loadgen.run_load(load)
    assert 1.5 - 0.2 <= row["seconds"] <= 1.5 + 1.5
    assert row["requests"] == row["ok"] == counting_server.requests > 0 and row["errors"] == {}
    assert counting_server.max_in_flight == 2  # one worker per process: both processes loaded at once
    assert row["images_per_s"] == pytest.approx(row["ok"] / row["seconds"], rel=0.02)
    assert row["clients_ready_s"] > 0


def test_a_killed_server_bench_keeps_its_finished_loads(counting_server, tmp_path):
    """SIGTERM (what `timeout` sends) after the first load: the JSON holds that load, marked incomplete."""
    out = tmp_path / "partial.json"
    base = f"http://127.0.0.1:{counting_server.server_port}"
    cmd = [sys.executable, "-m", "bench.server", "--url", base, "--endpoint", "/", "--seconds", "1"]
    cmd += ["--loads", "64x48:1:1,64x48:1:1,64x48:1:1,64x48:1:1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and json.loads(out.read_text())["results"]):  # always whole JSON: atomic writes
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["bench"] == "server"
    assert 1 <= len(data["results"]) < 4
    first = data["results"][0]
    assert first["ok"] == first["requests"] > 0 and first["image"] == "64x48"


def test_sigterm_stops_the_servers_a_bench_started(tmp_path):
    """exit_on_sigterm + Spawned: a SIGTERM to the bench runs the `with` exit, which stops the server process
    (started in its own session, so it does not get the signal itself)."""
    script = tmp_path / "bench_like.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import argparse, sys, time
            from pathlib import Path
            from bench import common
            from bench.loadgen import Spawned, free_port, spawn

            class Plain(Spawned):
                ready_path = "/"

                def start(self):
                    port = free_port()
                    self.url, self.log = f"http://127.0.0.1:{{port}}", {str(tmp_path / "server.log")!r}
                    self.args = argparse.Namespace(ready_timeout=30)
                    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
                    self.proc = spawn(cmd, None, self.log)
                    return self

            common.exit_on_sigterm()
            with Plain() as server:
                Path({str(tmp_path / "pid")!r}).write_text(str(server.proc.pid))
                time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    server_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    # the server was our grandchild: once stopped and reaped by its parent, its pid is gone
    assert not Path(f"/proc/{server_pid}").exists()


def test_peers_pause_the_servers_not_under_load():
    """`bench.peers` stops the idle servers' process groups for the length of a load and always resumes them."""
    from bench.peers import paused

    ticker = "import time\nwhile True: time.sleep(0.01)"
    proc = subprocess.Popen([sys.executable, "-c", ticker], start_new_session=True)

    def state() -> str:
        letter = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return "stopped" if letter in "Tt" else "running"

    def wait_for(expected: str) -> str:  # a signal takes effect asynchronously
        for _ in range(200):
            if state() == expected:
                break
            time.sleep(0.01)
        return state()

    try:
        assert wait_for("running") == "running"
        with paused([proc.pid]):
            assert wait_for("stopped") == "stopped"
        assert wait_for("running") == "running"
        with pytest.raises(RuntimeError), paused([proc.pid]):
            raise RuntimeError("a load that fails")
        assert wait_for("running") == "running"  # resumed after an error too
        with paused([2**22 + 12345]):  # a server that has already gone is no error
            pass
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_builds_run_each_checkouts_own_app_in_turn(tmp_path):
    """--builds: every round loads the server of each checkout, started from that checkout's `app` (here a copy
    that leaves a mark when imported), and the ratios compare each build with the first."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "app", other / "app", ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "imported-from"
    init = other / "app" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text(__file__)\n")
    out = tmp_path / "builds.json"
    cmd = [sys.executable, "-m", "bench.server", "--builds", f"here={ROOT},other={other}", "--shape", "micro"]
    cmd += ["--loads", "64x48:1:1", "--seconds", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True)
    data = json.loads(out.read_text())
    assert data["complete"] is True
    assert {r["server"]: r["ok"] > 0 for r in data["results"]} == {"here": True, "other": True}
    assert data["builds"]["here"] == common.git_head(ROOT)
    assert set(data["ratios"]["64x48x1:c1"]) == {"other"} and data["ratios"]["64x48x1:c1"]["other"]["images_per_s"] > 0
    assert marker.read_text() == str(init)


def test_builds_refuse_a_folder_without_the_app(tmp_path):
    cmd = [sys.executable, "-m", "bench.server", "--builds", f"here={ROOT},empty={tmp_path}", "--seconds", "1"]
    done = subprocess.run(cmd, cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode != 0 and f"--builds empty={tmp_path} holds no app/__main__.py" in done.stderr
