"""The image-search routes of API.md ("Image search (collections)"): /v1/collections and below.

The store (`app.collections`) holds the vectors; images are embedded by the server's own path for
/v1/embed (`embed_images`, the one place that calls `app.http.pipeline`), so an add or an image search
takes its place in the model's queue and batches with every other request. The store opens on the first
request to these routes (starting the embedded PostgreSQL when no `--collections-url` is given) and closes
at shutdown, after the drain (this router's lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from PIL import Image
from pydantic import Field
from starlette.responses import Response

from app.collections import (
    MAX_K,
    Binding,
    CollectionsService,
    NewItem,
    Store,
    StoreError,
)
from app.collections.store import check_filter, check_id, check_metadata, check_name, check_vector
from app.http.envelope import ApiError, CheckedRoute, FastJSON, invalid, note, state_of
from app.http.pipeline import (
    Part,
    Upload,
    admit,
    decode_base64,
    decode_uploads,
    guarded,
    media_type,
    multipart_parts,
    pick_model,
    refuse_when_full,
    run_items,
    to_item,
    too_many,
)
from app.http.schemas import V1_CHECKS, Doc, errors, ok
from app.http.state import ServedModel
from app.tasks import Embed

THUMBNAIL_SIDE = 128
POOLS = ("default", "cls", "mean")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the app's lifespan: on the way out (after the drain) the store closes and the embedded
    PostgreSQL stops, unless other processes of the same data folder still use it."""
    try:
        yield
    finally:
        service: CollectionsService | None = getattr(app.state, "collections", None)
        if service is not None:
            await service.close()


router = APIRouter(prefix="/v1/collections", route_class=CheckedRoute, lifespan=lifespan, tags=["collections"])


# ---------------------------------------------------------------------------------------------- plumbing


async def _store(request: Request) -> Store:
    app = request.app
    service = getattr(app.state, "collections", None)
    if service is None:
        settings = state_of(request).settings
        service = app.state.collections = CollectionsService(settings.data_dir, settings.collections_url)
    try:
        return await service.store()
    except StoreError as e:
        raise _api_error(e) from None


def _api_error(e: StoreError) -> ApiError:
    if e.kind == "not_found":
        return ApiError(404, "not_found", str(e))
    if e.kind == "conflict":
        return ApiError(409, "conflict", str(e))
    if e.kind == "unavailable":
        return ApiError(503, "not_ready", f"{e}; retry shortly", headers={"Retry-After": "1"})
    return invalid(str(e))


@contextlib.contextmanager
def _answers():
    """Store errors as API errors."""
    try:
        yield
    except StoreError as e:
        raise _api_error(e) from None


def _binding(served: ServedModel, pool: str) -> Binding:
    info = served.model.info
    preprocess = json.loads(json.dumps(info["preprocess"]))  # as it comes back from jsonb
    return Binding(served.name, str(info["sha256"]), [int(s) for s in info["image_size"]], pool, preprocess)


def _bound_model(request: Request, binding: Binding, name: str) -> ServedModel:
    """The loaded model a collection's images are embedded with; 409 when it is not loaded or differs."""
    served = state_of(request).models.get(binding.model)
    if served is None:
        raise ApiError(409, "conflict", f"collection {name!r} is bound to model {binding.model!r}, which is not loaded")
    if _binding(served, binding.pool) != binding:
        raise ApiError(
            409,
            "conflict",
            f"collection {name!r} was built with other weights, image size or preprocessing than the loaded "
            f"model {binding.model!r}; its vectors cannot be mixed with this model's (search by id or vector still "
            "works)",
        )
    note(request.scope, model=served.name)
    return served


def _embed_task(pool: str) -> Embed:
    return Embed(pool, False)  # type: ignore[arg-type]  # checked against POOLS when the collection was made


@dataclass
class ImageBatch:
    """What an image request carries: the images, and per image an optional id and metadata."""

    images: list[bytes] = field(default_factory=list)
    filenames: list[str | None] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # search: filter; parsed from the same body


def _json(data: bytes, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise invalid(f"{what}: malformed JSON: {e}") from None


def _b64_image(value: object, index: int) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"items[{index}].image must be a base64 string")
    if value[:5].lower() == "data:":
        header, sep, value = value.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise ApiError(
                400, "invalid_image", "a data: URL must be base64 ('data:image/...;base64,...')", index=index
            )
    try:
        return decode_base64(value)
    except ValueError:
        raise ApiError(400, "invalid_image", "the image is not valid base64", index=index, filename=None) from None


