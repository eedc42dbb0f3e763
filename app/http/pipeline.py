"""The road every /v1 inference request travels: read the images, admit, decode in the pool, batch, answer.
/v2 (app.http.v2) takes the same steps (`reserve`, `read_body`, `expect`, `decode_uploads`, `run_items`,
`guarded`).

Limits come first and cost nothing: a request takes a place in the model's queue before its body is read (503
overloaded when there is none, so bodies in flight are bounded by `max-queue` too), then the body cap and image
count while reading, then room for all its images (503 again, before any decoding), then the deadline (counted
from the moment the body has been read) and the client's disconnect, either of which drops the request's
unfinished work.

The body holds the images in one of API.md's three forms, each read into `Upload(data, filename)` with every
limit enforced while reading:
- the body is read with a cap: a Content-Length over the limit is refused before a byte is read, and a
  streamed (chunked) body is refused as soon as it passes the limit, so nothing large is ever buffered;
- `multipart/form-data`: the file parts named `images` (other fields are ignored; at most
  max-images-per-request + MAX_OTHER_PARTS parts, counted before parsing);
- `application/json`: `{"images": ["<base64>" or "data:image/...;base64,...", ...]}`;
- `image/*` or `application/octet-stream`: the body is the one image (filename null).
Nothing large is parsed on the event loop: a body with more than INLINE_SEPARATORS separators (JSON commas,
multipart line ends) holds more values than any request needs to carry, and parsing millions of them would
stall every other request (orjson and the multipart parser hold the GIL, so on a thread too); it is parsed in a
process of its own (`parse_off_loop`), which also refuses it for its counts there.

JPEGs for a runner that takes them (`Runner.takes_jpeg`: `--jpeg-decoder`) have only their header checked (on a
thread, `Decoder.pixels_or_jpeg`) and are queued compressed; their batch decodes them. One that turns out
undecodable then comes back as that image's `ImageError` (400, naming it), while the rest of its batch is
answered.

Memory held by a full queue is bounded: every queued item belongs to an admitted request (at most
`max-queue` images), and holds either h x w x 3 bytes of model-input pixels or, on the device path, a
reference to its request's body (at most `max-upload-bytes` each, held for the request's life anyway); and
at most `max-queue` bodies are being read at once.
"""

from __future__ import annotations

import asyncio
import base64
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
from app.tasks import Item, Task, batch_key

T = TypeVar("T")


# -- reading the body -------------------------------------------------------------------------------

_WHITESPACE = re.compile(rb"\s+")
INLINE_SEPARATORS = 4096  # a body with more is parsed in a process of its own (module doc)
PARSER_MODULES = ("app.http.pipeline", "app.http.v2_codec")  # what that process imports once (Decoder's preload)
MAX_OTHER_PARTS = 16  # multipart parts beside the images that a request may carry


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes")


def too_many(n: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"{n} images in one request; at most {limit} are allowed")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise invalid("the Content-Length header is not a number") from None
        if declared > limit:
            raise too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_uploads(request: Request, max_bytes: int, max_images: int) -> list[Upload]:
    """The request's images in order, or an ApiError (413, 415, 422, or 400 for undecodable base64)."""
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
    body = await read_body(request, max_bytes)
    content_type = request.headers.get("content-type", "")
    separators = 0  # what the parse would walk through, counted in C
    if parse is _multipart:
        _check_parts(body, _boundary(content_type), max_images)  # before the separators are even counted
        separators = body.count(b"\r\n")
    elif parse is _json:
        separators = body.count(b",")
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
    with reserve(served) as admission:
        uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_images_per_request)
        note(request.scope, model=served.name, images=len(uploads))
        if one_image and len(uploads) != 1:
            raise invalid(f"format=png draws one image; this request has {len(uploads)} (use format=json for several)")
        expect(admission, len(uploads))
        work = _decode_and_run(request, state, served, uploads, task, preview, admission)
        return await guarded(request, work, settings.request_timeout_s)


def reserve(served: ServedModel) -> Admission:
    """A place in the model's queue before the body is read, or 503 `overloaded` with a Retry-After.

    Before reading: under overload a refused request then costs no parse (about 1 ms for 32 images, time the
    accepted ones need), and bodies being read count against `max-queue`, which bounds the memory they hold."""
    try:
        return served.batcher.reserve()
    except Overloaded as e:
        raise _overloaded(e) from None


def expect(admission: Admission, n: int) -> None:
    """Room for the request's n images (its place grown), or 503 `overloaded` with a Retry-After."""
    try:
        admission.expect(n)
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
