"""`--dtype float8` (app.model.float8): float8 e4m3 multiplies in the blocks' linear layers, bfloat16 around them.

`--dtype float8` is for GPUs with float8 tensor cores; `app.load_model` refuses it on a CPU. On a CPU torch
emulates `torch._scaled_mm`, so the tests check float8's numbers on a model converted by hand (`emulated_float8`),
and the CUDA tests the GPU path where there is a GPU with float8 tensor cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import app
from app import digits
from app.checkpoints import CheckpointError
from app.model import ViTConfig
from app.model.float8 import Float8Linear, float8_problem, to_float8
from app.runner import make_runner
from app.tasks import Item, Tensors
from app.train import score

# the CPU tests need torch's (emulated) float8 multiply on the CPU; the CUDA tests only a GPU that has one
cpu_float8 = pytest.mark.skipif(float8_problem(torch.device("cpu")) is not None, reason="no float8 on this CPU")


def _float8_gpu() -> bool:
    return torch.cuda.is_available() and float8_problem(torch.device("cuda")) is None


def emulated_float8(spec: str) -> app.Model:
    """What `--dtype float8` loads, built on a CPU: bfloat16 with the blocks' linear layers in float8."""
    model = app.load_model(spec, dtype="bfloat16")
    to_float8(model.net)
    model.float8 = True
    return model


def _reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), linear.weight.double(), linear.bias.double())


@cpu_float8
def test_float8_linear_scales_each_weight_channel_and_each_input_row():
    # Channels and rows six orders of magnitude apart: with one scale for the whole tensor the small ones would
    # fall below e4m3's smallest number (2^-9 of the scale) and come out as zeros.
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(0, -6, 48)[:, None])
        linear.bias.zero_()
    x = torch.randn(5, 7, 64, generator=g) * torch.logspace(0, -6, 7)[None, :, None]
    fp8 = Float8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.element_size() == 1

    y = fp8(x.to(torch.bfloat16))

    assert y.shape == (5, 7, 48) and y.dtype == torch.bfloat16
    # each product has both factors rounded to 3 mantissa bits (relative error <= 2^-4 each), the sum then to
    # bfloat16: bounded by 2 * 2^-4 of sum |x| |w|, whatever the row's or channel's magnitude
    bound = x.abs().double() @ linear.weight.abs().double().T
    error = (y.double() - _reference(linear, x)).abs()
    assert (error <= 0.13 * bound + 2**-8 * _reference(linear, x).abs()).all()
    assert (y != 0).all()


@cpu_float8
def test_float8_linear_is_close_to_the_float32_layer():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(128, 256)
    x = torch.randn(64, 128, generator=g)
    y = Float8Linear(linear)(x.to(torch.bfloat16)).double()
    ref = _reference(linear, x)
    assert (y - ref).norm() / ref.norm() < 0.05  # about 0.03: e4m3's rounding, averaged over 128 products


@cpu_float8
def test_to_float8_converts_the_block_linears_it_can(make_tiny_vit, tiny_config):
    odd = ViTConfig(**{**tiny_config.to_dict(), "image_size": (32, 32), "mlp_dim": 40})  # the MLP: not x16
    for config, expected in ((tiny_config, 4), (odd, 2)):
        net = make_tiny_vit(config).to(torch.bfloat16)
        assert to_float8(net) == expected * config.depth
        kinds = [type(m) for m in (net.blocks[0].attn.qkv, net.blocks[0].attn.proj, net.blocks[0].mlp.fc1)]
        assert kinds == [Float8Linear, Float8Linear, Float8Linear if expected == 4 else nn.Linear]
        assert isinstance(net.head, nn.Linear) and net.patch_embed.proj.weight.dtype == torch.bfloat16


def test_load_model_refuses_float8_on_a_cpu(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"float8 needs a CUDA GPU with float8 tensor cores"):
        app.load_model(str(tiny_checkpoint), dtype="float8")
    if not torch.cuda.is_available():  # auto resolves to the CPU here
        with pytest.raises(CheckpointError, match=r"float8 needs a CUDA GPU"):
            app.load_model(str(tiny_checkpoint), device="auto", dtype="float8")


