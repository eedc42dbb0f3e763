"""The Open Inference Protocol (/v2) through `tritonclient[http]`, a client nobody here wrote, against the real app
under a real uvicorn on loopback, in JSON and in binary-tensor mode.

What it proves: BYTES images give the probabilities of /v1/classify, the embedding of /v1/embed and the heatmap of
/v1/attention?method=rollout for the same photos; UINT8 pixels and FP32 preprocessed tensors give what the engine
computes on the same pixels; request ids are echoed; the API key guards /v2/models/...; every error has the
protocol's {"error": "..."} shape with API.md's status codes (limits, overload, timeout and readiness included).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from http_support import encode, serve, settings_for, wrapping_loader
from PIL import Image

from app.engine import load_model
from app.http.factory import create_app
from app.http.loading import engine_loader

httpclient = pytest.importorskip("tritonclient.http", reason="pip install -e '.[test]' brings tritonclient[http]")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "v2-test-key"
MAX_IMAGES = 8
MAX_BYTES = 1 << 20
HEADER = "Inference-Header-Content-Length"


def auth() -> dict[str, str]:
    """A fresh dict each call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(checkpoints) -> Iterator[str]:
    """The app on "tiny" (10 classes, centre crop) and "headless", served by uvicorn on a loopback socket."""
    settings = settings_for(
        checkpoints,
        "tiny",
        "headless",
        api_key=KEY,
        max_images_per_request=MAX_IMAGES,
        max_upload_bytes=MAX_BYTES,
        log_level="warning",
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server was not ready within 60 s"
            time.sleep(0.05)
        yield url
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def triton(server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def engine(checkpoints):
    """The same checkpoint loaded by the engine alone, as the Python API would."""
    return load_model(str(checkpoints["tiny"]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def photos(real_photos) -> list:
    return [real_photos["chelsea"], real_photos["astronaut"]]


@pytest.fixture(scope="module")
def pngs(photos) -> list[bytes]:
    return [encode(p, "PNG") for p in photos]


def bytes_input(images: list[bytes], binary: bool) -> httpclient.InferInput:
    """A BYTES [N] tensor: raw bytes in binary mode, base64 strings in JSON (the contract's form)."""
    t = httpclient.InferInput("images", [len(images)], "BYTES")
    if binary:
        t.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:
        t.set_data_from_numpy(np.array([base64.b64encode(b).decode() for b in images], dtype=object), False)
    return t


def wanted(names: list[str], binary: bool, **params) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(n, binary_data=binary, **params) for n in names]


def v1(server: str, path: str, pngs: list[bytes]) -> dict:
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = httpx.post(f"{server}{path}", files=files, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- metadata


def test_health_and_server_metadata_are_open(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "vitserve" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_lists_the_input_forms_and_outputs(triton, engine):
    meta = triton.get_model_metadata("tiny", headers=auth())
    h, w = engine.config.image_size
    assert meta["name"] == "tiny" and meta["platform"] == "pytorch" and meta["versions"] == ["1"]
    assert {(i["datatype"], tuple(i["shape"])) for i in meta["inputs"]} == {
        ("BYTES", (-1,)),
        ("UINT8", (-1, -1, -1, 3)),
        ("FP32", (-1, 3, h, w)),
    }
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {
        "probabilities": ("FP32", [-1, 10]),
        "logits": ("FP32", [-1, 10]),
        "embedding": ("FP32", [-1, engine.config.embed_dim]),
        "attention_rollout": ("FP32", [-1, *engine.config.grid]),
    }
    assert triton.is_model_ready("tiny", headers=auth()) and triton.is_model_ready("tiny", "1", headers=auth())
    headless = triton.get_model_metadata("headless", headers=auth())
    assert [o["name"] for o in headless["outputs"]] == ["embedding", "attention_rollout"]


def test_the_api_key_guards_the_model_routes(triton, server):
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("tiny")
    assert e.value.status() == "401" and "API key" in e.value.message()
    r = httpx.post(f"{server}/v2/models/tiny/infer", json={"inputs": []})
    assert r.status_code == 401 and r.json() == {"error": r.json()["error"]} and r.headers["www-authenticate"]
    assert not triton.is_model_ready("tiny")


# ----------------------------------------------------------------------------------------- BYTES vs /v1


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_images_equal_v1_classify_and_embed(triton, server, pngs, binary):
    result = triton.infer(
        "tiny",
        [bytes_input(pngs, binary)],
        outputs=wanted(["probabilities", "embedding", "logits"], binary),
        request_id="req-7",
        headers=auth(),
    )
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_name"] == "tiny"
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 10) and probs.dtype == np.float32
    classified = v1(server, "/v1/classify?model=tiny&top_k=10", pngs)["results"]
    for row, answer in zip(probs, classified, strict=True):
        indices = [p["index"] for p in answer["predictions"]]
        close(row[indices], [p["score"] for p in answer["predictions"]])
    close(torch.tensor(result.as_numpy("logits")).softmax(-1), probs)
    embedded = v1(server, "/v1/embed?model=tiny", pngs)["results"]
    close(result.as_numpy("embedding"), [e["embedding"] for e in embedded])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_attention_rollout_equals_v1_attention(triton, server, pngs, binary):
    result = triton.infer(
        "tiny", [bytes_input(pngs, binary)], outputs=wanted(["attention_rollout"], binary), headers=auth()
    )
    heat = result.as_numpy("attention_rollout")
    answer = v1(server, "/v1/attention?model=tiny&method=rollout", pngs)["results"]
    assert heat.shape == (2, *answer[0]["grid"])
    close(heat, [a["heatmap"] for a in answer])


def test_classification_extension_gives_v1s_top_k(triton, server, pngs):
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    result = triton.infer("tiny", [bytes_input(pngs, True)], outputs=[out], headers=auth())
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    classified = v1(server, "/v1/classify?model=tiny&top_k=3", pngs)["results"]
    for row, answer in zip(top, classified, strict=True):
        fields = [cell.decode().split(":") for cell in row]
        assert [int(f[1]) for f in fields] == [p["index"] for p in answer["predictions"]]
        assert [f[2] for f in fields] == [p["label"] for p in answer["predictions"]]
        close([float(f[0]) for f in fields], [p["score"] for p in answer["predictions"]])


def test_default_output_is_probabilities_and_embedding_without_a_head(triton, server, pngs):
    # no `outputs`: tritonclient asks for binary_data_output, so the default output comes back as bytes
    result = triton.infer("tiny", [bytes_input(pngs[:1], True)], headers=auth())
    [only] = result.get_response()["outputs"]
    assert only["name"] == "probabilities" and only["parameters"]["binary_data_size"] == 40
    assert result.as_numpy("probabilities").sum() == pytest.approx(1.0, abs=1e-5)
    result = triton.infer("headless", [bytes_input(pngs, False)], headers=auth())
    embedded = v1(server, "/v1/embed?model=headless", pngs)["results"]
    close(result.as_numpy("embedding"), [e["embedding"] for e in embedded])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_read(triton, server, pngs, algorithm):
    result = triton.infer(
        "tiny",
        [bytes_input(pngs, True)],
        outputs=wanted(["embedding"], True),
        headers=auth(),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,  # we answer uncompressed, which the client accepts
    )
    embedded = v1(server, "/v1/embed?model=tiny", pngs)["results"]
    close(result.as_numpy("embedding"), [e["embedding"] for e in embedded])


# ------------------------------------------------------------------------------------ UINT8, FP32 vs engine


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint8_pixels_are_preprocessed_like_images(triton, engine, photos, binary):
    images = [p.resize((60, 45)) for p in photos]  # any size: resized and cropped like a decoded image
    pixels = np.stack([np.asarray(im) for im in images])
    t = httpclient.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels, binary)
    result = triton.infer("tiny", [t], outputs=wanted(["probabilities", "embedding"], binary), headers=auth())
    expected = engine(engine.preprocess(images))
    close(result.as_numpy("probabilities"), expected.logits.softmax(-1))
    close(result.as_numpy("embedding"), expected.embedding)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_preprocessed_pixels_go_straight_to_the_model(triton, engine, photos, binary):
    x = engine.preprocess(photos)
    x[1] = torch.randn(x[1].shape, generator=torch.Generator().manual_seed(3))  # any float input, not only images
    data = x.numpy().astype(np.float32)
    t = httpclient.InferInput("pixel_values", list(data.shape), "FP32").set_data_from_numpy(data, binary)
    names = ["logits", "embedding", "attention_rollout"]
    result = triton.infer("tiny", [t], outputs=wanted(names, binary), headers=auth())
    expected = engine(x, attentions=True)
    close(result.as_numpy("logits"), expected.logits)
    close(result.as_numpy("embedding"), expected.embedding)
    from app.analysis import rollout

    close(result.as_numpy("attention_rollout"), rollout(expected.attentions).reshape(2, *engine.config.grid))


def test_mixed_outputs_binary_and_json_in_one_response(triton, engine, photos):
    pixels = np.stack([np.asarray(p.resize((32, 32))) for p in photos])
    t = httpclient.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels, True)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
        httpclient.InferRequestedOutput("embedding", binary_data=False),
    ]
    result = triton.infer("tiny", [t], outputs=outputs, headers=auth())
    described = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "data" not in described["probabilities"] and "data" in described["embedding"]
    expected = engine(engine.preprocess([p.resize((32, 32)) for p in photos]))
    close(result.as_numpy("probabilities"), expected.logits.softmax(-1))
    close(result.as_numpy("embedding"), expected.embedding)


# ---------------------------------------------------------------------------------------------- errors


def failure(triton, model: str, inputs, outputs=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        triton.infer(model, inputs, outputs=outputs, headers=auth())
    return e.value


def test_unknown_model_is_404(triton, pngs):
    e = failure(triton, "nope", [bytes_input(pngs[:1], True)])
    assert e.status() == "404" and "nope" in e.message()
    with pytest.raises(InferenceServerException) as meta:
        triton.get_model_metadata("tiny", "2", headers=auth())
    assert meta.value.status() == "404"


def test_corrupt_image_is_400(triton, pngs):
    e = failure(triton, "tiny", [bytes_input([pngs[0], pngs[1][: len(pngs[1]) // 2]], True)])
    assert e.status() == "400" and "image 1" in e.message()
    e = failure(triton, "tiny", [bytes_input([b"not an image"], False)])
    assert e.status() == "400"


def test_bad_datatypes_and_shapes_are_422(triton, engine):
    ints = np.zeros((1, 32, 32, 3), np.int32)
    e = failure(triton, "tiny", [httpclient.InferInput("x", [1, 32, 32, 3], "INT32").set_data_from_numpy(ints)])
    assert e.status() == "422" and "INT32" in e.message()
    rgba = np.zeros((1, 8, 8, 4), np.uint8)
    e = failure(triton, "tiny", [httpclient.InferInput("x", [1, 8, 8, 4], "UINT8").set_data_from_numpy(rgba)])
    assert e.status() == "422" and "[N, H, W, 3]" in e.message()
    x = np.zeros((1, 3, 32, 32), np.float32)
    t = httpclient.InferInput("x", [1, 3, 32, 32], "FP32").set_data_from_numpy(x)
    e = failure(triton, "tiny", [t], [httpclient.InferRequestedOutput("heatmap")])
    assert e.status() == "422" and "heatmap" in e.message()
    e = failure(triton, "headless", [t], [httpclient.InferRequestedOutput("logits")])
    assert e.status() == "422" and "no classification head" in e.message()


def test_uint8_zero_sized_or_extreme_strips_are_400(triton):
    for shape in ([1, 0, 8, 3], [1, 1, 40_000, 3]):  # the strip would resize to 36 x 1.44e6 > 40e6 pixels
        x = np.zeros(shape, np.uint8)
        e = failure(triton, "tiny", [httpclient.InferInput("x", shape, "UINT8").set_data_from_numpy(x)])
        assert e.status() == "400", e.message()


def test_fp32_at_another_size_is_400(triton):
    x = np.zeros((1, 3, 16, 16), np.float32)
    e = failure(triton, "tiny", [httpclient.InferInput("x", [1, 3, 16, 16], "FP32").set_data_from_numpy(x)])
    assert e.status() == "400" and "32 x 32" in e.message()


def test_fp32_that_is_not_finite_is_400(triton, server):
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 1, 2, 3] = np.nan
    e = failure(triton, "tiny", [httpclient.InferInput("x", [1, 3, 32, 32], "FP32").set_data_from_numpy(x)])
    assert e.status() == "400" and "NaN or infinite" in e.message()
    # JSON numbers beyond float32's range become infinite: refused the same way
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [1e300] * 3072}]}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400 and "NaN or infinite" in r.json()["error"]


def test_limits_are_413(triton, server, pngs):
    many = [pngs[0]] * (MAX_IMAGES + 1)
    e = failure(triton, "tiny", [bytes_input(many, True)])
    assert e.status() == "413" and str(MAX_IMAGES) in e.message()
    big = np.zeros((1, 600, 600, 3), np.uint8)  # 1.08 MB of pixels, over the 1 MiB body cap
    e = failure(triton, "tiny", [httpclient.InferInput("x", list(big.shape), "UINT8").set_data_from_numpy(big)])
    assert e.status() == "413"
    bomb = gzip.compress(b" " * (2 * MAX_BYTES))  # a few KB that would inflate past the cap: never inflated
    headers = {**auth(), "Content-Encoding": "gzip"}
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=bomb, headers=headers, timeout=30)
    assert r.status_code == 413 and set(r.json()) == {"error"}


def test_raw_error_bodies_have_the_protocol_shape(server, pngs):
    def post(body: bytes, headers: dict) -> httpx.Response:
        return httpx.post(f"{server}/v2/models/tiny/infer", content=body, headers={**auth(), **headers}, timeout=30)

    cases = [
        (post(b"{not json", {}), 422),
        (post(b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [1, 2]}]}', {}), 422),
        (post(b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1]}]}', {HEADER: "200"}), 422),
        (httpx.get(f"{server}/v2/models/tiny/unknown", headers=auth()), 404),
        (httpx.get(f"{server}/v2/models/tiny/infer", headers=auth()), 405),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
        assert r.headers["x-request-id"]
    # the /v1 envelope is untouched
    assert httpx.get(f"{server}/v1/models/nope", headers=auth()).json()["error"]["code"] == "model_not_found"


