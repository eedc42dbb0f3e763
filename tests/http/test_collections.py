"""Image search (API.md, "Image search (collections)") on the real app and a real PostgreSQL with pgvector: the
embedded one (pgserver, started by the app itself under a temporary --data-dir).

Covers every route and form, every error of the contract (404, 409, 422, 401, 503), the binding of a collection
to its model, thumbnails, paging, filters that never shorten the list below the matches, and HNSW recall
against exact (numpy) search on a small clustered collection."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from http_support import encode, save_tiny, settings_for, wait_ready
from PIL import Image

from app.http.factory import create_app

pytest.importorskip("pgserver")

DIM = 32  # the tiny models' embedding size


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmodels")
    return {
        "tiny": save_tiny(root / "tiny.safetensors"),
        "other": save_tiny(root / "other.safetensors", seed=1, num_classes=5, crop=False),
        "retrained": save_tiny(root / "retrained.safetensors", seed=7),  # "tiny" with other weights
    }


def private_dir() -> Iterator[Path]:
    """A folder for an embedded PostgreSQL, outside pytest's tmp root: as root, pgserver opens the parent folders
    to its own `pgserver` user, and a pytest session starting beside this one would close pytest's root again."""
    folder = Path(tempfile.mkdtemp(prefix="vitserve-test-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    yield from private_dir()


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    yield from private_dir()


@pytest.fixture(scope="module")
def client(models, data_dir) -> Iterator[TestClient]:
    settings = settings_for(models, "tiny", "other", data_dir=str(data_dir))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def digit_png(value: int, size: int = 40) -> bytes:
    """A distinct little picture per value (stripes and a square), so embeddings differ."""
    rng = np.random.default_rng(value)
    a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    a[value % size :, :: (value % 5) + 2] = 255
    return encode(Image.fromarray(a, "RGB"), "PNG")


def error(r) -> str:  # type: ignore[no-untyped-def]
    return r.json()["error"]["code"]


def rand_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- collections


def test_create_get_list_delete(client: TestClient, data_dir: Path) -> None:
    r = client.post("/v1/collections", json={"name": "cats-1", "metric": "l2", "pool": "mean"})
    assert r.status_code == 201, r.text
    body = r.json()
    model = client.get("/v1/models/tiny").json()
    assert body["name"] == "cats-1" and body["model"] == "tiny" and body["model_sha256"] == model["sha256"]
    assert body["image_size"] == model["image_size"] and body["preprocess"] == model["preprocess"]
    assert (body["pool"], body["metric"], body["dim"], body["count"], body["index"]) == ("mean", "l2", DIM, 0, "hnsw")
    assert client.get("/v1/collections/cats-1").json() == body
    assert "cats-1" in [c["name"] for c in client.get("/v1/collections").json()["collections"]]
    assert str(data_dir) not in r.text

    r = client.post("/v1/collections", json={"name": "cats-1"})
    assert r.status_code == 409 and error(r) == "conflict"

    defaults = client.post("/v1/collections", json={"name": "dflt", "model": "other"}).json()
    assert (defaults["metric"], defaults["pool"], defaults["model"]) == ("cosine", "default", "other")

    assert client.delete("/v1/collections/cats-1").json() == {"deleted": "cats-1"}
    assert client.get("/v1/collections/cats-1").status_code == 404
    assert client.delete("/v1/collections/dflt").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Upper"},
        {"name": "-lead"},
        {"name": "a" * 64},
        {"name": "sp ace"},
        {"name": ""},
        {"name": 5},
        {},
        {"name": "ok", "metric": "manhattan"},
        {"name": "ok", "pool": "max"},
        {"name": "ok", "thumbnails": "yes"},
        {"name": "ok", "nonsense": 1},
        [1, 2],
    ],
)
def test_create_refuses_bad_input(client: TestClient, body) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/v1/collections", json=body)
    assert r.status_code == 422 and error(r) == "invalid_request", r.text


