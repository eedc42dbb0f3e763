"""The real app answers what the engine computes: classify, embed, attention, distance, similarity, ModelInfo,
for real photographs, through every input form."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from http_support import encode
from PIL import Image

import app
from app import analysis

ATOL = 1e-5


@pytest.fixture(scope="module")
def engines(checkpoints):
    """The engine itself, loaded on its own, as the reference for every answer."""
    return {name: app.load_model(str(path), device="cpu", dtype="float32") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def uploads(real_photos) -> list[tuple[str, bytes]]:
    """Real photos as uploads: PNG (lossless) and JPEG (decoded by the server exactly as PIL does)."""
    return [
        ("chelsea.png", encode(real_photos["chelsea"], "PNG")),
        ("astronaut.jpg", encode(real_photos["astronaut"], "JPEG", quality=92)),
        ("coffee.png", encode(real_photos["coffee"], "PNG")),
        ("china.jpg", encode(real_photos["china"], "JPEG", quality=92)),
    ]


def reference(engine, uploads, attentions=False):
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in uploads]
    return engine(engine.preprocess(images), attentions=attentions)


def multipart(uploads):
    return [("images", (name, data, "application/octet-stream")) for name, data in uploads]


def test_classify_equals_the_engine(client, engines, uploads):
    r = client.post("/v1/classify?top_k=3", files=multipart(uploads))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny"  # the first --model is the default
    probs = reference(engines["tiny"], uploads).logits.softmax(-1)
    labels = engines["tiny"].labels
    assert [res["filename"] for res in body["results"]] == [name for name, _ in uploads]
    for res, p in zip(body["results"], probs, strict=True):
        top = p.topk(3)
        assert [x["index"] for x in res["predictions"]] == top.indices.tolist()
        assert [x["label"] for x in res["predictions"]] == [labels[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([x["score"] for x in res["predictions"]], top.values.numpy(), atol=ATOL)


def test_classify_other_model_and_every_class(client, engines, uploads):
    r = client.post("/v1/classify?model=other&top_k=5", files=multipart(uploads[:2]))
    assert r.status_code == 200, r.text
    probs = reference(engines["other"], uploads[:2]).logits.softmax(-1)
    for res, p in zip(r.json()["results"], probs, strict=True):
        scores = [x["score"] for x in res["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # top_k = num_classes: the whole distribution
        np.testing.assert_allclose(scores, p.sort(descending=True).values.numpy(), atol=ATOL)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_embed_equals_the_engine(client, engines, uploads, pool, normalize):
    r = client.post(
        f"/v1/embed?model=headless&pool={pool}&normalize={str(normalize).lower()}", files=multipart(uploads)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    out = reference(engines["headless"], uploads)
    expected = out.embedding if pool == "cls" else out.tokens[:, 1:].mean(dim=1)
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    assert body["dim"] == 32 and body["model"] == "headless"
    got = np.array([res["embedding"] for res in body["results"]])
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL)


def test_embed_base64_is_little_endian_float32(client, uploads):
    as_floats = client.post("/v1/embed", files=multipart(uploads[:2])).json()
    as_b64 = client.post("/v1/embed?encoding=base64", files=multipart(uploads[:2])).json()
    for f, b in zip(as_floats["results"], as_b64["results"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, f["embedding"], atol=ATOL)


def test_attention_rollout_and_cls_equal_the_engine(client, engines, uploads):
    out = reference(engines["tiny"], uploads, attentions=True)
    rollout = analysis.rollout(out.attentions).reshape(-1, 4, 4)
    r = client.post("/v1/attention", files=multipart(uploads))
    assert r.status_code == 200, r.text
    for res, expected in zip(r.json()["results"], rollout, strict=True):
        assert res["method"] == "rollout" and res["grid"] == [4, 4]
        np.testing.assert_allclose(res["heatmap"], expected.numpy(), atol=ATOL)
        assert max(max(row) for row in res["heatmap"]) == pytest.approx(1.0)
    for layer, head in [(-1, "mean"), (0, "1"), (-2, "0")]:
        r = client.post(f"/v1/attention?method=cls&layer={layer}&head={head}", files=multipart(uploads))
        assert r.status_code == 200, r.text
        h = None if head == "mean" else int(head)
        expected = analysis.cls_attention(out.attentions, layer, h).reshape(-1, 4, 4)
        got = np.array([res["heatmap"] for res in r.json()["results"]])
        np.testing.assert_allclose(got, expected.numpy(), atol=ATOL)


def test_attention_distance_equals_the_engine(client, engines, uploads):
    out = reference(engines["tiny"], uploads, attentions=True)
    expected = analysis.attention_distance(out.attentions, (4, 4), 8)
    r = client.post("/v1/attention-distance", files=multipart(uploads))
    assert r.status_code == 200, r.text
    got = np.array([res["distance"] for res in r.json()["results"]])
    assert got.shape == (4, 2, 2)  # images, depth, heads
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_position_similarity_equals_the_engine(client, engines):
    r = client.get("/v1/models/tiny/position-similarity")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid"] == [4, 4]
    expected = analysis.position_similarity(engines["tiny"].net.pos_embed.detach())
    np.testing.assert_allclose(body["similarity"], expected.numpy(), atol=ATOL)


def test_pictures_are_pngs(client, uploads):
    one = [uploads[1]]
    for url in (
        "/v1/attention?format=png",
        "/v1/attention?format=png&method=cls&head=1",
        "/v1/attention-distance?format=png",
    ):
        r = client.post(url, files=multipart(one))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(r.content)).verify()
    overlay = Image.open(io.BytesIO(client.post("/v1/attention?format=png", files=multipart(one)).content))
    assert overlay.size == Image.open(io.BytesIO(uploads[1][1])).size  # drawn on the uploaded image
    r = client.get("/v1/models/tiny/position-similarity?format=png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_every_input_form_gives_the_same_answer(client, uploads):
    name, data = uploads[0]
    b64 = base64.b64encode(data).decode()
    forms = {
        "multipart": client.post("/v1/classify", files=[("images", (name, data, "image/png"))]),
        "json": client.post("/v1/classify", json={"images": [b64]}),
        "data-url": client.post("/v1/classify", json={"images": [f"data:image/png;base64,{b64}"]}),
        "urlsafe": client.post("/v1/classify", json={"images": [base64.urlsafe_b64encode(data).decode().rstrip("=")]}),
        "image/png": client.post("/v1/classify", content=data, headers={"content-type": "image/png"}),
        "octet-stream": client.post("/v1/classify", content=data, headers={"content-type": "application/octet-stream"}),
    }
    answers = {}
    for form, r in forms.items():
        assert r.status_code == 200, (form, r.text)
        [result] = r.json()["results"]
        assert result["filename"] == (name if form == "multipart" else None)
        answers[form] = result["predictions"]
    first = answers["multipart"]
    for form, predictions in answers.items():
        assert [p["index"] for p in predictions] == [p["index"] for p in first], form
        np.testing.assert_allclose([p["score"] for p in predictions], [p["score"] for p in first], atol=ATOL)


def test_results_come_back_in_request_order_across_batches(client, uploads):
    many = [(f"{i}-{name}", data) for i in range(3) for name, data in uploads]  # 12 images, batches of 8
    r = client.post("/v1/classify?top_k=1", files=multipart(many))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == [name for name, _ in many]
    for i in range(4, 12):
        [now], [before] = results[i]["predictions"], results[i - 4]["predictions"]
        assert now["index"] == before["index"] and now["score"] == pytest.approx(before["score"], abs=ATOL)


def test_model_info(client, checkpoints):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny", "other", "headless"]
    info = client.get("/v1/models/tiny").json()
    assert info == models[0]
    import hashlib

    assert info["sha256"] == hashlib.sha256(checkpoints["tiny"].read_bytes()).hexdigest()
    assert info["format"] == "native" and info["source"] == str(checkpoints["tiny"])
    assert (info["image_size"], info["patch_size"], info["grid"]) == ([32, 32], 8, [4, 4])
    assert (info["embed_dim"], info["depth"], info["num_heads"], info["num_classes"]) == (32, 2, 2, 10)
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert info["preprocess"]["crop"] == [32, 32] and info["preprocess"]["interpolation"] == "bicubic"
    assert len(info["preprocess"]["mean"]) == len(info["preprocess"]["std"]) == 3
    assert client.get("/v1/models/headless").json()["num_classes"] == 0
    serving = info["serving"]  # beyond the contract: how the server runs the model
    assert (serving["max_batch_size"], serving["max_queue"]) == (8, 256)  # the CPU's defaults
    assert serving["lanes"] in (1, 2) and serving["fast_path"] in ("eager", "onednn")


def test_health_readiness_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "models": ["tiny", "other", "headless"]}
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_a_float8_server_is_refused_on_a_cpu(checkpoints):
    """--dtype float8 is for GPUs with float8 tensor cores: on a CPU the model does not load, and the server says
    why (one message naming the model, float8 and the GPU, as the command line logs before it exits 1)."""
    from fastapi.testclient import TestClient
    from http_support import settings_for

    from app.http.factory import create_app

    fatal: list[str] = []
    settings = settings_for(checkpoints, "tiny", dtype="float8")
    with TestClient(create_app(settings, on_fatal=fatal.append)) as c:
        deadline = time.monotonic() + 60
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = c.get("/readyz")
        classify = c.post("/v1/classify", files=multipart([("a.png", encode(Image.new("RGB", (8, 8)), "PNG"))]))
    (message,) = fatal
    assert "'tiny'" in message and "float8 needs a CUDA GPU" in message
    assert ready.status_code == classify.status_code == 503
    assert message in ready.json()["error"]["message"] and classify.json()["error"]["code"] == "not_ready"


def _float8_gpu() -> bool:
    from app.model.float8 import float8_problem

    return torch.cuda.is_available() and float8_problem(torch.device("cuda")) is None


@pytest.mark.skipif(not _float8_gpu(), reason="needs a GPU with float8 tensor cores")
def test_a_float8_server_on_a_gpu_answers_as_its_engine(checkpoints, uploads):
    from fastapi.testclient import TestClient
    from http_support import settings_for, wait_ready

    from app.http.factory import create_app

    engine = app.load_model(str(checkpoints["tiny"]), device="cuda", dtype="float8")
    settings = settings_for(checkpoints, "tiny", device="cuda", dtype="float8", jpeg_draft=False, jpeg_decoder="pil")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/v1/models/tiny").json()["dtype"] == "float8"
        classify = c.post("/v1/classify?top_k=10", files=multipart(uploads))
        rollout = c.post("/v1/attention", files=multipart(uploads))
    assert classify.status_code == rollout.status_code == 200, (classify.text, rollout.text)
    # the server replays CUDA graphs, the engine runs eagerly: the same kernels, a bfloat16 step apart at most
    probs = reference(engine, uploads).logits.softmax(-1).cpu()
    for res, p in zip(classify.json()["results"], probs, strict=True):
        scores = {x["index"]: x["score"] for x in res["predictions"]}
        np.testing.assert_allclose([scores[i] for i in range(10)], p.numpy(), atol=1e-2)
    heat = analysis.rollout(reference(engine, uploads, attentions=True).attentions).reshape(-1, 4, 4).cpu()
    for res, h in zip(rollout.json()["results"], heat, strict=True):
        np.testing.assert_allclose(res["heatmap"], h.numpy(), atol=2e-3)
