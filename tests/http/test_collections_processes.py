"""Collections across real processes: `python -m app` (real uvicorn on loopback) and real PostgreSQL servers.

- durability: an add answered 200 survives kill -9 of the server and of its embedded PostgreSQL right after;
- sharing: two server processes on one PostgreSQL (`--collections-url`) add and search at once and each sees
  the other's writes;
- the embedded PostgreSQL stops when the server drains (SIGTERM), also after an earlier crash.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from http_support import encode, save_tiny
from PIL import Image

pgserver = pytest.importorskip("pgserver")

REPO = Path(__file__).resolve().parents[2]
DIM = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("pmodels") / "tiny.safetensors")


class Server:
    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "app", "--model", f"tiny={checkpoint}",
            "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32",
            "--decode-workers", "1", "--decode-pool", "thread", "--log-level", "info", *args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def png(seed: int) -> bytes:
    a = (np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8)
    return encode(Image.fromarray(a, "RGB"), "PNG")


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """The postmaster of `pgdata` and its children."""
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return []
    try:
        master = psutil.Process(int(pid_file.read_text().split()[0]))
        return [master, *master.children(recursive=True)]
    except (psutil.NoSuchProcess, ValueError):
        return []


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A folder for PostgreSQL data outside pytest's tmp root: as root, pgserver opens the parent folders to its
    own `pgserver` user, and a pytest session starting beside this one would close pytest's root again."""
    folder = Path(tempfile.mkdtemp(prefix="vitserve-test-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_answered_add_survives_kill_9_of_server_and_postgres(checkpoint: Path, tmp_path: Path, private_dir) -> None:
    data = private_dir / "data"
    log = tmp_path / "server.log"
    a = Server(checkpoint, log, "--data-dir", str(data))
    try:
        assert a.http.post("/v1/collections", json={"name": "durable"}).status_code == 201
        b64 = [base64.b64encode(png(i)).decode() for i in range(3)]
        r = a.http.post(
            "/v1/collections/durable/images",
            json={"items": [{"id": f"img{i}", "image": b, "metadata": {"i": i}} for i, b in enumerate(b64)]},
        )
        assert r.status_code == 200, r.text
        r = a.http.post("/v1/collections/durable/vectors", json={"items": [{"id": "vec", "vector": [0.25] * DIM}]})
        assert r.status_code == 200, r.text
        # right after the answers: both real processes die at once, with no chance to flush or stop
        victims = [psutil.Process(a.proc.pid), *postgres_processes(data / "postgres")]
        assert len(victims) >= 2
        for p in victims:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
    finally:
        a.stop()

    b = Server(checkpoint, log, "--data-dir", str(data))
    try:
        items = b.http.get("/v1/collections/durable/items").json()["items"]
        assert [i["id"] for i in items] == ["img0", "img1", "img2", "vec"]
        assert b.http.get("/v1/collections/durable").json()["count"] == 4
        r = b.http.post("/v1/collections/durable/search?k=1", json={"image": b64[1]})
        assert r.json()["results"][0]["id"] == "img1"
        assert b.http.get("/v1/collections/durable/items/img2/thumbnail").status_code == 200
        assert postgres_processes(data / "postgres")
    finally:
        assert b.stop() == 0
    # the drain stopped the embedded PostgreSQL, though the crashed server never unregistered itself
    deadline = time.monotonic() + 20
    while postgres_processes(data / "postgres") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not postgres_processes(data / "postgres")
    assert str(data) not in log.read_text()


@pytest.fixture
def shared_postgres(private_dir: Path) -> Iterator[str]:
    """One PostgreSQL with pgvector that two servers share, as a Kubernetes deployment would."""
    server = pgserver.get_server(private_dir / "shared-pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def test_two_servers_share_one_database(checkpoint: Path, tmp_path: Path, shared_postgres: str) -> None:
    a = Server(checkpoint, tmp_path / "a.log", "--collections-url", shared_postgres)
    b = Server(checkpoint, tmp_path / "b.log", "--collections-url", shared_postgres)
    try:
        assert a.http.post("/v1/collections", json={"name": "shared"}).status_code == 201
        assert b.http.get("/v1/collections/shared").json()["count"] == 0
        assert b.http.post("/v1/collections", json={"name": "shared"}).status_code == 409

        rng = np.random.default_rng(0)
        errors: list[str] = []

        def writer(server: Server, tag: str) -> None:
            for n in range(10):
                vector = rng.standard_normal(DIM).tolist()
                item = {"id": f"{tag}{n}", "vector": vector, "metadata": {"by": tag}}
                r = server.http.post("/v1/collections/shared/vectors", json={"items": [item]})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                # the other server sees the write as soon as it is answered
                other = b if server is a else a
                found = other.http.post("/v1/collections/shared/search?k=1", json={"vector": vector}).json()
                if found["results"][0]["id"] != f"{tag}{n}":
                    errors.append(f"{tag}{n} not found through the other server: {found}")
                if other.http.get(f"/v1/collections/shared/items/{tag}{n}").status_code != 200:
                    errors.append(f"{tag}{n} absent from the other server")

        threads = [threading.Thread(target=writer, args=(s, t)) for s, t in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for server in (a, b):
            assert server.http.get("/v1/collections/shared").json()["count"] == 20
            r = server.http.post("/v1/collections/shared/search?k=100", json={"id": "a0", "filter": {"by": "b"}})
            assert len(r.json()["results"]) == 10
        # images embedded by either server land in the same collection
        r = b.http.post("/v1/collections/shared/images?id=pic", content=png(5), headers={"content-type": "image/png"})
        assert r.status_code == 200
        r = a.http.post("/v1/collections/shared/search?k=1", content=png(5), headers={"content-type": "image/png"})
        assert r.json()["results"][0]["id"] == "pic"
    finally:
        assert a.stop() == 0 and b.stop() == 0
    for log in (tmp_path / "a.log", tmp_path / "b.log"):
        assert shared_postgres not in log.read_text()


def test_workers_share_the_embedded_postgres_and_the_last_one_stops_it(checkpoint: Path, tmp_path, private_dir):
    """`--workers 2`: both server processes use the one private PostgreSQL of the data folder; it stops once
    the drain has ended them all."""
    data = private_dir / "data"
    server = Server(checkpoint, tmp_path / "workers.log", "--data-dir", str(data), "--workers", "2")
    try:
        assert server.http.post("/v1/collections", json={"name": "w"}).status_code == 201
        handles = data / "postgres" / ".handle_pids.json"
        vectors = np.random.default_rng(0).standard_normal((300, DIM))
        users: list[int] = []
        for i, v in enumerate(vectors):  # a new connection each time, taken by whichever worker accepts it first
            with httpx.Client(base_url=server.url, timeout=60) as c:
                r = c.post("/v1/collections/w/vectors", json={"items": [{"id": str(i), "vector": v.tolist()}]})
                assert r.status_code == 200, r.text
                assert c.get("/v1/collections/w").json()["count"] == i + 1  # each sees every add so far
            users = json.loads(handles.read_text())  # the processes using the server, as pgserver counts them
            if len(users) == 2 and i >= 20:
                break
        assert len(users) == 2 and server.proc.pid not in users, users  # both workers, not the supervisor
        assert len({p.pid for p in postgres_processes(data / "postgres")[:1]}) == 1
    finally:
        assert server.stop() == 0
    deadline = time.monotonic() + 30
    while postgres_processes(data / "postgres") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not postgres_processes(data / "postgres")