def test_create_other_errors(client: TestClient) -> None:
    r = client.post("/v1/collections", json={"name": "x", "model": "nope"})
    assert r.status_code == 404 and error(r) == "model_not_found"
    r = client.post("/v1/collections", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/collections", content=b"name=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_unknown_collection_is_404_everywhere(client: TestClient) -> None:
    png = digit_png(1)
    calls = [
        client.get("/v1/collections/ghost"),
        client.delete("/v1/collections/ghost"),
        client.get("/v1/collections/ghost/items"),
        client.get("/v1/collections/ghost/items/a"),
        client.get("/v1/collections/ghost/items/a/thumbnail"),
        client.delete("/v1/collections/ghost/items/a"),
        client.post("/v1/collections/ghost/images", content=png, headers={"content-type": "image/png"}),
        client.post("/v1/collections/ghost/vectors", json={"items": [{"id": "a", "vector": [1.0] * DIM}]}),
        client.post("/v1/collections/ghost/search", json={"vector": [1.0] * DIM}),
        client.get("/v1/collections/NOT%20A%20NAME"),
    ]
    for r in calls:
        assert r.status_code == 404 and error(r) == "not_found", r.text


# ---------------------------------------------------------------------------------------------- images


def test_add_images_in_three_forms_and_search(client: TestClient) -> None:
    assert client.post("/v1/collections", json={"name": "pics"}).status_code == 201
    pngs = [digit_png(i) for i in range(6)]
    # multipart with ids and metadata
    r = client.post(
        "/v1/collections/pics/images",
        files=[("images", (f"{i}.png", pngs[i], "image/png")) for i in range(3)],
        data={"ids": json.dumps(["p0", "p1", "p2"]), "metadata": json.dumps([{"n": 0}, {"n": 1}, {"n": 2}])},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"ids": ["p0", "p1", "p2"], "count": 3}
    # raw body with ?id=
    r = client.post("/v1/collections/pics/images?id=p3", content=pngs[3], headers={"content-type": "image/png"})
    assert r.json() == {"ids": ["p3"], "count": 1}
    # JSON items, one without an id (a UUID4 comes back), one as a data: URL
    b64 = [base64.b64encode(p).decode() for p in pngs]
    r = client.post(
        "/v1/collections/pics/images",
        json={
            "items": [{"image": b64[4], "metadata": {"n": 4}}, {"id": "p5", "image": "data:image/png;base64," + b64[5]}]
        },
    )
    ids = r.json()["ids"]
    assert r.status_code == 200 and ids[1] == "p5" and len(ids[0]) == 36 and ids[0][14] == "4"
    assert client.get("/v1/collections/pics").json()["count"] == 6

    # the embedding stored is the one /v1/embed gives
    emb = client.post("/v1/embed?model=tiny", files=[("images", ("x.png", pngs[2], "image/png"))]).json()
    q = emb["results"][0]["embedding"]
    r = client.post("/v1/collections/pics/search?k=3", json={"vector": q})
    top = r.json()["results"][0]
    assert top["id"] == "p2" and top["score"] == pytest.approx(1.0, abs=1e-5) and top["metadata"] == {"n": 2}

    # search by image: multipart, raw, JSON; each finds the picture itself first
    for kwargs in (
        {"files": [("images", ("q.png", pngs[1], "image/png"))]},
        {"content": pngs[1], "headers": {"content-type": "image/png"}},
        {"json": {"image": b64[1]}},
    ):
        r = client.post("/v1/collections/pics/search?k=4", **kwargs)
        body = r.json()
        assert r.status_code == 200, r.text
        assert body["collection"] == "pics" and len(body["results"]) == 4 and body["took_ms"] > 0
        assert body["results"][0]["id"] == "p1"
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)

    # by stored id: the item itself is left out
    r = client.post("/v1/collections/pics/search?k=10", json={"id": "p1"})
    ids = [x["id"] for x in r.json()["results"]]
    assert len(ids) == 5 and "p1" not in ids

    # filter, in JSON and as a multipart part
    r = client.post("/v1/collections/pics/search?k=10", json={"id": "p1", "filter": {"n": 2}})
    assert [x["id"] for x in r.json()["results"]] == ["p2"]
    r = client.post(
        "/v1/collections/pics/search?k=10",
        files=[("images", ("q.png", pngs[1], "image/png"))],
        data={"filter": json.dumps({"n": 0})},
    )
    assert [x["id"] for x in r.json()["results"]] == ["p0"]


