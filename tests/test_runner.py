"""app.runner and app.cuda_runner: the runners serve the same numbers as the plain model of app/model/.

A tiny ViT (32x32 images, patch 8, width 32, depth 2). CUDA tests skip without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app import runner
from app.engine import load_model
from app.model import VisionTransformer, ViTConfig
from app.runner import CpuRunner, OneDNNLinear, ThreadShare, default_buckets, make_runner
from app.tasks import AttentionMap, Classify, Embed, Item

ATOL, RTOL = 1e-4, 1e-3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_onednn = pytest.mark.skipif(not runner.has_onednn_linear(), reason="this torch has no oneDNN linear ops")


def tiny_vit(num_classes: int = 10, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=num_classes
    )
    net = VisionTransformer(cfg)
    if net.head is not None:  # a zero head (the training init) would hide a wrong class token
        torch.nn.init.normal_(net.head.weight, std=0.5)
    return net.eval()


def tiny_checkpoint(tmp_path, num_classes: int = 5, seed: int = 1) -> str:
    """`tiny_vit` saved as a native checkpoint, for the tests that load it through the engine."""
    from app.checkpoints import native
    from app.preprocess import PreprocessConfig

    net = tiny_vit(num_classes=num_classes, seed=seed)
    pre = PreprocessConfig.from_dict({"resize": [32, 32], "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3})
    path = tmp_path / "tiny.safetensors"
    native.save(path, net.cfg, net.state_dict(), pre, [f"c{i}" for i in range(num_classes)])
    return str(path)


def assert_same(got, want, attentions: bool = False) -> None:
    """Two engine `Output`s agree: tokens, embeddings, logits (and attention maps)."""
    torch.testing.assert_close(got.tokens, want.tokens, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.embedding, want.embedding, atol=ATOL, rtol=RTOL)
    if want.logits is None:
        assert got.logits is None
    else:
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    if attentions:
        assert len(got.attentions) == len(want.attentions)
        for g, w in zip(got.attentions, want.attentions, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


def test_default_buckets_are_powers_of_two_and_the_maximum():
    assert default_buckets(1) == [1]
    assert default_buckets(8) == [1, 2, 4, 8]
    assert default_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        default_buckets(0)


# -- the CPU: the plain model, its linear layers packed in place ------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("num_classes", [5, 0])
def test_the_packed_model_gives_the_plain_models_numbers(tmp_path, num_classes):
    path = tiny_checkpoint(tmp_path, num_classes=num_classes, seed=2)
    plain = load_model(path)  # a second load: its own weights, never packed
    served = load_model(path)
    cpu = make_runner(served, max_batch_size=4)
    assert isinstance(cpu, CpuRunner) and cpu.fast_path == "onednn"
    assert not any(isinstance(m, torch.nn.Linear) for m in served.net.modules())  # every linear layer packed
    assert all(isinstance(b.mlp.fc1, OneDNNLinear) and b.mlp.fc1.attr == "gelu" for b in served.net.blocks)
    assert all(isinstance(b.mlp.act, torch.nn.Identity) for b in served.net.blocks)  # the GELU rides on fc1
    assert type(served.net.blocks[0]) is type(plain.net.blocks[0])  # the same blocks: no second copy of the math
    for n in (1, 3, 4, 6):  # sizes not warmed work too
        x = torch.randn(n, 3, 32, 32)
        assert_same(served(x), plain(x))
        assert_same(served(x, attentions=True), plain(x, attentions=True), attentions=True)


@needs_onednn
def test_compile_off_packs_nothing(tmp_path):
    path = tiny_checkpoint(tmp_path)
    off = make_runner(load_model(path), max_batch_size=2, fast=False)
    assert off.fast_path == "eager" and any(isinstance(m, torch.nn.Linear) for m in off.model.net.modules())


@needs_onednn
def test_packed_bfloat16_close_to_float32(tmp_path):
    path = tiny_checkpoint(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    want = load_model(path)(x)
    fast = load_model(path, dtype="bfloat16")
    make_runner(fast, max_batch_size=4)
    got = fast(x)
    assert fast.net.blocks[0].attn.qkv.packed_weight.dtype == torch.bfloat16
    torch.testing.assert_close(got.logits, want.logits, atol=0.1, rtol=0.05)


def test_a_runner_batch_answers_each_task_as_the_model_does(tmp_path):
    path = tiny_checkpoint(tmp_path, seed=3)
    plain = load_model(path)
    served = load_model(path)
    cpu = make_runner(served, max_batch_size=4)
    cpu.warmup(4)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    items = [
        Item(Classify(2), pixels=pixels[0]),
        Item(Embed("mean", normalize=True), pixels=pixels[1]),
        Item(AttentionMap("cls", layer=-1, head=1), pixels=pixels[2]),
    ]
    results = cpu.forward(cpu.prepare(items))
    x = plain.normalize(torch.from_numpy(np.stack(pixels)))
    want = plain(x, attentions=True)
    probabilities = want.logits[0].softmax(-1)
    assert list(results[0].indices) == probabilities.argsort(descending=True)[:2].tolist()
    np.testing.assert_allclose(results[0].scores, probabilities.sort(descending=True).values[:2], atol=ATOL)
    mean = torch.nn.functional.normalize(want.tokens[1, 1:].mean(0), dim=-1)
    np.testing.assert_allclose(results[1], mean.numpy(), atol=ATOL, rtol=RTOL)
    cls_row = want.attentions[-1][2, 1, 0, 1:]
    assert results[2].method == "cls"
    np.testing.assert_allclose(results[2].values.ravel(), (cls_row / cls_row.max()).numpy(), atol=ATOL, rtol=RTOL)


# -- CUDA graphs -------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_graphs_match_the_plain_model_and_pad_short_batches(tmp_path):
    path = tiny_checkpoint(tmp_path)
    plain = load_model(path, device="cuda")
    served = load_model(path, device="cuda")
    cuda = make_runner(served, max_batch_size=4)
    assert cuda.fast_path == "cudagraph" and cuda.overlap and cuda.lanes == 1
    cuda.graphs.capture_all()
    assert sorted(cuda.graphs.build_seconds) == [1, 2, 4]
    with torch.inference_mode():
        outs = []
        for n in (1, 3, 4, 6):  # 3 pads to 4; 6 = 4 + 2
            x = torch.randn(n, 3, 32, 32, device="cuda")
            got = cuda.graphs(x)
            outs.append(got)
            assert_same(got, plain(x))
        # results are copies: a later replay must not change an earlier answer
        before = outs[0].tokens.clone()
        cuda.graphs(torch.randn(1, 3, 32, 32, device="cuda"))
        torch.testing.assert_close(outs[0].tokens, before)


@needs_cuda
def test_cuda_graph_bfloat16_close_to_float32(tmp_path):
    path = tiny_checkpoint(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    want = load_model(path)(x)
    cuda = make_runner(load_model(path, device="cuda", dtype="bfloat16"), max_batch_size=2)
    with torch.inference_mode():
        got = cuda.graphs(x.to("cuda", torch.bfloat16))
    torch.testing.assert_close(got.logits.cpu(), want.logits, atol=0.1, rtol=0.05)


# -- lanes: forwards that share the intra-op threads ----------------------------------------------------------

needs_per_thread = pytest.mark.skipif(not runner.per_thread_intra_op(), reason="torch's threads are not per thread")


def _in_thread(fn):
    """fn() on a fresh thread (its intra-op threads set there never touch the caller's); returns its result."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()))
    thread.start()
    thread.join(30)
    return out["value"]


@needs_per_thread
def test_thread_share_gives_a_lone_forward_every_thread_and_two_at_once_half_each():
    import threading

    share = ThreadShare(4)
    first_in, second_done = threading.Event(), threading.Event()

    def first():
        with share.slot() as n:
            first_in.set()
            second_done.wait(10)
            return n, torch.get_num_threads()

    def second():
        first_in.wait(10)
        with share.slot() as n:
            seen = n, torch.get_num_threads()
        second_done.set()
        return seen

    mine = torch.get_num_threads()
    results: dict = {}
    threads = [threading.Thread(target=lambda f=f: results.update({f.__name__: f()})) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"first": (4, 4), "second": (2, 2)}
    assert _in_thread(lambda: _slot_alone(share)) == (4, 4)  # both gone: a lone forward gets all four again
    assert torch.get_num_threads() == mine  # the caller's own setting is untouched


def _slot_alone(share):
    with share.slot() as n:
        return n, torch.get_num_threads()


def test_cpu_lanes_two_with_two_threads_or_as_asked_and_one_on_a_gpu(tmp_path):
    path = tiny_checkpoint(tmp_path, seed=0)
    if runner.per_thread_intra_op():
        assert make_runner(load_model(path), max_batch_size=2, share=ThreadShare(2)).lanes == 2
        assert make_runner(load_model(path), max_batch_size=2, share=ThreadShare(8), lanes=3).lanes == 3
    assert make_runner(load_model(path), max_batch_size=2, share=ThreadShare(1)).lanes == 1
    if torch.cuda.is_available():
        assert make_runner(load_model(path, device="cuda"), max_batch_size=2, lanes=4).lanes == 1
