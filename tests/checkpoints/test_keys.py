"""The shape facts every reader takes from the weights alone."""

import pytest

from app.checkpoints.base import CheckpointError
from app.checkpoints.keys import config_from_shape, square_grid


def test_square_grid_reads_the_class_token_slot_and_the_patch_grid():
    assert square_grid(1 + 14 * 14, "x") == (14, 14)
    assert square_grid(14 * 14, "x", num_prefix=0) == (14, 14)  # no_embed_class: no slot for the class token
    assert square_grid(6 + 14 * 14, "x", num_prefix=6) == (14, 14)  # class, distillation and 4 registers
    with pytest.raises(CheckpointError, match=r"not 1 \+ a square patch grid.*config.json"):
        square_grid(1 + 12 * 16, "x")


def test_config_from_shape_takes_the_image_size_from_grid_and_patch():
    shape = {
        "embed_dim": 48,
        "in_chans": 3,
        "patch_size": 8,
        "depth": 2,
        "num_positions": 1 + 5 * 5,
        "mlp_dim": 96,
        "num_classes": 7,
        "qkv_bias": False,
    }
    config = config_from_shape(shape, "x", num_heads=4, qkv_bias=True, layer_norm_eps=1e-6)
    assert config.image_size == (40, 40)
    assert (config.patch_size, config.embed_dim, config.depth, config.mlp_dim) == (8, 48, 2, 96)
    assert (config.num_heads, config.qkv_bias, config.layer_norm_eps, config.num_classes) == (4, True, 1e-6, 7)
