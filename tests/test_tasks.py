"""app.tasks through a runner: a batch of mixed requests answers each one as it would be answered alone."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine import load_model
from app.runner import Runner, make_runner
from app.tasks import ATTENTION, AttentionDistance, AttentionMap, Heatmap, Item, Tensors, batch_key


@pytest.fixture
def runner(tiny_checkpoint, perturb) -> Runner:
    loaded = load_model(str(tiny_checkpoint / "model.safetensors"), device="cpu", dtype="float32")
    perturb(loaded.net)  # an untrained head and embeddings would give near-uniform attention everywhere
    cpu = make_runner(loaded, max_batch_size=8)
    cpu.warmup(8)
    return cpu


def run_batch(runner: Runner, items: list[Item]) -> list[object]:
    return runner.forward(runner.prepare(items))


def test_a_mixed_attention_batch_answers_each_item_as_alone(runner):
    h, w = runner.model.preprocess_config.output_size
    rng = np.random.default_rng(0)
    tasks = [
        AttentionMap("rollout"),
        AttentionMap("cls", layer=0, head=1),
        AttentionDistance(),
        Tensors(("logits", "attention_rollout")),
        AttentionMap("cls", layer=-1, head=None),
        AttentionMap("rollout"),
    ]
    items = [Item(t, pixels=rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for t in tasks]
    assert {batch_key(item) for item in items} == {ATTENTION}  # the batcher would put them in one batch
    together = run_batch(runner, items)
    for item, got in zip(items, together, strict=True):
        (alone,) = run_batch(runner, [item])
        if isinstance(alone, dict):
            assert got.keys() == alone.keys()
            for name in alone:
                np.testing.assert_allclose(got[name], alone[name], atol=1e-5, rtol=1e-4)
        elif isinstance(alone, Heatmap):
            assert got.method == alone.method
            np.testing.assert_allclose(got.values, alone.values, atol=1e-5, rtol=1e-4)
        else:
            np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-4)
    # and the items really differ, so an answer given to the wrong row would show
    assert not np.allclose(together[0].values, together[5].values, atol=1e-3)


def test_class_token_maps_compute_only_the_layers_they_read(runner):
    h, w = runner.model.preprocess_config.output_size
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    computed = []  # per block run: did it materialise its attention weights?
    for block in runner.model.net.blocks:
        block.register_forward_hook(lambda module, args, out: computed.append(out[1] is not None))
    run_batch(
        runner,
        [Item(AttentionMap("cls", layer=0), pixels=pixels), Item(AttentionMap("cls", layer=0, head=1), pixels=pixels)],
    )
    assert computed == [True, False]  # layer 1 kept the fused kernel
    computed.clear()
    run_batch(runner, [Item(AttentionMap("cls", layer=0), pixels=pixels), Item(AttentionMap("rollout"), pixels=pixels)])
    assert computed == [True, True]  # the rollout reads every layer
