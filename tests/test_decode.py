"""app.decode: every format, EXIF, every colour mode, corrupt and hostile inputs, draft mode, the pools."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.decode import Decoder, ImageTooLarge, InvalidImage, decode_image, decode_preview, decode_to_pixels, sniff
from app.preprocess import PreprocessConfig, to_model_pixels

LIMIT = 40_000_000
CFG = PreprocessConfig(resize=36, crop=(32, 32), interpolation="bicubic")


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # 451 x 300 RGB photograph


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_exact_pixels(cat, fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(cat, fmt, **kw)
    assert sniff(data) == fmt
    image, size = decode_image(data, LIMIT)
    assert size == cat.size and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(cat))


def test_jpeg_decodes_like_pillow(cat):
    data = encode(cat, "JPEG", quality=90)
    image, _ = decode_image(data, LIMIT)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_gif_gives_its_first_frame(cat):
    frames = [cat.quantize(64), Image.new("RGB", cat.size, (0, 0, 255)).quantize(4)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image, _ = decode_image(data, LIMIT)
    assert np.array_equal(np.asarray(image), np.asarray(frames[0].convert("RGB")))


def test_exif_orientation_is_applied(cat):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(cat, "JPEG", exif=exif, quality=95)
    image, size = decode_image(data, LIMIT)
    assert size == (cat.height, cat.width) == image.size
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(image), np.asarray(upright))


def test_grey_palette_and_cmyk_become_rgb(cat):
    for mode in ("L", "P", "CMYK", "1"):
        src = cat.convert(mode) if mode != "P" else cat.quantize(32)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        image, _ = decode_image(encode(src, fmt), LIMIT)
        assert image.mode == "RGB" and image.size == cat.size
        if fmt == "PNG":
            assert np.array_equal(np.asarray(image), np.asarray(src.convert("RGB")))


def test_sixteen_bit_grey_keeps_its_top_byte():
    levels = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16 % 65536).astype(np.uint16)
    src = Image.fromarray(levels.astype(np.uint16))
    image, _ = decode_image(encode(src, "PNG"), LIMIT)
    expected = (levels >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)
    assert np.array_equal(np.asarray(image)[..., 1], expected)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red-ish, right half fully transparent
    rgba[:, 4:6, 3] = 128  # half transparent
    image, _ = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT)
    px = np.asarray(image).astype(int)
    assert tuple(px[0, 0]) == (200, 0, 0)
    assert tuple(px[0, 7]) == (255, 255, 255)
    assert abs(px[0, 4, 1] - 127) <= 1  # 0 * a + 255 * (1 - a)
    la, _ = decode_image(encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), LIMIT)
    assert tuple(np.asarray(la)[0, 7]) == (255, 255, 255)
    palette = Image.fromarray(rgba, "RGBA").quantize(8)  # palette with a transparent entry
    assert palette.has_transparency_data
    p, _ = decode_image(encode(palette, "PNG"), LIMIT)
    assert tuple(np.asarray(p)[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, not an image",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",  # a format Pillow knows but we never hand it
        b"\x00\x00\x01\x00\x01\x00",  # ICO
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # a PNG signature and garbage
    ],
)
def test_unsupported_or_corrupt_bytes_are_invalid(data):
    with pytest.raises(InvalidImage):
        decode_image(data, LIMIT)


def test_truncated_jpeg_is_invalid(cat):
    data = encode(cat, "JPEG")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], LIMIT)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few kilobytes that decode to width * height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    payload = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header():
    data = bomb_png(10_000, 5_000)  # 50 M pixels in about 60 kB
    assert len(data) < 200_000
    with pytest.raises(ImageTooLarge, match="50,000,000 pixels"):
        decode_image(data, LIMIT)
    with pytest.raises(ImageTooLarge):
        decode_to_pixels(data, CFG, LIMIT)
    with pytest.raises(ImageTooLarge):  # the limit is ours, not Pillow's
        decode_image(bomb_png(200, 100), 19_999)


def test_extreme_aspect_ratios_are_refused_before_resizing():
    strip = bomb_png(1, 400_000)  # 400 k pixels, but 36 x 14.4 M once its short side is resized to 36
    with pytest.raises(InvalidImage, match="aspect ratio"):
        decode_to_pixels(strip, CFG, 4_000_000)


def test_zero_sized_images_are_refused():
    with pytest.raises(InvalidImage):
        decode_image(bomb_png(0, 10), LIMIT)


def test_pixels_are_the_model_pixels_of_the_decoded_image(cat):
    data = encode(cat, "PNG")
    out = decode_to_pixels(data, CFG, LIMIT)
    assert out.size == cat.size and out.pixels.dtype == np.uint8 and out.pixels.shape == (32, 32, 3)
    assert np.array_equal(out.pixels, to_model_pixels(cat, CFG))


def test_jpeg_draft_only_while_the_image_stays_twice_the_target(cat):
    big = cat.resize((cat.width * 4, cat.height * 4), Image.Resampling.BICUBIC)  # 1804 x 1200
    data = encode(big, "JPEG", quality=95)
    full = decode_to_pixels(data, CFG, LIMIT, draft=False)
    drafted = decode_to_pixels(data, CFG, LIMIT, draft=True)
    assert full.size == drafted.size == big.size
    diff = np.abs(full.pixels.astype(int) - drafted.pixels.astype(int))
    assert 0 < diff.mean() < 2.0  # drafted, yet close to the full decode
    # the DCT scale stops while the image is at least twice the resize target on each side
    from app.decode import apply_draft, draft_target

    image = Image.open(io.BytesIO(data))
    target = draft_target(big.size, CFG)
    apply_draft(image, target)
    image.load()
    assert image.width >= target[0] and image.height >= target[1] and image.width < big.width
    # a JPEG under twice the target is never drafted: identical with and without
    small, cfg = encode(cat, "JPEG"), PreprocessConfig(resize=224, crop=(224, 224))
    assert np.array_equal(
        decode_to_pixels(small, cfg, LIMIT, True).pixels, decode_to_pixels(small, cfg, LIMIT, False).pixels
    )


def test_preview_is_the_upright_image_shrunk(cat):
    data = encode(cat.resize((2400, 1600)), "JPEG")
    preview = decode_preview(data, LIMIT, max_side=600)
    assert preview.size == (2400, 1600)
    assert max(preview.pixels.shape[:2]) <= 600 and preview.pixels.shape[2] == 3


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_pools_give_the_same_pixels_and_typed_errors(cat, kind):
    data = encode(cat, "JPEG")

    async def main():
        decoder = Decoder(LIMIT, workers=1, kind=kind)
        try:
            await decoder.start()
            good = await decoder.pixels(data, CFG)
            with pytest.raises(InvalidImage):
                await decoder.pixels(data[:500], CFG)
            with pytest.raises(ImageTooLarge):
                await decoder.pixels(bomb_png(10_000, 5_000), CFG)
            return good
        finally:
            decoder.close()

    good = asyncio.run(main())
    assert np.array_equal(good.pixels, decode_to_pixels(data, CFG, LIMIT).pixels)


def with_decoder(body, workers: int = 2):  # type: ignore[no-untyped-def]
    """`await body(decoder)` on a started process-pool `Decoder`, closed afterwards; also how many times it
    replaced its pool."""
    restarts = []

    async def main():  # type: ignore[no-untyped-def]
        decoder = Decoder(LIMIT, workers=workers, kind="process", on_restart=lambda: restarts.append(1))
        try:
            await decoder.start()
            return await body(decoder)
        finally:
            decoder.close()

    return asyncio.run(main()), len(restarts)


def test_a_decoding_process_that_dies_takes_only_its_own_image_with_it(cat):
    """A crash is played by `os._exit` run in a decoding process (as a codec segfault on a crafted file would end)."""
    # small images: the few queued for the dead pool then fit in its pipe, where larger ones block Python 3.11.2's
    # feeder thread for good (the pool's manager thread then waits for it, and the test process never exits)
    data = encode(cat.resize((64, 48)), "PNG")

    async def crash_beside_six(decoder):  # type: ignore[no-untyped-def]
        beside = [decoder.pixels(data, CFG) for _ in range(6)]
        results = await asyncio.gather(decoder._run(os._exit, 1), *beside, return_exceptions=True)
        after = await decoder.pixels(data, CFG)  # the replaced pool serves what comes next
        return results, after

    ((crashed, *beside), after), restarts = with_decoder(crash_beside_six)
    assert isinstance(crashed, InvalidImage) and "crashed the decoder" in str(crashed)
    expected = decode_to_pixels(data, CFG, LIMIT).pixels
    for got in [*beside, after]:
        assert not isinstance(got, BaseException), got
        assert np.array_equal(got.pixels, expected)
    assert restarts == 1


def test_a_killed_decoding_process_is_replaced(cat):
    # what the OOM killer or a stray `kill -9` does to an idle worker: without the replacement, the pool would
    # refuse every later image
    data = encode(cat, "JPEG")

    async def kill_one_then_decode(decoder):  # type: ignore[no-untyped-def]
        victim = next(iter(decoder._pool._processes.values()))
        os.kill(victim.pid, signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, victim.join, 10)
        return [await decoder.pixels(data, CFG) for _ in range(3)]

    got, restarts = with_decoder(kill_one_then_decode)
    assert restarts == 1
    assert all(np.array_equal(g.pixels, decode_to_pixels(data, CFG, LIMIT).pixels) for g in got)


# -- the device path's check: header read here, the JPEG decoded later with its batch ---------------------------


def pixels_or_jpeg(data: bytes, max_pixels: int = LIMIT):  # type: ignore[no-untyped-def]
    """What the server's decode step gives for `data` on the device path (decoding inline what it does not take)."""

    async def main():  # type: ignore[no-untyped-def]
        decoder = Decoder(max_pixels, workers=0, kind="thread")
        try:
            return await decoder.pixels_or_jpeg(data, CFG)
        finally:
            decoder.close()

    return asyncio.run(main())


