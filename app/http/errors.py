"""The error envelope of API.md: `{"error": {"code", "message", ...}}`, and the handlers that produce it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

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
    """An answer with an error status: raised anywhere in a route, rendered as the envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


MAX_MESSAGE = 500  # characters: a message may quote what the client sent (a name, a path), never all of it


def cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def envelope(code: str, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": cut(message), **extra}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    return FastJSON(envelope(code, message, **extra), status_code=status, headers=headers)


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, "internal_error", f"internal server error; quote request id {request_id} when reporting it")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body", "header")]
        name = ".".join(loc)
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{name}: {msg}" if name else msg)
    return "invalid request: " + "; ".join(parts)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(422, "invalid_request", _validation_message(exc))


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
    return error_response(status, code, message, dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
