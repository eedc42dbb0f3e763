"""transformers ViT checkpoints: our model gives transformers' own numbers on the same weights.

Small randomly initialised ViTForImageClassification / ViTModel of several shapes, every parameter perturbed,
saved by transformers itself (save_pretrained) as safetensors and as pytorch_model.bin; logits, the embedding
(last_hidden_state[:, 0]), all tokens and every layer's attention (eager attention) within atol 1e-4, rtol 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from app import load_model
from app.checkpoints import CheckpointError, read_checkpoint

TOL = {"atol": 1e-4, "rtol": 1e-3}
SHAPES = {
    "square": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "id2label": {0: "cat", 1: "dog", 2: "fish", 3: "bird", 4: "horse"},
    },
    "non_square_no_qkv_bias_eps": {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 40,
        "image_size": [32, 48],
        "patch_size": 16,
        "num_labels": 3,
        "qkv_bias": False,
        "layer_norm_eps": 1e-5,
    },
    "headless": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 16,
        "image_size": 24,
        "patch_size": 8,
    },
}


def hf_model(shape: str, perturb):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(**SHAPES[shape], attn_implementation="eager")
    torch.manual_seed(0)
    model = ViTModel(config) if shape == "headless" else ViTForImageClassification(config)
    return perturb(model.eval(), seed=1)


def save(model, folder, fmt: str):
    """save_pretrained; for .bin, the same tensors pickled as pytorch_model.bin (transformers 5 always writes
    safetensors from save_pretrained, so the legacy file is written the way transformers 4 wrote it)."""
    model.save_pretrained(folder)
    if fmt == "bin":
        state_dict = load_file(folder / "model.safetensors")
        torch.save(state_dict, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def reference(model, x):
    trunk = getattr(model, "vit", model)
    with torch.no_grad():
        out = trunk(x, output_attentions=True)
        logits = model.classifier(out.last_hidden_state[:, 0]) if hasattr(model, "classifier") else None
    return logits, out.last_hidden_state, out.attentions


def input_for(shape: str) -> torch.Tensor:
    size = SHAPES[shape]["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shape", SHAPES)
def test_same_numbers_as_transformers(shape, fmt, perturb, tmp_path):
    ref = hf_model(shape, perturb)
    folder = save(ref, tmp_path / "vit", fmt)
    x = input_for(shape)
    logits, tokens, attentions = reference(ref, x)

    model = load_model(str(folder))
    out = model(x, attentions=True)
    fast = model(x)

    if logits is None:
        assert out.logits is None and model.info["num_classes"] == 0
    else:
        torch.testing.assert_close(out.logits, logits, **TOL)
        torch.testing.assert_close(fast.logits, logits, **TOL)
    torch.testing.assert_close(out.tokens, tokens, **TOL)
    torch.testing.assert_close(fast.tokens, tokens, **TOL)
    torch.testing.assert_close(out.embedding, tokens[:, 0], **TOL)
    assert len(out.attentions) == len(attentions) == ref.config.num_hidden_layers
    for ours, theirs in zip(out.attentions, attentions, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)

    info = model.info
    assert info["format"] == "hf"
    assert info["num_heads"] == ref.config.num_attention_heads
    assert model.net.norm.eps == ref.config.layer_norm_eps
    assert info["image_size"] == list(x.shape[-2:])
    assert len(info["sha256"]) == 64


def test_labels_come_from_id2label(perturb, tmp_path):
    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    assert load_model(str(folder)).labels == ["cat", "dog", "fish", "bird", "horse"]


def test_transformers5_in_memory_names_single_file_with_config_beside(perturb, tmp_path):
    """`model.state_dict()` in transformers 5 uses new names (layers.N.attention.q_proj, ...); read them too."""
    ref = hf_model("square", perturb)
    state_dict = ref.state_dict()
    assert any(".q_proj." in k for k in state_dict)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "weights.safetensors")
    ref.config.to_json_file(tmp_path / "config.json")
    model = load_model(str(tmp_path / "weights.safetensors"))
    x = input_for("square")
    torch.testing.assert_close(model(x).logits, reference(ref, x)[0], **TOL)
    assert model.labels[0] == "cat"


def test_single_file_without_config_infers_standard_width(perturb, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=192, num_hidden_layers=1, num_attention_heads=3, intermediate_size=32, image_size=32, patch_size=16
    )
    ref = perturb(ViTForImageClassification(config).eval())
    ref.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").rename(tmp_path / "vit.safetensors")
    model = load_model(str(tmp_path / "vit.safetensors"))
    assert model.info["num_heads"] == 3 and model.net.norm.eps == 1e-12
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, **TOL)


def test_single_file_of_unknown_width_without_config_is_refused(perturb, tmp_path):
    ref = hf_model("square", perturb)
    ref.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").rename(tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointError, match=r"width of 32.*config\.json"):
        read_checkpoint(str(tmp_path / "vit.safetensors"))


def test_sharded_checkpoint(perturb, tmp_path):
    ref = hf_model("square", perturb)
    ref.save_pretrained(tmp_path / "vit", max_shard_size="20KB")
    assert (tmp_path / "vit" / "model.safetensors.index.json").is_file()
    x = input_for("square")
    torch.testing.assert_close(load_model(str(tmp_path / "vit"))(x).logits, reference(ref, x)[0], **TOL)


def test_preprocessor_config_is_used(perturb, tmp_path):
    from transformers import ViTImageProcessorPil

    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=[0.1, 0.2, 0.3]).save_pretrained(
        folder
    )
    pre = load_model(str(folder)).info["preprocess"]
    assert pre["resize"] == [32, 32] and pre["interpolation"] == "bicubic" and pre["mean"] == [0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
        ({"num_channels": 1}, "num_channels 1 is not supported"),
        ({"patch_size": [8, 16]}, r"non-square patches \[8, 16\]"),
    ],
)
def test_a_config_we_cannot_reproduce_is_refused_by_name(change, words, perturb, tmp_path):
    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=words):
        read_checkpoint(str(folder))


@pytest.mark.parametrize(
    ("model_type", "why"), [("dinov3_vit", "RoPE"), ("beit", "relative position bias"), ("vit_hybrid", "CNN stem")]
)
def test_unsupported_model_type_is_refused_with_reason(perturb, tmp_path, model_type, why):
    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(CheckpointError, match=why):
        read_checkpoint(str(folder))


def test_missing_value_projection_is_named(perturb, tmp_path):
    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    state_dict = load_file(folder / "model.safetensors")
    del state_dict["vit.encoder.layer.1.attention.attention.value.weight"]
    save_file(state_dict, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"block 1 .*query/key/value weight"):
        read_checkpoint(str(folder))


def test_config_that_disagrees_with_weights_names_the_keys(perturb, tmp_path):
    folder = save(hf_model("square", perturb), tmp_path / "vit", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        load_model(str(folder))
