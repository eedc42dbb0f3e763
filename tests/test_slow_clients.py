"""Hostile clients against a real server process on loopback, with small limits so that each attack is short.

- bodies that trickle in hold no place in the model's queue: while more of them than the queue has room for
  are open, well-behaved requests are answered, /readyz says 200 and `vit_queue_depth` stays 0; each trickling
  body then gets 408 `timeout` (in the /v2 shape under /v2) once its first 5 s are over, and its connection is
  closed;
- a body that keeps above the minimum rate but takes longer than --body-timeout-s gets 408 at that time;
- bodies beyond --max-pending-body-bytes get 503 `overloaded` with a Retry-After at once (the rest of their body
  read and thrown away); those let in get 408 when they stall, and the server's resident memory returns to
  where it was;
- headers that do not arrive within --header-timeout-s (partial or none at all) have their connection closed;
- past --max-connections a new connection is closed before a byte is read, and served again once others close.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_main import ROOT, free_port, start, wait_until

sys.path.insert(0, str(ROOT / "tests" / "http"))
from http_support import encode, photo, save_tiny

MiB = 1 << 20
MAX_QUEUE = 8
BODY_TIMEOUT_S = 6.0  # above the 5 s grace before the rate applies, so that both limits can be seen
MAX_UPLOAD = 8 * MiB
BUDGET = 64 * MiB  # eight bodies of MAX_UPLOAD
HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The base URL and the pid of one server process with small limits."""
    tmp = tmp_path_factory.mktemp("slow")
    checkpoint = save_tiny(tmp / "tiny.safetensors", num_classes=10, depth=1)
    port = free_port()
    args = [
        f"--model=tiny={checkpoint}",
        f"--port={port}",
        "--device=cpu",
        "--decode-workers=1",
        "--decode-pool=thread",
        f"--max-queue={MAX_QUEUE}",
        "--max-images-per-request=4",
        f"--max-upload-bytes={MAX_UPLOAD}",
        f"--max-pending-body-bytes={BUDGET}",
        f"--body-timeout-s={BODY_TIMEOUT_S}",
        f"--header-timeout-s={HEADER_TIMEOUT_S}",
        f"--max-connections={MAX_CONNECTIONS}",
    ]
    proc = start(args, tmp / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"{base}/readyz", 200, proc)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(photo("chelsea").convert("RGB").resize((64, 48)), "PNG")


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def post_head(path: str, length: int, content_type: str = "image/png") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the response on `sock` (read until the server closes it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def trickle(base: str, path: str, seconds: float) -> tuple[int, bytes, float, bool]:
    """A body that promises 1,000 bytes and sends 5 every half second: its status, body, when it came (s after
    the headers), and whether the server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port_of(base))) as sock:
        sock.sendall(post_head(path, 1000, "application/json"))
        started = time.monotonic()
        sock.settimeout(0.5)
        data = b""
        while time.monotonic() - started < seconds:
            try:
                sock.sendall(b"     ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - started
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return status, body, took, closed


def queue_depth(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vit_queue_depth"
    )


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match
    return int(match.group(1)) / 1024


def classify(base: str, png: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/classify", files=[("images", ("a.png", png, "image/png"))], timeout=30)


def test_trickling_bodies_hold_no_queue_place_and_get_408_after_their_grace(server, png):
    base, _ = server
    n = MAX_QUEUE + 4  # more than the queue has room for: each would once have held a place
    paths = ["/v1/classify"] * (n - 2) + ["/v2/models/tiny/infer"] * 2
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        attacks = [pool.submit(trickle, base, path, 15) for path in paths]
        time.sleep(1.0)  # every trickling body has begun
        for _ in range(5):  # meanwhile the service is as if they were not there
            assert classify(base, png).status_code == 200
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            assert queue_depth(base) == 0
            time.sleep(0.3)
        results = [a.result() for a in attacks]
    for path, (status, body, took, closed) in zip(paths, results, strict=True):
        assert status == 408, body
        assert 4.5 < took < 5 + 2, took  # the rate applies after the first 5 s
        assert closed
        error = httpx.Response(408, content=body).json()["error"]
        if path.startswith("/v2"):
            assert "did not arrive in time" in error
        else:
            assert error["code"] == "timeout"
    assert classify(base, png).status_code == 200


def test_a_body_faster_than_the_rate_but_longer_than_the_timeout_gets_408(server):
    base, _ = server
    with socket.create_connection(("127.0.0.1", port_of(base))) as sock:
        sock.sendall(post_head("/v1/classify", 4 * MiB))
        started = time.monotonic()
        sock.settimeout(0.25)
        status = 0
        while time.monotonic() - started < BODY_TIMEOUT_S + 5:  # 128 KiB/s: 32 s for the whole body
            try:
                sock.sendall(b"\0" * 32768)
                if data := sock.recv(65536):
                    status = int(data.split()[1])
                    break
            except TimeoutError:
                continue
        took = time.monotonic() - started
    assert status == 408
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 2, took


def test_bodies_beyond_the_byte_budget_get_503_and_their_memory_returns(server, png):
    base, pid = server
    before = rss_mb(pid)
    n = 24  # three times the budget, each body all but its last byte, then stalled
    socks = [socket.create_connection(("127.0.0.1", port_of(base))) for _ in range(n)]
    chunk = b"\0" * MiB
    statuses = []
    try:
        for sock in socks:
            sock.settimeout(10)
            sock.sendall(post_head("/v1/classify", MAX_UPLOAD))
            for _ in range(MAX_UPLOAD // MiB - 1):
                sock.sendall(chunk)
            sock.sendall(chunk[:-1])
        peak = rss_mb(pid)
        full = classify(base, png)  # the budget is taken: a new request is refused, however small
        for sock in socks:
            statuses.append(answer(sock)[0])
    finally:
        for sock in socks:
            sock.close()
    assert statuses.count(408) == BUDGET // MAX_UPLOAD  # as many as the budget holds, until they stall too long
    # the others refused at once, a clean answer: the server reads the rest of the body and throws it away, and
    # closes the connection when the last byte does not come within the header timeout
    assert statuses.count(503) == n - BUDGET // MAX_UPLOAD, statuses
    assert full.status_code == 503, full.text
    assert full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "overloaded"
    assert peak < before + BUDGET / MiB + 64
    time.sleep(2.0)  # the heap is trimmed a second after the last large body ends
    assert rss_mb(pid) < before + 30, (before, peak, rss_mb(pid))
    assert classify(base, png).status_code == 200


def test_headers_must_arrive_within_the_timeout(server):
    base, _ = server
    with (
        socket.create_connection(("127.0.0.1", port_of(base))) as silent,
        socket.create_connection(("127.0.0.1", port_of(base))) as partial,
    ):
        partial.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: te")
        started = time.monotonic()
        for sock in (silent, partial):
            sock.settimeout(HEADER_TIMEOUT_S + 5)
            assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 1.5
    # a keep-alive connection's next request has the same deadline
    with socket.create_connection(("127.0.0.1", port_of(base))) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert sock.recv(100) == b""


def test_connections_past_the_limit_are_closed_at_once(server):
    base, _ = server
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", port_of(base))))
        time.sleep(0.2)  # all accepted
        with socket.create_connection(("127.0.0.1", port_of(base))) as extra:
            extra.settimeout(HEADER_TIMEOUT_S / 2)  # well before the header deadline
            with contextlib.suppress(ConnectionResetError):  # closed, or reset: either way refused
                assert extra.recv(100) == b""
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
