"""Image bytes -> validated RGB pixels: format sniffing, the pixel limit before decoding, EXIF, colour modes.

The functions here are pure and picklable, so a `Decoder` runs them in a process pool (default), a
thread pool or inline, never on the event loop. What comes back to the server is small: the uint8
pixels at the model's input size (not the full image) and the original size.

Safety: only the six formats of API.md are ever handed to Pillow (sniffed from magic bytes, never from
a file name or a content type), and what decoding would cost is read from the header and checked against the
`Limits` before a single pixel is decoded, so a decompression bomb costs microseconds: width x height, the bytes
the decoded samples take (a 16-bit image counts double), and for a JPEG its number of scans (a progressive JPEG
costs a pass over every coefficient per scan; a crafted one repeats a scan thousands of times). Pillow's own bomb
check is off in any process that imports this module: `open_checked` applies the configured limit, and says so.

The rare image that is still slow to decode within those limits (a JPEG of many pixels and many scans, see
`SLOW_SCAN_PIXELS`) is decoded in a process of its own (`Decoder.isolated`), killed the moment its request stops
waiting for it (timeout or disconnect); every other image takes the pool, with no extra copy or process hop.

With `--jpeg-decoder torchvision` (`Decoder.pixels_or_jpeg`), a JPEG whose header passes every check is not
decoded here: it goes to the batch as an `Encoded` (its compressed bytes, upright size and EXIF orientation)
and is decoded with its batch on the model's device (`app.gpu_decode`). Everything else, and JPEGs the device
path does not take (CMYK, Adobe RGB-transform, more than `DEVICE_MAX_PIXELS`), is decoded here as before.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import re
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np
from PIL import Image, ImageMode, ImageOps

from app.preprocess import PreprocessConfig, resized_size, to_model_pixels

ORIENTATION = 0x0112  # EXIF tag
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
WHITE = (255, 255, 255)
PREVIEW_SIDE = 1024  # longest side of the image an overlay is drawn on
DEVICE_MAX_PIXELS = 1 << 25  # largest JPEG (33.5 M pixels) decoded on the model's device; larger ones here
DEVICE_JPEG_MODES = ("RGB", "L")  # colour JPEGs (YCbCr) and grey ones; CMYK / YCCK stay with Pillow
# width x height x scans above which a JPEG is decoded in a process of its own (Decoder.isolated): about 0.3 s of
# CPU, while a 12-megapixel progressive photo of 10 scans is 120 M
SLOW_SCAN_PIXELS = 1 << 29
ISOLATED_NAME = "vitserve-isolated"  # the name of each process of Decoder.isolated
ROWS_AT_ONCE = 256  # rows of a high-depth image converted to 8-bit at a time
MARKERS_PER_SCAN = 8  # a JPEG may hold this many markers per allowed scan (tables, restarts aside); real ones: ~4
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker; not stuffing, a restart or a fill byte
log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = None  # Pillow's bomb check off: open_checked applies the configured limits (module doc)


class ImageError(Exception):
    """An image the server will not decode; `code` is the API error code."""

    code = "invalid_image"


class InvalidImage(ImageError):
    code = "invalid_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class SlowImage(Exception):
    """Raised by a decode asked not to take a slow image (`slow_ok=False`): `Decoder` decodes it in a process of its
    own instead."""


@dataclass(frozen=True)
class Limits:
    """What an image may cost, checked from its header before decoding (API.md's option table)."""

    pixels: int  # --max-image-pixels
    decoded_bytes: int | None = None  # --max-decoded-bytes; None: 4 x pixels
    jpeg_scans: int = 100  # --max-jpeg-scans

    @classmethod
    def of(cls, limits: Limits | int) -> Limits:
        """`limits`, or a pixel limit with the other limits at their defaults."""
        return limits if isinstance(limits, Limits) else cls(limits)

    @property
    def bytes(self) -> int:
        return self.decoded_bytes if self.decoded_bytes is not None else 4 * self.pixels


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (h, w, 3)
    size: tuple[int, int]  # (width, height) of the upright original image


@dataclass(frozen=True)
class Encoded:
    """A checked JPEG queued compressed, decoded with its batch on the model's device (`app.gpu_decode`).

    Memory: `data` is the request's own bytes object (the body is held for the request anyway), never a copy,
    so a full queue of these holds at most the admitted requests' bodies: max-upload-bytes x requests admitted,
    and requests admitted <= images admitted <= max-queue. Decoded pixels exist only while their batch is
    prepared (bounded per batch by `app.gpu_decode.CHUNK_PIXELS`), instead of h x w x 3 bytes per queued image.
    """

    data: bytes
    size: tuple[int, int]  # (width, height) of the upright image
    orientation: int  # EXIF orientation to apply after decoding
    limits: Limits | int  # the server's limits (an int: pixels), for a Pillow decode if the device cannot decode it

    def decode_here(self, cfg: PreprocessConfig) -> Decoded:
        """The PIL path for this image, when the device cannot decode it (full decode, no draft: the closest to
        what the device does). Raises `ImageError` for an image Pillow cannot decode either."""
        return decode_to_pixels(self.data, cfg, self.limits, draft=False)


def sniff(data: bytes) -> str | None:
    """The Pillow format name from the magic bytes, or None for anything we do not decode."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def open_checked(data: bytes, limits: Limits | int) -> Image.Image:
    """Open lazily (header only) and refuse what is unsupported, zero-sized or over the `limits` (an int: pixels).
    A JPEG's number of scans is left in `image.info["scans"]`, beside Pillow's own "progressive"."""
    limits = Limits.of(limits)
    if not data:
        raise InvalidImage("the image is empty (zero bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise InvalidImage("unsupported or unrecognised image format; send JPEG, PNG, WebP, GIF, BMP or TIFF")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Exception as e:
        raise InvalidImage(f"cannot read the {fmt} header: {e}") from None
    check_size(*image.size, limits.pixels)
    size = decoded_bytes(image)
    if size > limits.bytes:
        raise ImageTooLarge(
            f"the image's {image.width} x {image.height} pixels decode to {size:,} bytes "
            f"({size // (image.width * image.height)} per pixel), more than the limit of {limits.bytes:,}"
        )
    if fmt == "JPEG":
        image.info["scans"] = check_jpeg_scans(data, limits.jpeg_scans)
    return image


def decoded_bytes(image: Image.Image) -> int:
    """width x height x bytes per pixel of the samples in the file: bands x 1, or 2 for 16-bit samples (which Pillow
    keeps as "I;16", or reads from a "RGB;16B"-style raw mode), or 4 for 32-bit ones ("I", "F")."""
    mode = ImageMode.getmode(image.mode)
    per_band = np.dtype(mode.typestr).itemsize
    if per_band == 1 and any(";16" in str(tile.args) for tile in image.tile):
        per_band = 2
    return image.width * image.height * len(mode.bands) * per_band


def check_jpeg_scans(data: bytes, max_scans: int) -> int:
    """Refuse a JPEG of more than `max_scans` scans (SOS markers), or of more than MARKERS_PER_SCAN x `max_scans`
    markers in all, counted before decoding: each segment is skipped by its length (so an EXIF thumbnail is not
    counted), entropy-coded data by a search for the next marker, and counting stops at the end-of-image marker.
    Returns the number of scans."""
    scans = jpeg_scans(data, max_scans)
    if scans > max_scans:
        raise InvalidImage(
            f"the JPEG has more than {max_scans} scans, or more than {MARKERS_PER_SCAN * max_scans} markers in all "
            "(encoders write about 10 scans); it is refused before decoding"
        )
    return scans


def jpeg_scans(data: bytes, max_scans: int = 100) -> int:
    """The number of scans of a JPEG, counted up to `max_scans` + 1 (more than MARKERS_PER_SCAN x `max_scans` markers
    count as `max_scans` + 1 too)."""
    scans = markers = 0
    pos = 2  # after the start-of-image marker
    while scans <= max_scans and (found := _JPEG_MARKER.search(data, pos)) is not None:
        at, code = found.start(), data[found.start() + 1]
        if code == 0xD9:  # end of image
            break
        markers += 1
        if markers > MARKERS_PER_SCAN * max_scans:
            return max_scans + 1
        scans += code == 0xDA
        stands_alone = code in (0x01, 0xD8)  # TEM and a stray SOI carry no length
        pos = at + 2 + (0 if stands_alone else int.from_bytes(data[at + 2 : at + 4], "big"))
    return scans


def check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse a zero-sized image, or one of more than `max_pixels` (known from a header, before any decoding)."""
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image is zero-sized ({width} x {height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image has {width} x {height} = {width * height:,} pixels, more than the limit of {max_pixels:,}"
        )


def check_resize(size: tuple[int, int], cfg: PreprocessConfig, max_pixels: int) -> None:
    """Refuse an aspect ratio so extreme that resizing the upright `size` for the model would make more than
    `max_pixels` pixels: a 1 x 40,000,000 strip would become 36 x 1.4e9 pixels before its crop."""
    rw, rh = resized_size(size[0], size[1], cfg.resize)
    if rw * rh > max_pixels:
        raise InvalidImage(
            f"the image's aspect ratio ({size[0]} x {size[1]}) is too extreme: resizing it for the model "
            f"would take {rw * rh:,} pixels"
        )


def model_input(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An upright RGB image -> contiguous uint8 pixels at the model's input size."""
    try:
        return np.ascontiguousarray(to_model_pixels(image, cfg))
    except Exception as e:  # e.g. an image too thin to resize to the target
        raise InvalidImage(f"the image cannot be resized to the model's input: {e}") from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (read from the header, nothing decoded)."""
    w, h = image.size
    return (h, w) if orientation(image) in TRANSPOSED else (w, h)


def orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # a broken EXIF block: ignore it as browsers do
        return 1


def draft_target(size: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int]:
    """Smallest (w, h) a JPEG of upright `size` may be DCT-scaled to: twice the resize target on each side, so
    that the resize that follows still averages over enough source pixels to match a full decode."""
    rw, rh = resized_size(size[0], size[1], cfg.resize)
    return (2 * rw, 2 * rh)


def apply_draft(image: Image.Image, target: tuple[int, int]) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale that stays at least `target` (upright w, h)."""
    if image.format != "JPEG":
        return
    tw, th = target
    if orientation(image) in TRANSPOSED:
        tw, th = th, tw  # the file's own frame
    if image.width >= 2 * tw and image.height >= 2 * th:
        image.draft(image.mode, (tw, th))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB: grey, palette, CMYK and the rest converted; 16-bit scaled; alpha composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(high_depth_to_uint8(np.asarray(image)), "L")
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def high_depth_to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int holding 16-bit) grey levels -> 8-bit by their top byte; floats in [0, 1] or
    [0, 255] scaled to 8-bit. Converted a band of rows at a time, so the temporaries stay small beside the image."""
    out = np.empty(a.shape, np.uint8)
    if a.dtype.kind == "f":
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        for i in range(0, len(a), ROWS_AT_ONCE):
            rows = np.nan_to_num(a[i : i + ROWS_AT_ONCE].astype(np.float32))
            out[i : i + ROWS_AT_ONCE] = np.clip(rows * scale + 0.5, 0, 255)
        return out
    shift = 8 if a.max(initial=0) > 255 else 0
    for i in range(0, len(a), ROWS_AT_ONCE):
        out[i : i + ROWS_AT_ONCE] = np.clip(np.clip(a[i : i + ROWS_AT_ONCE], 0, 65535) >> shift, 0, 255)
    return out


def decode_image(
    data: bytes,
    limits: Limits | int,
    target: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    slow_ok: bool = True,
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (an upright RGB image, the upright size of the original).

    With `target` (upright size -> smallest acceptable upright (w, h)), a JPEG may be decoded at a
    reduced DCT scale that stays at least that large; the image is then smaller than the original.
    Without `slow_ok`, a JPEG of more than SLOW_SCAN_PIXELS pixels x scans raises `SlowImage` before decoding.
    """
    limits = Limits.of(limits)
    image = open_checked(data, limits)
    scan_pixels = image.width * image.height * image.info.get("scans", 1)
    if not slow_ok and scan_pixels > SLOW_SCAN_PIXELS:
        raise SlowImage()
    size = upright_size(image)
    try:
        if target is not None:
            apply_draft(image, target(size))
        image.load()  # first frame of a GIF / WebP animation / multi-page TIFF
        ImageOps.exif_transpose(image, in_place=True)  # upright without copying an image already upright
        image = to_rgb(image)
    except Exception as e:  # Pillow reports corrupt data with many exception types
        raise InvalidImage(f"the image data is truncated or corrupt: {e}") from None
    if image.width == 0 or image.height == 0:
        raise InvalidImage("the image is zero-sized")
    return image, size


def decode_to_pixels(
    data: bytes, cfg: PreprocessConfig, limits: Limits | int, draft: bool = True, slow_ok: bool = True
) -> Decoded:
    """Bytes -> uint8 pixels at the model's input size (the CPU half of preprocessing), and the upright size.

    A JPEG decoded at a reduced scale is resized from there exactly as the full image would be.
    """
    limits = Limits.of(limits)
    target = partial(draft_target, cfg=cfg) if draft else None
    image, size = decode_image(data, limits, target, slow_ok)
    # the original's size: a JPEG decoded at a reduced scale (still twice its resize) is far below the limit either way
    check_resize(size, cfg, limits.pixels)
    return Decoded(model_input(image, cfg), size)


def ends_complete(jpeg: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (zero padding allowed). A truncated upload does not, and a
    device decoder may fill in what is missing where Pillow refuses it: such a file goes to Pillow, which decides
    (a JPEG with data after its marker, as some cameras write, is simply decoded there too)."""
    return jpeg.rstrip(b"\x00").endswith(b"\xff\xd9")


def jpeg_for_device(
    data: bytes, cfg: PreprocessConfig, limits: Limits | int, device_max_pixels: int = DEVICE_MAX_PIXELS
) -> Encoded | None:
    """A JPEG that the device path takes, its header checked (Pillow reads the markers only: ~25 us) and nothing
    decoded; None for anything that must be decoded on the CPU instead. Every check of the PIL path up to the
    decode runs here, with the same errors."""
    if sniff(data) != "JPEG" or not ends_complete(data):
        return None
    limits = Limits.of(limits)
    image = open_checked(data, limits)
    width, height = image.size
    rgb_transform = image.info.get("adobe_transform") == 0 and image.mode == "RGB"  # RGB stored without YCbCr
    if image.mode not in DEVICE_JPEG_MODES or rgb_transform or width * height > device_max_pixels:
        return None
    size = upright_size(image)
    check_resize(size, cfg, limits.pixels)
    return Encoded(data, size, orientation(image), limits)


def decode_preview(data: bytes, limits: Limits | int, max_side: int = PREVIEW_SIDE, slow_ok: bool = True) -> Decoded:
    """Bytes -> the upright RGB image, shrunk to at most `max_side` on its longest side (for overlays)."""

    def target(size: tuple[int, int]) -> tuple[int, int]:
        scale = min(1.0, max_side / max(size))
        return (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))

    image, size = decode_image(data, limits, target, slow_ok)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return Decoded(np.asarray(image, dtype=np.uint8), size)


def _init_worker() -> None:
    """In each decoding process: Ctrl+C is left to the server, which shuts the pool down itself; the format plugins
    load once, not on the first request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.init()


def _noop() -> int:
    return 0


def _isolated_main(send: Connection, fn: Callable, args: tuple) -> None:
    """In a process of its own: send back (True, fn(*args)) or (False, the exception it raised)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        outcome = (True, fn(*args))
    except Exception as e:
        outcome = (False, e)
    send.send(outcome)


class ProcessDied(RuntimeError):
    """The process of `Decoder.isolated` ended without an answer (a crash, the OOM killer)."""


class _Isolated:
    """One call in a fresh process: `run` (on a waiting thread) starts it and returns what it sends back; `kill` (from
    the event loop) stops it at any point, also before it has started."""

    def __init__(self, context: multiprocessing.context.BaseContext, fn: Callable, args: tuple):
        self._receive, self._send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_isolated_main, args=(self._send, fn, args), name=ISOLATED_NAME, daemon=True
        )
        self._lock = threading.Lock()
        self._killed = False

    def run(self) -> tuple[bool, object]:
        try:
            with self._lock:
                if self._killed:
                    return False, ProcessDied("stopped before it started")
                self._process.start()
            self._send.close()
            return self._receive.recv()
        except EOFError:
            return False, ProcessDied(f"the process ended with status {self._process.exitcode}")
        finally:
            self._receive.close()
            if self._process.pid is not None:
                self._process.join()

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            if self._process.pid is not None:
                self._process.kill()


class Decoder:
    """Runs the decode functions off the event loop: `await decoder.pixels(data, cfg)`.

    A decoding process that dies (a codec crash on a crafted file, the OOM killer, a stray kill) breaks a process
    pool for good, and every later image would fail with it. So the pool is replaced at once, and each image the
    crash took down is decoded again on its own, one at a time, in a process of its own: the image that crashed
    it (if any) is the only one refused (400), and the images beside it are answered.

    A slow image (`SlowImage`) is decoded by `isolated`: in a fresh process, killed when its request stops waiting.
    `preload`: the modules every process forks with, imported once (those of the functions given to `isolated`).
    """

    def __init__(
        self,
        limits: Limits | int,
        workers: int = 2,
        kind: Literal["process", "thread"] = "process",
        draft: bool = True,
        on_restart: Callable[[], None] | None = None,
        preload: Sequence[str] = ("app.decode",),
    ):
        self.limits = Limits.of(limits)
        self.draft = draft
        self.workers = workers
        self.kind = kind
        self.preload = list(preload)
        self._pool: Executor | None = None
        self._header_thread = ThreadPoolExecutor(1, thread_name_prefix="jpeg-header")
        self._alone: ProcessPoolExecutor | None = None  # after a crash: one image at a time (see the class)
        self._alone_lock = asyncio.Lock()
        # isolated calls: at most one per decode worker at once, each waited for by a thread of its own
        self._isolated_slots = asyncio.Semaphore(max(1, workers))
        self._isolated_threads = ThreadPoolExecutor(max(1, workers), thread_name_prefix="isolated")
        self._isolated_running: set[_Isolated] = set()  # killed by close()
        self.on_restart = on_restart  # told of each pool replaced after a crash (the server counts them in /metrics)
        if workers > 0 and kind == "process":
            self._pool = self._process_pool(workers)
        elif workers > 0:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def _context(self) -> multiprocessing.context.BaseContext:
        context = multiprocessing.get_context("forkserver")
        # the fork server imports these once; each process then forks from it, already warm
        context.set_forkserver_preload(self.preload)
        return context

    def _process_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self._context(), initializer=_init_worker)

    async def start(self) -> None:
        """Start every worker now (a process pool starts them on first use otherwise), and the fork server that the
        isolated calls fork from."""
        if self._pool is not None:
            await asyncio.gather(*(self._run(_noop) for _ in range(self.workers)))
        await self.isolated(_noop)

    async def isolated(self, fn, *args):  # type: ignore[no-untyped-def]
        """fn(*args) in a fresh process, killed the moment the caller stops waiting (its request timed out, or its
        client left): for the rare work that the limits leave slow (a JPEG of many pixels and scans, a JSON body of
        millions of values), so that it neither holds a worker nor runs on after its request. Each call costs a fork
        (~10 ms); at most `workers` run at once. `ProcessDied` when the process ends without an answer."""
        async with self._isolated_slots:
            call = _Isolated(self._context(), fn, args)
            self._isolated_running.add(call)
            try:
                ok, value = await asyncio.get_running_loop().run_in_executor(self._isolated_threads, call.run)
            except asyncio.CancelledError:
                call.kill()
                raise
            finally:
                self._isolated_running.discard(call)
        if not ok:
            raise value  # type: ignore[misc]
        return value

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        pool = self._pool
        if pool is None:
            return fn(*args)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))
        except BrokenProcessPool:
            self._replace(pool)
            return await self._run_alone(fn, *args)

    async def _decode(self, fn, data: bytes, *args):  # type: ignore[no-untyped-def]
        """fn(data, *args, slow_ok) in the pool, or for a slow image in a process of its own."""
        try:
            return await self._run(fn, data, *args, False)
        except SlowImage:
            try:
                return await self.isolated(fn, data, *args, True)
            except ProcessDied:
                raise InvalidImage("the image crashed the decoder") from None

    def _replace(self, broken: Executor) -> None:
        """A fresh pool in place of `broken`, by the first of the images it failed to notice."""
        if self._pool is broken:
            log.error("a decoding process died; replacing the pool and decoding each image it held on its own")
            self._pool = self._process_pool(self.workers)
            if self.on_restart is not None:
                self.on_restart()
            broken.shutdown(wait=False, cancel_futures=True)

    async def _run_alone(self, fn, *args):  # type: ignore[no-untyped-def]
        """One image, alone in its process: if that process dies too, this image is what kills it."""
        async with self._alone_lock:
            if self._alone is None:
                self._alone = self._process_pool(1)
            alone = self._alone
            try:
                return await asyncio.get_running_loop().run_in_executor(alone, partial(fn, *args))
            except BrokenProcessPool:
                self._alone = None
                alone.shutdown(wait=False, cancel_futures=True)
                raise InvalidImage("the image crashed the decoder") from None

    async def pixels(self, data: bytes, cfg: PreprocessConfig) -> Decoded:
        return await self._decode(decode_to_pixels, data, cfg, self.limits, self.draft)

    async def pixels_or_jpeg(self, data: bytes, cfg: PreprocessConfig) -> Decoded | Encoded:
        """The device path: a JPEG it takes comes back as `Encoded` (its header checked, the bytes queued as they
        came), anything else decoded as `pixels` does.

        The header is read on a thread of this process: a trip to a decode process costs the event loop more
        (pickling, pipes, the pool's bookkeeping) than reading the markers does, and a thread still keeps a
        file with an absurd number of markers from stalling the loop."""
        loop = asyncio.get_running_loop()
        queued = await loop.run_in_executor(self._header_thread, jpeg_for_device, data, cfg, self.limits)
        return queued if queued is not None else await self.pixels(data, cfg)

    async def preview(self, data: bytes) -> Decoded:
        return await self._decode(decode_preview, data, self.limits, PREVIEW_SIDE)

    def close(self) -> None:
        """Stop the workers: queued jobs are cancelled, a running decode in the pool is bounded by the limits, and the
        processes of `isolated` (slow images, large parses) are killed."""
        self._header_thread.shutdown(wait=True, cancel_futures=True)
        for call in list(self._isolated_running):
            call.kill()
        self._isolated_threads.shutdown(wait=True, cancel_futures=True)
        for pool in (self._pool, self._alone):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._alone = None
