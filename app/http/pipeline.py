"""The road every /v1 inference request travels: read the images, admit, decode in the pool, batch, answer.
/v2 (app.http.v2) takes the same steps (`refuse_when_full`, `BodyReader.read`, `admit`, `decode_uploads`,
`run_items`, `guarded`).

Limits come first and cost nothing: the body is read under the limits of `BodyReader` below (its size, the bytes
of all bodies being read, its time: 413, 503 or 408) and the image count; only then does the request take room
for all its images in the model's queue (503 overloaded when there is none, before any decoding), so a body still
on its way holds no place there. Then the deadline (counted from the moment the body has been read) and the
client's disconnect, either of which drops the request's unfinished work.

Bodies being read are bounded apart from the queue (`BodyReader`), since a client that uploads slowly (or not
at all) would otherwise keep images that are ready from the model:

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

The body holds the images in one of API.md's three forms, each read into `Upload(data, filename)` with every
limit enforced while reading:
- the body is read with a cap (`BodyReader`): a Content-Length over the limit is refused before a byte is
  read, and a streamed (chunked) body is refused as soon as it passes the limit, so nothing large is ever
  buffered;
- `multipart/form-data`: the file parts named `images` (other fields are ignored; at most
  max-images-per-request + MAX_OTHER_PARTS parts, counted before parsing);
- `application/json`: `{"images": ["<base64>" or "data:image/...;base64,...", ...]}`;
- `image/*` or `application/octet-stream`: the body is the one image (filename null).
Nothing large is parsed on the event loop: a JSON body with more than INLINE_SEPARATORS commas holds more values
than any request needs to carry, and parsing millions of them would stall every other request (orjson holds the
GIL, so on a thread too); it is parsed in a process of its own (`parse_off_loop`), which also refuses it for its
counts there. A multipart body's parts are counted before it is parsed, and more than a request may carry is
refused (413): the parser's work grows with the parts alone.

JPEGs for a runner that takes them (`Runner.takes_jpeg`: `--jpeg-decoder`) have only their header checked (on a
thread, `Decoder.pixels_or_jpeg`) and are queued compressed; their batch decodes them. One that turns out
undecodable then comes back as that image's `ImageError` (400, naming it), while the rest of its batch is
answered.

Memory held by a full queue is bounded: every queued item belongs to an admitted request (at most
`max-queue` images), and holds either h x w x 3 bytes of model-input pixels or, on the device path, a
reference to its request's body (at most `max-upload-bytes` each, held for the request's life anyway); and
the bodies being read hold at most `max-pending-body-bytes` together.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.batching import Admission, ForwardFailed, Overloaded, Stopped
from app.decode import Decoded, Encoded, ImageError
from app.http.envelope import ApiError, image_error, internal_error, invalid, note, request_id_of, state_of
from app.http.state import ServedModel, ServerState
from app.settings import Settings
from app.tasks import Item, Task, batch_key

T = TypeVar("T")


# -- reading the body -------------------------------------------------------------------------------

_WHITESPACE = re.compile(rb"\s+")
INLINE_SEPARATORS = 4096  # a body with more is parsed in a process of its own (module doc)
PARSER_MODULES = ("app.http.pipeline", "app.http.v2_codec")  # what that process imports once (Decoder's preload)
MAX_OTHER_PARTS = 16  # multipart parts beside the images that a request may carry


RATE_GRACE_S = 5.0  # a body's first seconds, before --min-body-rate applies (API.md)
TRIM_AFTER_BYTES = 1 << 20  # after a body this large, the heap is trimmed once no body is being read...
TRIM_DELAY_S = 1.0  # ...for this long: the requests have let go of their bodies by then

CLOSE = {"Connection": "close"}


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes")


class BodyReader:
    """Reads request bodies under the byte budget and the time limits of the module's docstring (`read`)."""

    @classmethod
    def of(cls, settings: Settings) -> BodyReader:
        """The reader of one server process: its share of the budget, rounded up, with --workers."""
        s = settings
        return cls(s.max_upload_bytes, -(-s.max_pending_body_bytes // s.workers), s.body_timeout_s, s.min_body_rate)

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
            chunks.clear()  # the pieces go now (an exception's traceback would keep this frame's list alive)
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


def _libc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(name).malloc_trim if name else None
    return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing to do)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


def too_many(n: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"{n} images in one request; at most {limit} are allowed")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_uploads(request: Request, bodies: BodyReader, max_images: int) -> list[Upload]:
    """The request's images in order, or an ApiError (413, 415, 422, or 400 for undecodable base64; 408 and 503 from
    reading the body)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        parse = _multipart
    elif kind == "application/json" or kind.endswith("+json"):
        parse = _json
    elif kind.startswith("image/") or kind == "application/octet-stream":
        parse = _raw
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {kind or '(none)'!r}: send multipart/form-data with 'images' files, "
            "application/json with base64 'images', or the image itself as image/* or application/octet-stream",
        )
    body = await bodies.read(request)
    content_type = request.headers.get("content-type", "")
    # what the parse would walk through, counted in C. Not for multipart: its parser finds each part's end with
    # bytes.find and reads at most 8 header lines a part, so its Python work grows with the parts alone, and
    # multipart_parts counts those before parsing (counting every line end cost 2 ms a 2 MB body)
    separators = body.count(b",") if parse is _json else 0
    uploads = await parse_off_loop(request, separators, parse, body, content_type, max_images)
    if not uploads:
        raise invalid("no images in the request: send at least one")
    if len(uploads) > max_images:
        raise too_many(len(uploads), max_images)
    return uploads


async def parse_off_loop(request: Request, separators: int, parse: Callable[..., T], *args: object) -> T:
    """parse(*args) here when the body holds at most INLINE_SEPARATORS `separators` (microseconds of work), else in a
    process of its own (`Decoder.isolated`, killed if the request stops waiting)."""
    if separators <= INLINE_SEPARATORS:
        return parse(*args)
    return await request.app.state.vit.decoder.isolated(parse, *args)


def _raw(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    return [Upload(body, None)] if body else []


def _json(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise invalid(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise invalid('the JSON body must be an object {"images": ["<base64>", ...]}')
    items = doc["images"]
    if not isinstance(items, list):
        raise invalid('"images" must be a list of base64 strings')
    if len(items) > max_images:
        raise too_many(len(items), max_images)
    return [Upload(_b64(item, i), None) for i, item in enumerate(items)]


def _b64(item: object, index: int) -> bytes:
    if not isinstance(item, str):
        raise invalid(f"images[{index}] must be a base64 string, not {type(item).__name__}")
    return image_base64(item, index)


def image_base64(text: str, index: int, where: str = "") -> bytes:
    """One image as plain base64 or a data: URL (which must say ';base64') -> its bytes, the one rule of /v1 and /v2;
    400 `invalid_image` naming the image (its `index`, prefixed by `where`) when it is neither."""
    prefix = f"{where}: image {index}: " if where else ""
    if text[:5].lower() == "data:":
        header, sep, text = text.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            message = f"{prefix}a data: URL must be base64 ('data:image/...;base64,...')"
            raise ApiError(400, "invalid_image", message, index=index, filename=None)
    try:
        return decode_base64(text)
    except ValueError:
        message = f"{prefix}the image is not valid base64"
        raise ApiError(400, "invalid_image", message, index=index, filename=None) from None


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional, ASCII whitespace ignored; ValueError when it is not base64."""
    data = _WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))  # anything non-ASCII becomes an invalid '?'
    data = data.replace(b"-", b"+").replace(b"_", b"/")
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)  # binascii.Error is a ValueError


