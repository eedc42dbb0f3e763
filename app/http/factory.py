"""`create_app(settings) -> FastAPI`: the routes, the error envelope, the request middleware and a lifespan
that starts loading the models in the background (so uvicorn opens its socket at once)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from app.decode import Decoder
from app.http import collections, errors, health, page, v1, v2
from app.http.loading import Loader, engine_loader, load_all
from app.http.middleware import RequestContext
from app.http.responses import FastJSON
from app.http.state import ServerState
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("vitserve")


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
            settings.max_image_pixels,
            settings.decode_workers,
            settings.decode_pool_kind,
            settings.jpeg_draft,
            on_restart=state.metrics.decoder_restarts.inc,
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

    app = FastAPI(
        title="vitserve",
        description="Vision Transformer inference: classify, embed, attention maps. See API.md.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=FastJSON,
    )
    app.state.vit = state
    errors.install(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(collections.router)  # /v1/collections: image search (app.collections)
    app.include_router(v2.router)
    app.include_router(v2.model_router)
    app.include_router(page.router)  # GET / and the page's assets
    app.add_middleware(RequestContext, state=state)
    return app
