"""Every status and code of the contract's error table, in the exact envelope, from the real app.

400, 401, 404, 405, 413, 415, 422 here; 500, 503 (overloaded, not_ready) and 504 in test_serving.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from fastapi.testclient import TestClient
from http_support import asgi_call, encode, serve, settings_for, wait_ready
from test_decode import bomb_png

from app.http.factory import create_app

RAW = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def png(real_photos) -> bytes:
    return encode(real_photos["chelsea"], "PNG")


@pytest.fixture(scope="module")
def jpeg(real_photos) -> bytes:
    return encode(real_photos["coffee"], "JPEG")


@pytest.fixture(scope="module")
def strict(checkpoints):
    """An app with an API key and small limits."""
    settings = settings_for(
        checkpoints, "tiny", api_key="s3cret", max_upload_bytes=300_000, max_images_per_request=3, max_queue=8
    )
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = "Bearer s3cret"
        wait_ready(c)
        yield c


def error(r, status: int, code: str) -> dict:
    """Assert the envelope: exactly {"error": {"code", "message", ...}} with a sentence for a person."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert r.headers.get("x-request-id")
    return err


# -- 400 -----------------------------------------------------------------------------------------------


def test_400_invalid_image_names_index_and_filename(client, png, jpeg):
    files = [
        ("images", ("good.png", png, "image/png")),
        ("images", ("cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")),
        ("images", ("good.jpg", jpeg, "image/jpeg")),
    ]
    err = error(client.post("/v1/classify", files=files), 400, "invalid_image")
    assert (err["index"], err["filename"]) == (1, "cut.jpg")
    assert "truncated" in err["message"]


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a broken", b"not an image at all", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x89PNG\r\n\x1a\n\x00"],
    ids=["empty", "corrupt-gif", "text", "eps", "png-garbage"],
)
def test_400_undecodable_unsupported_or_zero_sized(client, data):
    files = [("images", ("x.bin", data, "application/octet-stream"))]
    err = error(client.post("/v1/embed", files=files), 400, "invalid_image")
    assert err["index"] == 0 and err["filename"] == "x.bin"


def test_400_zero_sized(client):
    error(client.post("/v1/classify", content=bomb_png(0, 5), headers=RAW), 400, "invalid_image")


def test_400_bad_base64_is_an_invalid_image(client, png):
    body = {"images": [base64.b64encode(png).decode(), "!!! not base64 !!!"]}
    err = error(client.post("/v1/classify", json=body), 400, "invalid_image")
    assert err["index"] == 1 and err["filename"] is None


def test_400_image_too_large_is_refused_from_the_header(client):
    bomb = bomb_png(10_000, 5_000)  # 50 M pixels, about 60 kB on the wire
    err = error(client.post("/v1/classify", content=bomb, headers=RAW), 400, "image_too_large")
    assert err["index"] == 0 and "40,000,000" in err["message"]


# -- 401 -----------------------------------------------------------------------------------------------


def test_401_without_or_with_a_wrong_key(strict, png):
    for auth in (None, "Bearer wrong", "Basic s3cret", "Bearer", "s3cret"):
        headers = {**RAW, "Authorization": auth} if auth else RAW
        r = strict.post("/v1/classify", content=png, headers=headers) if auth else _no_auth(strict, png)
        err = error(r, 401, "unauthorized")
        assert "Bearer" in err["message"] and r.headers["www-authenticate"] == "Bearer"
    error(_no_auth(strict, png, "GET", "/v1/models"), 401, "unauthorized")


def _no_auth(client, png, method="POST", url="/v1/classify"):
    headers = {k: v for k, v in client.headers.items() if k.lower() != "authorization"}
    request = client.build_request(method, url, content=png if method == "POST" else None, headers={**headers, **RAW})
    request.headers.pop("authorization", None)
    return client.send(request)


def test_the_key_opens_v1_and_health_stays_open(strict, png):
    assert strict.post("/v1/classify", content=png, headers=RAW).status_code == 200
    for url in ("/healthz", "/readyz", "/metrics"):
        assert _no_auth(strict, png, "GET", url).status_code == 200


