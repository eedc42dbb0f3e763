"""Liveness, readiness and metrics: open to all (no API key), never blocked by loading."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.http.checks import require_ready
from app.http.pipeline import state_of
from app.http.responses import FastJSON

router = APIRouter()


@router.get("/healthz", response_model=None)
async def healthz() -> Response:
    """200 while the process runs."""
    return FastJSON({"status": "ok"})


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response:
    """200 once every model is loaded and warm; 503 not_ready while loading or draining after SIGTERM."""
    require_ready(request)
    return FastJSON({"status": "ready", "models": list(state_of(request).models)})


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = state_of(request).metrics
    return Response(m.render(), media_type=m.content_type)