def _boundary(content_type: str) -> bytes:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise invalid("multipart/form-data without a boundary")
    return boundary


def _check_parts(body: bytes, boundary: bytes, max_images: int) -> None:
    """413 for a multipart body of more parts than a request may carry, counted before parsing."""
    max_parts = max_images + MAX_OTHER_PARTS
    parts_sent = body.count(b"--" + boundary) - 1  # the delimiters: one before each part, and the closing one
    if parts_sent > max_parts:
        message = f"{parts_sent:,} multipart parts; at most {max_parts} are read"
        raise ApiError(413, "payload_too_large", f"{message} ({max_images} images and {MAX_OTHER_PARTS} other fields)")


@dataclass
class Part:
    name: str  # the form field's name
    filename: str | None
    data: bytes


def multipart_parts(body: bytes, content_type: str, max_images: int) -> list[Part]:
    """Every part of a multipart body, its count checked before parsing (413 past max_images + MAX_OTHER_PARTS)."""
    boundary = _boundary(content_type)
    _check_parts(body, boundary, max_images)
    parts: list[Part] = []
    state: dict = {}

    def part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        parts.append(
            Part(name, filename.decode("utf-8", "replace") if filename is not None else None, b"".join(state["data"]))
        )

    callbacks = {
        "on_part_begin": part_begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:  # a malformed body, or a boundary longer than the parser takes
        raise invalid(f"malformed multipart body: {e}") from None
    return parts


def _multipart(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    """The `images` parts; 422 naming the fields sent when none is called `images`."""
    parts = multipart_parts(body, content_type, max_images)
    uploads = [Upload(p.data, p.filename) for p in parts if p.name == "images"]
    if len(uploads) > max_images:
        raise too_many(len(uploads), max_images)
    if not uploads and parts:
        sent = ", ".join(repr(name[:40]) for name in dict.fromkeys(p.name for p in parts))
        raise invalid(
            f"the multipart files must be fields named 'images' (-F images=@photo.jpg); this request has {sent}"
        )
    return uploads


# -- admitting, decoding, running ---------------------------------------------------------------------


@dataclass
class Outcome:
    uploads: list[Upload]
    decoded: list[Decoded | Encoded]  # both tell the upright `size`
    results: list[object]
    previews: list[Decoded] | None = None


def pick_model(state: ServerState, name: str | None) -> ServedModel:
    """The model called `name` among the loaded ones (never anything else), or the default."""
    if name is None or name == "":
        assert state.default_model is not None
        return state.models[state.default_model]
    served = state.models.get(name)
    if served is None:
        known = ", ".join(state.models)
        raise ApiError(404, "model_not_found", f"no model named {name[:100]!r}; loaded models: {known}")
    return served


async def infer(
    request: Request, served: ServedModel, task: Task, *, one_image: bool = False, preview: bool = False
) -> Outcome:
    """Read the request's images and run `task` on each; errors as API.md says."""
    state = state_of(request)
    settings = state.settings
    refuse_when_full(served)
    uploads = await read_uploads(request, state.bodies, settings.max_images_per_request)
    note(request.scope, model=served.name, images=len(uploads))
    if one_image and len(uploads) != 1:
        raise invalid(f"format=png draws one image; this request has {len(uploads)} (use format=json for several)")
    with admit(served, len(uploads)) as admission:
        work = _decode_and_run(request, state, served, uploads, task, preview, admission)
        return await guarded(request, work, settings.request_timeout_s)


def refuse_when_full(served: ServedModel) -> None:
    """503 `overloaded` before the body is read when the queue has no room left at all: under overload a refused
    request then costs no read and no parse (about 1 ms for 32 images, time the accepted ones need). Nothing is
    taken: `admit` decides once the body has been read."""
    try:
        served.batcher.check_room(1)
    except Overloaded as e:
        raise _overloaded(e) from None


def admit(served: ServedModel, n: int) -> Admission:
    """Room for the request's n images in the model's queue, or 503 `overloaded` with a Retry-After. Taken once the
    body has been read: an upload, however slow, never holds a place that images ready to run could use."""
    try:
        return served.batcher.admit(n)
    except Overloaded as e:
        raise _overloaded(e) from None


def _overloaded(e: Overloaded) -> ApiError:
    return ApiError(503, "overloaded", str(e), headers={"Retry-After": str(e.retry_after)})


async def _decode_and_run(
    request: Request,
    state: ServerState,
    served: ServedModel,
    uploads: list[Upload],
    task: Task,
    preview: bool,
    admission: Admission,
) -> Outcome:
    decoded, previews = await decode_uploads(state, served, uploads, preview)
    items = [to_item(d, task) for d in decoded]
    results = await run_items(request, served, items, admission, [u.filename for u in uploads])
    return Outcome(uploads, decoded, results, previews or None)


async def decode_uploads(
    state: ServerState, served: ServedModel, uploads: list[Upload], preview: bool = False
) -> tuple[list[Decoded | Encoded], list[Decoded]]:
    """Every upload decoded for `served` at once (with `preview`, also the picture an overlay is drawn on);
    400 naming the first image that cannot be decoded."""
    decoder = state.decoder
    assert decoder is not None
    decode = _image_decoder(state, served)
    jobs = [decode(u.data) for u in uploads]
    if preview:
        jobs += [decoder.preview(u.data) for u in uploads]
    done = await asyncio.gather(*jobs, return_exceptions=True)
    decoded, previews = done[: len(uploads)], done[len(uploads) :]
    for i, d in enumerate(decoded):
        if isinstance(d, ImageError):
            raise image_error(d, i, uploads[i].filename)
        if isinstance(d, BaseException):
            raise d  # the pool itself failed: a server fault
    for d in previews:
        if isinstance(d, BaseException):
            raise d
    return decoded, previews  # type: ignore[return-value]


async def run_items(
    request: Request,
    served: ServedModel,
    items: list[Item],
    admission: Admission,
    filenames: Sequence[str | None] = (),
) -> list[object]:
    """The model's results for `items`, in order, through its batcher; its failures as API.md's errors (with
    `filenames`, an image that fails is named by its file too)."""
    try:
        results = await served.batcher.run(items, batch_key(items[0]), admission)
    except Stopped as e:  # the batcher stopped or halted first
        results = [e]
    for i, result in enumerate(results):
        if isinstance(result, ImageError):  # found while its batch decoded it on the device
            raise image_error(result, i, filenames[i] if filenames else None)
        if isinstance(result, ForwardFailed):
            raise internal_error(request_id_of(request.scope))
        if isinstance(result, Stopped):  # shutting down, or the device is lost or hangs: the reason says which
            raise ApiError(503, "not_ready", f"{result}; retry on another instance")
    return results


def _image_decoder(state: ServerState, served: ServedModel) -> Callable[[bytes], Awaitable[Decoded | Encoded]]:
    """The decode step for a model: pixels from the pool, or for a runner that takes JPEGs a JPEG whose header is
    checked and which is queued compressed for its batch to decode."""
    decoder = state.decoder
    assert decoder is not None
    cfg = served.model.preprocess_config
    if served.batcher.runner.takes_jpeg:
        return partial(decoder.pixels_or_jpeg, cfg=cfg)
    return partial(decoder.pixels, cfg=cfg)


def to_item(decoded: Decoded | Encoded, task: Task) -> Item:
    if isinstance(decoded, Encoded):
        return Item(task, jpeg=decoded)
    return Item(task, pixels=decoded.pixels)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body has been read; only a disconnect can follow)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, work: Awaitable[T], timeout: float) -> T:
    """Run `work` until it finishes, the deadline passes (504) or the client disconnects (dropped).

    The work runs in this task, under a timeout; one watcher task cancels it if the client goes away. (A task for
    the work as well, with `asyncio.wait` over both, cost 34-43 us a request instead of 15.)
    """
    this = asyncio.current_task()
    assert this is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(request)
        gone = True
        this.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError:
        raise ApiError(
            504, "timeout", f"the request took longer than the {timeout:g} s limit; its unfinished work was dropped"
        ) from None
    except asyncio.CancelledError:
        if not gone:
            raise  # not ours: the server is stopping
        this.uncancel()
        raise ClientDisconnect() from None
    finally:
        watcher.cancel()
