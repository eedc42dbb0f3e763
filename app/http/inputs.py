"""The three input forms of API.md -> a list of `Upload(data, filename)`, with every limit enforced while reading.

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
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.http.errors import ApiError, invalid

_WHITESPACE = re.compile(rb"\s+")
INLINE_SEPARATORS = 4096  # a body with more is parsed in a process of its own (module doc)
PARSER_MODULES = ("app.http.inputs", "app.http.v2_codec")  # what that process imports once (Decoder's preload)
MAX_OTHER_PARTS = 16  # multipart parts beside the images that a request may carry
T = TypeVar("T")


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
        _check_parts(body, _boundary(content_type), max_images)
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


def _multipart(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    """The `images` parts (the part count checked by `_check_parts` before)."""
    boundary = _boundary(content_type)
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
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
        parts.append((state["headers"], b"".join(state["data"])))

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
    uploads = []
    names = []
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        names.append(disposition.get(b"name", b"").decode("utf-8", "replace"))
        if names[-1] != "images":
            continue
        filename = disposition.get(b"filename")
        uploads.append(Upload(data, filename.decode("utf-8", "replace") if filename is not None else None))
        if len(uploads) > max_images:
            raise too_many(len(uploads), max_images)
    if not uploads and names:
        sent = ", ".join(repr(name[:40]) for name in dict.fromkeys(names))
        raise invalid(
            f"the multipart files must be fields named 'images' (-F images=@photo.jpg); this request has {sent}"
        )
    return uploads
