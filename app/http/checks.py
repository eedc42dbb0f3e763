"""The checks a request meets before its route runs: the API key (401), then readiness (503 `not_ready`).

Shared by /v1 and by the model routes of /v2; the health routes use `require_ready` alone. With --protect-docs,
`ProtectDocs` asks for the key on /metrics and the documentation too."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.errors import ApiError, api_error_response
from app.http.pipeline import state_of


def require_api_key(request: Request) -> None:
    """With --api-key, the request needs `Authorization: Bearer <key>`."""
    key = state_of(request).settings.api_key
    if key and not key_matches(request.headers, key):
        raise unauthorized()


def key_matches(headers: Headers, key: str) -> bool:
    """Whether `headers` carry `Authorization: Bearer <key>`, compared in constant time as UTF-8 bytes (Starlette
    reads header values as Latin-1, which gives back the bytes sent, so a non-ASCII key matches its UTF-8 form)."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), key.encode("utf-8"))


def unauthorized() -> ApiError:
    return ApiError(
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


DOCS_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class ProtectDocs:
    """Pure ASGI, for --protect-docs with an --api-key: the metrics and the API's documentation need the key too
    (401 in the usual shape). Without it they stay open, with `/`, the health routes and the page's files."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] in DOCS_PATHS
            and not key_matches(Headers(scope=scope), self.api_key)
        ):
            await api_error_response(scope["path"], unauthorized())(scope, receive, send)
            return
        await self.app(scope, receive, send)
