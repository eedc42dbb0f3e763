"""The GPU-side batch path: pinned staging buffers, the side stream, the prepare/forward split.

The CUDA tests skip without a GPU; the same functions run on the CPU in tests/test_jpeg_device.py
(prepare_batch), tests/test_batching.py (the prepare/forward split) and tests/http/test_jpeg_decoder.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
def test_pinned_stager_reuses_its_buffers_without_overwriting_a_copy_in_flight():
    from app.cuda_runner import PinnedStager

    device = torch.device("cuda")
    stager = PinnedStager(device)
    stream = torch.cuda.Stream(device)
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)] for n in (3, 4, 1, 4, 2, 4)]
    outs = []
    for arrays in batches:
        # a slow kernel ahead of each copy on the same stream: the copy is still pending when upload returns,
        # so refilling that buffer too early would corrupt it
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1_000_000)
        outs.append(stager.upload(arrays, stream))
    torch.cuda.synchronize()
    for arrays, out in zip(batches, outs, strict=True):
        assert out.device.type == "cuda" and out.dtype == torch.uint8
        assert np.array_equal(out.cpu().numpy(), np.stack(arrays))
    assert stager.capacity == [4, 4]  # grown to a power of two, then reused
    assert all(s.host.is_pinned() for s in stager._slots)


@cuda
def test_prepared_batches_on_the_side_stream_equal_the_cpu_path(tiny_checkpoint):
    import app
    from app.runner import make_runner
    from app.tasks import Classify, Item

    cpu = make_runner(app.load_model(str(tiny_checkpoint)), max_batch_size=8)
    gpu = make_runner(app.load_model(str(tiny_checkpoint), device="cuda", dtype="float32"), max_batch_size=8)
    rng = np.random.default_rng(1)
    items = [Item(Classify(3), pixels=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    expected = cpu.forward(cpu.prepare(items))
    prepared = [gpu.prepare(items[:3]), gpu.prepare(items[3:])]  # two in flight at once
    assert prepared[0].ready is not None and prepared[0].inputs.dtype == torch.float32
    got = gpu.forward(prepared[0]) + gpu.forward(prepared[1])
    for a, b in zip(got, expected, strict=True):
        assert list(a.indices) == list(b.indices)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_a_batch_is_prepared_beside_the_forward_on_cuda_only(tiny_checkpoint):
    import asyncio
    import threading

    import app
    from app.batching import Batcher
    from app.runner import make_runner
    from app.tasks import Classify, Item

    async def threads_used(device: str) -> set[str]:
        runner = make_runner(app.load_model(str(tiny_checkpoint), device=device), max_batch_size=2)
        seen = set()
        prepare = runner.prepare
        runner.prepare = lambda items: seen.add(threading.current_thread().name) or prepare(items)
        batcher = Batcher(runner, max_batch_size=2, max_wait_s=0)
        batcher.start()
        try:
            pixels = np.zeros((32, 32, 3), np.uint8)
            results = await batcher.run([Item(Classify(1), pixels=pixels)] * 3)
            assert all(r.indices.shape == (1,) for r in results)
        finally:
            await batcher.stop()
        return {name.split("_")[0] for name in seen}

    assert asyncio.run(threads_used("cpu")) == {"forward-model"}  # the CPU: one step on the forward thread
    if torch.cuda.is_available():
        assert asyncio.run(threads_used("cuda")) == {"prepare-model"}


def _jpegs() -> list[bytes]:
    import io

    from PIL import Image

    data = pytest.importorskip("skimage.data")
    out = []
    for name, size in (("chelsea", (640, 480)), ("astronaut", (300, 400)), ("coffee", (640, 480))):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).resize(size).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@cuda
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")
@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_nvjpeg_batches_match_the_cpu_decoder_within_a_few_grey_levels():
    from app import gpu_decode
    from app.decode import jpeg_for_device
    from app.preprocess import PreprocessConfig

    cfg = PreprocessConfig(resize=256, crop=(224, 224), interpolation="bicubic")
    datas = _jpegs()
    encoded = [jpeg_for_device(d, cfg, 10**8) for d in datas]
    results = {}
    for device in ("cpu", "cuda"):
        out, rows, errors = gpu_decode.decode_batch(encoded, cfg, torch.device(device))
        assert not errors and out.device.type == device
        results[device] = out.cpu()[np.argsort(rows)].to(torch.int16)
    diff = (results["cuda"] - results["cpu"]).abs()
    # nvJPEG's IDCT and chroma upsampling: on the H200, bench.jpeg_decoders measured up to 13 grey levels apart at
    # 640x480 (0.31 on average); a wrong channel order, crop or resize would move the mean by tens
    assert diff.max() <= 16 and diff.float().mean() < 1.0


@cuda
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")
@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_a_cuda_batch_of_jpegs_and_pixels_with_a_corrupt_one(tiny_checkpoint, bogus_huffman_table):
    import app
    from app.decode import ImageError, jpeg_for_device
    from app.runner import make_runner
    from app.tasks import Classify, Item

    runner = make_runner(app.load_model(str(tiny_checkpoint), device="cuda", dtype="bfloat16"), max_batch_size=8)
    cfg = runner.model.preprocess_config
    datas = _jpegs()
    datas[1] = bogus_huffman_table(datas[1])  # the header intact, the image data undecodable
    items = [Item(Classify(2), jpeg=jpeg_for_device(d, cfg, 10**8)) for d in datas]
    items.append(Item(Classify(2), pixels=np.zeros((*cfg.output_size, 3), np.uint8)))
    prepared = runner.prepare(items)
    assert prepared.ready is not None and prepared.inputs.dtype == torch.bfloat16
    results = runner.forward(prepared)
    assert 1 in prepared.errors and isinstance(results[1], ImageError)  # nvJPEG refused it, and so did Pillow
    assert all(results[i].indices.shape == (2,) for i in (0, 2, 3))
