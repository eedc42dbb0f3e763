"""`--jpeg-decoder torchvision` through the real app: JPEGs queued compressed and decoded with their batch.

On the CPU this runs torchvision's CPU decoder through exactly the code the GPU path uses (nvJPEG aside):
answers equal to the PIL path's within a grey level, a corrupt JPEG that passes the header check answered
400 without failing the other requests of its batch, and PNGs still decoded by Pillow.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient
from http_support import encode, serve, settings_for, wait_ready, wrapping_loader

from app import gpu_decode
from app.http.factory import create_app

pytestmark = [
    pytest.mark.skipif(not gpu_decode.available(), reason="torchvision is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*"),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]
RAW = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def jpegs(real_photos) -> list[bytes]:
    return [encode(real_photos[n], "JPEG", quality=90) for n in ("chelsea", "astronaut", "coffee", "china")]


@pytest.fixture(scope="module")
def clients(checkpoints):
    """The same models served with each decoder (JPEG draft off on the PIL side: the device decodes in full)."""
    apps = {
        choice: create_app(settings_for(checkpoints, "tiny", "headless", jpeg_decoder=choice, jpeg_draft=False))
        for choice in ("pil", "torchvision")
    }
    with TestClient(apps["pil"]) as pil, TestClient(apps["torchvision"]) as tv:
        wait_ready(pil)
        wait_ready(tv)
        yield {"pil": pil, "torchvision": tv}


def multipart(datas: list[bytes]) -> list:
    return [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(datas)]


def test_the_settings_choose_the_device_path_only_where_asked(clients):
    for choice, client in clients.items():
        served = client.app.state.vit.models["tiny"]
        model, choice_set = served.model, client.app.state.vit.settings.jpeg_decoder
        wanted = gpu_decode.use_for(choice_set, model.device, model.preprocess_config)
        assert wanted == (choice == "torchvision")  # auto on this CPU would be pil


def test_answers_equal_the_pil_path(clients, jpegs):
    answers = {
        choice: [
            c.post("/v1/classify?top_k=10", files=multipart(jpegs)).json(),
            c.post("/v1/embed?model=headless", files=multipart(jpegs)).json(),
        ]
        for choice, c in clients.items()
    }
    (pil_cls, pil_emb), (tv_cls, tv_emb) = answers["pil"], answers["torchvision"]
    for a, b in zip(pil_cls["results"], tv_cls["results"], strict=True):
        scores_a = {p["index"]: p["score"] for p in a["predictions"]}
        scores_b = {p["index"]: p["score"] for p in b["predictions"]}
        assert scores_a.keys() == scores_b.keys()
        assert max(abs(scores_a[k] - scores_b[k]) for k in scores_a) < 0.01
    for a, b in zip(pil_emb["results"], tv_emb["results"], strict=True):
        np.testing.assert_allclose(b["embedding"], a["embedding"], atol=0.05, rtol=0.02)


def test_png_is_still_decoded_by_pillow_exactly(clients, real_photos):
    png = encode(real_photos["astronaut"], "PNG")
    pil, tv = (c.post("/v1/embed?model=headless", content=png, headers=RAW).json() for c in clients.values())
    assert pil == tv  # the same pixels, bit for bit: no device decoding for PNG


def test_a_corrupt_jpeg_in_a_shared_batch_gets_400_and_its_batch_mates_200(checkpoints, jpegs, bogus_huffman_table):
    created = []
    settings = settings_for(checkpoints, "tiny", jpeg_decoder="torchvision", max_wait_ms=300, max_batch_size=8)
    app = create_app(settings, loader=wrapping_loader(created))
    corrupt = bogus_huffman_table(jpegs[2])  # the header is intact: it passes the pool's check

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()
            jobs = [client.post("/v1/classify", content=d, headers=RAW) for d in jpegs]
            jobs.insert(2, client.post("/v1/classify", files=multipart([jpegs[0], corrupt])))
            return await asyncio.gather(*jobs)

    answers = asyncio.run(main())
    assert [r.status_code for r in answers] == [200, 200, 400, 200, 200]
    error = answers[2].json()["error"]
    assert error["code"] == "invalid_image" and error["index"] == 1 and error["filename"] == "1.jpg"
    assert "image 1 (1.jpg)" in error["message"]
    # one forward for all of them: six images arrived together, the corrupt one never reached the model
    assert created[0].batch_sizes == [5]


def v2_bytes(datas: list[bytes]) -> dict:
    data = [base64.b64encode(d).decode() for d in datas]
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


def test_v2_bytes_images_take_the_device_path_too(clients, jpegs, bogus_huffman_table):
    """/v2 BYTES inputs go through the same decode step: equal to the PIL path's answers, and a corrupt JPEG that
    passes the header check is the protocol's 400 naming its index."""
    url = "/v2/models/tiny/infer"
    pil, tv = (c.post(url, json=v2_bytes(jpegs)).json() for c in clients.values())
    (pil_probs,), (tv_probs,) = ([o["data"] for o in r["outputs"] if o["name"] == "probabilities"] for r in (pil, tv))
    np.testing.assert_allclose(tv_probs, pil_probs, atol=0.01)
    corrupt = bogus_huffman_table(jpegs[1])
    r = clients["torchvision"].post(url, json=v2_bytes([jpegs[0], corrupt]))
    assert r.status_code == 400 and "image 1" in r.json()["error"]


def test_a_truncated_jpeg_is_refused_before_its_batch(clients, jpegs):
    """A cut-off JPEG (no end marker) goes to Pillow in the pool, which refuses it, whatever the decoder: a
    device decoder that would fill in the missing part never sees it."""
    truncated = jpegs[0][: len(jpegs[0]) * 3 // 4]
    for client in clients.values():
        r = client.post("/v1/classify", content=truncated, headers=RAW)
        assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
