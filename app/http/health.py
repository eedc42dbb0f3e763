"""Liveness, readiness and metrics: open to all (no API key), never blocked by loading."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from app.http.envelope import FastJSON, require_ready, state_of
from app.http.schemas import Health, Ready, errors, ok

router = APIRouter(tags=["health"])
METRICS = {
    200: {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}, "example": "vit_requests_total{...} 3.0"}},
    }
}


@router.get("/healthz", response_model=None, responses={**ok(Health, {"status": "ok"}), **errors(500)})
async def healthz() -> Response:
    """200 while the process runs."""
    return FastJSON({"status": "ok"})


@router.get(
    "/readyz",
    response_model=None,
    responses={**ok(Ready, {"status": "ready", "models": ["mnist-vit"]}), **errors(500, 503)},
)
async def readyz(request: Request) -> Response:
    """200 once every model is loaded and warm; 503 not_ready while loading or draining after SIGTERM."""
    require_ready(request)
    return FastJSON({"status": "ready", "models": list(state_of(request).models)})


@router.get("/metrics", response_model=None, response_class=PlainTextResponse, responses={**METRICS, **errors(500)})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = state_of(request).metrics
    return Response(m.render(), media_type=m.content_type)
