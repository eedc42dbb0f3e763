"""Image bytes -> validated RGB pixels: format sniffing, the pixel limit before decoding, EXIF, colour modes.

The functions here are pure and picklable, so a `Decoder` runs them in a process pool (default), a
thread pool or inline, never on the event loop. What comes back to the server is small: the uint8
pixels at the model's input size (not the full image) and the original size.

Safety: only the six formats of API.md are ever handed to Pillow (sniffed from magic bytes, never from
a file name or a content type), and width x height is read from the header and checked against the
limit before a single pixel is decoded, so a decompression bomb costs microseconds.

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
import signal
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from app.preprocess import PreprocessConfig, resized_size, to_model_pixels

ORIENTATION = 0x0112  # EXIF tag
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
WHITE = (255, 255, 255)
PREVIEW_SIDE = 1024  # longest side of the image an overlay is drawn on
DEVICE_MAX_PIXELS = 1 << 25  # largest JPEG (33.5 M pixels) decoded on the model's device; larger ones here
DEVICE_JPEG_MODES = ("RGB", "L")  # colour JPEGs (YCbCr) and grey ones; CMYK / YCCK stay with Pillow
log = logging.getLogger(__name__)


class ImageError(Exception):
    """An image the server will not decode; `code` is the API error code."""

    code = "invalid_image"


class InvalidImage(ImageError):
    code = "invalid_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"


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
    max_pixels: int  # the server's limit, for a Pillow decode if the device cannot decode it

    def decode_here(self, cfg: PreprocessConfig) -> Decoded:
        """The PIL path for this image, when the device cannot decode it (full decode, no draft: the closest to
        what the device does). Raises `ImageError` for an image Pillow cannot decode either."""
        return decode_to_pixels(self.data, cfg, self.max_pixels, draft=False)


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


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse what is unsupported, zero-sized or over `max_pixels`."""
    if not data:
        raise InvalidImage("the image is empty (zero bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise InvalidImage("unsupported or unrecognised image format; send JPEG, PNG, WebP, GIF, BMP or TIFF")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"the image is too large: {e}") from None
    except Exception as e:
        raise InvalidImage(f"cannot read the {fmt} header: {e}") from None
    check_size(*image.size, max_pixels)
    return image


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
    [0, 255] scaled to 8-bit."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float32))
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    if a.max(initial=0) > 255:
        a = np.clip(a, 0, 65535) >> 8
    return np.clip(a, 0, 255).astype(np.uint8)


def decode_image(
    data: bytes, max_pixels: int, target: Callable[[tuple[int, int]], tuple[int, int]] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (an upright RGB image, the upright size of the original).

    With `target` (upright size -> smallest acceptable upright (w, h)), a JPEG may be decoded at a
    reduced DCT scale that stays at least that large; the image is then smaller than the original.
    """
    image = open_checked(data, max_pixels)
    size = upright_size(image)
    try:
        if target is not None:
            apply_draft(image, target(size))
        image.load()  # first frame of a GIF / WebP animation / multi-page TIFF
        ImageOps.exif_transpose(image, in_place=True)  # upright without copying an image already upright
        image = to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"the image is too large: {e}") from None
    except Exception as e:  # Pillow reports corrupt data with many exception types
        raise InvalidImage(f"the image data is truncated or corrupt: {e}") from None
    if image.width == 0 or image.height == 0:
        raise InvalidImage("the image is zero-sized")
    return image, size


def decode_to_pixels(data: bytes, cfg: PreprocessConfig, max_pixels: int, draft: bool = True) -> Decoded:
    """Bytes -> uint8 pixels at the model's input size (the CPU half of preprocessing), and the upright size.

    A JPEG decoded at a reduced scale is resized from there exactly as the full image would be.
    """
    target = partial(draft_target, cfg=cfg) if draft else None
    image, size = decode_image(data, max_pixels, target)
    # the original's size: a JPEG decoded at a reduced scale (still twice its resize) is far below the limit either way
    check_resize(size, cfg, max_pixels)
    return Decoded(model_input(image, cfg), size)


def ends_complete(jpeg: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (zero padding allowed). A truncated upload does not, and a
    device decoder may fill in what is missing where Pillow refuses it: such a file goes to Pillow, which decides
    (a JPEG with data after its marker, as some cameras write, is simply decoded there too)."""
    return jpeg.rstrip(b"\x00").endswith(b"\xff\xd9")


def jpeg_for_device(
    data: bytes, cfg: PreprocessConfig, max_pixels: int, device_max_pixels: int = DEVICE_MAX_PIXELS
) -> Encoded | None:
    """A JPEG that the device path takes, its header checked (Pillow reads the markers only: ~25 us) and nothing
    decoded; None for anything that must be decoded on the CPU instead. Every check of the PIL path up to the
    decode runs here, with the same errors."""
    if sniff(data) != "JPEG" or not ends_complete(data):
        return None
    image = open_checked(data, max_pixels)
    width, height = image.size
    rgb_transform = image.info.get("adobe_transform") == 0 and image.mode == "RGB"  # RGB stored without YCbCr
    if image.mode not in DEVICE_JPEG_MODES or rgb_transform or width * height > device_max_pixels:
        return None
    size = upright_size(image)
    check_resize(size, cfg, max_pixels)
    return Encoded(data, size, orientation(image), max_pixels)


def decode_preview(data: bytes, max_pixels: int, max_side: int = PREVIEW_SIDE) -> Decoded:
    """Bytes -> the upright RGB image, shrunk to at most `max_side` on its longest side (for overlays)."""

    def target(size: tuple[int, int]) -> tuple[int, int]:
        scale = min(1.0, max_side / max(size))
        return (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))

    image, size = decode_image(data, max_pixels, target)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return Decoded(np.asarray(image, dtype=np.uint8), size)


def _init_worker(max_pixels: int) -> None:
    """In each decoding process: Pillow's own bomb limit follows ours (we check first anyway), and
    Ctrl+C is left to the server, which shuts the pool down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.init()  # load the format plugins once, not on the first request


def _noop() -> int:
    return 0


class Decoder:
    """Runs the decode functions off the event loop: `await decoder.pixels(data, cfg)`.

    A decoding process that dies (a codec crash on a crafted file, the OOM killer, a stray kill) breaks a process
    pool for good, and every later image would fail with it. So the pool is replaced at once, and each image the
    crash took down is decoded again on its own, one at a time, in a process of its own: the image that crashed
    it (if any) is the only one refused (400), and the images beside it are answered.
    """

    def __init__(
        self,
        max_pixels: int,
        workers: int = 2,
        kind: Literal["process", "thread"] = "process",
        draft: bool = True,
        on_restart: Callable[[], None] | None = None,
    ):
        self.max_pixels = max_pixels
        self.draft = draft
        self.workers = workers
        self.kind = kind
        self._pool: Executor | None = None
        self._header_thread = ThreadPoolExecutor(1, thread_name_prefix="jpeg-header")
        self._alone: ProcessPoolExecutor | None = None  # after a crash: one image at a time (see the class)
        self._alone_lock = asyncio.Lock()
        self.on_restart = on_restart  # told of each pool replaced after a crash (the server counts them in /metrics)
        if workers > 0 and kind == "process":
            self._pool = self._process_pool(workers)
        elif workers > 0:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def _process_pool(self, workers: int) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        # the fork server imports us once; each worker then forks from it, already warm
        context.set_forkserver_preload(["app.decode"])
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(self.max_pixels,))

    async def start(self) -> None:
        """Start every worker now (a process pool starts them on first use otherwise)."""
        if self._pool is not None:
            await asyncio.gather(*(self._run(_noop) for _ in range(self.workers)))

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        pool = self._pool
        if pool is None:
            return fn(*args)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))
        except BrokenProcessPool:
            self._replace(pool)
            return await self._run_alone(fn, *args)

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
        return await self._run(decode_to_pixels, data, cfg, self.max_pixels, self.draft)

    async def pixels_or_jpeg(self, data: bytes, cfg: PreprocessConfig) -> Decoded | Encoded:
        """The device path: a JPEG it takes comes back as `Encoded` (its header checked, the bytes queued as they
        came), anything else decoded as `pixels` does.

        The header is read on a thread of this process: a trip to a decode process costs the event loop more
        (pickling, pipes, the pool's bookkeeping) than reading the markers does, and a thread still keeps a
        file with an absurd number of markers from stalling the loop."""
        loop = asyncio.get_running_loop()
        queued = await loop.run_in_executor(self._header_thread, jpeg_for_device, data, cfg, self.max_pixels)
        return queued if queued is not None else await self.pixels(data, cfg)

    async def preview(self, data: bytes) -> Decoded:
        return await self._run(decode_preview, data, self.max_pixels)

    def close(self) -> None:
        """Stop the workers (queued jobs are cancelled; a running decode is bounded by the pixel limit)."""
        self._header_thread.shutdown(wait=True, cancel_futures=True)
        for pool in (self._pool, self._alone):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._alone = None
