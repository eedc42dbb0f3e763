"""The /v1 routes of API.md. Each route checks its parameters, hands the images to `pipeline.infer` and
shapes the answer; nothing here touches torch."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from starlette.responses import Response

from app import visuals
from app.http.envelope import CheckedRoute, FastJSON, invalid, note, state_of
from app.http.pipeline import infer, pick_model
from app.http.schemas import (
    EXAMPLES,
    IMAGES_BODY,
    MODEL_INFO,
    V1_CHECKS,
    V1_IMAGES,
    AttentionResponse,
    ClassifyResponse,
    DistanceResponse,
    EmbedResponse,
    ModelInfo,
    ModelList,
    SimilarityResponse,
    errors,
    ok,
)
from app.http.state import ServedModel
from app.preprocess import seen_region
from app.tasks import AttentionDistance, AttentionMap, Classify, Embed, Predictions

router = APIRouter(prefix="/v1", route_class=CheckedRoute, tags=["v1"])

ModelName = Annotated[str | None, Query(description="a loaded model's name (default: the default model)")]
Format = Annotated[Literal["json", "png"], Query(description="json, or png (one image only)")]


def _model(request: Request, name: str | None) -> ServedModel:
    served = pick_model(state_of(request), name)
    note(request.scope, model=served.name)
    return served


@router.get("/models", response_model=None, responses={**ok(ModelList, {"models": [MODEL_INFO]}), **errors(*V1_CHECKS)})
async def list_models(request: Request) -> Response:
    state = state_of(request)
    return FastJSON({"models": [m.info for m in state.models.values()]})


@router.get("/models/{name}", response_model=None, responses={**ok(ModelInfo, MODEL_INFO), **errors(*V1_CHECKS, 404)})
async def get_model(request: Request, name: str) -> Response:
    return FastJSON(_model(request, name).info)


@router.post(
    "/classify",
    response_model=None,
    responses={**ok(ClassifyResponse, EXAMPLES["classify"]), **errors(*V1_IMAGES)},
    openapi_extra=IMAGES_BODY,
)
async def classify(
    request: Request,
    top_k: Annotated[int, Query(ge=1, description="how many classes, 1 to num_classes")] = 5,
    model: ModelName = None,
) -> Response:
    served = _model(request, model)
    n = served.num_classes
    if n == 0:
        raise invalid(f"model {served.name!r} has no classification head; use /v1/embed")
    if top_k > n:
        raise invalid(f"top_k must be between 1 and {n} (the model's number of classes), not {top_k}")
    out = await infer(request, served, Classify(top_k))
    labels = served.model.labels
    results = []
    for upload, pred in zip(out.uploads, out.results, strict=True):
        assert isinstance(pred, Predictions)
        predictions = [
            {"index": int(i), "label": labels[int(i)], "score": float(s)}
            for i, s in zip(pred.indices, pred.scores, strict=True)
        ]
        results.append({"filename": upload.filename, "predictions": predictions})
    return FastJSON({"model": served.name, "results": results})


@router.post(
    "/embed",
    response_model=None,
    responses={**ok(EmbedResponse, EXAMPLES["embed"]), **errors(*V1_IMAGES)},
    openapi_extra=IMAGES_BODY,
)
async def embed(
    request: Request,
    pool: Annotated[
        Literal["default", "cls", "mean"],
        Query(
            description="default (the model family's own embedding), cls (the class token) or mean (of patch tokens)"
        ),
    ] = "default",
    normalize: Annotated[bool, Query(description="divide by the L2 norm")] = False,
    encoding: Annotated[Literal["float", "base64"], Query(description="float list or base64 float32 LE")] = "float",
    model: ModelName = None,
) -> Response:
    served = _model(request, model)
    if pool == "cls" and not served.config.class_token:
        raise invalid(
            f"pool must be default or mean for model {served.name!r}: it has no class token "
            f"(its own pooling is {served.model.info['pool']!r}), not cls"
        )
    out = await infer(request, served, Embed(pool, normalize))
    results = []
    for upload, vector in zip(out.uploads, out.results, strict=True):
        v = np.asarray(vector, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode("ascii") if encoding == "base64" else v
        results.append({"filename": upload.filename, "embedding": value})
    dim = len(out.results[0])  # the returned vector's size: pools may differ (CLIP: 512 projected, 768 cls)
    return FastJSON({"model": served.name, "dim": dim, "results": results})


def _layer_head(served: ServedModel, layer: int, head: str) -> tuple[int, int | None]:
    depth, heads = int(served.config.depth), int(served.config.num_heads)
    if not -depth <= layer < depth:
        raise invalid(f"layer must be between {-depth} and {depth - 1} (the model has {depth} layers), not {layer}")
    if head == "mean":
        return layer, None
    try:
        h = int(head)
    except ValueError:
        raise invalid(f"head must be 'mean' or a head index from 0 to {heads - 1}, not {head!r}") from None
    if not 0 <= h < heads:
        raise invalid(f"head must be 'mean' or a head index from 0 to {heads - 1}, not {h}")
    return layer, h


@router.post(
    "/attention",
    response_model=None,
    responses={
        **ok(AttentionResponse, EXAMPLES["attention"], png="the heatmap over the upload"),
        **errors(*V1_IMAGES),
    },
    openapi_extra=IMAGES_BODY,
)
async def attention(
    request: Request,
    method: Annotated[Literal["rollout", "cls"], Query(description="rollout, or one layer's CLS row")] = "rollout",
    layer: Annotated[int, Query(description="Python-style layer index, -depth to depth - 1 (method=cls)")] = -1,
    head: Annotated[str, Query(description="'mean' or a head index, 0 to num_heads - 1 (method=cls)")] = "mean",
    format: Format = "json",
    model: ModelName = None,
) -> Response:
    served = _model(request, model)
    layer, h = _layer_head(served, layer, head)
    task = AttentionMap(method, layer, h) if method == "cls" else AttentionMap("rollout")
    png = format == "png"
    out = await infer(request, served, task, one_image=png, preview=png)
    grid = [int(g) for g in served.config.grid]
    if png:
        assert out.previews is not None
        return await _overlay(served, out.previews[0], out.results[0].values)  # type: ignore[union-attr]
    cfg = served.model.preprocess_config
    # "region" (beyond the contract): the box (left, top, right, bottom) of the uploaded image, in its pixels,
    # that the heatmap covers (the model's crop), so a client can lay the map over the photo; the page uses it.
    results = [
        {
            "filename": u.filename,
            "method": heat.method,  # cls or rollout; probe... or mean... for a model without a class token
            "grid": grid,
            "heatmap": heat.values,
            "region": [float(v) for v in seen_region(*d.size, cfg)],
        }
        for u, d, heat in zip(out.uploads, out.decoded, out.results, strict=True)  # type: ignore[misc]
    ]
    return FastJSON({"model": served.name, "results": results})


async def _overlay(served: ServedModel, preview, heatmap: np.ndarray) -> Response:  # type: ignore[no-untyped-def]
    image = Image.fromarray(preview.pixels, "RGB")
    width, height = preview.size
    left, top, right, bottom = seen_region(width, height, served.model.preprocess_config)
    sx, sy = image.width / width, image.height / height
    box = (left * sx, top * sy, right * sx, bottom * sy)
    png = await asyncio.to_thread(visuals.overlay_png, image, heatmap, box)
    return Response(png, media_type="image/png")


@router.post(
    "/attention-distance",
    response_model=None,
    responses={
        **ok(DistanceResponse, EXAMPLES["distance"], png="the distances plotted by layer and head"),
        **errors(*V1_IMAGES),
    },
    openapi_extra=IMAGES_BODY,
)
async def attention_distance(request: Request, format: Format = "json", model: ModelName = None) -> Response:
    served = _model(request, model)
    png = format == "png"
    out = await infer(request, served, AttentionDistance(), one_image=png)
    if png:
        cfg = served.config
        data = await asyncio.to_thread(visuals.distance_plot_png, out.results[0], cfg.patch_size, tuple(cfg.image_size))
        return Response(data, media_type="image/png")
    results = [{"filename": u.filename, "distance": d} for u, d in zip(out.uploads, out.results, strict=True)]
    return FastJSON({"model": served.name, "results": results})


@router.get(
    "/models/{name}/position-similarity",
    response_model=None,
    responses={
        **ok(SimilarityResponse, EXAMPLES["similarity"], png="a mosaic of every patch's similarity map"),
        **errors(*V1_CHECKS, 404, 422),
    },
)
async def position_similarity(request: Request, name: str, format: Format = "json") -> Response:
    served = _model(request, name)
    similarity = await asyncio.to_thread(served.similarity)
    grid = [int(g) for g in served.config.grid]
    if format == "png":
        data = await asyncio.to_thread(visuals.similarity_mosaic_png, similarity, tuple(grid))
        return Response(data, media_type="image/png")
    return FastJSON({"model": served.name, "grid": grid, "similarity": similarity})
