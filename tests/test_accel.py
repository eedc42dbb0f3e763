"""app.accel: the engine's optional speed-ups compute the same function as the eager model.

Compiling tests use a tiny ViT (32x32 images, patch 8, width 32, depth 2), which inductor builds in seconds; they
skip when no C++ compiler is installed. CUDA-graph tests skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from app import accel
from app.accel import Accelerated, FastPath, accelerate, default_buckets, plan_chunks, resolve_strategy
from app.model import VisionTransformer, ViTConfig

ATOL, RTOL = 1e-4, 1e-3
needs_cxx = pytest.mark.skipif(not accel.has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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


def eager(net: VisionTransformer, x: torch.Tensor):
    with torch.inference_mode():
        tokens = net.forward_features(x).tokens
        return tokens, net.forward_head(tokens)


def assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=RTOL)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=RTOL)


# -- planning (pure) ------------------------------------------------------------------------------------


def test_default_buckets_are_powers_of_two_and_the_maximum():
    assert default_buckets(1) == [1]
    assert default_buckets(8) == [1, 2, 4, 8]
    assert default_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        default_buckets(0)


@pytest.mark.parametrize("n", range(1, 40))
@pytest.mark.parametrize("pad", [True, False])
def test_plan_chunks_covers_every_row_once(n, pad):
    buckets = [1, 2, 4, 8, 16]
    runs = plan_chunks(n, buckets, pad)
    assert sum(rows for rows, _ in runs) == n
    assert all(rows <= bucket and bucket in buckets for rows, bucket in runs)
    if not pad:
        assert all(rows == bucket for rows, bucket in runs)
    else:  # padding: full largest buckets, then at most one padded run
        assert sum(1 for rows, bucket in runs if rows < bucket) <= 1
        assert len(runs) == -(-n // 16)


def test_resolve_strategy():
    cpu = torch.device("cpu")
    assert resolve_strategy("off", cpu) == "eager"
    assert resolve_strategy("eager", cpu) == "eager"
    assert resolve_strategy("auto", cpu) == ("onednn" if accel.has_onednn_linear() else "eager")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_strategy("cudagraph", cpu)
    with pytest.raises(ValueError, match="unknown compile mode"):
        resolve_strategy("fastest", cpu)


def test_eager_strategy_is_the_module_itself():
    net = tiny_vit()
    fast = accelerate(net, "cpu", torch.float32, 4, mode="off")
    assert fast.strategy == "eager"
    assert fast.warmup() == {}
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert_same(fast(x), eager(net, x))


# -- oneDNN linears, on the CPU -------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not accel.has_onednn_linear(), reason="this torch has no oneDNN linear ops")


@needs_onednn
@pytest.mark.parametrize("num_classes", [10, 0])
def test_onednn_matches_eager_at_any_batch_size(num_classes):
    net = tiny_vit(num_classes=num_classes)
    fast = accelerate(net, "cpu", torch.float32, [1, 4], mode="auto")
    assert fast.strategy == "onednn"
    assert sorted(fast.warmup()) == [1, 4]
    linears = [m for m in fast.fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []  # every linear layer was replaced
    assert all(isinstance(b, accel.OneDNNBlock) for b in fast.fast.net.blocks)  # residuals fused into projections
    assert any(isinstance(m, torch.nn.Linear) for m in net.modules())  # and the engine's own model untouched
    for n in (1, 3, 4, 6):  # sizes not warmed work too
        x = torch.randn(n, 3, 32, 32)
        assert_same(fast(x), eager(net, x))


@needs_onednn
def test_onednn_attention_path_gives_the_eager_maps_and_logits(tmp_path):
    from app.engine import load_model

    path = tiny_checkpoint(tmp_path, seed=2)
    plain = load_model(path, device="cpu", dtype="float32")
    fast = load_model(path, device="cpu", dtype="float32", compile="auto")
    fast.warmup(4)
    assert fast.accel_strategy == "onednn"
    ran = []  # the attention path runs on the oneDNN copy, not on the served module's own layers
    fast._fast.attention_net.blocks[0].register_forward_hook(lambda *_: ran.append("onednn"))
    fast.net.blocks[0].register_forward_hook(lambda *_: ran.append("eager"))

    x = torch.randn(3, 3, 32, 32)
    want, got = plain(x, attentions=True), fast(x, attentions=True)
    assert ran == ["onednn"]
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.tokens, want.tokens, atol=ATOL, rtol=RTOL)
    assert len(got.attentions) == 2
    for g, w in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


@needs_onednn
def test_onednn_bfloat16_close_to_float32():
    net = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    want = eager(net, x)
    fast = accelerate(tiny_vit().to(torch.bfloat16), "cpu", torch.bfloat16, 4, mode="onednn")
    got = fast(x.to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[1].float(), want[1], atol=0.1, rtol=0.05)


# -- compiled, on the CPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    """One tiny model compiled at buckets 1 and 2 (the tests below share its two compiled graphs)."""
    if not accel.has_cpp_compiler():
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    net = tiny_vit()
    fast = accelerate(net, "cpu", torch.float32, [1, 2], mode="compile")
    return net, fast, fast.warmup()


def test_compiled_matches_eager_at_buckets_and_between_them(compiled):
    net, fast, built = compiled
    assert fast.strategy == "compile" and not fast.pad
    assert sorted(built) == [1, 2] and all(s > 0 for s in built.values())
    # after warm-up nothing compiles again: not for other batch sizes, not for normal (non-inference) tensors
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (1, 2, 3, 5):  # 3 = 2 + 1 and 5 = 2 + 2 + 1: chunks without padding on the CPU
            x = torch.randn(n, 3, 32, 32)
            assert_same(fast(x), eager(net, x))
            with torch.inference_mode():
                assert_same(fast(x.clone()), eager(net, x))


def test_padding_rows_do_not_change_real_rows(compiled):
    # On a GPU short batches are padded up to a bucket; rows of a ViT never mix, so padding is invisible.
    net, fast, _ = compiled
    fast.pad, fast.buckets = True, [2]
    try:
        with torch.inference_mode():
            for n in (1, 3):  # 1 -> padded to 2; 3 -> 2 + (1 padded to 2)
                x = torch.randn(n, 3, 32, 32)
                got = fast(x)
                assert got[0].shape == (n, 17, 32) and got[1].shape == (n, 10)
                assert_same(got, eager(net, x))
    finally:
        fast.pad, fast.buckets = False, [1, 2]


@needs_cxx
def test_engine_warmup_uses_the_compiled_path_and_keeps_attentions(tmp_path):
    from app.engine import load_model

    path = tiny_checkpoint(tmp_path)
    plain = load_model(path, device="cpu", dtype="float32")
    auto = load_model(path, device="cpu", dtype="float32", compile="auto")
    auto.warmup(4)
    assert auto.accel_strategy == ("onednn" if accel.has_onednn_linear() else "eager")
    fast = load_model(path, device="cpu", dtype="float32", compile="on")
    assert fast.accel_strategy == "eager"
    seconds = fast.warmup([1, 2])
    assert sorted(seconds) == [1, 2]
    assert fast.accel_strategy == "compile"

    x = torch.randn(3, 3, 32, 32)
    want = plain(x)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = fast(x)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.tokens, want.tokens, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.embedding, want.embedding, atol=ATOL, rtol=RTOL)
    assert got.attentions is None
    by_auto = auto(x)
    torch.testing.assert_close(by_auto.logits, want.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(by_auto.tokens, want.tokens, atol=ATOL, rtol=RTOL)
    # the attention path is the eager one, compiled or not
    with_maps = fast(x, attentions=True)
    assert len(with_maps.attentions) == 2 and with_maps.attentions[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(with_maps.logits, want.logits, atol=ATOL, rtol=RTOL)


# -- CUDA graphs --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("strategy", ["cudagraph", "compile+cudagraph"])
def test_cuda_graphs_match_eager_and_pad_short_batches(strategy):
    net = tiny_vit().cuda()
    fast = accelerate(net, "cuda", torch.float32, [1, 4], mode=strategy)
    assert fast.pad
    fast.warmup()
    with torch.inference_mode():
        outs = []
        for n in (1, 3, 4, 6):  # 3 pads to 4; 6 = 4 + 2 (padded)
            x = torch.randn(n, 3, 32, 32, device="cuda")
            got = fast(x)
            outs.append(got)
            assert_same(got, eager(net, x))
        # results are copies: a later replay must not change an earlier answer
        before = outs[0][0].clone()
        fast(torch.randn(1, 3, 32, 32, device="cuda"))
        torch.testing.assert_close(outs[0][0], before)


@needs_cuda
def test_cuda_graph_bfloat16_close_to_float32():
    net = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    want = eager(net, x)
    fast = accelerate(net.to("cuda", torch.bfloat16), "cuda", torch.bfloat16, [2], mode="cudagraph")
    fast.warmup()
    with torch.inference_mode():
        got = fast(x.to("cuda", torch.bfloat16))
    torch.testing.assert_close(got[1].float().cpu(), want[1], atol=0.1, rtol=0.05)


def test_fast_path_module_is_what_gets_accelerated():
    net = tiny_vit(num_classes=0)
    fast = FastPath(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert_same(fast(x), eager(net, x))
    assert isinstance(accelerate(net, "cpu", torch.float32, 2, mode="off"), Accelerated)


# -- lanes: forwards that share the intra-op threads ----------------------------------------------------------

needs_per_thread = pytest.mark.skipif(not accel.per_thread_intra_op(), reason="torch's threads are not per thread")


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

    share = accel.ThreadShare(4)
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


def test_forward_lanes_two_on_a_cpu_one_on_a_gpu_or_under_compile(tmp_path):
    from app.engine import load_model
    from app.tasks import forward_lanes

    path = tiny_checkpoint(tmp_path, seed=0)
    auto = load_model(path, compile="auto")
    compiled = load_model(path, compile="on")
    if accel.per_thread_intra_op():
        assert forward_lanes(auto, threads=2) == 2
        assert forward_lanes(auto, threads=8, requested=3) == 3
    assert forward_lanes(auto, threads=1) == 1
    assert forward_lanes(compiled, threads=8, requested=4) == 1
    if torch.cuda.is_available():
        assert forward_lanes(load_model(str(path), device="cuda"), threads=8, requested=4) == 1
