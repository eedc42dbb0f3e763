"""Generated bad input against the real app: whatever arrives, the answer is a 2xx or a 4xx JSON error, never a 5xx.

Hypothesis builds query strings, image bytes (real PNG / JPEG / GIF / WebP / BMP / TIFF files with bytes flipped,
cut or inserted), multipart and JSON bodies, and Open Inference Protocol requests. Failing examples are shrunk and
printed, so a regression names its input.
"""

from __future__ import annotations

import base64
import io
import os
from urllib.parse import quote

from http_support import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

# FUZZ_EXAMPLES=2000 for a deeper search than the suite's default
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
POSTS = ["/v1/classify", "/v1/embed", "/v1/attention", "/v1/attention-distance"]
PARAMS = ["top_k", "model", "format", "method", "layer", "head", "pool", "normalize", "encoding"]


def seed_images() -> dict[str, bytes]:
    """One small real image per decoded format (a crop of a photograph, so the files carry real entropy data)."""
    from skimage import data

    image = Image.fromarray(data.chelsea()).crop((100, 50, 164, 98))
    return {
        "image/png": encode(image, "PNG"),
        "image/jpeg": encode(image, "JPEG", quality=85),
        "image/gif": encode(image.convert("P"), "GIF"),
        "image/webp": encode(image, "WEBP"),
        "image/bmp": encode(image, "BMP"),
        "image/tiff": encode(image, "TIFF"),
    }


SEEDS = seed_images()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few bytes flipped, a slice cut out, random bytes inserted, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del out[at:]
    return bytes(out)


image_bytes = st.one_of(
    st.sampled_from(sorted(SEEDS)).flatmap(lambda kind: mutated(SEEDS[kind])),
    st.binary(max_size=256),
)
param_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["png", "json", "rollout", "cls", "mean", "true", "false", "base64", "float", "nan", "-1", "0"]),
)


def assert_handled(r) -> None:
    """Not a server fault: a success, or a 4xx with API.md's error envelope."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]


@FUZZ
@given(
    url=st.sampled_from(POSTS),
    params=st.dictionaries(st.sampled_from([*PARAMS, "unknown"]), param_values, max_size=4),
)
def test_any_query_string(client, url, params):
    assert_handled(client.post(url, params=params, content=SEEDS["image/png"], headers={"content-type": "image/png"}))


@FUZZ
@given(
    path=st.sampled_from(["/v1/models/{}", "/v1/models/{}/position-similarity"]),
    name=st.one_of(st.sampled_from(["tiny", "headless"]), st.text(min_size=1, max_size=12)),
    fmt=param_values,
)
def test_any_model_name_and_format_on_the_get_routes(client, path, name, fmt):
    if "/" in name or name in (".", ".."):
        name = "x" + name.replace("/", "_")  # a path separator changes the route, not the input
    assert_handled(client.get(path.format(quote(name, safe="")), params={"format": fmt}))


@FUZZ
@given(url=st.sampled_from(POSTS), kind=st.sampled_from([*SEEDS, "application/octet-stream"]), body=image_bytes)
def test_any_image_bytes_as_the_body(client, url, kind, body):
    assert_handled(client.post(url, content=body, headers={"content-type": kind}))


@FUZZ
@given(images=st.lists(image_bytes, min_size=1, max_size=3), cut=st.integers(0, 2000), extra=st.binary(max_size=64))
def test_any_multipart_body(client, images, cut, extra):
    files = [("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
    files.append(("images", ("good.png", SEEDS["image/png"], "image/png")))
    request = client.build_request("POST", "/v1/classify", files=files)
    body = request.read()
    # the real body cut short somewhere, with junk appended: a broken boundary, header or part
    broken = body[: max(0, len(body) - cut)] + extra
    assert_handled(
        client.post("/v1/classify", content=broken, headers={"content-type": request.headers["content-type"]})
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    doc=st.one_of(
        json_values,
        st.fixed_dictionaries({"images": st.lists(json_values, max_size=3)}),
        st.fixed_dictionaries(
            {"images": st.lists(image_bytes.map(lambda b: base64.b64encode(b).decode()), max_size=3)}
        ),
    )
)
def test_any_json_body(client, doc):
    assert_handled(client.post("/v1/embed", json=doc))


v2_inputs = st.fixed_dictionaries(
    {
        "name": st.text(max_size=8),
        "datatype": st.sampled_from(["BYTES", "UINT8", "FP32", "FP16", "INT64", "nonsense"]),
        "shape": st.lists(st.integers(-2, 40), max_size=5),
        "data": json_values,
    },
    optional={"parameters": st.dictionaries(st.text(max_size=12), json_values, max_size=2)},
)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {"inputs": st.lists(v2_inputs, max_size=2)},
        optional={
            "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=20)}), max_size=3),
            "id": json_values,
        },
    ),
    model=st.sampled_from(["tiny", "headless", "nope"]),
)
def test_any_open_inference_protocol_request(client, body, model):
    r = client.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)  # the v2 protocol's own error shape


def test_the_seed_images_decode_before_they_are_broken(client):
    # the mutations start from valid files: each one, untouched, is a 200
    for kind, data in SEEDS.items():
        r = client.post("/v1/classify", content=data, headers={"content-type": kind})
        assert r.status_code == 200, (kind, r.text)
    assert Image.open(io.BytesIO(SEEDS["image/gif"])).format == "GIF"