def _unsupported(kind: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"unsupported Content-Type {kind or '(none)'!r}: send multipart/form-data with 'images' files, "
        "application/json, or the image itself as image/* or application/octet-stream",
    )


def _metadata_list(value: object, n: int, what: str) -> list[dict]:
    if value is None:
        return [{} for _ in range(n)]
    if not isinstance(value, list) or len(value) != n:
        raise invalid(f"{what} must be a JSON list with one object per image ({n})")
    return [_checked(check_metadata, v, f"{what}[{i}]") for i, v in enumerate(value)]


def _id_list(value: object, n: int, what: str) -> list[str | None]:
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise invalid(f"{what} must be a JSON list with one id per image ({n})")
    return [_checked(check_id, v, f"{what}[{i}]") for i, v in enumerate(value)]


def _checked(check, value, where):  # type: ignore[no-untyped-def]
    with _answers():
        return check(value, where)


def _form_parts(request: Request, body: bytes) -> list[Part]:
    """The parts of a multipart form, their count checked before parsing (`multipart_parts`)."""
    limit = state_of(request).settings.max_images_per_request
    return multipart_parts(body, request.headers.get("content-type", ""), limit)


def _parse_add(request: Request, body: bytes) -> ImageBatch:
    """The add-images forms of API.md: multipart (images, ids, metadata), a raw image (?id=), JSON items."""
    kind = media_type(request)
    batch = ImageBatch()
    if kind == "multipart/form-data":
        parts = _form_parts(request, body)
        images = [p for p in parts if p.name == "images"]
        ids_part = next((p for p in parts if p.name == "ids"), None)
        meta_part = next((p for p in parts if p.name == "metadata"), None)
        batch.images = [p.data for p in images]
        batch.filenames = [p.filename for p in images]
        batch.ids = _id_list(_json(ids_part.data, "ids") if ids_part else None, len(images), "ids")
        batch.metadata = _metadata_list(
            _json(meta_part.data, "metadata") if meta_part else None, len(images), "metadata"
        )
    elif kind == "application/json" or kind.endswith("+json"):
        doc = _json(body, "the body")
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise invalid('the JSON body must be {"items": [{"id": str (optional), "image": base64, "metadata": {}}]}')
        for i, item in enumerate(doc["items"]):
            if not isinstance(item, dict) or "image" not in item:
                raise invalid(f"items[{i}] must be an object with an 'image' (base64)")
            batch.images.append(_b64_image(item["image"], i))
            batch.filenames.append(None)
            batch.ids.append(_checked(check_id, item["id"], f"items[{i}].id") if item.get("id") is not None else None)
            batch.metadata.append(_checked(check_metadata, item.get("metadata"), f"items[{i}].metadata"))
    elif kind.startswith("image/") or kind == "application/octet-stream":
        if body:
            given = request.query_params.get("id")
            meta = request.query_params.get("metadata")
            batch.images, batch.filenames = [body], [None]
            batch.ids = [_checked(check_id, given, "id") if given is not None else None]
            batch.metadata = [_checked(check_metadata, _json(meta.encode(), "metadata") if meta else None, "metadata")]
    else:
        raise _unsupported(kind)
    return batch


def _parse_search(request: Request, body: bytes) -> ImageBatch:
    """The search forms: multipart (one image, a `filter` part), a raw image, or JSON image / id / vector."""
    kind = media_type(request)
    batch = ImageBatch()
    if kind == "multipart/form-data":
        parts = _form_parts(request, body)
        images = [p for p in parts if p.name == "images"]
        batch.images = [p.data for p in images]
        batch.filenames = [p.filename for p in images]
        filt = next((p for p in parts if p.name == "filter"), None)
        batch.extra["filter"] = _json(filt.data, "filter") if filt else None
    elif kind == "application/json" or kind.endswith("+json"):
        doc = _json(body, "the body")
        if not isinstance(doc, dict):
            raise invalid('the JSON body must be an object: {"image": base64} or {"id": str} or {"vector": [...]}')
        given = [key for key in ("image", "id", "vector") if doc.get(key) is not None]
        if len(given) != 1:
            raise invalid('give exactly one of "image" (base64), "id" (a stored item) or "vector" (a list of floats)')
        if "image" in given:
            batch.images, batch.filenames = [_b64_image(doc["image"], 0)], [None]
        else:
            batch.extra[given[0]] = doc[given[0]]
        batch.extra["filter"] = doc.get("filter")
    elif kind.startswith("image/") or kind == "application/octet-stream":
        if body:
            batch.images, batch.filenames = [body], [None]
        filt = request.query_params.get("filter")
        batch.extra["filter"] = _json(filt.encode(), "filter") if filt else None
    else:
        raise _unsupported(kind)
    return batch