def test_items_paging_get_thumbnail_delete(client: TestClient) -> None:
    assert client.post("/v1/collections", json={"name": "pages"}).status_code == 201
    files = [("images", (f"{i}.png", digit_png(10 + i, size=40 + 30 * i), "image/png")) for i in range(5)]
    ids = [f"i{i}" for i in range(5)]
    meta = [{"i": i} for i in range(5)]
    r = client.post(
        "/v1/collections/pages/images", files=files, data={"ids": json.dumps(ids), "metadata": json.dumps(meta)}
    )
    assert r.status_code == 200, r.text
    seen, cursor = [], None
    while True:
        page = client.get("/v1/collections/pages/items", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        body = page.json()
        assert len(body["items"]) <= 2
        seen += body["items"]
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == [{"id": i, "metadata": m} for i, m in zip(ids, meta, strict=True)]  # insertion order

    assert client.get("/v1/collections/pages/items/i3").json() == {
        "id": "i3",
        "metadata": {"i": 3},
        "has_thumbnail": True,
    }
    t = client.get("/v1/collections/pages/items/i4/thumbnail")
    assert t.status_code == 200 and t.headers["content-type"] == "image/webp"
    im = Image.open(io.BytesIO(t.content))
    assert im.format == "WEBP" and max(im.size) == 128
    assert client.get("/v1/collections/pages/items/nope").status_code == 404
    assert client.get("/v1/collections/pages/items/nope/thumbnail").status_code == 404
    for path in ("/items/a%00b", "/items/a%00b/thumbnail"):  # no id holds a NUL
        assert client.get("/v1/collections/pages" + path).status_code == 404
    assert client.delete("/v1/collections/pages/items/%00").status_code == 404
    r = client.post("/v1/collections/pages/search", json={"id": "a\u0000b"})
    assert r.status_code in (404, 422)

    assert client.delete("/v1/collections/pages/items/i2").json() == {"deleted": "i2"}
    assert client.delete("/v1/collections/pages/items/i2").status_code == 404
    assert client.get("/v1/collections/pages").json()["count"] == 4
    for bad in ({"cursor": "abc"}, {"limit": 0}, {"limit": 1001}):
        assert client.get("/v1/collections/pages/items", params=bad).status_code == 422


def test_thumbnails_opt_out(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "nothumbs", "thumbnails": False})
    client.post("/v1/collections/nothumbs/images?id=a", content=digit_png(3), headers={"content-type": "image/png"})
    assert client.get("/v1/collections/nothumbs/items/a").json()["has_thumbnail"] is False
    r = client.get("/v1/collections/nothumbs/items/a/thumbnail")
    assert r.status_code == 404 and error(r) == "not_found"