def test_the_device_takes_a_checked_jpeg_without_decoding_it_and_everything_else_is_decoded_here(cat):
    from app.decode import Decoded, Encoded, Limits, jpeg_for_device

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(cat, "JPEG", exif=exif)
    queued = jpeg_for_device(rotated, CFG, LIMIT)
    assert queued == Encoded(rotated, (cat.height, cat.width), 6, Limits(LIMIT))  # upright size, orientation to apply
    assert isinstance(jpeg_for_device(encode(cat.convert("L"), "JPEG"), CFG, LIMIT), Encoded)
    for data in (encode(cat, "PNG"), encode(cat.convert("CMYK"), "JPEG")):  # not for the device: decoded here
        assert jpeg_for_device(data, CFG, LIMIT) is None
        got = pixels_or_jpeg(data)
        assert isinstance(got, Decoded) and np.array_equal(got.pixels, decode_to_pixels(data, CFG, LIMIT).pixels)
    big = encode(cat, "JPEG")
    assert jpeg_for_device(big, CFG, LIMIT, device_max_pixels=cat.width * cat.height - 1) is None
    padded = encode(cat, "JPEG") + b"\x00" * 16  # zero padding after the end marker: still the device's
    assert isinstance(jpeg_for_device(padded, CFG, LIMIT), Encoded)
    trailing = encode(cat, "JPEG") + b"camera data"  # data after the end marker: Pillow decodes it, as before
    assert jpeg_for_device(trailing, CFG, LIMIT) is None
    assert isinstance(pixels_or_jpeg(trailing), Decoded)


