"""Our own format: one self-describing .safetensors (architecture, labels, preprocessing in its metadata)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from app import load_model
from app.checkpoints import CheckpointError, native, read_checkpoint
from app.model import ViTConfig
from app.preprocess import PreprocessConfig


def test_round_trip(make_native_checkpoint, make_tiny_vit, tiny_config):
    pre = PreprocessConfig(resize=(40, 40), crop=(32, 32), interpolation="bicubic", invert=True, crop_pct=0.8)
    folder = make_native_checkpoint("rt", seed=5, labels=[f"digit {i}" for i in range(10)], preprocess=pre)
    ckpt = read_checkpoint(str(folder / "model.safetensors"))
    assert ckpt.format == "native" and ckpt.config == tiny_config and ckpt.preprocess == pre
    assert ckpt.labels[3] == "digit 3"
    expected = make_tiny_vit(tiny_config, seed=5).state_dict()
    assert set(ckpt.state_dict) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(ckpt.state_dict[k], v, atol=0, rtol=0)


def test_load_model_from_folder(tiny_checkpoint, make_tiny_vit, pixels):
    model = load_model(str(tiny_checkpoint))
    info = model.info
    assert info["format"] == "native" and info["num_classes"] == 10 and info["grid"] == [4, 4]
    assert info["preprocess"] == {
        "resize": 36,
        "crop": [32, 32],
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert model.labels[0] == "label_0"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, make_tiny_vit()(pixels), atol=1e-5, rtol=1e-4)


def test_extra_metadata_is_kept(tmp_path, make_tiny_vit, tiny_config):
    native.save(
        tmp_path / "m.safetensors",
        tiny_config,
        make_tiny_vit().state_dict(),
        PreprocessConfig(resize=(32, 32)),
        [],
        extra={"training": {"epochs": 3}},
    )
    assert native.read_metadata(tmp_path / "m.safetensors")["training"] == {"epochs": 3}
    assert load_model(str(tmp_path / "m.safetensors")).labels[0] == "class_0"  # no labels: class_<i>


def test_malformed_metadata(tmp_path, make_tiny_vit):
    tensors = make_tiny_vit().state_dict()
    save_file(tensors, tmp_path / "bad_json.safetensors", metadata={native.METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=r"unreadable vitserve metadata in bad_json\.safetensors"):
        read_checkpoint(str(tmp_path / "bad_json.safetensors"))
    save_file(tensors, tmp_path / "no_config.safetensors", metadata={native.METADATA_KEY: json.dumps({"labels": []})})
    with pytest.raises(CheckpointError, match=r"malformed vitserve metadata in no_config\.safetensors"):
        read_checkpoint(str(tmp_path / "no_config.safetensors"))


def test_metadata_that_disagrees_with_weights_names_the_keys(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    meta = native.read_metadata(path)
    meta["config"] = ViTConfig.from_dict({**meta["config"], "depth": 3}).to_dict()
    save_file(load_file(path), path, metadata={native.METADATA_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.attn\.proj\.bias"):
        load_model(str(path))
