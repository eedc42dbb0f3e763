"""docs/design.md walks one `POST /v1/classify` from the route to the JSON. This test keeps the walk true: it
profiles such a request on a real uvicorn on loopback, on every thread that serves it (the event loop, the decode
threads, the forward threads), and fails when an `app` module runs that the walk does not name.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from http_support import encode, photo, save_tiny, settings_for

from app.http.factory import create_app

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def module_of(dotted: str) -> str:
    """The module part of `app.pkg.module.Class.function`: its longest importable prefix."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            continue
    raise AssertionError(f"docs/design.md names {dotted}, which is in no module")


def walk_modules() -> list[str]:
    """The `app` modules the walk names, in order of first mention."""
    text = DESIGN.read_text()
    walk = text.split("## The walk of one request", 1)[1].split("\n## ", 1)[0]
    steps = [line for line in walk.splitlines() if re.match(r"^\d+\. ", line)]
    assert steps, "docs/design.md has no numbered walk"
    modules: list[str] = []
    for line in steps:
        for dotted in re.findall(r"`(app\.[\w.]+)`", line):
            name = module_of(dotted)
            if name not in modules:
                modules.append(name)
    return modules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_checkpoints(tmp_path):
    return {"tiny": save_tiny(tmp_path / "tiny.safetensors")}


def test_the_walk_names_at_most_ten_modules_and_every_module_a_classify_request_runs(tiny_checkpoints):
    named = walk_modules()
    assert len(named) <= 10, named
    seen: set[str] = set()
    recording = threading.Event()

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and recording.is_set():
            name = frame.f_globals.get("__name__", "")
            if name.startswith("app."):
                seen.add(name)

    port = free_port()
    # a thread-pool decoder, so that decoding runs on a thread of this process, where the profile sees it
    settings = settings_for(tiny_checkpoints, "tiny", decode_pool="thread", port=port)
    threading.setprofile(profile)  # every thread started from now on: uvicorn's, the decoder's, the forwards'
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(600):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            body = encode(photo("chelsea"), "JPEG")
            client.post("/v1/classify", files={"images": ("cat.jpg", body, "image/jpeg")})  # the first: warm caches
            recording.set()
            answer = client.post("/v1/classify", files={"images": ("cat.jpg", body, "image/jpeg")})
            time.sleep(0.3)  # the log line and the metrics come after the answer
            recording.clear()
        assert answer.status_code == 200 and answer.json()["results"][0]["predictions"]
    finally:
        threading.setprofile(None)
        server.should_exit = True
        thread.join(30)
    seen.discard(__name__)
    assert sys.getprofile() is None
    assert seen, "the profile saw nothing"
    unnamed = sorted(seen - set(named))
    assert not unnamed, f"modules ran that docs/design.md's walk does not name: {unnamed} (it names {named})"
