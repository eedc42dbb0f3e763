"""/healthz while clients send bodies of millions of values: does the event loop stay free? JSON to stdout.

Starts vitserve on loopback (the bundled model, on the CPU), then measures `/healthz` latency for `--seconds`
alone, and again while `--clients` threads send one kind of hostile body back to back:
- `v2_bytes`: a /v2 JSON BYTES tensor of 6,000,000 empty strings (18 MB);
- `multipart`: 200,000 empty multipart parts (10 MB);
- `v2_fp32`: a /v2 JSON FP32 tensor of 5,000,000 nested `[0]`s (20 MB).
Every such body is refused (413 or 422); the point is what parsing it costs everyone else. The goal: `/healthz`
p50 under 50 ms throughout.

    python -m bench.hostile_bodies [--seconds 10] [--clients 2] [--kinds v2_bytes,multipart,v2_fp32]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter

from bench import common
from bench.loadgen import check_loopback, free_port, spawn, stop, wait_ready

JSON = {"content-type": "application/json"}


def bodies(model: str) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """kind -> (path, body, headers)."""
    infer = f"/v2/models/{model}/infer"
    strings = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[6000000],"data":[' + b",".join(
        [b'""'] * 6_000_000
    )
    zeros = b'{"inputs":[{"name":"p","datatype":"FP32","shape":[5000000,1],"data":[' + b",".join([b"[0]"] * 5_000_000)
    part = b'--x\r\nContent-Disposition: form-data; name="images"\r\n\r\n\r\n'
    return {
        "v2_bytes": (infer, strings + b"]}]}", JSON),
        "multipart": (
            "/v1/classify",
            part * 200_000 + b"--x--\r\n",
            {"content-type": "multipart/form-data; boundary=x"},
        ),
        "v2_fp32": (infer, zeros + b"]}]}", JSON),
    }


def probe(client, url: str, seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    """`/healthz` latencies (ms), one request after another, for `seconds`."""
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        assert client.get(url + "/healthz").status_code == 200
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    return times


def summary(times: list[float]) -> dict:
    return {
        "n": len(times),
        "p50_ms": round(common.percentile(times, 50), 2),
        "p95_ms": round(common.percentile(times, 95), 2),
        "max_ms": round(max(times), 2),
    }


def measure(url: str, kind: str | None, clients: int, seconds: float, model: str) -> dict:
    import httpx

    stopping = threading.Event()
    statuses: Counter[int] = Counter()
    body_ms: list[float] = []

    def hostile() -> None:
        path, body, headers = bodies(model)[kind]  # type: ignore[index]
        with httpx.Client(timeout=120) as c:
            while not stopping.is_set():
                started = time.perf_counter()
                statuses[c.post(url + path, content=body, headers=headers).status_code] += 1
                body_ms.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=hostile, daemon=True) for _ in range(clients if kind else 0)]
    for t in threads:
        t.start()
    time.sleep(2.0 if kind else 0.0)  # the clients have built their bodies and are sending
    with httpx.Client(timeout=60) as c:
        health = summary(probe(c, url, seconds))
    stopping.set()
    for t in threads:
        t.join(120)
    row = {"kind": kind or "idle", "clients": len(threads), "healthz": health}
    if kind:
        row["hostile"] = {"statuses": dict(statuses), **(summary(body_ms) if body_ms else {})}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--kinds", default="v2_bytes,multipart,v2_fp32")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--server-arg", action="append", default=[], help="passed on to vit-serve (repeatable)")
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    common.exit_on_sigterm()
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    check_loopback(url)
    folder = common.temp_dir("vitserve-hostile-")
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    proc = spawn([*cmd, *args.server_arg], {"PYTHONUNBUFFERED": "1"}, str(folder / "server.log"))
    try:
        wait_ready(url + "/readyz", proc, args.ready_timeout)
        model = httpx.get(url + "/readyz").json()["models"][0]
        rows = [measure(url, None, 0, args.seconds, model)]
        for kind in args.kinds.split(","):
            rows.append(measure(url, kind, args.clients, args.seconds, model))
            print(f"{kind}: /healthz {rows[-1]['healthz']}", file=sys.stderr)
    finally:
        stop(proc)
    result = {
        "bench": "hostile_bodies",
        "goal": "healthz p50 < 50 ms",
        "rows": rows,
        "environment": common.environment("cpu"),
        "git": common.git_head(),
    }
    common.write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
