"""Hostile clients against the real app: what once answered 500, bodies that hold millions of values, images whose
header promises an expensive decode, and the API key and the documentation routes it guards."""

from __future__ import annotations

import base64
import os

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from http_support import encode, settings_for, wait_ready
from PIL import Image
from starlette.datastructures import Headers
from test_decode import isolated_processes, many_scans_jpeg
from test_errors import error

from app.http.envelope import key_matches
from app.http.factory import create_app
from app.http.pipeline import INLINE_SEPARATORS, parse_off_loop

INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def png(real_photos) -> bytes:
    return encode(real_photos["chelsea"].resize((64, 48)), "PNG")


def v2_error(r, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- what answered 500 -----------------------------------------------------------------------------------------


def test_a_multipart_boundary_longer_than_the_parser_takes_is_422(client, png):
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'.encode()
    body += png + f"\r\n--{boundary}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    err = error(client.post("/v1/classify", content=body, headers=headers), 422, "invalid_request")
    assert "multipart" in err["message"] and "256" in err["message"]


@pytest.mark.parametrize(
    "shape, words",
    [
        ([0, 2**40, 2**40], "larger than any request"),
        ([1] * 70, "at most 8"),
    ],
)
def test_v2_shapes_beyond_any_tensor_are_422(client, shape, words):
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": shape, "data": []}]}
    assert words in v2_error(client.post(INFER, json=body), 422)


def test_v2_bytes_nested_deeper_than_the_stack_is_422(client, png):
    image = base64.b64encode(png)
    data = b"[" * 970 + b'"' + image + b'"' + b"]" * 970
    body = b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ' + data + b"}]}"
    headers = {"content-type": "application/json"}
    assert "nested deeper" in v2_error(client.post(INFER, content=body, headers=headers), 422)
    nested = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 1], "data": [[image.decode()]]}]}
    assert "nested deeper" not in client.post(INFER, json=nested).text  # as deep as its shape: read as usual


# -- errors that point to the fix, one data-URL rule ------------------------------------------------------------


@pytest.mark.parametrize("field", ["image", "file"])
def test_a_multipart_file_under_another_name_names_the_field_expected_and_those_sent(client, png, field):
    files = [(field, ("cat.png", png, "image/png")), ("note", (None, b"hello"))]
    err = error(client.post("/v1/classify", files=files), 422, "invalid_request")
    assert "'images'" in err["message"] and f"'{field}'" in err["message"] and "'note'" in err["message"]
    assert "no images in the request" not in err["message"]


def test_a_data_url_that_is_not_base64_is_refused_alike_by_v1_and_v2(client, png):
    url = "data:image/png," + base64.b64encode(png).decode()  # no ';base64': not what it says
    v1 = error(client.post("/v1/classify", json={"images": [url]}), 400, "invalid_image")
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [url]}]}
    assert "must be base64" in v1["message"] and "must be base64" in v2_error(client.post(INFER, json=v2), 400)
    good = "data:image/png;base64," + base64.b64encode(png).decode()
    assert client.post("/v1/classify", json={"images": [good]}).status_code == 200
    v2["inputs"][0]["data"] = [good]
    assert client.post(INFER, json=v2).status_code == 200


# -- bodies of millions of values ------------------------------------------------------------------------------


def test_multipart_parts_are_counted_before_parsing(client):
    boundary = "x"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="e"\r\n\r\n\r\n'
    body = (part * 200_000 + f"--{boundary}--\r\n").encode()  # 200,000 empty parts, 13 MB
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    err = error(client.post("/v1/classify", content=body, headers=headers), 413, "payload_too_large")
    assert "200,000 multipart parts" in err["message"]


def test_v2_rows_are_counted_from_the_shape_before_the_data(client):
    binary = b"\x00\x00\x00\x00" * 5_000_000  # 5 M empty BYTES elements, read no further than the shape says
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(binary)}}
            ]
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
    assert "holds 1 elements" in v2_error(client.post(INFER, content=header + binary, headers=headers), 422)
    many = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [6_000], "data": [""] * 6_000}]}
    assert "6000 images" in v2_error(client.post(INFER, json=many), 413)


