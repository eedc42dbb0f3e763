"""The Open Inference Protocol (KServe v2 / Triton REST) on the same models, batchers and limits as /v1.

Routes: `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `GET /v2/models/{name}`, `GET /v2/models/{name}/ready`,
`POST /v2/models/{name}/infer` (each model route also under `/versions/1`, the only version a model has).

One input tensor per request, told apart by its datatype (the names in the metadata are suggestions):
- `BYTES [N]` (or `[N, 1]`): encoded images, decoded and preprocessed exactly as /v1 does;
- `UINT8 [N, H, W, 3]`: RGB pixels of any size, run through the model's preprocessing like a decoded image;
- `FP32 [N, 3, H, W]`: already preprocessed, H x W the model's input size; goes straight to the forward.
Outputs as the request's `outputs` asks (default `probabilities`, or `embedding` for a model without a
head): `probabilities`, `logits`, `embedding`, `attention_rollout`, each FP32; Triton's classification
extension (`parameters.classification = k`) turns probabilities or logits into the top k as BYTES
`"<value>:<index>:<label>"`.

Limits and status codes are /v1's (API.md's table): 401 without the API key on `/v2/models/...` (health
and server metadata stay open, like /healthz), 404 unknown model, 413 body or image count over the caps,
503 overloaded (with Retry-After) or not ready, 504 past the request timeout; 400 for image data that
cannot be used (undecodable bytes, zero-sized or oversized pixels, an FP32 tensor not at the model's size
or not finite); 422 for a malformed request (JSON, datatypes, shapes, unknown outputs). Every error is the
protocol's `{"error": "<message>"}`: `app.http.envelope` gives every /v2 path that shape, whoever raised it.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request
from PIL import Image
from starlette.responses import Response

from app.batching import Admission
from app.decode import ImageError, check_resize, check_size, model_input
from app.http.envelope import ApiError, CheckedRoute, FastJSON, image_error, invalid, note, require_ready, state_of
from app.http.pipeline import (
    Upload,
    decode_uploads,
    expect,
    guarded,
    parse_off_loop,
    pick_model,
    read_body,
    reserve,
    run_items,
    to_item,
    too_many,
)
from app.http.schemas import (
    EXAMPLES,
    V1_CHECKS,
    V1_IMAGES,
    V2_INFER_BODY,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    errors,
    ok,
)
from app.http.state import ServedModel, ServerState
from app.http.v2_codec import (
    HEADER_LENGTH,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    decompress,
    json_part_length,
    parse_request,
)
from app.http.v2_codec import encode_response as encode
from app.preprocess import PreprocessConfig
from app.tasks import Item, Tensors, top_k

VERSION = "1"  # a served model has one version
EXTENSIONS = ["binary_tensor_data", "classification"]
HEAD_OUTPUTS = ("probabilities", "logits")

router = APIRouter(prefix="/v2", tags=["v2"])  # server metadata and health: open to all
model_router = APIRouter(prefix="/v2", route_class=CheckedRoute, tags=["v2"])  # /v2/models/...: key, readiness
Name = Annotated[str, Path(description="a loaded model's name")]
Version = Annotated[str, Path(description="the model's version (always 1)")]
V2_METADATA = {**ok(V2ModelMetadata, EXAMPLES["v2_metadata"]), **errors(*V1_CHECKS, 404, v2=True)}
V2_MODEL_READY = {**ok(V2ModelReady, {"name": "mnist-vit", "ready": True}), **errors(*V1_CHECKS, 404, v2=True)}
V2_INFER = {**ok(V2InferResponse, EXAMPLES["v2_infer"]), **errors(*V1_IMAGES, v2=True)}


# -- server ----------------------------------------------------------------------------------------------


@router.get(
    "",
    response_model=None,
    responses={
        **ok(V2ServerMetadata, {"name": "vitserve", "version": "0.1.0", "extensions": EXTENSIONS}),
        **errors(500, v2=True),
    },
)
async def server_metadata(request: Request) -> Response:
    return FastJSON({"name": "vitserve", "version": request.app.version, "extensions": EXTENSIONS})


@router.get("/health/live", response_model=None, responses={**ok(V2Live, {"live": True}), **errors(500, v2=True)})
async def live() -> Response:
    return FastJSON({"live": True})


@router.get(
    "/health/ready", response_model=None, responses={**ok(V2Ready, {"ready": True}), **errors(500, 503, v2=True)}
)
async def ready(request: Request) -> Response:
    """200 once every model is loaded and warm (as /readyz); 503 while loading or draining."""
    require_ready(request)
    return FastJSON({"ready": True})


# -- models ----------------------------------------------------------------------------------------------


def find_model(state: ServerState, name: str, version: str | None = None) -> ServedModel:
    served = pick_model(state, name)  # a path segment: never empty
    if version is not None and version != VERSION:
        raise ApiError(404, "model_not_found", f"model {name!r} has no version {version[:40]!r}; its only version is 1")
    return served


def model_metadata(served: ServedModel) -> dict:
    cfg = served.config
    h, w = (int(x) for x in cfg.image_size)
    gh, gw = (int(x) for x in cfg.grid)
    outputs = [{"name": n, "datatype": "FP32", "shape": [-1, served.num_classes]} for n in HEAD_OUTPUTS]
    outputs = outputs if served.num_classes else []
    outputs += [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, served.model.embedding_dim]},
        {"name": "attention_rollout", "datatype": "FP32", "shape": [-1, gh, gw]},
    ]
    return {
        "name": served.name,
        "versions": [VERSION],
        "platform": "pytorch",
        # one of these per request (told apart by datatype): encoded images, RGB pixels, preprocessed pixels
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, h, w]},
        ],
        "outputs": outputs,
    }


@model_router.get("/models/{name}", response_model=None, responses=V2_METADATA)
async def get_model(request: Request, name: Name) -> Response:
    return FastJSON(model_metadata(find_model(state_of(request), name)))


@model_router.get("/models/{name}/versions/{version}", response_model=None, responses=V2_METADATA)
async def get_model_version(request: Request, name: Name, version: Version) -> Response:
    return FastJSON(model_metadata(find_model(state_of(request), name, version)))


@model_router.get("/models/{name}/ready", response_model=None, responses=V2_MODEL_READY)
async def model_ready(request: Request, name: Name) -> Response:
    find_model(state_of(request), name)
    return FastJSON({"name": name, "ready": True})


@model_router.get("/models/{name}/versions/{version}/ready", response_model=None, responses=V2_MODEL_READY)
async def model_version_ready(request: Request, name: Name, version: Version) -> Response:
    find_model(state_of(request), name, version)
    return FastJSON({"name": name, "ready": True})


@model_router.post("/models/{name}/infer", response_model=None, responses=V2_INFER, openapi_extra=V2_INFER_BODY)
async def infer(request: Request, name: Name) -> Response:
    return await _infer(request, name, None)


@model_router.post(
    "/models/{name}/versions/{version}/infer", response_model=None, responses=V2_INFER, openapi_extra=V2_INFER_BODY
)
async def infer_version(request: Request, name: Name, version: Version) -> Response:
    return await _infer(request, name, version)


# -- inference -------------------------------------------------------------------------------------------


async def _infer(request: Request, name: str, version: str | None) -> Response:
    state = state_of(request)
    settings = state.settings
    served = find_model(state, name, version)
    note(request.scope, model=served.name)
    with reserve(served) as admission:
        body = await read_body(request, settings.max_upload_bytes)
        body = decompress(body, request.headers.get("content-encoding"), settings.max_upload_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        separators = body.count(b",", 0, json_part_length(body, header_length))  # in the JSON part, before parsing it
        req = await parse_off_loop(
            request, separators, parse_request, body, header_length, settings.max_images_per_request
        )
        tensor = the_images(req.inputs, served, state)
        outputs = requested_outputs(req.outputs, served)
        n = tensor.shape[0]
        note(request.scope, images=n)
        task = Tensors(tuple(dict.fromkeys(o.name for o in outputs)))
        expect(admission, n)
        timeout = min(settings.request_timeout_s, req.timeout_s or settings.request_timeout_s)  # the shorter wins
        results = await guarded(request, _run(request, state, served, tensor, task, admission), timeout)
    header = {"model_name": served.name, "model_version": VERSION}
    if req.id is not None:
        header["id"] = req.id
    tensors = [_output_tensor(o, results, served, req.binary_output) for o in outputs]
    content, json_length = encode(header, tensors)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


def the_images(inputs: list[InputTensor], served: ServedModel, state: ServerState) -> InputTensor:
    """The request's one input, checked against the three accepted forms and the limits."""
    if len(inputs) != 1:
        raise invalid(f"send exactly one input tensor (BYTES, UINT8 or FP32); this request has {len(inputs)}")
    t = inputs[0]
    shape, where = t.shape, f"input {t.name!r}"
    h, w = (int(x) for x in served.config.image_size)
    if t.datatype == "BYTES" and (len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1)):
        raise invalid(f"{where}: a BYTES input holds one encoded image per row: shape [N] or [N, 1], not {list(shape)}")
    if t.datatype == "UINT8" and (len(shape) != 4 or shape[3] != 3):
        raise invalid(f"{where}: a UINT8 input is RGB pixels of shape [N, H, W, 3], not {list(shape)}")
    if t.datatype == "FP32" and (len(shape) != 4 or shape[1] != 3):
        raise invalid(f"{where}: an FP32 input is preprocessed pixels of shape [N, 3, {h}, {w}], not {list(shape)}")
    n, limit = shape[0], state.settings.max_images_per_request
    if n == 0:
        raise invalid("no images in the request: send at least one")
    if n > limit:
        raise too_many(n, limit)
    if t.datatype == "UINT8":
        _check_pixels(shape[1], shape[2], served.model.preprocess_config, state.settings.max_image_pixels, where)
    if t.datatype == "FP32":
        if tuple(shape[2:]) != (h, w):
            message = (
                f"{where}: preprocessed pixels must be {h} x {w} (the model's input size), not {shape[2]} x {shape[3]}"
            )
            raise ApiError(400, "invalid_image", message)
        if not np.isfinite(t.data).all():  # type: ignore[arg-type]
            raise ApiError(400, "invalid_image", f"{where}: the preprocessed pixels hold NaN or infinite values")
    return t


