"""One pure-ASGI middleware around every request: request id, in-flight count, metrics, the log line, and the
last line of defence (an unhandled exception becomes a 500 with the request id, in the error shape of its path, never
a traceback).

Pure ASGI rather than BaseHTTPMiddleware, so streaming bodies and disconnect notices pass through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import api_error_response, internal_error
from app.http.state import ServerState

log = logging.getLogger("vitserve.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
CLIENT_CLOSED = 499  # nginx's code for a client that went away before its answer


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
