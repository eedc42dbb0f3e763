"""Image search at scale: collections of random 768-d vectors, and the bundled digit model on real digits.

    python -m bench.search --sizes 10000,100000 [--queries 200] [--out FILE]
    python -m bench.search --digits [--out FILE]

The script starts everything itself: a PostgreSQL with pgvector (pgserver, in a temporary folder) and
`python -m app` on loopback pointed at it with `--collections-url`, serving a headless 768-d ViT (random
weights: the collections of vectors only need its dimension) and the bundled digit model.

Per size N (clustered data: 1,000 Gaussian clusters in 768-d, unit centres, noise sigma 0.35 per axis, queries
drawn from the same clusters):
- insert: N vectors through `POST /vectors` in batches of 500 from 2 clients, into the collection's HNSW index
  as it grows (vectors/s);
- index build: the same HNSW index rebuilt from scratch (`REINDEX`, maintenance_work_mem 1 GB), seconds;
- recall@10 of searches over HTTP (the server's default `ef_search`) against exact search (numpy), and recall
  at other `ef_search` values straight in SQL, which is how EF_SEARCH in app/collections/store.py was chosen;
- search latency over HTTP by vector, k=10: p50/p99 at concurrency 1 and 16.

`--digits`: the bundled model's collection of the 4,000 MNIST digits it was trained on (added as images), and
its 1,000 held-out digits as queries (searched as images): precision@10 (the share of the 10 neighbours with
the query's label), recall@10 of the index on these embeddings, and the latency of a search by image beside
the embedding alone (`/v1/embed`) and a search by vector.

Prints a table, then JSON (`--out FILE` writes it too). Bounded: every phase has a fixed amount of work.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench.common import exit_on_sigterm, git_head, percentile, table, write_json

ROOT = Path(__file__).resolve().parents[1]
DIM = 768
CLUSTERS = 1000
SIGMA = 0.35
BATCH = 500
EF_SWEEP = (40, 64, 100, 160, 250)


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    out = centres[picks] + SIGMA * rng.standard_normal((n, DIM)).astype(np.float32)
    return out.astype(np.float32)


def exact_top(base: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact cosine top-k (indices), in blocks so memory stays bounded."""
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for start in range(0, len(q), 64):
        sims = q[start : start + 64] @ unit.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


# ---------------------------------------------------------------------------------------------- the processes


class Stack:
    """pgserver's PostgreSQL and `python -m app` on loopback, both in a temporary folder, stopped on exit."""

    def __init__(self, max_upload_mb: int = 64):
        self.dir = Path(tempfile.mkdtemp(prefix="vitserve-bench-"))
        import pgserver

        self.pg = pgserver.get_server(self.dir / "pg", cleanup_mode="stop")
        self.uri = self.pg.get_uri()
        ckpt = self.dir / "vec768.safetensors"
        _write_headless(ckpt)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "app", "--model", f"vec768={ckpt}", "--model", "mnist-vit",
            "--models-dir", str(ROOT / "models"), "--collections-url", self.uri,
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
            "--max-upload-bytes", str(max_upload_mb << 20), "--request-timeout-s", "300",
        ]  # fmt: skip
        self.log = (self.dir / "server.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server was not ready within 180 s")
            time.sleep(0.3)
        self.http = httpx.Client(base_url=self.url, timeout=600)

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.pg.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def sql(self, query: str, params: tuple = ()) -> list:
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


def _write_headless(path: Path) -> None:
    """A one-block ViT whose embedding has 768 dimensions (random weights; only its size matters here)."""
    import torch

    from app.checkpoints import native
    from app.model import VisionTransformer, ViTConfig
    from app.preprocess import PreprocessConfig

    config = ViTConfig(
        image_size=(32, 32), patch_size=16, embed_dim=DIM, depth=1, num_heads=12, mlp_dim=DIM, num_classes=0
    )
    torch.manual_seed(0)
    native.save(path, config, VisionTransformer(config).state_dict(), PreprocessConfig(resize=(32, 32)), [])


# ---------------------------------------------------------------------------------------------- load


def insert(stack: Stack, name: str, vectors: np.ndarray, metadata: list[dict] | None = None) -> float:
    """All of `vectors` through POST /vectors, 2 clients at once; vectors per second."""
    batches = [range(s, min(s + BATCH, len(vectors))) for s in range(0, len(vectors), BATCH)]

    def send(rows: range) -> None:
        items = [{"id": str(i), "vector": vectors[i], **({"metadata": metadata[i]} if metadata else {})} for i in rows]
        body = orjson.dumps({"items": items}, option=orjson.OPT_SERIALIZE_NUMPY)
        r = stack.http.post(
            f"/v1/collections/{name}/vectors", content=body, headers={"content-type": "application/json"}
        )
        r.raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(send, batches))
    return len(vectors) / (time.perf_counter() - start)


