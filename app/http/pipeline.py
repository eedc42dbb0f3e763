"""The road every /v1 inference request travels: read the images, admit, decode in the pool, batch, answer.
/v2 (app.http.v2) takes the same steps (`reserve`, `expect`, `decode_uploads`, `run_items`, `guarded`).

Limits come first and cost nothing: a request takes a place in the model's queue before its body is read (503
overloaded when there is none, so bodies in flight are bounded by `max-queue` too), then the body cap and image
count while reading, then room for all its images (503 again, before any decoding), then the deadline (counted
from the moment the body has been read) and the client's disconnect, either of which drops the request's
unfinished work.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

from app.batching import Admission, ForwardFailed, Overloaded, Stopped
from app.decode import Decoded, Encoded, ImageError
from app.http.errors import ApiError, image_error, internal_error, invalid
from app.http.inputs import Upload, read_uploads
from app.http.middleware import note, request_id_of
from app.http.state import ServedModel, ServerState
from app.tasks import Item, Task, batch_key

T = TypeVar("T")


@dataclass
class Outcome:
    uploads: list[Upload]
    decoded: list[Decoded | Encoded]  # both tell the upright `size`
    results: list[object]
    previews: list[Decoded] | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.vit


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
