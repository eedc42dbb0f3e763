"""Decoding off the event loop: process pool vs thread pool vs inline, on 640x480 JPEGs.

Two measurements, interleaved and repeated (the median is printed), because a shared machine is noisy:
- `pool`: app.decode.Decoder alone, 32 decodes in flight: bytes -> 224x224 uint8 model pixels;
- `server`: a real `python -m app` on loopback with a tiny model (so decoding and HTTP dominate), raw-body
  classify requests from an async client at concurrency 16, for a few seconds per run.

    python bench/decode_pool.py                      # both, workers 2
    python bench/decode_pool.py --what pool --workers 1 2 4 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from app.decode import Decoder
from app.preprocess import PreprocessConfig
from bench.loadgen import free_port

CFG = PreprocessConfig(resize=248, crop=(224, 224), interpolation="bicubic")
ROOT = Path(__file__).resolve().parents[1]


def jpeg(size=(640, 480)) -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def pool_rate(kind: str, workers: int, data: bytes, n: int, concurrency: int = 32) -> float:
    decoder = Decoder(40_000_000, workers, kind)  # type: ignore[arg-type]
    await decoder.start()
    await asyncio.gather(*(decoder.pixels(data, CFG) for _ in range(8)))
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await decoder.pixels(data, CFG)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = n / (time.perf_counter() - started)
    decoder.close()
    return rate


def tiny_checkpoint(folder: Path) -> Path:
    import torch

    from app.checkpoints import native
    from app.model import VisionTransformer, ViTConfig

    config = ViTConfig(
        image_size=(224, 224), patch_size=32, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10
    )
    path = folder / "tiny224.safetensors"
    native.save(path, config, VisionTransformer(config).state_dict(), CFG, [str(i) for i in range(10)])
    del torch
    return path


async def load(url: str, data: bytes, seconds: float, concurrency: int) -> tuple[float, int]:
    import httpx

    done = errors = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                r = await client.post(url, content=data, headers={"content-type": "image/jpeg"})
                done += r.status_code == 200
                errors += r.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started), errors


def server_rate(kind: str, workers: int, data: bytes, ckpt: Path, seconds: float, concurrency: int) -> float:
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_")}
    args = ["--model", f"t={ckpt}", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    args += ["--decode-pool", kind, "--decode-workers", str(workers), "--max-queue", "1024"]
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        asyncio.run(load(f"{base}/v1/classify", data, 1.0, concurrency))  # warm
        rate, errors = asyncio.run(load(f"{base}/v1/classify", data, seconds, concurrency))
        if errors:
            print(f"  ({kind}: {errors} errors)", file=sys.stderr)
        return rate
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--what", choices=["pool", "server", "both"], default="both")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=300, help="decodes per pool run")
    p.add_argument("--seconds", type=float, default=5.0, help="load per server run")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    data = jpeg()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp)) if args.what != "pool" else None
        for _ in range(args.reps):
            for workers in args.workers:
                for kind in ("thread", "process"):
                    if args.what in ("pool", "both"):
                        rate = asyncio.run(pool_rate(kind, workers, data, args.n))
                        results.setdefault(f"pool {kind} x{workers}", []).append(rate)
                    if args.what in ("server", "both"):
                        rate = server_rate(kind, workers, data, ckpt, args.seconds, args.concurrency)  # type: ignore[arg-type]
                        results.setdefault(f"server {kind} x{workers}", []).append(rate)
    summary = {k: {"median": statistics.median(v), "runs": [round(x, 1) for x in v]} for k, v in results.items()}
    for k, v in summary.items():
        print(f"{k:24s} {v['median']:7.1f} images/s   runs {v['runs']}")
    print(json.dumps({"jpeg": [640, 480], "cpus": os.cpu_count(), "results": summary}))


if __name__ == "__main__":
    main()
