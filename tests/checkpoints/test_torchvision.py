"""torchvision ViT checkpoints: our model gives torchvision's numbers; the weight-set table is torchvision's.

vit_b_16 itself is 86M parameters, but torchvision's key names do not depend on the size, so a tiny
torchvision.models.VisionTransformer exercises the same converter.
"""

from __future__ import annotations

import json

import pytest
import torch

from app import load_model
from app.checkpoints import CheckpointError, read_checkpoint
from app.checkpoints import torchvision as tv_reader
from app.checkpoints.tables import imagenet_labels, torchvision_table
from app.engine import Normalizer
from app.preprocess import to_model_pixels

TOL = {"atol": 1e-4, "rtol": 1e-3}


def tv_model(perturb, **kwargs):
    from torchvision.models import VisionTransformer

    args = {
        "image_size": 32,
        "patch_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 32,
        "mlp_dim": 64,
        "num_classes": 10,
        **kwargs,
    }
    torch.manual_seed(0)
    return perturb(VisionTransformer(**args).eval(), seed=3)


def reference(model, x):
    """torchvision's logits, its final-normed tokens (encoder output) and every layer's attention weights."""
    tokens, normed_inputs = [], []
    hooks = [model.encoder.register_forward_hook(lambda m, a, out: tokens.append(out))]
    hooks += [
        layer.ln_1.register_forward_hook(lambda m, a, out: normed_inputs.append(out)) for layer in model.encoder.layers
    ]
    with torch.no_grad():
        logits = model(x)
        maps = [
            layer.self_attention(h, h, h, need_weights=True, average_attn_weights=False)[1]
            for layer, h in zip(model.encoder.layers, normed_inputs, strict=True)
        ]
    for h in hooks:
        h.remove()
    return logits, tokens[0], maps


def test_same_numbers_as_torchvision(perturb, tmp_path):
    ref = tv_model(perturb)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))  # width 32: heads are not standard
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    logits, tokens, maps = reference(ref, x)

    model = load_model(str(tmp_path / "vit.pth"))
    out = model(x, attentions=True)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(model(x).logits, logits, **TOL)
    torch.testing.assert_close(out.tokens, tokens, **TOL)
    torch.testing.assert_close(out.embedding, tokens[:, 0], **TOL)
    for ours, theirs in zip(out.attentions, maps, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    info = model.info
    assert info["format"] == "torchvision" and info["num_heads"] == 2 and model.net.norm.eps == 1e-6
    assert info["preprocess"]["interpolation"] == "bilinear"  # the classic transform, scaled to 32 px


def test_standard_width_heads_inferred_and_imagenet_labels(perturb, tmp_path):
    standard = {"patch_size": 16, "num_layers": 1, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 32}
    ref = tv_model(perturb, **standard, num_classes=1000)
    torch.save({"model": ref.state_dict()}, tmp_path / "vit.pth")
    model = load_model(str(tmp_path / "vit.pth"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x).logits, reference(ref, x)[0], **TOL)
    assert model.info["num_heads"] == 12 and model.labels == imagenet_labels()


def test_older_mlp_names(perturb, tmp_path):
    """torchvision before 0.13 named the MLP layers linear_1 / linear_2."""
    ref = tv_model(perturb)
    old = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in ref.state_dict().items()
    }
    assert any("linear_1" in k for k in old)
    torch.save(old, tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_model(str(tmp_path / "vit.pth"))(x).logits, reference(ref, x)[0], **TOL)


def test_representation_layer_is_refused(perturb, tmp_path):
    torch.save(tv_model(perturb, representation_size=16).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"representation layer .*heads\.pre_logits"):
        read_checkpoint(str(tmp_path / "vit.pth"))


def test_arch_that_does_not_fit(perturb, tmp_path):
    torch.save(tv_model(perturb).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"do not fit architecture vit_b_16: embedding width 32 \(not 768\)"):
        read_checkpoint(str(tmp_path / "vit.pth"), arch="vit_b_16")
    with pytest.raises(CheckpointError, match=r"unknown torchvision architecture 'vit_base_patch16_224' \(a timm name"):
        read_checkpoint(str(tmp_path / "vit.pth"), arch="vit_base_patch16_224")


@pytest.mark.parametrize(
    ("arch", "tag", "size", "expected"),
    [
        ("vit_b_16", None, 224, "ViT_B_16_Weights.IMAGENET1K_V1"),  # DEFAULT wins over SWAG linear at 224
        ("vit_b_16", None, 384, "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"),
        ("vit_b_16", "swag_linear", 224, "ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1"),
        ("vit_b_16", "imagenet1k_swag_linear_v1", 224, "ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1"),
        ("vit_l_16", None, 224, "ViT_L_16_Weights.IMAGENET1K_V1"),
        ("vit_l_16", None, 512, "ViT_L_16_Weights.IMAGENET1K_SWAG_E2E_V1"),
        ("vit_h_14", None, 518, "ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1"),
        ("vit_h_14", None, 224, "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1"),  # no V1 weights for vit_h_14
        ("vit_b_32", None, 320, "ViT_B_32_Weights.IMAGENET1K_V1"),  # fine-tuned elsewhere: the default, rescaled
    ],
)
def test_weight_set_by_architecture_and_position_length(arch, tag, size, expected):
    assert tv_reader.weight_set(arch, tag, size, "test")["enum"] == expected


def test_weight_set_tag_that_contradicts_the_weights():
    with pytest.raises(CheckpointError, match="is for 224 px images"):
        tv_reader.weight_set("vit_b_16", "swag_linear", 384, "test")
    with pytest.raises(CheckpointError, match="no weight set 'v9'"):
        tv_reader.weight_set("vit_b_16", "v9", 224, "test")


def test_every_table_entry_is_torchvisions_transform(photos):
    """Each weight set against torchvision.models.ViT_*_Weights: fields, and pixels on a real photo."""
    from torchvision import models

    table = torchvision_table()
    enums = ("ViT_B_16_Weights", "ViT_B_32_Weights", "ViT_L_16_Weights", "ViT_L_32_Weights", "ViT_H_14_Weights")
    assert len(table["weights"]) == sum(len(getattr(models, n)) for n in enums)
    for key, entry in table["weights"].items():
        enum_name, member = entry["enum"].split(".")
        weights = getattr(getattr(models, enum_name), member)
        transform = weights.transforms()
        ours = tv_reader.preprocess_config(entry)
        assert [ours.resize] == transform.resize_size and list(ours.crop) == transform.crop_size * 2, key
        assert ours.interpolation == transform.interpolation.value, key
        assert list(ours.mean) == transform.mean and list(ours.std) == transform.std, key
        assert entry["image_size"] == weights.meta["min_size"][0], key
        assert entry["default"] == (weights == type(weights).DEFAULT), key
        got = Normalizer(ours)(torch.from_numpy(to_model_pixels(photos[0], ours).copy())[None])[0]
        torch.testing.assert_close(got, transform(photos[0]), atol=1e-5, rtol=1e-5)
    arch = table["architectures"]["vit_l_16"]
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["mlp_dim"]) == (1024, 24, 16, 4096)


def test_imagenet_labels_are_torchvisions():
    from torchvision.models import ViT_B_16_Weights

    assert imagenet_labels() == ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]
