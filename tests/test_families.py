"""The ViT families (DINOv2, CLIP, SigLIP, DeiT distilled, pooled ViTs) against their reference libraries.

Small random models are built by timm, transformers and open_clip themselves, every parameter perturbed (so that
zero-initialised layer scales, tokens or biases hide nothing), saved in each format, loaded with `app.load_model`
and compared in float32 on logits, default embeddings, tokens and attention maps.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import app
from app import analysis

ATOL, RTOL = 1e-4, 1e-3
SMALL = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours.float(), theirs.float(), atol=ATOL, rtol=RTOL)


def pixels(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- timm ----------------------------------------------------------------------------------------------------


def timm_attentions(model, x) -> list[torch.Tensor]:
    """Each block's softmaxed attention, caught at its (identity) attention dropout on timm's unfused path."""
    maps, hooks = [], []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach())))
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    return maps


def save_timm(tmp_path, name: str, model, model_args: dict):
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": name, "num_classes": model.num_classes, "model_args": model_args}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


TIMM = [
    ("vit_small_patch14_dinov2", {}, "dinov2", "cls", (1, 0, 0)),
    ("vit_small_patch14_reg4_dinov2", {}, "dinov2", "cls", (1, 0, 4)),
    ("vit_giant_patch14_dinov2", {"mlp_ratio": 4.0}, "dinov2", "cls", (1, 0, 0)),  # SwiGLU
    ("vit_base_patch16_clip_224", {}, "clip", "cls", (1, 0, 0)),
    ("vit_base_patch16_clip_quickgelu_224", {}, "clip", "cls", (1, 0, 0)),
    ("vit_base_patch16_siglip_224", {}, "siglip", "map", (0, 0, 0)),
    ("vit_base_patch16_siglip_gap_224", {}, "siglip", "mean", (0, 0, 0)),
    ("deit_tiny_distilled_patch16_224", {}, "deit_distilled", "cls", (1, 1, 0)),
    ("vit_medium_patch16_gap_256", {}, "vit_gap", "mean", (0, 0, 0)),
    ("vit_medium_patch16_reg4_gap_256", {}, "vit_gap", "mean", (0, 0, 4)),
    ("vit_so150m_patch16_reg4_map_256", {}, "vit", "map", (0, 0, 4)),
]


@pytest.mark.parametrize(("name", "extra", "family", "pool", "prefix"), TIMM, ids=[t[0] for t in TIMM])
def test_timm_family(tmp_path, name, extra, family, pool, prefix):
    timm = pytest.importorskip("timm")
    args = {**SMALL, **extra}
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **args))
    model_args = {k: v for k, v in args.items() if k != "img_size"}
    folder = save_timm(tmp_path, name, ref, model_args)
    model = app.load_model(str(folder))
    info = model.info
    assert (info["family"], info["pool"]) == (family, pool)
    assert info["prefix_tokens"] == dict(zip(("class", "distillation", "registers"), prefix, strict=True))
    x = pixels()
    out = model(x, attentions=True)
    with torch.no_grad():
        feats = ref.forward_features(x)
        close(out.tokens, feats)
        if info["num_classes"]:
            close(out.embedding, ref.forward_head(feats, pre_logits=True))
            close(out.logits, ref.forward_head(feats))
        else:  # a CLIP tag whose head is the image-text projection: it gives the embedding
            assert family == "clip" and out.logits is None
            close(out.embedding, ref.forward_head(feats))
    for ours, theirs in zip(out.attentions, timm_attentions(ref, x), strict=True):
        close(ours, theirs)
    assert info["embedding_dim"] == out.embedding.shape[1]


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"])
def test_timm_resampled(tmp_path, name):
    """At another image size the position embedding is resampled as timm resamples it."""
    timm = pytest.importorskip("timm")
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **SMALL))
    folder = save_timm(tmp_path, name, ref, {k: v for k, v in SMALL.items() if k != "img_size"})
    big = perturb(timm.create_model(name, pretrained=False, num_classes=5, **{**SMALL, "img_size": 48}))
    big.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(ref.state_dict(), big))
    model = app.load_model(str(folder), image_size=48)
    x = pixels(48)
    with torch.no_grad():
        close(model(x).logits, big(x))
