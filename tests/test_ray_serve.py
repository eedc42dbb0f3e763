"""Ray Serve (app/ray_serve.py) on a local single-node Ray: two CPU replicas of a tiny random checkpoint behind
Ray's HTTP proxy on loopback.

What it proves: requests are answered by both replicas (each names itself in X-Served-By); the answers equal the
plain server's for the same images (/v1 and /v2); a replica killed while requests are in flight is replaced by Ray
and every request after that succeeds; the config file in deploy/ray is valid for Serve and builds the app.

Skipped without Ray. CI installs it with: pip install -e '.[test,ray]'
"""

from __future__ import annotations

import base64
import io
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

# Before Ray is imported: every Ray process on the loopback address (Ray would pick the host's interface), and
# no usage report.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytest.importorskip("ray.serve", reason="the optional ray extra: pip install -e '.[ray]'")
import ray
from ray import serve
from ray.serve import Application

from app.checkpoints import native
from app.http.factory import create_app
from app.model import VisionTransformer, ViTConfig
from app.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from app.ray_serve import DEPLOYMENT, SERVED_BY, app_builder, build_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
APP = "vitserve"
pytestmark = pytest.mark.timeout(240)


def served_by(r: httpx.Response) -> str:
    """The replica's Ray actor name, from "X-Served-By: <name> pid=<pid>"."""
    return r.headers[SERVED_BY].split(" pid=")[0]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A tiny random native checkpoint (32x32, patch 8, width 32, depth 2) and the settings that serve it."""
    sizes = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}
    config = ViTConfig(image_size=(32, 32), patch_size=8, num_classes=10, **sizes)
    torch.manual_seed(0)
    net = VisionTransformer(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("ray-models") / "tiny.safetensors"
    preprocess = PreprocessConfig(resize=36, crop=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    native.save(path, config, net.state_dict(), preprocess, [f"label {i}" for i in range(10)])
    return Settings(
        model=[f"tiny={path}"],
        device="cpu",
        dtype="float32",
        decode_workers=1,
        decode_pool="thread",
        log_level="warning",
    )


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    from skimage import data

    out = []
    for image in (data.chelsea(), data.astronaut()):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def proxy(settings) -> Iterator[str]:
    """A fresh local Ray (3 CPUs, no dashboard) with the app on two replicas; the proxy's URL on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(settings, num_replicas=2), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def classify(url: str, images: list[bytes]) -> httpx.Response:
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    return httpx.post(f"{url}/v1/classify?top_k=10", files=files, timeout=60)


def v2_body(images: list[bytes]) -> dict:
    data = [base64.b64encode(b).decode() for b in images]
    return {
        "id": "ray",
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)], "data": data}],
        "outputs": [{"name": "probabilities"}, {"name": "embedding"}],
    }


def running_replicas() -> dict:
    return dict(serve.status().applications[APP].deployments[DEPLOYMENT].replica_states)


def test_requests_are_answered_by_both_replicas(proxy, pngs):
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: classify(proxy, [pngs[i % 2]]), range(36)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    names = {served_by(r) for r in answers}
    assert len(names) == 2, names
    assert all(n.startswith("SERVE_REPLICA::") for n in names)
    # one X-Request-ID per response, the client's own when it sent one
    r = httpx.get(f"{proxy}/readyz", headers={"X-Request-ID": "ray-test-1"})
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["ray-test-1"]


def test_results_equal_the_plain_server(proxy, settings, pngs):
    with TestClient(create_app(settings)) as plain:
        for _ in range(600):
            if plain.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
        expected = {
            "classify": plain.post("/v1/classify?top_k=10", files=files),
            "embed": plain.post("/v1/embed", files=files),
            "v2": plain.post("/v2/models/tiny/infer", json=v2_body(pngs)),
        }
    got = {
        "classify": classify(proxy, pngs),
        "embed": httpx.post(f"{proxy}/v1/embed", files=files, timeout=60),
        "v2": httpx.post(f"{proxy}/v2/models/tiny/infer", json=v2_body(pngs), timeout=60),
    }
    for key in expected:
        assert expected[key].status_code == got[key].status_code == 200, got[key].text
        assert SERVED_BY in got[key].headers and SERVED_BY not in expected[key].headers
    for e, g in zip(expected["classify"].json()["results"], got["classify"].json()["results"], strict=True):
        assert [p["index"] for p in e["predictions"]] == [p["index"] for p in g["predictions"]]
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in e["predictions"]], 1e-5)
    e_embed = [r["embedding"] for r in expected["embed"].json()["results"]]
    np.testing.assert_allclose([r["embedding"] for r in got["embed"].json()["results"]], e_embed, rtol=1e-4, atol=1e-5)
    for e, g in zip(expected["v2"].json()["outputs"], got["v2"].json()["outputs"], strict=True):
        assert (e["name"], e["shape"]) == (g["name"], g["shape"])
        np.testing.assert_allclose(g["data"], e["data"], rtol=1e-4, atol=1e-5)
    assert got["v2"].json()["id"] == "ray"


def test_a_replica_killed_under_load_is_replaced(proxy, pngs):
    batch = [pngs[0], pngs[1]] * 4  # 8 images per request: each keeps a replica busy for a while

    def send(_: int) -> int | str:
        try:
            return classify(proxy, batch).status_code
        except httpx.TransportError as e:
            return type(e).__name__

    first = [classify(proxy, [pngs[0]]) for _ in range(12)]
    names = {served_by(r) for r in first}
    victim = sorted(names)[0]
    with ThreadPoolExecutor(4) as pool:
        load = [pool.submit(send, i) for i in range(40)]
        while sum(f.done() for f in load) < 4:
            time.sleep(0.01)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        during = [f.result(timeout=120) for f in load]
    # requests caught on the dying replica may fail with a server error; none hang and none is a client error
    assert all(s == 200 or isinstance(s, str) or s >= 500 for s in during), [s for s in during if s != 200]
    assert during.count(200) >= 4

    deadline = time.monotonic() + 120
    replacement = None
    while replacement is None:
        assert time.monotonic() < deadline, f"no replacement replica within 120 s: {running_replicas()}"
        r = classify(proxy, [pngs[0]])
        if r.status_code == 200 and served_by(r) not in names:
            replacement = served_by(r)
        time.sleep(0.2)
    while running_replicas() != {"RUNNING": 2}:
        assert time.monotonic() < deadline, running_replicas()
        time.sleep(0.2)

    after = [classify(proxy, [pngs[0]]) for _ in range(16)]
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    assert victim not in {served_by(r) for r in after}
    reference = first[0].json()["results"][0]["predictions"]
    for r in after:
        got = r.json()["results"][0]["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in reference]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in reference], rtol=1e-5)


def test_the_config_file_is_valid_and_builds_the_app():
    import yaml  # PyYAML comes with ray[serve]
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy/ray/serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    [application] = schema.applications
    assert application.import_path == "app.ray_serve:app_builder" and application.route_prefix == "/"
    [options] = application.deployments
    assert options.name == DEPLOYMENT
    assert options.autoscaling_config["target_ongoing_requests"] > 0
    # draining outlasts the request timeout, and Ray's proxy waits longer than the replica's own 504
    timeout = application.args["request_timeout_s"]
    assert options.graceful_shutdown_timeout_s > timeout and config["http_options"]["request_timeout_s"] > timeout
    assert isinstance(app_builder(application.args), Application)