def test_a_truncated_jpeg_is_left_to_pillow_which_refuses_it(cat):
    """A device decoder may fill in a cut-off JPEG; Pillow refuses it, and the check sends it there."""
    from app.decode import jpeg_for_device

    data = encode(cat, "JPEG")
    assert jpeg_for_device(data[: len(data) * 3 // 4], CFG, LIMIT) is None
    with pytest.raises(InvalidImage, match="truncated"):
        pixels_or_jpeg(data[: len(data) * 3 // 4])


def test_the_device_check_refuses_what_the_pil_path_refuses(cat):
    from app.decode import jpeg_for_device

    data = encode(cat, "JPEG")
    with pytest.raises(ImageTooLarge):
        jpeg_for_device(data, CFG, limits=cat.width * cat.height - 1)
    with pytest.raises(InvalidImage):
        jpeg_for_device(data[:4] + b"\x00" * 64 + b"\xff\xd9", CFG, LIMIT)  # JPEG magic and end, no header
    strip = encode(Image.new("RGB", (4000, 1)), "JPEG")
    with pytest.raises(InvalidImage, match="too extreme"):
        jpeg_for_device(strip, CFG, limits=100_000)


@pytest.mark.parametrize("kind,workers", [("thread", 1), ("thread", 0), ("process", 1)])
def test_decoder_queues_the_requests_own_bytes_for_the_device(cat, kind, workers):
    from app.decode import Encoded

    jpeg, png = encode(cat, "JPEG"), encode(cat, "PNG")

    async def main():
        decoder = Decoder(LIMIT, workers=workers, kind=kind)
        try:
            return await asyncio.gather(decoder.pixels_or_jpeg(jpeg, CFG), decoder.pixels_or_jpeg(png, CFG))
        finally:
            decoder.close()

    queued, decoded = asyncio.run(main())
    assert isinstance(queued, Encoded) and queued.data is jpeg  # no copy, never sent back from a process
    assert queued.size == cat.size and queued.orientation == 1 and queued.limits.pixels == LIMIT
    assert np.array_equal(decoded.pixels, decode_to_pixels(png, CFG, LIMIT).pixels)
    assert np.array_equal(queued.decode_here(CFG).pixels, decode_to_pixels(jpeg, CFG, LIMIT, draft=False).pixels)


# -- costs bounded before decoding, and a slow decode that ends with its request -------------------------------


def many_scans_jpeg(side: int, repeats: int) -> bytes:
    """A progressive JPEG of one flat colour whose last scan (a few dozen bytes: every block empty) is repeated
    `repeats` times: each repeat costs the decoder a pass over every block of the image."""
    data = encode(Image.new("RGB", (side, side), (120, 30, 200)), "JPEG", quality=90, progressive=True)
    last = data[data.rfind(b"\xff\xda") : -2]
    return data[:-2] + last * repeats + b"\xff\xd9"


def test_a_jpeg_with_more_scans_than_the_limit_is_refused_before_decoding(cat):
    from app.decode import Limits, jpeg_scans

    photo = encode(cat, "JPEG", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 1
    assert jpeg_scans(photo) == 10 and jpeg_scans(encode(cat, "JPEG", exif=exif)) == 1
    crafted = many_scans_jpeg(64, 200)
    assert jpeg_scans(crafted, 1000) == 210
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(crafted, LIMIT)
    with pytest.raises(InvalidImage, match="more than 5 scans"):
        decode_image(photo, Limits(LIMIT, jpeg_scans=5))
    decode_image(crafted, Limits(LIMIT, jpeg_scans=210))  # within its limit it is an image like any other
    # the thumbnail inside EXIF is skipped with its segment; comments between scans count as markers, not scans
    thumbnail = encode(cat.resize((80, 60)), "JPEG", progressive=True)
    app1 = b"Exif\x00\x00" + thumbnail
    with_thumbnail = photo[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + photo[2:]
    assert jpeg_scans(with_thumbnail) == 10
    sos = photo.index(b"\xff\xda", photo.index(b"\xff\xda") + 2)  # a comment before the second scan
    comment = b"\xff\xfe" + struct.pack(">H", 6) + b"\xff\xd9\xff\xda"  # an end-of-image marker inside: no end
    assert jpeg_scans(photo[:sos] + comment + photo[sos:]) == 10


def test_decoded_bytes_are_bounded_from_the_header_with_16_bit_samples_counted_double():
    from app.decode import Limits, decoded_bytes, open_checked

    grey16 = encode(Image.fromarray(np.zeros((100, 200), np.uint16)), "PNG")
    grey8 = encode(Image.new("L", (200, 100)), "PNG")
    rgb16 = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 200, 100, 16, 2, 0, 0, 0))
    rgb16 += png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")  # the header is all that is read
    assert [decoded_bytes(Image.open(io.BytesIO(d))) for d in (grey8, grey16, rgb16)] == [20_000, 40_000, 120_000]
    limits = Limits(LIMIT, decoded_bytes=30_000)
    open_checked(grey8, limits)
    for data in (grey16, rgb16):
        with pytest.raises(ImageTooLarge, match="more than the limit of 30,000"):
            open_checked(data, limits)
    assert Limits(1000).bytes == 4000  # the default: 4 bytes for each allowed pixel


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_16_bit_png_decodes_without_copies_of_its_full_depth(tmp_path):
    """A 6300 x 6300 16-bit grey PNG of 90 kB: 79 MB of samples, which the conversion to 8-bit once held six
    times over (740 MB); it now converts a band of rows at a time. Measured in a fresh process."""
    script = """
import io, resource
import numpy as np
from PIL import Image
from app.decode import decode_to_pixels
from app.preprocess import PreprocessConfig
a = np.zeros((6300, 6300), np.uint16); a[::7, ::5] = 60000
buf = io.BytesIO(); Image.fromarray(a).save(buf, "PNG", compress_level=1); data = buf.getvalue(); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_to_pixels(data, PreprocessConfig(resize=36, crop=(32, 32)), 40_000_000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, out.pixels.max())
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    rise_mb, top = (int(x) for x in done.stdout.split())
    assert top > 0  # the top byte of 60000 survived the conversion
    assert rise_mb < 400, f"peak memory rose by {rise_mb} MB"  # the 8-bit image in RGB alone is 160 MB


def test_pillow_takes_the_configured_pixel_limit_above_its_own_and_says_nothing():
    """Pillow refuses more than 178,956,970 pixels on its own and warns above half of that; the configured limit
    is the one that applies, in either direction, and its refusal quotes it."""
    import warnings

    from app.decode import open_checked

    huge = bomb_png(20_000, 10_000)  # 200 M pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        assert open_checked(huge, 300_000_000).size == (20_000, 10_000)
        assert open_checked(bomb_png(10_000, 10_000), 150_000_000).size == (10_000, 10_000)  # 100 M pixels
    with pytest.raises(ImageTooLarge, match="more than the limit of 150,000,000") as refused:
        open_checked(huge, 150_000_000)
    assert "178" not in str(refused.value)


def isolated_processes() -> list:
    """The processes of `Decoder.isolated` still alive (in this process: pools of other tests aside)."""
    import multiprocessing

    from app.decode import ISOLATED_NAME

    return [p for p in multiprocessing.active_children() if p.name == ISOLATED_NAME]


def test_a_slow_decode_runs_in_a_process_of_its_own_that_ends_with_its_request(cat):
    """A JPEG within the limits that would still take seconds (4000 x 4000 pixels, 2000 scans allowed here) is
    decoded in a process of its own; when its caller stops waiting, that process is killed, and the decode thread
    was never held: an ordinary image is decoded at once."""
    import time

    from app.decode import SLOW_SCAN_PIXELS, Limits

    slow = many_scans_jpeg(4000, 1990)
    assert SLOW_SCAN_PIXELS < 4000 * 4000 * 2000
    decoder = Decoder(Limits(LIMIT, jpeg_scans=2000), workers=1, kind="thread")

    async def main() -> float:
        await decoder.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await decoder.pixels(slow, CFG)
        assert (await decoder.pixels(encode(cat, "PNG"), CFG)).size == cat.size
        return time.monotonic() - started

    try:
        assert asyncio.run(main()) < 3.0
        deadline = time.monotonic() + 5.0
        while isolated_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not isolated_processes()  # the decode was stopped, not left to run for seconds
    finally:
        decoder.close()


def test_a_slow_image_is_decoded_in_its_own_process_to_the_same_pixels():
    from app.decode import Limits

    data = many_scans_jpeg(2000, 150)  # 4 M pixels x 160 scans: over SLOW_SCAN_PIXELS, about 0.4 s
    decoder = Decoder(Limits(LIMIT, jpeg_scans=200), workers=1, kind="thread")

    async def main():  # type: ignore[no-untyped-def]
        return await decoder.pixels(data, CFG)

    try:
        out = asyncio.run(main())
    finally:
        decoder.close()
    assert np.array_equal(out.pixels, decode_to_pixels(data, CFG, Limits(LIMIT, jpeg_scans=200)).pixels)


def test_closing_the_decoder_kills_its_isolated_processes():
    import time

    from app.decode import ProcessDied

    decoder = Decoder(LIMIT, workers=1, kind="thread")

    async def main() -> float:
        call = asyncio.ensure_future(decoder.isolated(time.sleep, 60))
        deadline = time.monotonic() + 30
        while not isolated_processes() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert isolated_processes()
        started = time.monotonic()
        decoder.close()
        with pytest.raises(ProcessDied):
            await call
        return time.monotonic() - started

    assert asyncio.run(main()) < 5.0
    assert not isolated_processes()


def test_the_decoding_processes_never_map_torch(cat):
    """The pool's workers, the isolated calls and the fork server they start from import only app.decode and the
    body parsers: none of them maps torch's libraries, which would cost each process a few hundred megabytes."""
    import multiprocessing.forkserver
    from pathlib import Path

    from app.http.pipeline import PARSER_MODULES

    maps = Path("/proc/self/maps")

    async def main(decoder):  # type: ignore[no-untyped-def]
        await decoder.pixels(encode(cat, "JPEG"), CFG)  # the worker has decoded an image
        return await decoder._run(maps.read_text), await decoder.isolated(maps.read_text)

    decoder = Decoder(LIMIT, workers=1, kind="process", preload=("app.decode", *PARSER_MODULES))

    async def started():  # type: ignore[no-untyped-def]
        await decoder.start()
        try:
            return await main(decoder)
        finally:
            decoder.close()

    worker, isolated = asyncio.run(started())
    fork_server = Path(f"/proc/{multiprocessing.forkserver._forkserver._forkserver_pid}/maps").read_text()
    assert "libtorch" in Path("/proc/self/maps").read_text()  # the test process itself has torch: the check works
    for name, mapped in (("worker", worker), ("isolated call", isolated), ("fork server", fork_server)):
        assert "libtorch" not in mapped and "libc10" not in mapped, name