def test_a_handwritten_binary_request(server, pngs):
    """The extension byte by byte, without tritonclient: JSON header, then 4-byte LE length + image bytes."""
    head = (
        b'{"id": "raw", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],'
        b' "parameters": {"binary_data_size": %d}}], "outputs": [{"name": "embedding",'
        b' "parameters": {"binary_data": true}}]}' % (4 + len(pngs[0]))
    )
    body = head + len(pngs[0]).to_bytes(4, "little") + pngs[0]
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=body, headers={**auth(), HEADER: str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER])
    meta = json.loads(r.content[:n])
    assert meta["id"] == "raw" and meta["outputs"][0]["parameters"]["binary_data_size"] == 4 * 32
    vector = np.frombuffer(r.content[n:], "<f4")
    close(vector, v1(server, "/v1/embed?model=tiny", pngs[:1])["results"][0]["embedding"])


# ------------------------------------------------------------------- overload, timeout, readiness (in-process)


def v2_request(png: bytes) -> dict:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]}


def test_overload_is_503_with_retry_after(checkpoints, pngs):
    app = create_app(settings_for(checkpoints, "tiny", max_queue=4, max_images_per_request=2))

    async def main():
        async with serve(app) as client:
            served = app.state.vit.models["tiny"]
            with served.batcher.admit(served.batcher.max_queue):  # the queue is full
                full = await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0]))
            return full, await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0]))

    full, after = asyncio.run(main())
    assert full.status_code == 503 and set(full.json()) == {"error"}
    assert int(full.headers["retry-after"]) >= 1
    assert after.status_code == 200


