"""What wraps every request, whatever its route: the request id, the API key and readiness checks, the log line
and the metrics, JSON bodies, and API.md's error envelope (`{"error": {"code", "message", ...}}` everywhere, except
under /v2, where the Open Inference Protocol's `{"error": "<message>"}` is the shape).

`RequestContext` is one pure-ASGI middleware around every request (pure ASGI rather than BaseHTTPMiddleware, so
streaming bodies and disconnect notices pass through untouched), and the last line of defence: an unhandled
exception becomes a 500 with the request id, in the error shape of its path, never a traceback. `CheckedRoute`
runs the API key (401) and readiness (503 `not_ready`) checks before a /v1 or /v2 model route; the health routes
use `require_ready` alone. With --protect-docs, `ProtectDocs` asks for the key on /metrics and the documentation.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.decode import ImageError
from app.http.state import ServerState

log = logging.getLogger("vitserve.access")


def state_of(request: Request) -> ServerState:
    return request.app.state.vit


# -- JSON bodies and the error envelope ------------------------------------------------------------------------------

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class FastJSON(JSONResponse):  # a JSONResponse, so the OpenAPI document calls its body JSON
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=OPTIONS)


STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
    503: "not_ready",
    504: "timeout",
}


class ApiError(Exception):
    """An answer with an error status: raised anywhere in a route, rendered in its path's shape (error_response)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def __reduce__(self):  # type: ignore[no-untyped-def]
        """Picklable with its keywords, so that a parse in another process (`Decoder.isolated`) can raise it."""
        return partial(ApiError, **self.extra), (self.status, self.code, self.message, self.headers)


MAX_MESSAGE = 500  # characters: a message may quote what the client sent (a name, a path), never all of it


def cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """The one place that picks an error's shape, from the request's path; the status, headers and capped message
    are the same in both shapes (the protocol's shape has no room for `code` or the extra keys)."""
    if is_v2(path):
        body: dict = {"error": cut(message)}
    else:
        body = {"error": {"code": code, "message": cut(message), **extra}}
    return FastJSON(body, status_code=status, headers=headers)


def api_error_response(path: str, error: ApiError) -> Response:
    return error_response(path, error.status, error.code, error.message, error.headers, **error.extra)


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def image_error(error: ImageError, index: int | None = None, filename: str | None = None, where: str = "") -> ApiError:
    """An image the server will not decode -> 400 with its code (`invalid_image`, `image_too_large`), naming the
    image: `where` it is, else its index (and filename)."""
    if not where:
        where = f"image {index}" + (f" ({filename})" if filename else "") if index is not None else "the image"
    extra = {} if index is None else {"index": index, "filename": filename}
    return ApiError(400, error.code, f"{where}: {error}", **extra)


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, "internal_error", f"internal server error; quote request id {request_id} when reporting it")


# what a value of each kind must look like, after pydantic's own words (which name no allowed values for these)
_EXPECTED = {"bool_parsing": "use true or false", "int_parsing": "use a whole number", "float_parsing": "use a number"}


def _descriptions(request: Request) -> dict[str, str]:
    """The route's parameters' documented meanings (and ranges), by name."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    params = [*getattr(dependant, "query_params", ()), *getattr(dependant, "path_params", ())]
    return {p.alias: p.field_info.description for p in params if getattr(p.field_info, "description", None)}


def _validation_message(exc: RequestValidationError, described: dict[str, str] | None = None) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body", "header")]
        name = ".".join(loc)
        msg = str(err.get("msg", "invalid value"))
        if hint := _EXPECTED.get(str(err.get("type", ""))):
            msg = f"{msg}; {hint}"
        if name and (meaning := (described or {}).get(name)):
            msg = f"{msg} ({meaning})"
        parts.append(f"{name}: {msg}" if name else msg)
    return "invalid request: " + "; ".join(parts)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return api_error_response(request.url.path, exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(request.url.path, 422, "invalid_request", _validation_message(exc, _descriptions(request)))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    status = exc.status_code
    code = STATUS_CODES.get(status, "error")
    if status == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif status == 405:
        allow = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {request.url.path}" + (f"; use {allow}" if allow else "")
    else:
        message = str(exc.detail)
    return error_response(request.url.path, status, code, message, dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]


_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
CLIENT_CLOSED = 499  # nginx's code for a client that went away before its answer


# -- the request context: id, in-flight count, metrics, the log line -------------------------------------------------


def request_id_of(scope: Scope) -> str:
    return scope.get("vitserve", {}).get("request_id", "")


def note(scope: Scope, **fields: object) -> None:
    """Routes add what the log line reports (model, images)."""
    scope.setdefault("vitserve", {}).update(fields)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def printable(path: str, limit: int = 200) -> str:
    """A request path as the log line shows it: unquoted like a route's template, with anything but printable
    ASCII (control characters, spaces, other scripts) escaped, so one request stays one line of space-separated
    fields (no log injection)."""
    escaped = path[:limit].encode("unicode_escape").decode("ascii")
    return "".join(c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" for c in escaped)


class RequestContext:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        context = {"request_id": request_id, "model": None, "images": 0}
        scope["vitserve"] = context
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        self.state.inflight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = status or CLIENT_CLOSED
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            if status == 0:
                response = api_error_response(scope["path"], internal_error(request_id))
                await response(scope, receive, send_with_id)
            status = status or 500
        finally:
            self.state.inflight -= 1
            self._record(scope, context, status or CLIENT_CLOSED, time.perf_counter() - started)

    def _record(self, scope: Scope, context: dict, status: int, seconds: float) -> None:
        endpoint = route_template(scope)
        metrics = self.state.metrics
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.duration.labels(endpoint).observe(seconds)
        if context.get("model") and status < 400 and context.get("images"):
            metrics.images.labels(context["model"], endpoint).inc(context["images"])
        log.info(
            "%s %s %s model=%s images=%d status=%d duration_ms=%.1f",
            context["request_id"],
            scope.get("method", ""),
            endpoint if endpoint != "unmatched" else printable(scope.get("path", "")),
            context.get("model") or "-",
            context.get("images") or 0,
            status,
            seconds * 1000.0,
        )


# -- the checks before a route: API key, readiness, the protected docs -----------------------------------------------


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