async def _read(request: Request) -> bytes:
    return await state_of(request).bodies.read(request)


# ---------------------------------------------------------------------------------------------- embedding


async def embed_images(
    request: Request,
    served: ServedModel,
    pool: str,
    read: Callable[[], Awaitable[ImageBatch]],
    thumbnails: bool,
) -> tuple[ImageBatch, list[np.ndarray], list[bytes | None]]:
    """`read()` the request's images, take room for them in the model's queue, embed them through the model's
    batcher as /v1/embed does, and make the thumbnails. The one place where image search meets the inference
    path."""
    state = state_of(request)
    settings = state.settings
    refuse_when_full(served)
    batch = await read()
    n = len(batch.images)
    if n > settings.max_images_per_request:
        raise too_many(n, settings.max_images_per_request)
    if n == 0:
        return batch, [], []
    note(request.scope, images=n)
    with admit(served, n) as admission:

        async def work() -> tuple[list[np.ndarray], list[bytes | None]]:
            uploads = [Upload(d, f) for d, f in zip(batch.images, batch.filenames, strict=True)]
            decoded, previews = await decode_uploads(state, served, uploads, preview=thumbnails)
            task = _embed_task(pool)
            vectors = await run_items(request, served, [to_item(d, task) for d in decoded], admission, batch.filenames)
            thumbs: list[bytes | None] = [None] * n
            if thumbnails:
                thumbs = list(await asyncio.to_thread(lambda: [_thumbnail(p.pixels) for p in previews]))
            return [np.asarray(v, dtype=np.float32) for v in vectors], thumbs

        vectors, thumbs = await guarded(request, work(), settings.request_timeout_s)
    return batch, vectors, thumbs


def _thumbnail(pixels: np.ndarray) -> bytes:
    """WebP, longest side 128 px (smaller images are scaled up, larger ones down)."""
    image = Image.fromarray(pixels, "RGB")
    scale = THUMBNAIL_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "WEBP", quality=80, method=4)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- routes


def _obj(required: tuple[str, ...] = (), description: str | None = None, **properties: dict) -> dict:
    schema: dict = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def _body(**content: dict) -> dict:
    """OpenAPI's requestBody for a route that reads its own body: {media type: schema}."""
    kinds = {"multipart": ("multipart/form-data",), "json": ("application/json",), "image": IMAGE_TYPES}
    return {"requestBody": {"content": {t: {"schema": s} for kind, s in content.items() for t in kinds[kind]}}}


IMAGE_TYPES = ("image/png", "image/jpeg", "image/*")


