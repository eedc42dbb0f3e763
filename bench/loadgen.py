"""A closed-loop HTTP load generator for loopback servers, and the server-side watchers it reports with.

Closed loop: `concurrency` workers each send a request, wait for the answer, and send the next, until the time
or the request budget runs out. Workers are spread over `procs` client processes (one Python process cannot
keep hundreds of requests a second in flight with httpx; aiohttp is used where installed). Only 127.0.0.1,
localhost and ::1 are accepted as targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing as mp
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import percentile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {url}: the benchmarks only target loopback ({', '.join(sorted(LOOPBACK))})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- images ------------------------------------------------------------------------------------------------


def photo_jpeg(width: int, height: int, which: str = "astronaut", quality: int = 90) -> bytes:
    """A real photograph (scikit-image's astronaut or chelsea), resized to width x height, as JPEG bytes."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data

        pixels = getattr(data, which)()
    except Exception:  # no scikit-image: a smooth synthetic picture with edges (still compresses like a photo)
        y, x = np.mgrid[0:512, 0:512]
        pixels = np.stack([(x + y) % 256, (x * 2) % 256, (y * 3 + (x // 64) * 40) % 256], axis=-1).astype(np.uint8)
    img = Image.fromarray(pixels).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


# -- the load ------------------------------------------------------------------------------------------


@dataclass
class Load:
    url: str  # full URL of the endpoint, e.g. http://127.0.0.1:8000/v1/classify?top_k=5
    jpeg: bytes
    images_per_request: int = 1
    concurrency: int = 1
    seconds: float = 10.0
    max_requests: int = 0  # 0: no limit besides the time
    field_name: str = "images"
    procs: int = 1
    timeout_s: float = 120.0
    headers: dict = field(default_factory=dict)


@dataclass
class Sample:
    latency_s: float
    status: int  # HTTP status, or 0 for a transport error
    images: int


def _worker_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def multipart_body(load: Load) -> tuple[bytes, str]:
    """The request body, encoded once: the load generator shares the server's cores, so every request it
    builds anew costs the server under test a little CPU."""
    boundary = "vitserve-bench-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{load.field_name}"; filename="img{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + load.jpeg
        + b"\r\n"
        for i in range(load.images_per_request)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# How long the client processes may take to start (a fresh interpreter each, importing the HTTP client) before
# the load is called off.
CLIENTS_READY_TIMEOUT_S = 120.0
# Between the release of the clients and their shared start: long enough for every process to see the release.
START_MARGIN_S = 0.2


async def _wait_for_start(wait_start) -> float:
    """Block until the parent releases the clients; the deadline of this client's load, on its perf_counter."""
    start_at, seconds = wait_start()  # blocking is fine: no request is in flight yet
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    # the shared wall-clock window [start_at, start_at + seconds], moved onto this process's monotonic clock
    return time.perf_counter() + (start_at + seconds - time.time())


async def _closed_loop(load: Load, workers: int, budget: int, deadline: float, post) -> list[Sample]:
    """`workers` clients, each sending its next request (`await post()` -> status) as soon as the last one is
    answered, until the deadline or until `budget` requests are sent (0: no limit)."""
    samples: list[Sample] = []
    sent = 0

    async def one():
        nonlocal sent
        while time.perf_counter() < deadline and (budget <= 0 or sent < budget):
            sent += 1
            t0 = time.perf_counter()
            try:
                status = await post()
            except Exception:
                status = 0
            samples.append(Sample(time.perf_counter() - t0, status, load.images_per_request))

    await asyncio.gather(*(one() for _ in range(workers)))
    return samples


async def _run_aiohttp(load: Load, workers: int, budget: int, wait_start) -> list[Sample]:
    import aiohttp

    conn = aiohttp.TCPConnector(limit=max(workers, 1), force_close=False)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        body, content_type = multipart_body(load)
        headers = {**load.headers, "content-type": content_type}

        async def post() -> int:
            async with session.post(load.url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return await _closed_loop(load, workers, budget, await _wait_for_start(wait_start), post)


async def _run_httpx(load: Load, workers: int, budget: int, wait_start) -> list[Sample]:
    import httpx

    limits = httpx.Limits(max_connections=max(workers, 1), max_keepalive_connections=max(workers, 1))
    async with httpx.AsyncClient(limits=limits, timeout=load.timeout_s) as client:
        body, content_type = multipart_body(load)
        headers = {**load.headers, "content-type": content_type}

        async def post() -> int:
            return (await client.post(load.url, content=body, headers=headers)).status_code

        return await _closed_loop(load, workers, budget, await _wait_for_start(wait_start), post)


def _client_main(load: Load, workers: int, budget: int, go, start_at, out) -> None:
    """One client process: get ready (imports, body, HTTP session), say so, wait for the release, then load
    until the shared deadline and send back (end wall time, samples)."""
    try:
        try:
            import aiohttp  # noqa: F401

            runner = _run_aiohttp
        except ImportError:
            runner = _run_httpx

        def wait_start() -> tuple[float, float]:
            out.put(("ready", os.getpid(), None))
            if not go.wait(CLIENTS_READY_TIMEOUT_S + 60):
                raise TimeoutError("never released by the parent")
            return start_at.value, load.seconds

        samples = asyncio.run(runner(load, workers, budget, wait_start))
        out.put(("done", time.time(), [(s.latency_s, s.status, s.images) for s in samples]))
    except BaseException as e:  # the parent waits for a message from every client: never leave it guessing
        out.put(("error", os.getpid(), f"{type(e).__name__}: {e}"))
        raise


def _next_message(out, children: list, timeout_s: float, what: str) -> tuple:
    """The next message from the clients; raises if one died without a word or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            msg = out.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            dead = [c.exitcode for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load client process exited with status {dead[0]} while {what}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"load clients still {what} after {timeout_s:.0f} s") from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"load client {msg[1]} failed while {what}: {msg[2]}")
        return msg


def run_load(load: Load) -> dict:
    """Run one closed-loop load and summarise it: images/s, requests/s, latency percentiles, statuses.

    The client processes start, build their request body and HTTP session, and report ready; once all are,
    they are released together onto one shared wall-clock window [start, start + seconds]. `seconds` in the
    summary runs from that start to the last client's end (the last answer after the deadline), so process
    start-up is no part of it and every client loads for the whole window.
    """
    check_loopback(load.url)
    procs = max(1, min(load.procs, load.concurrency))
    workers = _worker_counts(load.concurrency, procs)
    budgets = _worker_counts(load.max_requests, procs) if load.max_requests else [0] * procs
    ctx = mp.get_context("spawn")
    out, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    children = [
        ctx.Process(target=_client_main, args=(load, w, b, go, start_at, out), daemon=True)
        for w, b in zip(workers, budgets, strict=True)
    ]
    t0 = time.perf_counter()
    try:
        for c in children:
            c.start()
        for _ in children:
            _next_message(out, children, CLIENTS_READY_TIMEOUT_S, "starting")
        ready_s = time.perf_counter() - t0
        start = time.time() + START_MARGIN_S
        start_at.value = start
        go.set()
        samples: list[Sample] = []
        ended = []
        for _ in children:
            _, end, got = _next_message(out, children, START_MARGIN_S + load.seconds + load.timeout_s + 60, "loading")
            ended.append(end)
            samples += [Sample(*s) for s in got]
        for c in children:
            c.join(timeout=10)
    finally:
        for c in children:  # on an error or SIGTERM: no client keeps loading the server
            if c.is_alive():
                c.terminate()
                c.join(timeout=5)
    elapsed = max(max(ended) - start, 1e-9)
    row = summarise(samples, elapsed, load)
    row["clients_ready_s"] = round(ready_s, 2)
    return row


def summarise(samples: list[Sample], elapsed: float, load: Load) -> dict:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s * 1e3 for s in ok]
    statuses = Counter(str(s.status) for s in samples)
    return {
        "concurrency": load.concurrency,
        "images_per_request": load.images_per_request,
        "requests": len(samples),
        "ok": len(ok),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "seconds": round(elapsed, 2),
        "images_per_s": round(sum(s.images for s in ok) / elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "latency_ms": {q: round(percentile(lat, p), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
    }


# -- watching the server -------------------------------------------------------------------------------------


class Watcher:
    """Samples the server's memory and the GPU's used memory while a load runs.

    peak_rss_mib: the server process itself; peak_tree_pss_mib: its process tree (decode pools, LitServe's
    workers) by proportional set size, so pages shared between the processes are not counted twice.
    main_thread_cpu_s: CPU time of the server's main thread during the load (Linux): uvicorn's event loop,
    where the HTTP side of every request runs. With `--workers` the pid is the supervisor's, whose main thread
    serves no request: the figure then says nothing about the workers.
    """

    def __init__(self, pid: int | None, gpu: bool, interval_s: float = 0.25, pss_interval_s: float = 1.0):
        self.pid, self.gpu, self.interval_s = pid, gpu and shutil.which("nvidia-smi") is not None, interval_s
        # PSS walks the page tables of every process of the tree: 4 times a second that took 4-6% of a 2-core
        # machine from the server it measures, so it is sampled less often than the RSS
        self.pss_interval_s = pss_interval_s
        self.peak_rss = self.peak_pss = self.peak_gpu_mib = 0
        self._cpu_start: float | None = None
        self._cpu: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watcher:
        self.peak_rss = self.peak_pss = self.peak_gpu_mib = 0
        self._cpu_start = main_thread_cpu_s(self.pid) if self.pid else None
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        end = main_thread_cpu_s(self.pid) if self.pid else None
        self._cpu = None if end is None or self._cpu_start is None else end - self._cpu_start

    def report(self) -> dict:
        out = {}
        if self.pid:
            out["peak_rss_mib"] = round(self.peak_rss / 2**20, 1)
            out["peak_tree_pss_mib"] = round(self.peak_pss / 2**20, 1)
            if self._cpu is not None:
                out["main_thread_cpu_s"] = round(self._cpu, 3)
        if self.gpu:
            out["peak_gpu_used_mib"] = self.peak_gpu_mib
        return out

    def _loop(self) -> None:
        last_gpu = last_pss = 0.0
        while not self._stop.is_set():
            if self.pid:
                self.peak_rss = max(self.peak_rss, rss_of(self.pid))
                if time.time() - last_pss >= self.pss_interval_s:
                    self.peak_pss = max(self.peak_pss, tree_pss_of(self.pid))
                    last_pss = time.time()
            if self.gpu and time.time() - last_gpu > 1.0:
                self.peak_gpu_mib = max(self.peak_gpu_mib, gpu_used_mib())
                last_gpu = time.time()
            self._stop.wait(self.interval_s)


def main_thread_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process's main thread (its thread id is its pid); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def rss_of(pid: int) -> int:
    """RSS of the process in bytes (from /proc/PID/statm: cheap); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def tree_pss_of(pid: int) -> int:
    """PSS of the process and all its descendants in bytes (psutil; their RSS without it); 0 when it is gone."""
    try:
        import psutil
    except ImportError:
        return rss_of(pid)
    try:
        proc = psutil.Process(pid)
        pss = 0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, AttributeError):
                pss += p.memory_full_info().pss
        return pss
    except psutil.Error:
        return 0


def gpu_used_mib() -> int:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return int(out.stdout.split()[0])
    except Exception:
        return 0


# -- starting servers -------------------------------------------------------------------------------------------


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float) -> float:
    """Poll `url` until it answers 200; seconds waited. Raises if the process exits or time runs out."""
    import httpx

    check_loopback(url)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, grace_s: float = 8) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (only the process we started, and its process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


def spawn(cmd: list[str], env: dict | None, log_path: str, cwd: str | None = None) -> subprocess.Popen:
    """Start a server in its own process group (so stopping it also stops its worker processes), in `cwd`."""
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
    )


class Spawned:
    """A server the benchmark started in a subprocess: `start()` (the subclass's) launches it, `wait()`
    blocks until `ready_path` answers 200 and records the start-up time; `with` stops it in the end."""

    ready_path = "/readyz"
    url: str
    log: str
    args: Any
    proc: Any = None
    startup_s: float | None = None
    _t0: float = 0.0

    def start(self):
        raise NotImplementedError

    def wait(self):
        try:
            wait_ready(self.url + self.ready_path, self.proc, self.args.ready_timeout)
        except Exception:
            stop(self.proc)
            print(Path(self.log).read_text()[-3000:], file=sys.stderr)
            raise
        self.startup_s = round(time.perf_counter() - self._t0, 1)
        return self

    def __enter__(self):
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc)
