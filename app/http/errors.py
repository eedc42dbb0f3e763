"""The error answers of API.md, and the handlers that produce them: the envelope `{"error": {"code", "message",
...}}` everywhere, except under /v2, where the Open Inference Protocol's `{"error": "<message>"}` is the shape."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.decode import ImageError
from app.http.responses import FastJSON

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