def _check_pixels(height: int, width: int, cfg: PreprocessConfig, max_pixels: int, where: str) -> None:
    """The limits a decoded image meets (app.decode), before any work: size, pixel count, resize cost."""
    try:
        check_size(width, height, max_pixels)
        check_resize((width, height), cfg, max_pixels)
    except ImageError as e:
        raise image_error(e, where=where) from None


def requested_outputs(outputs: list[RequestedOutput] | None, served: ServedModel) -> list[RequestedOutput]:
    """The outputs asked for (checked against the model), or the default one."""
    if not outputs:
        return [RequestedOutput("probabilities" if served.num_classes else "embedding", None, 0)]
    available = [o["name"] for o in model_metadata(served)["outputs"]]
    seen = set()
    for o in outputs:
        if o.name in HEAD_OUTPUTS and not served.num_classes:
            raise invalid(f"model {served.name!r} has no classification head, so no {o.name!r}; ask for 'embedding'")
        if o.name not in available:
            raise invalid(f"unknown output {o.name!r}; model {served.name!r} has {', '.join(available)}")
        if o.name in seen:
            raise invalid(f"output {o.name!r} is asked for twice")
        seen.add(o.name)
        if o.classification and o.name not in HEAD_OUTPUTS:
            raise invalid(f"classification applies to probabilities or logits, not {o.name!r}")
        if o.classification > served.num_classes:
            raise invalid(f"classification must be between 1 and {served.num_classes}, not {o.classification}")
    return outputs