def test_timeout_is_504(checkpoints, pngs):
    settings = settings_for(checkpoints, "tiny", request_timeout_s=0.2)
    app = create_app(settings, loader=wrapping_loader(delay=1.0))

    async def main():
        async with serve(app) as client:
            return await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0]))

    r = asyncio.run(main())
    assert r.status_code == 504 and "0.2 s" in r.json()["error"]


def test_not_ready_while_loading_and_while_draining(checkpoints, pngs):
    release = threading.Event()

    def slow(spec, settings, models_dir):
        release.wait(30)
        return engine_loader(spec, settings, models_dir)

    app = create_app(settings_for(checkpoints, "tiny"), loader=slow)

    async def main():
        async with serve(app, wait=False) as client:
            loading = [
                await client.get("/v2/health/ready"),
                await client.get("/v2/models/tiny/ready"),
                await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0])),
            ]
            live = await client.get("/v2/health/live")
            release.set()
            while (await client.get("/v2/health/ready")).status_code != 200:
                await asyncio.sleep(0.02)
            ok = await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0]))
            app.state.vit.begin_drain()
            draining = [
                await client.get("/v2/health/ready"),
                await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0])),
            ]
            return loading, live, ok, draining

    loading, live, ok, draining = asyncio.run(main())
    assert live.status_code == 200
    for r in loading + draining:
        assert r.status_code == 503 and set(r.json()) == {"error"}, r.text
    assert "loading" in loading[0].json()["error"] and "shutting down" in draining[0].json()["error"]
    assert ok.status_code == 200