STRING = {"type": "string"}
OBJECT = {"type": "object"}
FILE = {"type": "string", "format": "binary"}
BASE64 = {"type": "string", "description": "base64 or a data: URL"}
VECTOR = {"type": "array", "items": {"type": "number"}}
JSON_TEXT = {"type": "string", "description": "JSON"}
ItemsBody = _body(
    multipart=_obj(("images",), images={"type": "array", "items": FILE}, ids=JSON_TEXT, metadata=JSON_TEXT),
    json=_obj(items={"type": "array", "items": _obj(("image",), id=STRING, image=BASE64, metadata=OBJECT)}),
    image=FILE,
)
VectorsBody = _body(
    json=_obj(items={"type": "array", "items": _obj(("id", "vector"), id=STRING, vector=VECTOR, metadata=OBJECT)})
)
SearchBody = _body(
    json=_obj(
        description="exactly one of image, id (a stored item, left out of the results), vector; filter optional",
        image=BASE64,
        id=STRING,
        vector=VECTOR,
        filter={"type": "object", "description": "equality on top-level metadata keys"},
    ),
    multipart=_obj(images={"type": "array", "items": FILE, "maxItems": 1}, filter=JSON_TEXT),
    image=FILE,
)
CreateBody = _body(
    json=_obj(
        ("name",),
        name={"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
        model={"type": "string", "description": "a loaded model (default: the default model)"},
        pool={"type": "string", "enum": list(POOLS), "default": "default"},
        metric={"type": "string", "enum": ["cosine", "l2", "ip"], "default": "cosine"},
        thumbnails={"type": "boolean", "default": True},
    )
)


# -- what the answers look like (documentation only: the routes answer with FastJSON) --------------------------


class CollectionDoc(Doc):
    name: str
    model: str
    model_sha256: str
    image_size: list[int]
    pool: str
    preprocess: dict
    metric: str
    dim: int
    count: int
    index: str = Field(description="hnsw, or exact above 2,000 dimensions")
    thumbnails: bool


class CollectionListDoc(Doc):
    collections: list[CollectionDoc]


class AddedDoc(Doc):
    ids: list[str]
    count: int


class ItemDoc(Doc):
    id: str
    metadata: dict
    has_thumbnail: bool | None = None


class ItemsPageDoc(Doc):
    items: list[ItemDoc]
    next: str | None = Field(description="the cursor of the next page; null on the last")


class DeletedDoc(Doc):
    deleted: str


class MatchDoc(Doc):
    id: str
    score: float = Field(description="cosine similarity (cosine), negative distance (l2), inner product (ip)")
    metadata: dict


class SearchDoc(Doc):
    collection: str
    results: list[MatchDoc] = Field(description="best first")
    took_ms: float


COLLECTION_EXAMPLE = {
    "name": "digits",
    "model": "mnist-vit",
    "model_sha256": "11d79907f6199a6464dc38c61c972c330b8ed2fddcfb55f154487f9cbc81e20b",
    "image_size": [28, 28],
    "pool": "default",
    "preprocess": {"resize": [28, 28], "crop": None, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
    "metric": "cosine",
    "dim": 128,
    "count": 3,
    "index": "hnsw",
    "thumbnails": True,
}
SEARCH_EXAMPLE = {
    "collection": "digits",
    "results": [{"id": "seven", "score": 1.0, "metadata": {"label": 7}}, {"id": "four", "score": 0.18, "metadata": {}}],
    "took_ms": 9.4,
}


def _errors(*statuses: int) -> dict:
    """The error entries, with a collection's 404 (`not_found`) in place of the model's."""
    out = errors(*V1_CHECKS, *statuses)
    if 404 in out:
        out[404] = {
            **out[404],
            "description": "`not_found`: no such collection or item (or, on create, `model_not_found`)",
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorBody"},
                    "example": {"error": {"code": "not_found", "message": "no collection named 'ghost'"}},
                }
            },
        }
    return out


IMAGE_ERRORS = (400, 404, 409, 413, 415, 422, 504)


class WebP(Response):
    media_type = "image/webp"


@router.post(
    "",
    response_model=None,
    status_code=201,
    openapi_extra=CreateBody,
    summary="Create a collection",
    responses={
        201: {
            "model": CollectionDoc,
            "description": "Created",
            "content": {"application/json": {"example": COLLECTION_EXAMPLE}},
        },
        **_errors(404, 409, 413, 415, 422),
    },
)
async def create_collection(request: Request) -> Response:
    """A collection bound to a loaded model's weights, image size, pool and preprocessing."""
    doc = await _json_body(request)
    if not isinstance(doc, dict):
        raise invalid('the JSON body must be an object {"name": str, ...}')
    unknown = sorted(set(doc) - {"name", "model", "pool", "metric", "thumbnails"})
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)[:200]}")
    name = _checked(lambda v, _w: check_name(v), doc.get("name"), "name")
    pool = doc.get("pool") or "default"
    if pool not in POOLS:
        raise invalid(f"pool must be one of {', '.join(POOLS)}")
    metric = doc.get("metric") or "cosine"
    if metric not in ("cosine", "l2", "ip"):
        raise invalid("metric must be one of cosine, l2, ip")
    thumbnails = doc.get("thumbnails", True)
    if not isinstance(thumbnails, bool):
        raise invalid("thumbnails must be true or false")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a loaded model's name")
    served = pick_model(state_of(request), model)
    if pool == "cls" and not served.config.class_token:
        raise invalid(f"pool must be default or mean for model {served.name!r}: it has no class token, not cls")
    dim = served.model.embedding_dim if pool == "default" else served.config.embed_dim  # CLIP: 512 projected
    store = await _store(request)
    with _answers():
        coll = await store.create(name, _binding(served, pool), metric, int(dim), thumbnails)
    return FastJSON(coll.public(), status_code=201)