def test_a_body_of_many_values_is_parsed_in_another_process(client):
    """Where the parse runs is the point: here millions of values would hold the event loop (orjson holds the GIL,
    on a thread too); in a process of their own they cost nothing but that process's time."""

    class Request:  # what parse_off_loop reads of a request
        app = client.app

    async def parsed_by(separators: int) -> int:
        return await parse_off_loop(Request(), separators, os.getpid)  # type: ignore[arg-type]

    assert client.portal.call(parsed_by, INLINE_SEPARATORS) == os.getpid()  # type: ignore[union-attr]
    assert client.portal.call(parsed_by, INLINE_SEPARATORS + 1) != os.getpid()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/classify", {"images": [""] * 6_000}),
        (INFER, {"inputs": [{"name": "p", "datatype": "FP32", "shape": [6_000, 3, 32, 32], "data": [[0]] * 6_000}]}),
    ],
)
def test_a_json_body_of_many_values_is_refused_for_its_count(client, path, body):
    r = client.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "6000 images" in r.text


# -- images: the limits the app was started with ---------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(checkpoints):
    settings = settings_for(checkpoints, "tiny", max_decoded_bytes=30_000, max_jpeg_scans=5)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_the_decoded_bytes_and_jpeg_scans_flags_apply(limited):
    grey16 = encode(Image.fromarray(np.zeros((100, 200), np.uint16)), "PNG")  # 40,000 bytes once decoded
    err = error(
        limited.post("/v1/classify", content=grey16, headers={"content-type": "image/png"}), 400, "image_too_large"
    )
    assert "30,000" in err["message"]
    grey8 = encode(Image.new("L", (200, 100)), "PNG")
    assert limited.post("/v1/classify", content=grey8, headers={"content-type": "image/png"}).status_code == 200
    crafted = many_scans_jpeg(64, 10)
    err = error(
        limited.post("/v1/classify", content=crafted, headers={"content-type": "image/jpeg"}), 400, "invalid_image"
    )
    assert "more than 5 scans" in err["message"]


# -- the API key -----------------------------------------------------------------------------------------------

KEY = "clé-für-ünïcode"


@pytest.fixture(scope="module")
def keyed(checkpoints):
    with TestClient(create_app(settings_for(checkpoints, "tiny", api_key=KEY))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def guarded(checkpoints):
    with TestClient(create_app(settings_for(checkpoints, "tiny", api_key=KEY, protect_docs=True))) as c:
        wait_ready(c)
        yield c


def bearer(key: str) -> dict[str, bytes]:
    return {"authorization": b"Bearer " + key.encode("utf-8")}


def test_a_non_ascii_key_matches_its_utf8_form_only(keyed, png):
    raw = {"content-type": "image/png"}
    assert keyed.post("/v1/classify", content=png, headers={**raw, **bearer(KEY)}).status_code == 200
    error(keyed.post("/v1/classify", content=png, headers=raw), 401, "unauthorized")
    # the test client re-encodes header values as UTF-8, so the Latin-1 form is checked on the headers as received
    latin1 = Headers(raw=[(b"authorization", b"Bearer " + KEY.encode("latin-1"))])
    assert key_matches(Headers(raw=[(b"authorization", bearer(KEY)["authorization"])]), KEY)
    assert not key_matches(latin1, KEY)


DOCS = ("/metrics", "/docs", "/redoc", "/openapi.json")
OPEN = ("/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")


def test_docs_and_metrics_stay_open_with_a_key_unless_protected(keyed, guarded):
    for path in DOCS + OPEN:
        assert keyed.get(path).status_code == 200, path
    for path in DOCS:
        error(guarded.get(path), 401, "unauthorized")
        assert guarded.get(path, headers=bearer(KEY)).status_code == 200, path
    for path in OPEN:
        assert guarded.get(path).status_code == 200, path


def test_a_slow_decode_ends_with_its_504(checkpoints, png):
    """A JPEG the limits allow here (2000 scans) but which would take many seconds: the request gets its 504 at the
    deadline and the decode is stopped with it, so the decode thread is free for the next request at once."""
    import time

    settings = settings_for(checkpoints, "tiny", max_jpeg_scans=2000, request_timeout_s=1.0)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        slow = many_scans_jpeg(4000, 1990)
        started = time.monotonic()
        r = c.post("/v1/classify", content=slow, headers={"content-type": "image/jpeg"})
        error(r, 504, "timeout")
        assert c.post("/v1/classify", content=png, headers={"content-type": "image/png"}).status_code == 200
        assert time.monotonic() - started < 5.0
        deadline = time.monotonic() + 5.0
        while isolated_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not isolated_processes()