def test_adds_are_all_or_nothing_and_ids_unique(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "dups"})
    png = digit_png(5)
    assert client.post(
        "/v1/collections/dups/images?id=a", content=png, headers={"content-type": "image/png"}
    ).is_success
    # an id present already
    r = client.post(
        "/v1/collections/dups/images",
        files=[("images", ("1.png", png, "image/png"))] * 2,
        data={"ids": json.dumps(["b", "a"])},
    )
    assert r.status_code == 409 and error(r) == "conflict" and "'a'" in r.json()["error"]["message"]
    # repeated in the request
    r = client.post(
        "/v1/collections/dups/images",
        files=[("images", ("1.png", png, "image/png"))] * 2,
        data={"ids": json.dumps(["c", "c"])},
    )
    assert r.status_code == 409
    # one bad image fails the request: nothing of it is stored
    r = client.post(
        "/v1/collections/dups/images",
        files=[("images", ("1.png", png, "image/png")), ("images", ("2.png", b"not an image", "image/png"))],
        data={"ids": json.dumps(["d", "e"])},
    )
    assert r.status_code == 400 and error(r) == "invalid_image"
    r = client.post(
        "/v1/collections/dups/vectors",
        json={"items": [{"id": "v1", "vector": [1.0] * DIM}, {"id": "a", "vector": [1.0] * DIM}]},
    )
    assert r.status_code == 409
    items = client.get("/v1/collections/dups/items").json()["items"]
    assert [i["id"] for i in items] == ["a"] and client.get("/v1/collections/dups").json()["count"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"items": []}},
        {"json": {"items": [{"id": "x"}]}},
        {"json": {"items": [{"image": 5}]}},
        {"json": {"items": [{"image": "aGk=", "metadata": [1]}]}},
        {"json": {"items": [{"image": "aGk=", "id": ""}]}},
        {"json": {"images": ["aGk="]}},
        {"files": [("images", ("a.png", b"x", "image/png"))], "data": {"ids": "[1]"}},
        {"files": [("images", ("a.png", b"x", "image/png"))], "data": {"ids": '["a", "b"]'}},
        {"files": [("images", ("a.png", b"x", "image/png"))], "data": {"metadata": "{not json"}},
        {"files": [("images", ("a.png", b"x", "image/png"))], "data": {"metadata": '["x"]'}},
        {"content": b"", "headers": {"content-type": "image/png"}},
    ],
)
def test_add_images_refuses_bad_requests(client: TestClient, kwargs) -> None:  # type: ignore[no-untyped-def]
    client.post("/v1/collections", json={"name": "strict"})
    r = client.post("/v1/collections/strict/images", **kwargs)
    assert r.status_code in (400, 422), r.text
    assert client.get("/v1/collections/strict").json()["count"] == 0


def test_add_images_limits(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "limits"})
    r = client.post("/v1/collections/limits/images", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/collections/limits/images", content=b"not an image", headers={"content-type": "image/png"})
    assert r.status_code == 400 and error(r) == "invalid_image"


# ---------------------------------------------------------------------------------------------- vectors, search


def test_vectors_dimension_and_values(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "vecs"})
    for vector in ([1.0] * (DIM - 1), [1.0] * (DIM + 1), [0.0] * DIM, ["a"] * DIM, [1e39] * DIM, "x", None):
        r = client.post("/v1/collections/vecs/vectors", json={"items": [{"id": "a", "vector": vector}]})
        assert r.status_code == 422 and error(r) == "invalid_request", (vector, r.text)
    r = client.post("/v1/collections/vecs/vectors", json={"items": [{"vector": [1.0] * DIM}]})
    assert r.status_code == 422  # vectors need their ids
    for body in ({"vector": [1.0] * 3}, {"vector": [1.0] * DIM, "id": "a"}, {}, {"filter": {"a": 1}}, [1]):
        r = client.post("/v1/collections/vecs/search", json=body)
        assert r.status_code == 422, (body, r.text)
    for k in (0, 1001, -1):
        r = client.post(f"/v1/collections/vecs/search?k={k}", json={"vector": [1.0] * DIM})
        assert r.status_code == 422 and error(r) == "invalid_request"
    r = client.post("/v1/collections/vecs/search", json={"vector": [1.0] * DIM, "filter": [1]})
    assert r.status_code == 422
    r = client.post("/v1/collections/vecs/search", json={"id": "absent"})
    assert r.status_code == 404


def test_scores_per_metric(client: TestClient) -> None:
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((20, DIM)).astype(np.float32)
    q = rng.standard_normal(DIM).astype(np.float32)
    for metric in ("cosine", "l2", "ip"):
        name = f"metric-{metric}"
        client.post("/v1/collections", json={"name": name, "metric": metric})
        items = [{"id": f"v{i}", "vector": v.tolist()} for i, v in enumerate(vecs)]
        assert client.post(f"/v1/collections/{name}/vectors", json={"items": items}).status_code == 200
        results = client.post(f"/v1/collections/{name}/search?k=5", json={"vector": q.tolist()}).json()["results"]
        if metric == "cosine":
            truth = vecs @ q / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(q))
        elif metric == "l2":
            truth = -np.linalg.norm(vecs - q, axis=1)
        else:
            truth = vecs @ q
        best = np.argsort(-truth)[:5]
        assert [r["id"] for r in results] == [f"v{i}" for i in best]
        assert [r["score"] for r in results] == pytest.approx(truth[best].tolist(), rel=1e-4, abs=1e-4)


