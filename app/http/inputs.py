"""The three input forms of API.md -> a list of `Upload(data, filename)`, with every limit enforced while reading.

- the body is read with a cap (`app.http.bodies`): a Content-Length over the limit is refused before a byte is
  read, and a streamed (chunked) body is refused as soon as it passes the limit, so nothing large is ever
  buffered;
- `multipart/form-data`: the file parts named `images` (other fields are ignored);
- `application/json`: `{"images": ["<base64>" or "data:image/...;base64,...", ...]}`;
- `image/*` or `application/octet-stream`: the body is the one image (filename null).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.http.errors import ApiError, invalid

if TYPE_CHECKING:
    from app.http.bodies import BodyReader

_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes")


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
    uploads = parse(body, request.headers.get("content-type", ""), max_images)
    if not uploads:
        raise invalid("no images in the request: send at least one")
    if len(uploads) > max_images:
        raise too_many(len(uploads), max_images)
    return uploads


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
    """Plain base64 or a data: URL (which must say ';base64')."""
    if not isinstance(item, str):
        raise invalid(f"images[{index}] must be a base64 string, not {type(item).__name__}")
    if item[:5].lower() == "data:":
        header, sep, item = item.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            message = "a data: URL must be base64 ('data:image/...;base64,...')"
            raise ApiError(400, "invalid_image", message, index=index, filename=None)
    try:
        return decode_base64(item)
    except ValueError:
        raise ApiError(400, "invalid_image", "the image is not valid base64", index=index, filename=None) from None


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional, ASCII whitespace ignored; ValueError when it is not base64."""
    data = _WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))  # anything non-ASCII becomes an invalid '?'
    data = data.replace(b"-", b"+").replace(b"_", b"/")
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)  # binascii.Error is a ValueError


def _multipart(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise invalid("multipart/form-data without a boundary")
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
    except MultipartParseError as e:
        raise invalid(f"malformed multipart body: {e}") from None
    uploads = []
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition.get(b"name") != b"images":
            continue
        filename = disposition.get(b"filename")
        uploads.append(Upload(data, filename.decode("utf-8", "replace") if filename is not None else None))
        if len(uploads) > max_images:
            raise too_many(len(uploads), max_images)
    return uploads
