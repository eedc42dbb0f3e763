"""JPEGs decoded with their batch (app.gpu_decode via app.tasks), against the PIL path, on the CPU.

torchvision's CPU decoder runs the very code the GPU path runs, nvJPEG aside (tests/test_gpu_path.py has the
CUDA checks). Real photographs, several sizes and preprocessing configurations; pixels within a grey level or
two of PIL's, logits of a small random ViT nearly unchanged.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import app
from app import gpu_decode
from app.decode import Encoded, ImageError, decode_to_pixels, jpeg_for_device
from app.preprocess import PreprocessConfig
from app.runner import make_runner
from app.tasks import Classify, Item

pytestmark = [
    pytest.mark.skipif(not gpu_decode.available(), reason="torchvision is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*"),  # 0.29 points to TorchCodec
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),  # read-only request bytes, no copy
]
LIMIT = 40_000_000
CPU = torch.device("cpu")
CONFIGS = {
    "bicubic-crop": PreprocessConfig(resize=36, crop=(32, 32), interpolation="bicubic"),
    "bilinear-224": PreprocessConfig(resize=256, crop=(224, 224), interpolation="bilinear"),
    "squash": PreprocessConfig(resize=(32, 48), interpolation="bilinear"),
    "grey-inverted": PreprocessConfig(resize=40, crop=(32, 32), interpolation="bicubic", grayscale=True, invert=True),
    "crop-beyond": PreprocessConfig(resize=(30, 30), crop=(32, 32), interpolation="bilinear"),  # PIL pads black
}


def photos() -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    images = {n: Image.fromarray(getattr(data, n)()) for n in ("chelsea", "astronaut", "coffee")}
    images["china"] = Image.fromarray(load_sample_image("china.jpg"))
    return images


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """Each photo as a JPEG at half, full and 1.5x size (downscaled and upscaled by the preprocessing)."""
    out = {}
    for name, image in photos().items():
        for scale in (0.5, 1.0, 1.5):
            size = (round(image.width * scale), round(image.height * scale))
            out[f"{name}@{scale}"] = encode(image.resize(size, Image.Resampling.BICUBIC), quality=90)
    return out


def encode(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kw)
    return buffer.getvalue()


def queued(data: bytes, cfg: PreprocessConfig) -> Encoded:
    encoded = jpeg_for_device(data, cfg, LIMIT)
    assert encoded is not None
    return encoded


def device_pixels(datas: list[bytes], cfg: PreprocessConfig) -> np.ndarray:
    out, rows, errors = gpu_decode.decode_batch([queued(d, cfg) for d in datas], cfg, CPU)
    assert not errors and sorted(rows) == list(range(len(datas)))
    pixels = np.empty((len(datas), *out.shape[1:]), np.uint8)
    pixels[rows] = out.numpy()
    return pixels.transpose(0, 2, 3, 1)  # (n, h, w, 3) as PIL's


@pytest.mark.parametrize("config", CONFIGS)
def test_device_decoding_gives_pils_pixels_within_a_grey_level(jpegs, config):
    cfg = CONFIGS[config]
    names = list(jpegs)
    got = device_pixels([jpegs[n] for n in names], cfg)
    for name, pixels in zip(names, got, strict=True):
        expected = decode_to_pixels(jpegs[name], cfg, LIMIT, draft=False).pixels
        diff = np.abs(pixels.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 2, (name, diff.max())  # float weights vs Pillow's fixed point, at rounding edges
        assert diff.mean() < 0.1, (name, diff.mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(orientation):
    image = photos()["chelsea"].crop((0, 0, 120, 80))  # not square: a wrong transpose changes the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, exif=exif, quality=95)
    cfg = PreprocessConfig(resize=(40, 64), interpolation="bilinear")  # no crop: all of the image is compared
    expected = decode_to_pixels(data, cfg, LIMIT, draft=False).pixels
    got = device_pixels([data], cfg)[0]
    assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1


def test_memory_bounds_split_the_work_without_changing_results(jpegs, monkeypatch):
    cfg = CONFIGS["bicubic-crop"]
    datas = list(jpegs.values())[:6]
    whole = device_pixels(datas, cfg)
    monkeypatch.setattr(gpu_decode, "CHUNK_PIXELS", 1)  # one image per decode call
    monkeypatch.setattr(gpu_decode, "GROUP_PIXELS", 1)  # one image per resize
    assert np.array_equal(device_pixels(datas, cfg), whole)


def test_a_corrupt_jpeg_fails_alone_and_its_batch_mates_run(tiny_checkpoint, jpegs, bogus_huffman_table):
    runner = make_runner(app.load_model(str(tiny_checkpoint)), max_batch_size=4, jpeg_decoder="torchvision")
    assert runner.takes_jpeg
    cfg = runner.model.preprocess_config
    datas = [jpegs["chelsea@1.0"], bogus_huffman_table(jpegs["coffee@1.0"]), jpegs["china@0.5"]]
    pixels = np.zeros((*cfg.output_size, 3), np.uint8)
    items = [Item(Classify(3), jpeg=queued(d, cfg)) for d in datas] + [Item(Classify(3), pixels=pixels)]
    prepared = runner.prepare(items)
    assert set(prepared.errors) == {1} and sorted(prepared.rows) == [0, 2, 3]
    error = prepared.errors[1]
    assert isinstance(error, ImageError) and error.code == "invalid_image"
    results = runner.forward(prepared)
    assert results[1] is error  # in the failed item's own place
    # the others: exactly what the PIL path gives for the same pixels, and the uint8 item as before
    exact = [Item(Classify(3), pixels=device_pixels([d], cfg)[0]) for d in (datas[0], datas[2])] + [items[3]]
    for got, want in zip([results[0], results[2], results[3]], runner.forward(runner.prepare(exact)), strict=True):
        assert list(got.indices) == list(want.indices)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_logits_barely_move_between_the_pil_and_the_device_path(tiny_checkpoint, jpegs):
    model = app.load_model(str(tiny_checkpoint))
    runner = make_runner(model, max_batch_size=8, fast=False, jpeg_decoder="torchvision")
    cfg = model.preprocess_config
    datas = list(jpegs.values())
    pil = np.stack([decode_to_pixels(d, cfg, LIMIT, draft=False).pixels for d in datas])
    with torch.inference_mode():
        expected = model(model.normalize(torch.from_numpy(pil))).logits
        prepared = runner.prepare([Item(Classify(1), jpeg=queued(d, cfg)) for d in datas])
        order = np.argsort(prepared.rows)
        got = model(prepared.inputs).logits[torch.from_numpy(order)]
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.02 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_the_warm_up_decodes_a_jpeg_only_where_the_device_path_is_chosen(tiny_checkpoint):
    from app.runner import warmup_items
    from app.tasks import FAST

    def runner(choice: str):
        return make_runner(app.load_model(str(tiny_checkpoint)), max_batch_size=2, jpeg_decoder=choice)

    assert not any(i.jpeg for i in warmup_items(runner("pil"), 2, FAST))
    assert not any(i.jpeg for i in warmup_items(runner("auto"), 2, FAST))  # auto: not on a CPU
    device = runner("torchvision")
    items = warmup_items(device, 2, FAST)
    assert isinstance(items[0].jpeg, Encoded) and isinstance(items[1].pixels, np.ndarray)
    assert len(device.forward(device.prepare(items))) == 2  # the warm-up batch runs through the device decoder
