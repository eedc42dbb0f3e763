"""The checks a request meets before its route runs: the API key (401), then readiness (503 `not_ready`).

Shared by /v1 and by the model routes of /v2; the health routes use `require_ready` alone."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from app.http.errors import ApiError
from app.http.pipeline import state_of


def require_api_key(request: Request) -> None:
    """With --api-key, the request needs `Authorization: Bearer <key>` (compared in constant time)."""
    key = state_of(request).settings.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_ready(request: Request) -> None:
    """503 `not_ready` while the models load or the server drains after SIGTERM."""
    state = state_of(request)
    if not state.accepting:
        raise ApiError(503, "not_ready", state.not_ready_reason(), headers={"Retry-After": "1"})


class CheckedRoute(APIRoute):
    """A route that checks the API key, then readiness, before FastAPI reads its parameters. Plain calls
    rather than router dependencies: FastAPI solves each dependency much as it solves a route, and on the event
    loop that cost as much as the rest of our request handling (bench/results/README.md, "The event loop")."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            require_api_key(request)
            require_ready(request)
            return await handler(request)

        return checked
