"""app.analysis: attention rollout against its definition, written out here with the full matrix products."""

from __future__ import annotations

import numpy as np
import torch

from app import analysis


def random_attentions(batch: int, depth: int, heads: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(batch, heads, tokens, tokens, generator=g)).softmax(-1) for _ in range(depth)]


def rollout_by_definition(attentions: list[torch.Tensor]) -> np.ndarray:
    """Abnar & Zuidema: R = A_L ... A_1 with A_l = rownorm(mean over heads + I); the class token's row over patches,
    divided by its maximum."""
    maps = []
    for image in range(attentions[0].shape[0]):
        product = np.eye(attentions[0].shape[-1])
        for weights in attentions:  # first layer to last, each new layer multiplying from the left
            a = weights[image].double().numpy().mean(axis=0) + np.eye(product.shape[0])
            product = (a / a.sum(axis=1, keepdims=True)) @ product
        row = product[0, 1:]
        maps.append(row / row.max())
    return np.stack(maps)


def test_rollout_is_the_class_row_of_the_product_of_every_layer():
    attentions = random_attentions(batch=3, depth=4, heads=2, tokens=17)
    got = analysis.rollout(attentions)
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got.numpy(), rollout_by_definition(attentions), rtol=1e-5, atol=1e-6)


def test_rollout_of_one_layer_is_that_layers_head_mean_class_row():
    (weights,) = random_attentions(batch=2, depth=1, heads=3, tokens=10, seed=1)
    a = weights.mean(dim=1) + torch.eye(10)
    row = (a / a.sum(-1, keepdim=True))[:, 0, 1:]
    torch.testing.assert_close(analysis.rollout([weights]), row / row.amax(-1, keepdim=True))


def test_rollout_order_matters():
    # later layers multiply from the left: reversing the layers gives another map (so the order is really tested)
    attentions = random_attentions(batch=1, depth=3, heads=2, tokens=9, seed=2)
    assert not torch.allclose(analysis.rollout(attentions), analysis.rollout(attentions[::-1]), atol=1e-3)
