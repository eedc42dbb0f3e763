"""A newcomer's first five minutes, for real: the README's serve command and every curl example in it.

The server is started as the README says (`vit-serve`, no options), from a directory that is not the
repository, so the bundled default model must be found on its own. It must classify the bundled model's
held-out digits as well as its model card claims, and every curl example must give output of the shape the
README shows (same keys, same kinds of values, the same strings).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_examples  # noqa: E402
from test_main import free_port, wait_until  # noqa: E402

BUNDLED = ROOT / "models" / "mnist-vit" / "model.safetensors"
VOLATILE = {"sha256"}  # the bundled model's file hash changes when it is retrained

pytestmark = pytest.mark.skipif(not BUNDLED.exists(), reason="the bundled model has not been trained yet")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vit-serve` as the README runs it, on a free loopback port (VIT_PORT, so the command stays as written)."""
    port = free_port()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_")} | {"VIT_PORT": str(port)}
    # the user's data directory (where the image-search examples start the embedded PostgreSQL) is a private
    # folder outside pytest's tmp root: as root, pgserver opens the data folder's parents to its own user
    data_home = Path(tempfile.mkdtemp(prefix="vitserve-readme-"))
    env["XDG_DATA_HOME"] = str(data_home)
    exe = shutil.which("vit-serve", path=str(Path(sys.executable).parent)) or "vit-serve"
    with open(elsewhere / "server.log", "w") as log:
        proc = subprocess.Popen([exe], cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"{url}/readyz", 200, proc, timeout=180)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{(elsewhere / 'server.log').read_text()}") from None
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        shutil.rmtree(data_home, ignore_errors=True)


def test_bundled_model_is_the_default_and_reaches_its_claimed_accuracy(server):
    from app import digits
    from app.checkpoints import native

    ready = httpx.get(f"{server}/readyz").json()
    assert ready["models"][0] == "mnist-vit"
    claimed = native.read_metadata(BUNDLED)["metrics"]["mnist_test"]
    images, labels = digits.mnist_test_images()
    hits = 0
    for start in range(0, len(images), 50):
        files = []
        for img in images[start : start + 50]:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            files.append(("images", ("digit.png", buf.getvalue(), "image/png")))
        r = httpx.post(f"{server}/v1/classify", params={"top_k": 1}, files=files, timeout=60)
        assert r.status_code == 200, r.text
        predicted = [int(res["predictions"][0]["label"]) for res in r.json()["results"]]
        hits += sum(p == y for p, y in zip(predicted, labels[start : start + 50], strict=True))
    assert len(images) == 1000
    assert hits / len(images) >= claimed - 0.002  # served through HTTP as the card measured it in-process


def assert_same_shape(expected: object, actual: object, path: str = "$") -> None:
    """`actual` has the README's structure: same keys, same kinds, same strings (lists: each item like the first)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys {actual} vs {expected}"
        for key, value in expected.items():
            if key not in VOLATILE:
                assert_same_shape(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: {actual!r} is not a list"
        assert bool(actual) == bool(expected), f"{path}: empty vs non-empty"
        for i, item in enumerate(actual):
            assert_same_shape(
                expected[min(i, len(expected) - 1)] if i < len(expected) else expected[0], item, f"{path}[{i}]"
            )
    elif isinstance(expected, bool) or expected is None:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, int | float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), f"{path}: {actual!r} is not a number"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


EXAMPLES = readme_examples.find_examples((ROOT / "README.md").read_text())


def test_readme_has_curl_examples_for_every_endpoint():
    text = " ".join(e.command for e in EXAMPLES)
    for route in (
        "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/classify", "/v1/embed", "/v1/attention?",
        "/v1/attention-distance", "/position-similarity", "/v2/models", "/v1/collections", "/search",
    ):  # fmt: skip
        assert route in text, f"no curl example for {route}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.command.split("localhost:8000")[-1][:40] for e in EXAMPLES])
def test_curl_example(server, example, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    shutil.copy(ROOT / "README.md", work / "README.md")
    written = [work / path for path in re.findall(r"-o\s+(\S+)", example.command)]  # absolute paths stay as they are
    for path in written:
        assert path.is_absolute() and path.parts[1] == "tmp", f"{path}: the README writes files to /tmp only"
        path.unlink(missing_ok=True)
    stdout = readme_examples.run(example, server, cwd=work)  # in a scratch copy, so its files land there
    if example.output is not None:
        assert_same_shape(json.loads(example.output), json.loads(stdout))
    for path in written:  # curl -o /tmp/FILE.png (or .webp): a real image in that format came back
        with Image.open(path) as img:
            assert img.format == path.suffix[1:].upper() and img.width > 0
    assert not list(work.glob("*.png")), "an example wrote a file into the checkout"
    if "-o " not in example.command and example.output is None:
        assert stdout.strip(), "the example printed nothing"


def test_python_example_runs(monkeypatch):
    """The README's Python API example, executed as written from the repository root."""
    text = (ROOT / "README.md").read_text()
    python = [m.group(2) for m in readme_examples.FENCE.finditer(text) if m.group(1) == "python"]
    assert python, "the README shows no Python example"
    monkeypatch.chdir(ROOT)
    for code in python:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert namespace["out"].logits.argmax(-1).tolist() == [7]