# -- 404 / 405 -----------------------------------------------------------------------------------------


def test_404_model_not_found(client, png):
    err = error(client.post("/v1/classify?model=nope", content=png, headers=RAW), 404, "model_not_found")
    assert "tiny" in err["message"]  # lists what is loaded
    error(client.get("/v1/models/nope"), 404, "model_not_found")
    error(client.get("/v1/models/nope/position-similarity"), 404, "model_not_found")
    # a model parameter is a name, never a path
    error(client.post("/v1/classify?model=../../etc/passwd", content=png, headers=RAW), 404, "model_not_found")
    # an unknown name is quoted back cut short, not echoed whole
    err = error(client.post(f"/v1/classify?model={'x' * 20_000}", content=png, headers=RAW), 404, "model_not_found")
    assert len(err["message"]) < 300


def test_no_message_echoes_a_long_input_whole(client):
    """Messages quote what the client sent (a path, a tensor's name), cut to 500 characters at most."""
    long_path = error(client.get("/v1/" + "p" * 20_000), 404, "not_found")["message"]
    assert len(long_path) == 500 and long_path.endswith("…")
    tensor = {"name": "n" * 100_000, "datatype": "FP128", "shape": [1], "data": [1]}
    r = client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
    assert r.status_code == 422 and len(r.json()["error"]) == 500


def test_404_not_found_and_405_method_not_allowed(client):
    error(client.get("/v3/nothing/here"), 404, "not_found")  # under /v2 errors take the v2 protocol's shape
    error(client.post("/v1/unknown"), 404, "not_found")
    r = client.get("/v1/classify")
    err = error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST" and "POST" in err["message"]
    error(client.delete("/healthz"), 405, "method_not_allowed")


# -- 413 -----------------------------------------------------------------------------------------------


def test_413_body_over_the_limit_by_content_length(strict):
    big = b"\xff\xd8\xff" + b"\0" * 400_000
    err = error(
        strict.post("/v1/classify", content=big, headers={"content-type": "image/jpeg"}), 413, "payload_too_large"
    )
    assert "300,000" in err["message"]


def test_413_streamed_body_is_cut_off_while_reading(checkpoints):
    app = create_app(settings_for(checkpoints, "tiny", max_upload_bytes=300_000))

    async def main():
        async with serve(app):
            chunks = (b"\0" * 65536 for _ in range(1000))  # a 64 MB chunked upload, no Content-Length
            return await asgi_call(app, "POST", "/v1/classify", {"content-type": "image/jpeg"}, chunks)

    out = asyncio.run(main())
    assert out["status"] == 413 and b"payload_too_large" in out["body"]
    assert out["pulled"] <= 5  # read up to the limit (300 kB = 5 chunks), never the rest


def test_413_too_many_images(strict, png):
    small = encode(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8)), "PNG")
    files = [("images", (f"{i}.png", small, "image/png")) for i in range(4)]
    err = error(strict.post("/v1/classify", files=files), 413, "payload_too_large")
    assert "at most 3" in err["message"]
    body = {"images": [base64.b64encode(small).decode()] * 4}
    error(strict.post("/v1/classify", json=body), 413, "payload_too_large")


# -- 415 -----------------------------------------------------------------------------------------------


def test_415_unsupported_media_type(client, png):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        error(client.post("/v1/classify", content=png, headers={"content-type": ctype}), 415, "unsupported_media_type")
    r = client.post("/v1/classify", content=png, headers={"content-type": ""})
    error(r, 415, "unsupported_media_type")