async def _run(
    request: Request, state: ServerState, served: ServedModel, t: InputTensor, task: Tensors, admission: Admission
) -> list[dict]:
    items = await _items(state, served, t, task)
    return await run_items(request, served, items, admission)  # type: ignore[return-value]


async def _items(state: ServerState, served: ServedModel, t: InputTensor, task: Tensors) -> list[Item]:
    """The input tensor -> batcher items: uint8 pixels at the model's input size, or float32 as sent."""
    cfg = served.model.preprocess_config
    if t.datatype == "FP32":
        return [Item(task, tensor=np.ascontiguousarray(x, dtype=np.float32)) for x in t.data]  # type: ignore[union-attr]
    if t.datatype == "UINT8":
        pixels = await asyncio.to_thread(_resize_all, t.data, cfg)
        return [Item(task, pixels=p) for p in pixels]
    decoded, _ = await decode_uploads(state, served, [Upload(data, None) for data in t.data])  # type: ignore[union-attr]
    return [to_item(d, task) for d in decoded]


def _resize_all(pixels: np.ndarray, cfg: PreprocessConfig) -> list[np.ndarray]:
    """UINT8 images -> the model's input size, by the same PIL steps as a decoded image."""
    out = []
    for i, a in enumerate(pixels):
        try:
            out.append(model_input(Image.fromarray(np.ascontiguousarray(a)), cfg))
        except ImageError as e:
            raise image_error(e, i) from None
    return out


def _output_tensor(o: RequestedOutput, results: list[dict], served: ServedModel, binary: bool) -> OutputTensor:
    stacked = np.stack([r[o.name] for r in results]).astype(np.float32, copy=False)
    binary = o.binary if o.binary is not None else binary
    if not o.classification:
        return OutputTensor(o.name, "FP32", stacked.shape, stacked, binary)
    labels = served.model.labels
    rows = []
    for row in stacked:
        top = top_k(row, o.classification)
        rows += [f"{score:f}:{i}:{labels[i]}".encode() for i, score in zip(top.indices, top.scores, strict=True)]
    return OutputTensor(o.name, "BYTES", (len(stacked), o.classification), rows, binary)
