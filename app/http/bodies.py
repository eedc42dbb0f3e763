"""Request bodies being read: bounded in bytes across the process, and in time.

A body still being read holds no place in a model's queue: a client that uploads slowly (or not at all) would
otherwise keep images that are ready from the model. Bodies are bounded apart from the queue:

- in bytes: all bodies being read at once share `--max-pending-body-bytes`. A body takes its Content-Length
  before its first byte is read (a chunked body takes its bytes as they come); a request that does not fit gets
  503 `overloaded`. A body alone is always let in (it is capped by `--max-upload-bytes` anyway).
- in time: the whole body must arrive within `--body-timeout-s` and, after its first 5 s, at `--min-body-rate`
  on average (the deadline moves 1 s later for every `min-body-rate` bytes received, as Apache's
  mod_reqtimeout does). Past either, 408 `timeout`. One timer per body, no extra task: when it fires it moves
  itself to the deadline that the bytes received by then allow, so a chunk costs nothing but a count.

A body that ends (read, refused or timed out) gives its bytes back to the budget at once, and its chunks are
freed with the reader's frame. A 408 closes the connection (that client is too slow to wait for); after a
refusal uvicorn reads the rest of the body and throws it away, within the time app.connections allows.

Memory that large bodies held goes back to the system a second after the last body being read ends
(`release_memory`): glibc otherwise keeps the freed space of the heap for later allocations, and 64 bodies of
20 MiB left 1.5 GB of resident memory behind after they closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging

from starlette.requests import Request

from app.http.errors import ApiError, invalid
from app.http.inputs import too_large

log = logging.getLogger("vitserve")

RATE_GRACE_S = 5.0  # a body's first seconds, before --min-body-rate applies (API.md)
TRIM_AFTER_BYTES = 1 << 20  # after a body this large, the heap is trimmed once no body is being read...
TRIM_DELAY_S = 1.0  # ...for this long: the requests have let go of their bodies by then

CLOSE = {"Connection": "close"}


class BodyReader:
    """Reads request bodies under the byte budget and the time limits of the module's docstring."""

    def __init__(self, max_bytes: int, budget: int, timeout_s: float, min_rate: float):
        self.max_bytes = max_bytes  # one body: --max-upload-bytes (413 beyond it)
        self.budget = budget  # all bodies being read: --max-pending-body-bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate  # bytes per second; 0: no rate check
        self.pending = 0  # bytes taken by the bodies being read
        self._large_ended = False  # a large body has ended since the heap was last trimmed
        self._trim: asyncio.TimerHandle | None = None  # the heap's next trim, when one is due

    async def read(self, request: Request) -> bytes:
        """The whole body; 413 once it is known to pass --max-upload-bytes, 503 `overloaded` when the budget has no
        room for it, 408 `timeout` when it arrives too late or too slowly."""
        declared = content_length(request)
        if declared > self.max_bytes:
            raise too_large(self.max_bytes)
        self._take(declared)
        clock = _Clock(self)
        held = declared
        chunks: list[bytes] = []
        try:
            async for chunk in request.stream():
                clock.received += len(chunk)
                if clock.received > self.max_bytes:
                    raise too_large(self.max_bytes)
                if clock.received > held:  # chunked, or more than it declared (h11 refuses that): take what came
                    self._take(clock.received - held)
                    held = clock.received
                chunks.append(chunk)
            return b"".join(chunks)
        except asyncio.CancelledError:
            if not clock.late:
                raise  # not ours: the server is stopping
            clock.task.uncancel()
            raise self._timeout(clock.received) from None
        finally:
            clock.stop()
            self.pending -= held
            self._large_ended |= held >= TRIM_AFTER_BYTES
            if self._large_ended and self.pending == 0 and self._trim is None:
                self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._release_memory)

    def _take(self, n: int) -> None:
        """n more bytes for a body being read, or 503 `overloaded` (a body alone always fits)."""
        if self.pending and self.pending + n > self.budget:
            raise ApiError(
                503,
                "overloaded",
                f"request bodies of {self.pending:,} bytes are being received (at most {self.budget:,}); "
                "retry after the time in the Retry-After header",
                headers={"Retry-After": "1"},
            )
        self.pending += n

    def deadline(self, started: float, received: int) -> float:
        """When a body begun at `started` must have arrived, given what has: the rate rule's deadline, capped by
        the timeout."""
        if self.min_rate <= 0:
            return started + self.timeout_s
        return started + min(self.timeout_s, RATE_GRACE_S + received / self.min_rate)

    def _timeout(self, received: int) -> ApiError:
        return ApiError(
            408,
            "timeout",
            f"the request body did not arrive in time ({received:,} bytes received): it must arrive within "
            f"{self.timeout_s:g} s, and after its first {RATE_GRACE_S:g} s at {self.min_rate:,.0f} bytes/s or more",
            headers=CLOSE,
        )

    def _release_memory(self) -> None:
        """Trim on a thread: it takes up to 100 ms on a heap that large bodies have grown, and holds the heap's
        lock meanwhile, so it waits for a moment when no body is being read (the next body would reuse the
        space anyway). Under a steady stream of bodies the heap stays at most the budget larger."""
        self._trim = None
        if self.pending == 0:
            self._large_ended = False
            asyncio.get_running_loop().run_in_executor(None, release_memory)


class _Clock:
    """One body's deadline, as one timer rather than one per chunk: when it fires, it moves itself to the deadline
    that the bytes received by then allow, or, once that has passed, cancels the task reading the body."""

    def __init__(self, reader: BodyReader):
        self.reader = reader
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.started = self.loop.time()
        self.received = 0
        self.late = False
        self._timer = self.loop.call_at(reader.deadline(self.started, 0), self._check)

    def _check(self) -> None:
        deadline = self.reader.deadline(self.started, self.received)
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._check)
        else:
            self.late = True
            self.task.cancel()

    def stop(self) -> None:
        self._timer.cancel()


def content_length(request: Request) -> int:
    """The declared body size (0 when none is declared: a chunked body); 422 when it is not a number."""
    length = request.headers.get("content-length")
    if length is None:
        return 0
    if not length.strip().isdigit():
        raise invalid("the Content-Length header is not a number")
    return int(length)


def _libc_malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(name).malloc_trim if name else None
    return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing to do)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