# -- 422 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/v1/classify?top_k=0",
        "/v1/classify?top_k=11",  # the tiny model has 10 classes
        "/v1/classify?top_k=abc",
        "/v1/classify?model=headless",  # no classification head
        "/v1/embed?pool=max",
        "/v1/embed?normalize=perhaps",
        "/v1/embed?encoding=hex",
        "/v1/attention?method=gradcam",
        "/v1/attention?method=cls&layer=2",  # depth 2: layers -2..1
        "/v1/attention?method=cls&layer=-3",
        "/v1/attention?method=cls&head=2",  # 2 heads: 0..1
        "/v1/attention?method=cls&head=-1",
        "/v1/attention?method=cls&head=first",
        "/v1/attention?format=gif",
        "/v1/attention-distance?format=svg",
    ],
)
def test_422_bad_parameters(client, png, url):
    err = error(client.post(url, content=png, headers=RAW), 422, "invalid_request")
    assert "Input should" in err["message"] or "between" in err["message"] or "head" in err["message"]


def test_422_bad_position_similarity_format(client):
    error(client.get("/v1/models/tiny/position-similarity?format=jpeg"), 422, "invalid_request")


def test_422_no_images_and_malformed_bodies(client, png):
    error(client.post("/v1/classify", content=b"", headers=RAW), 422, "invalid_request")
    error(client.post("/v1/classify", json={"images": []}), 422, "invalid_request")
    error(client.post("/v1/classify", json={"pictures": ["x"]}), 422, "invalid_request")
    error(client.post("/v1/classify", json={"images": "abc"}), 422, "invalid_request")
    error(client.post("/v1/classify", json={"images": [42]}), 422, "invalid_request")
    error(client.post("/v1/classify", json=["x"]), 422, "invalid_request")
    err = error(
        client.post("/v1/classify", content=b'{"images": [', headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    assert "JSON" in err["message"]
    files = [("other", ("a.png", png, "image/png"))]  # a form without an 'images' part
    error(client.post("/v1/classify", files=files), 422, "invalid_request")
    bad = b"--xyz\r\nContent-Disposition: form-data; name=images\r\n\r\nabc"  # never closed
    r = client.post("/v1/classify", content=bad, headers={"content-type": "multipart/form-data"})  # no boundary
    error(r, 422, "invalid_request")


def test_422_png_takes_one_image(client, png):
    files = [("images", ("a.png", png, "image/png")), ("images", ("b.png", png, "image/png"))]
    err = error(client.post("/v1/attention?format=png", files=files), 422, "invalid_request")
    assert "one image" in err["message"]
    error(client.post("/v1/attention-distance?format=png", files=files), 422, "invalid_request")


# -- request ids, the log line -------------------------------------------------------------------------


def test_every_response_carries_a_request_id(client, png):
    r = client.post("/v1/classify", content=png, headers={**RAW, "X-Request-ID": "client-id-42"})
    assert r.headers["x-request-id"] == "client-id-42"
    r = client.get("/nope", headers={"X-Request-ID": "abc"})
    assert r.headers["x-request-id"] == "abc"
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3  # new ones when the client sends none
    injected = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert injected.headers["x-request-id"] != "bad id\twith spaces" + "x" * 200


def test_one_log_line_per_request(client, png, caplog):
    caplog.set_level(logging.INFO, logger="vitserve.access")
    client.post("/v1/classify?model=other", files=[("images", ("a.png", png, "image/png"))] * 2,
                headers={"X-Request-ID": "log-me"})  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "vitserve.access" and "log-me" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    for part in ("log-me", "POST", "/v1/classify", "model=other", "images=2", "status=200", "duration_ms="):
        assert part in line


def test_log_lines_show_routes_and_unmatched_paths_alike(client, caplog):
    """A route's template and a path that matched no route are both written bare, the latter escaped."""
    caplog.set_level(logging.INFO, logger="vitserve.access")
    client.get("/static/app.js", headers={"X-Request-ID": "log-route"})
    client.get("/no%20where%0Aforged%20line", headers={"X-Request-ID": "log-path"})  # decoded by the server
    lines = {r.getMessage().split()[0]: r.getMessage() for r in caplog.records if r.name == "vitserve.access"}
    assert " GET /static/{name} " in lines["log-route"]
    assert " GET /no\\x20where\\nforged\\x20line " in lines["log-path"], lines["log-path"]
    assert "'" not in lines["log-path"] and "\n" not in lines["log-path"]