def test_a_forward_fault_is_500_in_the_protocol_shape_with_the_request_id(checkpoints, pngs):
    app = create_app(settings_for(checkpoints, "tiny"), loader=wrapping_loader(poison=True))
    white = encode(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG")

    async def main():
        async with serve(app) as client:
            headers = {"X-Request-ID": "fault-1"}
            return (
                await client.post("/v2/models/tiny/infer", json=v2_request(white), headers=headers),
                await client.post("/v2/models/tiny/infer", json=v2_request(pngs[0])),
            )

    fault, fine = asyncio.run(main())
    assert fault.status_code == 500 and set(fault.json()) == {"error"}
    assert "fault-1" in fault.json()["error"] and fault.headers["x-request-id"] == "fault-1"
    assert fine.status_code == 200


def test_the_per_request_timeout_parameter_shortens_the_deadline(triton, server, pngs):
    """Triton's `timeout` (microseconds): 1 us cannot be met (504, its work dropped); a generous one changes
    nothing; a malformed one is refused like any malformed request (422)."""
    inputs = [bytes_input(pngs[:1], True)]
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", inputs, headers=auth(), timeout=1)
    assert info.value.status() == "504" and "took longer" in info.value.message()
    result = triton.infer("tiny", inputs, headers=auth(), timeout=60_000_000)
    assert result.as_numpy("probabilities").shape[0] == 1
    body = {**v2_request(pngs[0]), "parameters": {"timeout": "soon"}}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=body, headers=auth(), timeout=30)
    assert r.status_code == 422 and "timeout" in r.json()["error"]  # as the other malformed requests
