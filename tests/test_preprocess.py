"""Preprocessing against transformers' own PIL image processor on real photos, and the config's own rules.

timm's and torchvision's published transforms are checked entry by entry in tests/checkpoints/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.checkpoints import hf
from app.engine import Normalizer
from app.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    preprocess_for_size,
    seen_region,
    to_model_pixels,
)

PROCESSOR_CONFIGS = {
    "defaults": {},
    # DeiT-style: shortest edge, then an odd crop whose margins round differently in torchvision and transformers
    "shortest_edge_and_crop": {
        "size": {"shortest_edge": 256},
        "do_center_crop": True,
        "crop_size": {"height": 221, "width": 221},
        "resample": 3,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    },
    "exact_non_square_bicubic": {"size": {"height": 48, "width": 40}, "resample": 3},
    "no_normalize": {"size": {"height": 64, "width": 64}, "do_normalize": False},
    "no_rescale": {"size": {"height": 32, "width": 32}, "do_rescale": False, "image_mean": [1.0, 2.0, 3.0]},
    "nearest_odd_rescale": {"size": {"height": 30, "width": 30}, "resample": 0, "rescale_factor": 0.5},
}


def ours(images, cfg: PreprocessConfig) -> torch.Tensor:
    batch = np.stack([to_model_pixels(img, cfg) for img in images])
    return Normalizer(cfg)(torch.from_numpy(batch))


@pytest.mark.parametrize("name", PROCESSOR_CONFIGS)
def test_matches_transformers_pil_processor(name, photos, tmp_path):
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(**PROCESSOR_CONFIGS[name])
    processor.save_pretrained(tmp_path)  # read back the file transformers itself writes
    pp = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = hf.preprocess_config(pp, (224, 224), "test")
    expected = processor(images=photos, return_tensors="pt").pixel_values
    got = ours(photos, cfg)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


UNSUPPORTED = {
    "longest edge": ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "longest_edge is not supported"),
    "size of another form": ({"size": "224"}, "unsupported size: '224'"),
    "crop without height": (
        {"do_center_crop": True, "crop_size": {"shortest_edge": 224}},
        "crop_size needs height and width",
    ),
    "unknown resample": ({"resample": 9}, "unknown resample 9"),
    "two-channel mean": ({"image_mean": [0.5, 0.5]}, "need 3 values"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_processor_settings_we_cannot_reproduce_are_refused_by_name(name):
    from app.checkpoints import CheckpointError

    pp, words = UNSUPPORTED[name]
    with pytest.raises(CheckpointError, match=words):
        hf.preprocess_config(pp, (224, 224), "test")


def test_transformers_crop_margin_is_floored(photos):
    """The odd margins of a 221 crop: transformers floors them, torchvision rounds; the floor is what we use."""
    pp = PROCESSOR_CONFIGS["shortest_edge_and_crop"]
    cfg = hf.preprocess_config(pp, (224, 224), "test")
    assert cfg.crop_rounding == "floor"
    torchvision_style = PreprocessConfig.from_dict({**cfg.to_dict(), "crop_rounding": "round"})
    assert not torch.equal(ours(photos[:1], cfg), ours(photos[:1], torchvision_style))


def test_missing_processor_file_uses_vit_defaults_at_model_size():
    cfg = hf.preprocess_config(None, (32, 48), "test")
    assert cfg == PreprocessConfig(resize=(32, 48), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


def test_config_round_trip_keeps_declared_steps():
    cfg = PreprocessConfig(
        resize=(40, 40), crop=(32, 32), interpolation="bicubic", grayscale=True, invert=True, crop_pct=0.8
    )
    d = cfg.to_dict()
    assert d["grayscale"] and d["invert"] and d["crop_pct"] == 0.8
    assert PreprocessConfig.from_dict(d) == cfg
    plain = PreprocessConfig(resize=36, crop=(32, 32)).to_dict()
    assert set(plain) == {"resize", "crop", "interpolation", "mean", "std"}  # defaults stay out of ModelInfo
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(resize=32, interpolation="cubic-ish")


def test_grayscale_and_invert(photos):
    cfg = PreprocessConfig(resize=(32, 32), grayscale=True, invert=True)
    px = to_model_pixels(photos[0], cfg)
    expected = 255 - np.asarray(photos[0].resize((32, 32), 2).convert("L"))
    assert (px[..., 0] == expected).all() and (px[..., 0] == px[..., 2]).all()


def test_preprocess_for_size_keeps_crop_ratio():
    torchvision_style = PreprocessConfig(resize=256, crop=(224, 224))
    at_384 = preprocess_for_size(torchvision_style, (384, 384))
    assert at_384.resize == 438 and at_384.crop == (384, 384)  # floor(384 * 256 / 224)
    timm_style = PreprocessConfig(resize=248, crop=(224, 224), crop_pct=0.9)
    assert preprocess_for_size(timm_style, (384, 384)).resize == 426  # floor(384 / 0.9), as timm computes it
    exact = PreprocessConfig(resize=(224, 224))
    assert preprocess_for_size(exact, (32, 48)).resize == (32, 48)
    shortest_only = PreprocessConfig(resize=40)
    assert preprocess_for_size(shortest_only, (32, 32)).crop == (32, 32)


def test_seen_region_is_the_centre_crop_box_in_original_pixels():
    cfg = PreprocessConfig(resize=256, crop=(224, 224))
    left, top, right, bottom = seen_region(512, 256, cfg)  # resized to 512 x 256, crop 224 in the middle
    assert (left, top, right, bottom) == (144.0, 16.0, 368.0, 240.0)