def test_filter_never_shortens_the_list_below_the_matches(client: TestClient) -> None:
    """3,000 items: 300 tagged "common", 8 tagged "rare". HNSW alone would return at most ef_search rows before
    filtering; the answer must hold k items whenever k match, and all the matches when fewer do."""
    client.post("/v1/collections", json={"name": "filtered"})
    rng = np.random.default_rng(0)
    vecs = rand_unit(rng, 3000)
    tags = ["rare" if i % 375 == 0 else "common" if i % 10 == 1 else "other" for i in range(3000)]
    for start in range(0, 3000, 1000):
        items = [
            {"id": f"f{i}", "vector": vecs[i].tolist(), "metadata": {"tag": tags[i], "i": i}}
            for i in range(start, start + 1000)
        ]
        assert client.post("/v1/collections/filtered/vectors", json={"items": items}).status_code == 200
    q = rand_unit(rng, 1)[0].tolist()
    for tag, k, expected in (("common", 150, 150), ("common", 300, 300), ("rare", 10, 8), ("none", 5, 0)):
        r = client.post(f"/v1/collections/filtered/search?k={k}", json={"vector": q, "filter": {"tag": tag}})
        results = r.json()["results"]
        assert len(results) == expected, (tag, k, len(results))
        assert all(x["metadata"]["tag"] == tag for x in results)
    # exactly the true nearest among the rare ones
    rare = [i for i in range(3000) if tags[i] == "rare"]
    truth = sorted(rare, key=lambda i: -float(vecs[i] @ np.asarray(q)))
    r = client.post("/v1/collections/filtered/search?k=8", json={"vector": q, "filter": {"tag": "rare"}})
    assert [x["id"] for x in r.json()["results"]] == [f"f{i}" for i in truth]
    # a filter on two keys, and values of other JSON types
    r = client.post("/v1/collections/filtered/search?k=5", json={"vector": q, "filter": {"tag": "rare", "i": 375}})
    assert [x["id"] for x in r.json()["results"]] == ["f375"]
    r = client.post("/v1/collections/filtered/search?k=5", json={"vector": q, "filter": {"i": "375"}})
    assert r.json()["results"] == []  # "375" is not 375
    r = client.post("/v1/collections/filtered/search?k=1000", json={"vector": q})
    assert len(r.json()["results"]) == 1000


def test_hnsw_recall_against_exact_search(client: TestClient) -> None:
    """Clustered data (50 Gaussian clusters), 5,000 vectors: recall@10 of the HNSW index at its default settings
    against numpy's exact cosine search, over 100 queries."""
    client.post("/v1/collections", json={"name": "recall"})
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, DIM)).astype(np.float32)
    vecs = centres[rng.integers(0, 50, 5000)] + 0.35 * rng.standard_normal((5000, DIM)).astype(np.float32)
    for start in range(0, 5000, 1000):
        items = [{"id": str(i), "vector": vecs[i].tolist()} for i in range(start, start + 1000)]
        assert client.post("/v1/collections/recall/vectors", json={"items": items}).status_code == 200
    queries = centres[rng.integers(0, 50, 100)] + 0.35 * rng.standard_normal((100, DIM)).astype(np.float32)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    hits = 0
    for q in queries:
        truth = set(np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10].tolist())
        r = client.post("/v1/collections/recall/search?k=10", json={"vector": q.tolist()})
        got = {int(x["id"]) for x in r.json()["results"]}
        hits += len(got & truth)
    recall = hits / 1000
    assert recall >= 0.95, recall


# ---------------------------------------------------------------------------------------------- binding to the model