async def _json_body(request: Request) -> Any:
    kind = media_type(request)
    if not (kind == "application/json" or kind.endswith("+json")):
        raise _unsupported(kind)
    return _json(await _read(request), "the body")


@router.get(
    "",
    response_model=None,
    summary="List collections",
    responses={**ok(CollectionListDoc, {"collections": [COLLECTION_EXAMPLE]}), **_errors()},
)
async def list_collections(request: Request) -> Response:
    store = await _store(request)
    with _answers():
        return FastJSON({"collections": [c.public() for c in await store.list()]})


@router.get(
    "/{name}",
    response_model=None,
    summary="A collection",
    responses={**ok(CollectionDoc, COLLECTION_EXAMPLE), **_errors(404)},
)
async def get_collection(request: Request, name: str) -> Response:
    store = await _store(request)
    with _answers():
        return FastJSON((await store.get(name)).public())


@router.delete(
    "/{name}",
    response_model=None,
    summary="Delete a collection and its items",
    responses={**ok(DeletedDoc, {"deleted": "digits"}), **_errors(404)},
)
async def delete_collection(request: Request, name: str) -> Response:
    store = await _store(request)
    with _answers():
        await store.delete(name)
    return FastJSON({"deleted": name})


@router.post(
    "/{name}/images",
    response_model=None,
    openapi_extra=ItemsBody,
    summary="Add images",
    responses={**ok(AddedDoc, {"ids": ["three", "seven"], "count": 2}), **_errors(*IMAGE_ERRORS)},
)
async def add_images(request: Request, name: str) -> Response:
    """Embed the images with the collection's model and store them (all or nothing); the ids come back."""
    store = await _store(request)
    with _answers():
        coll = await store.describe(name)  # the add checks the binding again, under its lock
    served = _bound_model(request, coll.binding, name)

    async def read() -> ImageBatch:
        return _parse_add(request, await _read(request))

    batch, vectors, thumbs = await embed_images(request, served, coll.binding.pool, read, coll.thumbnails)
    if not vectors:
        raise invalid("no images in the request: send at least one")
    ids = [i if i is not None else str(uuid.uuid4()) for i in batch.ids]
    items = [NewItem(i, v, m, t) for i, v, m, t in zip(ids, vectors, batch.metadata, thumbs, strict=True)]
    with _answers():
        await store.add(name, items, binding=coll.binding)
    return FastJSON({"ids": ids, "count": len(ids)})


@router.post(
    "/{name}/vectors",
    response_model=None,
    openapi_extra=VectorsBody,
    summary="Add vectors",
    responses={**ok(AddedDoc, {"ids": ["v1"], "count": 1}), **_errors(404, 409, 413, 415, 422)},
)
async def add_vectors(request: Request, name: str) -> Response:
    """Store vectors computed elsewhere (all or nothing); 422 for a wrong dimension."""
    store = await _store(request)
    doc = await _json_body(request)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list) or not doc["items"]:
        raise invalid('the JSON body must be {"items": [{"id": str, "vector": [floats], "metadata": {}}, ...]}')
    with _answers():
        coll = await store.get(name)
        items = []
        for i, item in enumerate(doc["items"]):
            if not isinstance(item, dict):
                raise invalid(f"items[{i}] must be an object")
            item_id = check_id(item.get("id"), f"items[{i}].id")
            vector = check_vector(item.get("vector"), coll.dim, coll.metric, f"items[{i}].vector")
            items.append(NewItem(item_id, vector, check_metadata(item.get("metadata"), f"items[{i}].metadata")))
        ids = await store.add(name, items)
    return FastJSON({"ids": ids, "count": len(ids)})


