"""`create_app(settings) -> FastAPI`: the routes, the error envelope, the request middleware and a lifespan
that starts loading the models in the background (so uvicorn opens its socket at once)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.decode import Decoder, Limits
from app.http import collections, envelope, health, page, v1, v2
from app.http.envelope import FastJSON, ProtectDocs, RequestContext
from app.http.loading import Loader, engine_loader, load_all
from app.http.pipeline import PARSER_MODULES
from app.http.state import ServerState
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("vitserve")

DESCRIPTION = """Vision Transformer inference: class predictions, embeddings, attention heatmaps and the ViT paper's
figures, as JSON or PNG, beside the Open Inference Protocol (v2).

Images go in as multipart/form-data (one `images` part per image), as the raw body (`Content-Type: image/png`,
`image/jpeg`, ...) or as JSON `{"images": ["<base64>", ...]}`. Every error outside /v2 is
`{"error": {"code": "...", "message": "..."}}`; under /v2 it is the protocol's `{"error": "..."}`. With
`--api-key`, /v1 and /v2/models need `Authorization: Bearer <key>`."""


def create_app(
    settings: Settings | None = None,
    *,
    loader: Loader | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service. `loader(spec, settings, models_dir) -> Model` replaces `app.engine.load_model` (tests
    inject slow or faulty models through it); `on_fatal(message)` is called when a model cannot be loaded
    or its device fails for good while serving (the command line stops the server with status 1)."""
    settings = settings or Settings()
    state = ServerState(settings, Metrics(), on_fatal=on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decoder = Decoder(
            Limits(settings.max_image_pixels, settings.decoded_bytes_limit, settings.max_jpeg_scans),
            settings.decode_workers,
            settings.decode_pool_kind,
            settings.jpeg_draft,
            on_restart=state.metrics.decoder_restarts.inc,
            preload=("app.decode", *PARSER_MODULES),
        )
        loading = asyncio.create_task(load_all(state, loader or engine_loader), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            for served in state.models.values():
                await served.batcher.stop()
            state.decoder.close()
            gc.unfreeze()  # what start-up froze (loading.keep_out_of_garbage_collection) can be collected again

    app = FastAPIOffline(  # /docs and /redoc with Swagger UI and ReDoc served from the package, no CDN
        title="vitserve",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=FastJSON,
    )
    app.state.vit = state
    envelope.install(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(collections.router)  # /v1/collections: image search (app.collections)
    app.include_router(v2.router)
    app.include_router(v2.model_router)
    app.include_router(page.router)  # GET / and the page's assets
    if settings.protect_docs and settings.api_key:
        app.add_middleware(ProtectDocs, api_key=settings.api_key)
    app.add_middleware(RequestContext, state=state)  # added last: the outermost, so it sees every answer
    app.openapi = _without_unsent_validation_errors(app.openapi)  # type: ignore[method-assign]
    return app


def _without_unsent_validation_errors(openapi: Callable[[], dict]) -> Callable[[], dict]:
    """FastAPI documents a 422 `HTTPValidationError` on every route with parameters; this app never sends that
    shape (its 422 is the error envelope, documented where a parameter can be invalid), so those go. And an
    error is JSON even on a route whose answer is not (/metrics)."""

    def schema() -> dict:
        doc = openapi()
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                answer = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(answer.get("content", "")):
                    del operation["responses"]["422"]
                for status, answer in operation.get("responses", {}).items():
                    content = answer.get("content", {})
                    if status != "200" and "application/json" in content:  # an error is JSON on every route
                        answer["content"] = {"application/json": content["application/json"]}
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        return doc

    return schema
