"""HTTP connections: at most --max-connections open, and request headers within --header-timeout-s.

uvicorn's HTTP protocols (h11 and httptools) wait for ever for a connection's first request, and for the rest
of headers that have begun to arrive (their keep-alive timer only runs between requests, and any byte stops
it); `limit_concurrency` still reads every request to answer 503. `guarded_protocol` is uvicorn's own protocol
with both limits, handed to uvicorn through its public `Config(http=...)`:

- a connection beyond the limit is closed as soon as it is accepted, before a byte is read (asyncio offers no
  public way to stop accepting). With --workers N each process takes its share of the limit, rounded up.
- the headers of each request must arrive within the timeout, counted from the moment the connection opened
  or the previous response was sent; otherwise the connection is closed. That includes the rest of a body the
  app answered without reading (a 401, a 503 for the byte budget): uvicorn reads it and throws it away, so a
  client that sent it gets its answer on a connection that stays open, and one that does not send it loses
  the connection. A request whose headers have arrived is bounded by app.http.pipeline.BodyReader (its body) and
  --request-timeout-s (its work).

Refusing or closing costs the server nothing; the client sees a closed connection.
"""

from __future__ import annotations

import asyncio
import logging
import math

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("vitserve")


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11: what its "auto" picks) with a cap on open
    connections (this process's) and a deadline for headers."""

    warned = 0.0  # when a refusal was last logged: one line a minute, however many are refused

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._waiting: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:  # this one included
                nonlocal warned
                if self.loop.time() - warned > 60:
                    warned = self.loop.time()
                    log.warning("%d connections open, the most allowed: new ones are closed", max_connections)
                transport.abort()
                return
            self._wait_for_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._answering():  # a request's headers have arrived: the app has it
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may already have started a pipelined request
            if not self.transport.is_closing() and not self._answering():
                self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _answering(self) -> bool:
            """A request's headers have arrived and its response is not complete."""
            return self.cycle is not None and not self.cycle.response_complete

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._waiting = self.loop.call_later(header_timeout_s, self._too_late)

        def _stop_waiting(self) -> None:
            if self._waiting is not None:
                self._waiting.cancel()
                self._waiting = None

        def _too_late(self) -> None:
            self._waiting = None
            if not self._answering() and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


def per_worker(max_connections: int, workers: int) -> int:
    """Each of `workers` processes' share of the open connections, rounded up."""
    return math.ceil(max_connections / workers)
