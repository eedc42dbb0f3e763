"""The engine as API.md's Python API describes it: load_model -> Model (preprocess, __call__, info)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import app
from app.checkpoints import CheckpointError
from app.engine import build_model, load_strict
from app.model import VisionTransformer

MODEL_INFO_KEYS = {
    "source",
    "format",
    "sha256",
    "image_size",
    "patch_size",
    "grid",
    "embed_dim",
    "depth",
    "num_heads",
    "num_classes",
    "device",
    "dtype",
    "preprocess",
    "family",
    "pool",
    "prefix_tokens",
    "embedding_dim",
}  # API.md's ModelInfo; "name" is the server's to add


def test_python_api(tiny_checkpoint, photos):
    model = app.load_model(str(tiny_checkpoint), device="cpu", dtype="float32")
    pixels = model.preprocess(photos)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    out = model(pixels, attentions=True)
    assert out.logits.shape == (2, 10)
    assert out.tokens.shape == (2, 17, 32)
    torch.testing.assert_close(out.embedding, out.tokens[:, 0])
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    assert model(pixels).attentions is None
    assert not out.logits.requires_grad


def test_cpu_half_and_device_half_of_preprocessing_compose(tiny_checkpoint, photos):
    model = app.load_model(str(tiny_checkpoint))
    uint8 = np.stack([model.to_pixels(img) for img in photos])
    assert uint8.dtype == np.uint8 and uint8.shape == (2, 32, 32, 3)
    torch.testing.assert_close(model.normalize(torch.from_numpy(uint8)), model.preprocess(photos))


def test_info(tiny_checkpoint):
    model = app.load_model(str(tiny_checkpoint))
    info = model.info
    assert set(info) == MODEL_INFO_KEYS
    weights = tiny_checkpoint / "model.safetensors"
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["source"] == str(tiny_checkpoint)
    assert (info["image_size"], info["patch_size"], info["grid"]) == ([32, 32], 8, [4, 4])
    assert (info["embed_dim"], info["depth"], info["num_heads"], info["num_classes"]) == (32, 2, 2, 10)
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert set(info["preprocess"]) >= {"resize", "crop", "interpolation", "mean", "std"}


def test_headless_model(tiny_headless_checkpoint, pixels):
    model = app.load_model(str(tiny_headless_checkpoint))
    out = model(pixels)
    assert out.logits is None and out.embedding.shape == (2, 32)
    assert model.info["num_classes"] == 0 and model.labels == []


def test_labels_fall_back_when_they_do_not_match_the_head(make_native_checkpoint):
    folder = make_native_checkpoint("few-labels", labels=["only", "three", "names"])
    assert app.load_model(str(folder)).labels == [f"class_{i}" for i in range(10)]


@pytest.mark.parametrize(("size", "grid"), [(48, [6, 6]), ((32, 48), [4, 6]), (16, [2, 2])])
def test_image_size(size, grid, tiny_checkpoint):
    model = app.load_model(str(tiny_checkpoint), image_size=size)
    info = model.info
    hw = [size, size] if isinstance(size, int) else list(size)
    assert info["image_size"] == hw and info["grid"] == grid
    assert info["preprocess"]["crop"] == hw
    assert model.net.pos_embed.shape[1] == 1 + grid[0] * grid[1]
    out = model(torch.randn(1, 3, *hw), attentions=True)
    assert out.attentions[0].shape[-1] == 1 + grid[0] * grid[1]


def test_image_size_must_be_a_multiple_of_the_patch(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a multiple of the patch size 8"):
        app.load_model(str(tiny_checkpoint), image_size=36)


def test_bfloat16_on_cpu(tiny_checkpoint, pixels):
    exact = app.load_model(str(tiny_checkpoint))(pixels, attentions=True)
    model = app.load_model(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    assert model.info["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.net.parameters())
    out = model(pixels, attentions=True)
    assert out.logits.dtype == out.tokens.dtype == out.attentions[0].dtype == torch.float32
    torch.testing.assert_close(out.logits, exact.logits, atol=0.1, rtol=0.05)  # bfloat16 has 8 bits of mantissa
    torch.testing.assert_close(out.attentions[-1].sum(-1), torch.ones(2, 2, 17), atol=1e-2, rtol=0)


def test_float16_on_cpu(tiny_checkpoint, pixels):
    exact = app.load_model(str(tiny_checkpoint))(pixels)
    out = app.load_model(str(tiny_checkpoint), dtype="float16")(pixels)
    torch.testing.assert_close(out.logits, exact.logits, atol=2e-2, rtol=2e-2)


def test_device_and_dtype_choices(tiny_checkpoint):
    model = app.load_model(str(tiny_checkpoint), device="auto", dtype="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.info["device"].startswith(expected)
    if expected == "cpu":
        assert model.info["dtype"] == "float32"
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            app.load_model(str(tiny_checkpoint), device="cuda")
    with pytest.raises(CheckpointError, match="unknown dtype 'float64'"):
        app.load_model(str(tiny_checkpoint), dtype="float64")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(tiny_checkpoint, pixels):
    exact = app.load_model(str(tiny_checkpoint))(pixels, attentions=True)
    model = app.load_model(str(tiny_checkpoint), device="cuda", dtype="float32")
    assert not torch.backends.cudnn.allow_tf32  # the patch projection in float32, not TF32
    out = model(pixels, attentions=True)
    assert out.logits.device.type == "cuda"
    torch.testing.assert_close(out.logits.cpu(), exact.logits, atol=1e-4, rtol=1e-3)
    half = app.load_model(str(tiny_checkpoint), device="cuda", dtype="auto")(pixels)
    torch.testing.assert_close(half.logits.cpu(), exact.logits, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_device_error_reports_a_sticky_fault(tiny_checkpoint):
    # a device-side assert poisons the process's CUDA context for good: in a child process, not this one
    code = (
        "import os, sys, torch, app\n"
        "model = app.load_model(sys.argv[1], device='cuda')\n"
        "assert model.device_error() is None\n"
        "try:\n"
        "    torch.zeros(4, device='cuda')[torch.tensor([10], device='cuda')].cpu()  # an index out of bounds\n"
        "except Exception:\n"
        "    pass\n"
        "print('device error:', model.device_error(), flush=True)\n"
        "os._exit(0)  # skip the interpreter's teardown in a poisoned CUDA context\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert "device error: " in child.stdout and "device error: None" not in child.stdout


def test_strict_loading_never_half_loads(make_tiny_vit, tiny_config):
    model = make_tiny_vit(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = make_tiny_vit(seed=2).state_dict()
    broken = {**other, "unexpected.weight": torch.zeros(1)}
    del broken["norm.bias"]
    with pytest.raises(CheckpointError) as err:
        load_strict(model, broken, "src")
    assert "missing keys: norm.bias" in str(err.value) and "unexpected keys: unexpected.weight" in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was copied


def test_build_model_has_no_random_weights(tiny_checkpoint):
    """Every weight comes from the checkpoint: two builds are identical (no random init on the way)."""
    from app.checkpoints import read_checkpoint

    ckpt = read_checkpoint(str(tiny_checkpoint))
    a, b = build_model(ckpt, None), build_model(ckpt, None)
    assert isinstance(a, VisionTransformer) and not a.training
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_normalize_is_one_fused_op_equal_to_the_textbook_formula(tiny_checkpoint):
    model = app.load_model(str(tiny_checkpoint))
    cfg = model.preprocess_config
    uint8 = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    expected = (uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    got = model.normalize(uint8)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # straight into the model's dtype: the same numbers as normalising in float32 and casting
    torch.testing.assert_close(model.normalize(uint8, torch.bfloat16), expected.to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_normalize_matches_cpu(tiny_checkpoint):
    cpu = app.load_model(str(tiny_checkpoint))
    gpu = app.load_model(str(tiny_checkpoint), device="cuda", dtype="bfloat16")
    uint8 = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = gpu.normalize(uint8, torch.bfloat16)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    # a fused multiply-add on the GPU may round the float32 value differently: at most one bfloat16 step apart
    torch.testing.assert_close(got.cpu(), cpu.normalize(uint8, torch.bfloat16), atol=1e-2, rtol=1e-2)