def test_collection_bound_to_its_model(models, fresh_dir: Path) -> None:
    """A collection made with "tiny" answers 409 to adds and image searches once "tiny" is other weights or is
    not loaded; searches by id and by vector still work."""
    data = fresh_dir / "data"
    png = digit_png(2)
    with TestClient(create_app(settings_for(models, "tiny", data_dir=str(data)))) as c:
        wait_ready(c)
        c.post("/v1/collections", json={"name": "bound"})
        assert c.post(
            "/v1/collections/bound/images?id=a", content=png, headers={"content-type": "image/png"}
        ).is_success
        c.post("/v1/collections/bound/vectors", json={"items": [{"id": "b", "vector": [0.5] * DIM}]})
    retrained = {"tiny": models["retrained"], "other": models["other"]}
    for settings in (
        settings_for(retrained, "tiny", data_dir=str(data)),
        settings_for(models, "other", data_dir=str(data)),
    ):
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            r = c.post("/v1/collections/bound/images?id=c", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 409 and error(r) == "conflict", r.text
            r = c.post("/v1/collections/bound/search", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 409
            r = c.post("/v1/collections/bound/search", json={"image": base64.b64encode(png).decode()})
            assert r.status_code == 409
            r = c.post("/v1/collections/bound/search", json={"id": "a"})
            assert r.status_code == 200 and [x["id"] for x in r.json()["results"]] == ["b"]
            r = c.post("/v1/collections/bound/search", json={"vector": [0.5] * DIM})
            assert r.status_code == 200 and r.json()["results"][0]["id"] == "b"
            assert c.get("/v1/collections/bound").json()["count"] == 2


# ---------------------------------------------------------------------------------------------- safety


def test_api_key_covers_collections(models, fresh_dir: Path) -> None:
    settings = settings_for(models, "tiny", data_dir=str(fresh_dir / "d"), api_key="sekrit")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for method, path in (("GET", "/v1/collections"), ("POST", "/v1/collections"), ("GET", "/v1/collections/x")):
            r = c.request(method, path, json={"name": "x"})
            assert r.status_code == 401 and error(r) == "unauthorized"
        ok = c.get("/v1/collections", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200


def test_unreachable_database_is_503_without_credentials(models, caplog: pytest.LogCaptureFixture) -> None:
    url = "postgresql://someone:hunter2pw@127.0.0.1:1/vectors"
    settings = settings_for(models, "tiny", collections_url=url)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.get("/v1/collections")
        assert r.status_code == 503 and error(r) == "not_ready"
        assert "hunter2pw" not in r.text and "someone" not in r.text and url not in r.text
        assert c.get("/healthz").status_code == 200
    assert "hunter2pw" not in caplog.text and url not in caplog.text


def test_embedded_server_is_private(client: TestClient, data_dir: Path) -> None:
    """The socket sits in the 0700 data folder of PostgreSQL, which accepts connections through it only."""
    client.get("/v1/collections")
    pgdata = data_dir / "postgres"
    assert stat.S_IMODE(os.stat(pgdata).st_mode) == 0o700
    assert (pgdata / ".s.PGSQL.5432").is_socket()
    hba = [line.split() for line in (pgdata / "pg_hba.conf").read_text().splitlines() if line and line[0] != "#"]
    assert hba and all(line[0] == "local" for line in hba)
    assert "listen_addresses = ''" in (pgdata / "postgresql.auto.conf").read_text()


def test_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.__main__ import parse_settings

    s = parse_settings(["--data-dir", "/srv/vitserve", "--collections-url", "postgresql://u:p@db:5432/v"])
    assert (s.data_dir, s.collections_url) == ("/srv/vitserve", "postgresql://u:p@db:5432/v")
    monkeypatch.setenv("VIT_COLLECTIONS_URL", "postgresql://other@db/v")
    monkeypatch.setenv("VIT_DATA_DIR", "/var/lib/vitserve")
    s = parse_settings([])
    assert (s.data_dir, s.collections_url) == ("/var/lib/vitserve", "postgresql://other@db/v")
    assert parse_settings(["--collections-url", "postgresql://flag@db/v"]).collections_url == "postgresql://flag@db/v"


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/collections"]) == {"get", "post"}
    search = paths["/v1/collections/{name}/search"]["post"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(search["requestBody"]["content"])
    assert {p["name"] for p in search["parameters"]} == {"name", "k"}
    images = paths["/v1/collections/{name}/images"]["post"]["requestBody"]["content"]
    assert images["application/json"]["schema"]["properties"]["items"]["items"]["required"] == ["image"]
    assert "/v1/collections/{name}/items/{item_id}/thumbnail" in paths