@cpu_float8
def test_a_float8_model_and_its_cpu_runner(tiny_checkpoint, pixels):
    exact = app.load_model(str(tiny_checkpoint))(pixels)
    model = emulated_float8(str(tiny_checkpoint))
    assert model.info["dtype"] == "float8" and model.dtype == torch.bfloat16
    assert sum(isinstance(m, Float8Linear) for m in model.net.modules()) == 4 * model.config.depth

    eager = model(pixels)
    runner = make_runner(model, max_batch_size=2)
    runner.warmup(2)
    items = [Item(Tensors(("logits",)), tensor=p.numpy()) for p in pixels]  # preprocessed pixels, as /v2 takes
    served = torch.from_numpy(np.stack([r["logits"] for r in runner.forward(runner.prepare(items))]))
    fast, maps = model(pixels), model(pixels, attentions=True)

    assert runner.fast_path == "eager"  # oneDNN's packed linears would leave the float8 layers out
    assert sum(isinstance(m, Float8Linear) for m in model.net.modules()) == 4 * model.config.depth  # none packed
    assert torch.equal(fast.logits, eager.logits) and torch.equal(served, eager.logits)
    torch.testing.assert_close(fast.logits, exact.logits, atol=0.1, rtol=0.1)  # about 0.04 here; bfloat16 0.01
    assert F.cosine_similarity(fast.logits, exact.logits).min() > 0.99
    # the attention path computes the same function (softmax in float32 there, fused kernel here)
    torch.testing.assert_close(maps.logits, fast.logits, atol=0.1, rtol=0.05)
    torch.testing.assert_close(maps.attentions[-1].sum(-1), torch.ones(2, 2, 17), atol=1e-2, rtol=0)


@cpu_float8
def test_float8_keeps_the_bundled_digit_models_accuracy():
    images, labels = digits.mnist_test_images()
    exact = app.load_model("mnist-vit")
    fp8 = emulated_float8("mnist-vit")
    reference = score(exact, images, labels)
    assert score(fp8, images, labels) >= reference - 0.005  # measured: 98.3% against 98.2% (1,000 digits)
    batch = exact.preprocess(images[:200])
    agree = (exact(batch).logits.argmax(1) == fp8(batch).logits.argmax(1)).float().mean().item()
    assert agree >= 0.99


@pytest.mark.skipif(not _float8_gpu(), reason="needs a GPU with float8 tensor cores")
def test_float8_on_cuda_is_close_to_float32_and_runs_under_cuda_graphs(tiny_checkpoint, pixels):
    exact = app.load_model(str(tiny_checkpoint))(pixels)
    model = app.load_model(str(tiny_checkpoint), device="cuda", dtype="float8")
    assert model.info["dtype"] == "float8"
    assert sum(isinstance(m, Float8Linear) for m in model.net.modules()) == 4 * model.config.depth
    eager = model(pixels)
    runner = make_runner(model, max_batch_size=2)
    runner.warmup(2)
    with torch.inference_mode():
        graphed = runner.graphs(pixels.to("cuda", model.dtype))
    assert runner.fast_path == "cudagraph"
    # the same kernels on the same shapes; a bfloat16 step apart at most, should cuBLASLt pick another algorithm
    torch.testing.assert_close(graphed.logits, eager.logits, atol=1e-2, rtol=1e-2)
    logits = eager.logits.cpu()  # the same bounds as on the CPU (test_load_model_float8)
    torch.testing.assert_close(logits, exact.logits, atol=0.1, rtol=0.1)
    assert F.cosine_similarity(logits, exact.logits).min() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available() or _float8_gpu(), reason="needs a GPU without float8 tensor cores")
def test_float8_is_refused_on_an_older_cuda_gpu(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"compute capability 8\.9"):
        app.load_model(str(tiny_checkpoint), device="cuda", dtype="float8")