async def _latency(url: str, path: str, bodies: list[bytes], concurrency: int, content_type: str) -> list[float]:
    times: list[float] = []
    queue = list(bodies)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post(path, content=body, headers={"content-type": content_type})
                times.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times


def latency(stack: Stack, path: str, bodies: list[bytes], concurrency: int, content_type="application/json") -> dict:
    asyncio.run(_latency(stack.url, path, bodies[: min(len(bodies), 20)], concurrency, content_type))  # warm up
    start = time.perf_counter()
    times = asyncio.run(_latency(stack.url, path, bodies, concurrency, content_type))
    wall = time.perf_counter() - start
    return {
        "p50_ms": round(percentile(times, 50), 2),
        "p99_ms": round(percentile(times, 99), 2),
        "requests": len(times),
        "per_s": round(len(times) / wall, 1),
    }


def search_ids(stack: Stack, name: str, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    out = []
    for q in queries:
        body = orjson.dumps({"vector": q}, option=orjson.OPT_SERIALIZE_NUMPY)
        r = stack.http.post(
            f"/v1/collections/{name}/search?k={k}", content=body, headers={"content-type": "application/json"}
        )
        r.raise_for_status()
        out.append([int(x["id"]) for x in r.json()["results"]])
    return out


def sql_recall(stack: Stack, name: str, queries: np.ndarray, truth: np.ndarray, efs=EF_SWEEP) -> dict:
    """Recall@10 straight in SQL at several hnsw.ef_search values (iterative scans off: the index alone)."""
    import psycopg
    from pgvector.psycopg import register_vector

    (cid,) = stack.sql("SELECT id FROM vitserve_collections WHERE name = %s", (name,))[0]
    out = {}
    with psycopg.connect(stack.uri, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("SET enable_seqscan = off")  # the index, as the server's searches use it
        for ef in efs:
            conn.execute(f"SET hnsw.ef_search = {int(ef)}")
            found = []
            for q in queries:
                rows = conn.execute(
                    f"SELECT id FROM vitserve_items_{int(cid)} ORDER BY embedding <=> %s LIMIT 10", (q,)
                ).fetchall()
                found.append([int(r[0]) for r in rows])
            out[str(ef)] = round(recall(found, truth), 4)
    return out


def reindex_seconds(stack: Stack, name: str) -> float:
    import psycopg

    (cid,) = stack.sql("SELECT id FROM vitserve_collections WHERE name = %s", (name,))[0]
    with psycopg.connect(stack.uri, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        start = time.perf_counter()
        conn.execute(f"REINDEX INDEX vitserve_items_{int(cid)}_hnsw")
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- runs


def run_size(stack: Stack, n: int, n_queries: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres *= np.sqrt(DIM) * SIGMA * 2  # clusters apart by about twice their spread
    base = clustered(n, rng, centres)
    queries = clustered(n_queries, rng, centres)
    name = f"bench-{n}"
    stack.http.delete(f"/v1/collections/{name}")
    r = stack.http.post("/v1/collections", json={"name": name, "model": "vec768", "metric": "cosine"})
    r.raise_for_status()
    print(f"[{n}] inserting ...", file=sys.stderr, flush=True)
    rate = insert(stack, name, base)
    print(f"[{n}] {rate:.0f} vectors/s; rebuilding the index ...", file=sys.stderr, flush=True)
    build = reindex_seconds(stack, name)
    truth = exact_top(base, queries)
    print(f"[{n}] index built in {build:.1f} s; searching ...", file=sys.stderr, flush=True)
    http_recall = recall(search_ids(stack, name, queries), truth)
    sweep = sql_recall(stack, name, queries, truth)
    bodies = [orjson.dumps({"vector": q}, option=orjson.OPT_SERIALIZE_NUMPY) for q in queries]
    path = f"/v1/collections/{name}/search?k=10"
    c1 = latency(stack, path, bodies, 1)
    c16 = latency(stack, path, bodies * 4, 16)
    size = stack.sql("SELECT pg_total_relation_size(%s)", (f"vitserve_items_{_cid(stack, name)}",))[0][0]
    stack.http.delete(f"/v1/collections/{name}")
    return {
        "n": n,
        "dim": DIM,
        "data": f"{CLUSTERS} Gaussian clusters, sigma {SIGMA}",
        "insert_vectors_per_s": round(rate, 1),
        "index_build_s": round(build, 2),
        "recall_at_10_http": round(http_recall, 4),
        "recall_at_10_by_ef_search_sql": sweep,
        "search_c1": c1,
        "search_c16": c16,
        "table_and_index_mb": round(size / 2**20, 1),
    }


def _cid(stack: Stack, name: str) -> int:
    return int(stack.sql("SELECT id FROM vitserve_collections WHERE name = %s", (name,))[0][0])


def run_digits(stack: Stack) -> dict:
    from PIL import Image

    from app.digits import mnist_split

    train_x, train_y, test_x, test_y = mnist_split()

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a, "L").convert("RGB").save(buf, "PNG")
        return buf.getvalue()

    name = "bench-digits"
    stack.http.delete(f"/v1/collections/{name}")
    stack.http.post("/v1/collections", json={"name": name, "model": "mnist-vit"}).raise_for_status()
    print("[digits] adding 4,000 training digits as images ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    for s in range(0, len(train_x), 64):
        rows = range(s, min(s + 64, len(train_x)))
        files = [("images", (f"{i}.png", png(train_x[i]), "image/png")) for i in rows]
        data = {
            "ids": orjson.dumps([str(i) for i in rows]).decode(),
            "metadata": orjson.dumps([{"label": int(train_y[i])} for i in rows]).decode(),
        }
        stack.http.post(f"/v1/collections/{name}/images", files=files, data=data).raise_for_status()
    add_rate = len(train_x) / (time.perf_counter() - start)
    print("[digits] searching with the 1,000 held-out digits ...", file=sys.stderr, flush=True)
    queries = [png(a) for a in test_x]
    same = 0
    for q, label in zip(queries, test_y, strict=True):
        r = stack.http.post(f"/v1/collections/{name}/search?k=10", content=q, headers={"content-type": "image/png"})
        r.raise_for_status()
        same += sum(int(x["metadata"]["label"]) == int(label) for x in r.json()["results"])
    precision = same / (10 * len(queries))
    # the index against exact search on these embeddings
    stored = np.zeros((len(train_x), 128), np.float32)
    cursor = None
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(stack.uri, autocommit=True) as conn:
        register_vector(conn)
        for i, v in conn.execute(f"SELECT id, embedding FROM vitserve_items_{_cid(stack, name)}"):
            stored[int(i)] = v.to_numpy()
    emb = []
    for s in range(0, len(queries), 64):
        files = [("images", ("q.png", q, "image/png")) for q in queries[s : s + 64]]
        r = stack.http.post("/v1/embed?model=mnist-vit", files=files)
        r.raise_for_status()
        emb += [x["embedding"] for x in r.json()["results"]]
    emb_arr = np.asarray(emb, np.float32)
    truth = exact_top(stored, emb_arr)
    found = search_ids(stack, name, emb_arr)
    exact_precision = float(np.mean(train_y[truth] == test_y[:, None]))
    sample = queries[:200]
    by_image = latency(stack, f"/v1/collections/{name}/search?k=10", sample, 1, "image/png")
    embed_only = latency(stack, "/v1/embed?model=mnist-vit", sample, 1, "image/png")
    vec_bodies = [orjson.dumps({"vector": v}, option=orjson.OPT_SERIALIZE_NUMPY) for v in emb_arr[:200]]
    by_vector = latency(stack, f"/v1/collections/{name}/search?k=10", vec_bodies, 1)
    del cursor
    return {
        "collection": "4,000 MNIST-5k training digits (app.digits.mnist_split), added as PNG images",
        "queries": "the 1,000 held-out digits, searched as PNG images, k=10",
        "precision_at_10": round(precision, 4),
        "precision_at_10_exact_search": round(exact_precision, 4),
        "recall_at_10_http": round(recall(found, truth), 4),
        "add_images_per_s": round(add_rate, 1),
        "search_by_image_c1": by_image,
        "embed_only_c1": embed_only,
        "search_by_vector_c1": by_vector,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000", help="comma-separated collection sizes (default 10000)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--digits", action="store_true", help="the digit model on real digits instead of --sizes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    stack = Stack()
    try:
        from app.collections.store import EF_SEARCH, HNSW_EF_CONSTRUCTION, HNSW_M

        result: dict = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_head(),
            "command": "python -m bench.search " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "index": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": EF_SEARCH},
        }
        if args.digits:
            result["digits"] = run_digits(stack)
        else:
            result["sizes"] = [run_size(stack, int(n), args.queries) for n in args.sizes.split(",")]
            rows = [
                {
                    "n": r["n"],
                    "insert/s": r["insert_vectors_per_s"],
                    "build s": r["index_build_s"],
                    "recall@10": r["recall_at_10_http"],
                    "c1 p50": r["search_c1"]["p50_ms"],
                    "c1 p99": r["search_c1"]["p99_ms"],
                    "c16 p50": r["search_c16"]["p50_ms"],
                    "c16 p99": r["search_c16"]["p99_ms"],
                }
                for r in result["sizes"]
            ]
            print(table(rows, list(rows[0])), file=sys.stderr)
        result["loadavg_end"] = os.getloadavg()
        write_json(result, args.out)
    finally:
        stack.close()


if __name__ == "__main__":
    main()