@router.get(
    "/{name}/items",
    response_model=None,
    summary="List items in insertion order",
    responses={
        **ok(ItemsPageDoc, {"items": [{"id": "three", "metadata": {"label": 3}}], "next": "1"}),
        **_errors(404, 422),
    },
)
async def list_items(
    request: Request,
    name: str,
    cursor: Annotated[str | None, Query(description="'next' of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="items per page, 1 to 1000")] = 100,
) -> Response:
    store = await _store(request)
    with _answers():
        page, nxt = await store.items(name, cursor, limit)
    return FastJSON({"items": page, "next": nxt})


@router.get(
    "/{name}/items/{item_id}",
    response_model=None,
    summary="An item",
    responses={**ok(ItemDoc, {"id": "four", "metadata": {}, "has_thumbnail": True}), **_errors(404)},
)
async def get_item(request: Request, name: str, item_id: str) -> Response:
    store = await _store(request)
    with _answers():
        return FastJSON(await store.item(name, item_id))


@router.get(
    "/{name}/items/{item_id}/thumbnail",
    response_model=None,
    response_class=WebP,
    summary="An item's thumbnail (WebP, longest side 128 px)",
    responses={
        200: {
            "description": "the thumbnail",
            "content": {"image/webp": {"schema": FILE, "example": "RIFF....WEBPVP8 ..."}},
        },
        **_errors(404),
    },
)
async def get_thumbnail(request: Request, name: str, item_id: str) -> Response:
    store = await _store(request)
    with _answers():
        data = await store.thumbnail(name, item_id)
    return Response(data, media_type="image/webp", headers={"Cache-Control": "private, max-age=3600"})


@router.delete(
    "/{name}/items/{item_id}",
    response_model=None,
    summary="Delete an item",
    responses={**ok(DeletedDoc, {"deleted": "four"}), **_errors(404)},
)
async def delete_item(request: Request, name: str, item_id: str) -> Response:
    store = await _store(request)
    with _answers():
        await store.delete_item(name, item_id)
    return FastJSON({"deleted": item_id})


@router.post(
    "/{name}/search",
    response_model=None,
    openapi_extra=SearchBody,
    summary="The k nearest items",
    responses={**ok(SearchDoc, SEARCH_EXAMPLE), **_errors(*IMAGE_ERRORS)},
)
async def search(
    request: Request,
    name: str,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="how many results, 1 to 1000")] = 10,
) -> Response:
    """Query by image (embedded with the collection's model), by a stored item's id (left out of the results)
    or by a vector; an optional filter keeps items whose metadata has every given key equal."""
    start = time.perf_counter()
    store = await _store(request)
    with _answers():
        coll = await store.describe(name)
    kind = media_type(request)
    vectors: list[np.ndarray] = []
    if kind == "application/json" or kind.endswith("+json"):
        batch = _parse_search(request, await _read(request))
        if batch.images:  # {"image": base64}: embedded under a place in the model's queue

            async def parsed() -> ImageBatch:
                return batch

            served = _bound_model(request, coll.binding, name)
            _, vectors, _ = await embed_images(request, served, coll.binding.pool, parsed, False)
    else:  # multipart or a raw image
        served = _bound_model(request, coll.binding, name)

        async def read() -> ImageBatch:
            found = _parse_search(request, await _read(request))
            if len(found.images) != 1:
                raise invalid(f"a search takes one image; this request has {len(found.images)}")
            return found

        batch, vectors, _ = await embed_images(request, served, coll.binding.pool, read, False)
    with _answers():
        where = check_filter(batch.extra.get("filter"))
        exclude = None
        if vectors:
            query: Any = vectors[0]
        elif batch.extra.get("id") is not None:
            exclude = check_id(batch.extra["id"], "id")
            query = await store.vector_of(name, exclude)
        elif batch.extra.get("vector") is not None:
            query = check_vector(batch.extra["vector"], coll.dim, coll.metric, "vector")
        else:
            raise invalid("no query: send one image, or JSON with 'image', 'id' or 'vector'")
        _, results = await store.search(name, query, k, where, exclude, binding=coll.binding if vectors else None)
    took = round((time.perf_counter() - start) * 1000.0, 3)
    return FastJSON({"collection": name, "results": results, "took_ms": took})
