"""Write app/data/timm_pretrained.json from timm's own registry (run once; timm is not a run-time dependency).

For every timm `vit_*` / `deit_*` architecture the script builds the model on the meta device (no weights,
no memory), decides whether our ViT can hold it, and records:

- "architectures": name -> the shape our ViT needs (width, depth, heads, patch, image size, mlp width, qkv bias,
  LayerNorm eps) and its default pretrained tag (timm's family default, used when no tag is given);
- "pretrained": "arch.tag" -> the eval preprocessing of that weight set (input_size, crop_pct, crop_mode,
  interpolation, mean, std) and its class count;
- "generic": timm's ViT default config (`vision_transformer._cfg()`), for weights whose architecture is unknown;
- "unsupported": name -> why our ViT cannot hold it (register tokens, distillation token, layer scale, ...),
  so that `--arch` with such a name is refused with a reason instead of "unknown architecture".

Usage: python scripts/make_timm_table.py [--out app/data/timm_pretrained.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import PretrainedCfg
from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer, _cfg
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "app" / "data" / "timm_pretrained.json"


def unsupported_reason(m: nn.Module) -> str | None:
    """Why our class-token ViT cannot hold timm model `m`, or None when it can."""
    if not isinstance(m, VisionTransformer):
        return f"{type(m).__name__} is not a plain VisionTransformer"
    if getattr(m, "dist_token", None) is not None:
        return "distillation token (dist_token / head_dist)"
    if m.num_reg_tokens:
        return "register tokens (reg_token)"
    if not m.has_class_token:
        return "no class token"
    if m.global_pool != "token" or not isinstance(m.fc_norm, nn.Identity) or m.attn_pool is not None:
        return f"{m.global_pool!r} pooling instead of the class token"
    if m.no_embed_class or m.pos_embed is None:
        return "position embedding without a class-token slot"
    if not isinstance(m.norm_pre, nn.Identity):
        return "pre-norm before the blocks (norm_pre, CLIP style)"
    if not isinstance(m.norm, nn.LayerNorm):
        return "no final LayerNorm"
    pe = m.patch_embed
    if type(pe) is not PatchEmbed or pe.proj.bias is None or not isinstance(pe.norm, nn.Identity):
        return "non-standard patch embedding"
    if pe.patch_size[0] != pe.patch_size[1]:
        return "non-square patches"
    for b in m.blocks:
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            return f"non-standard block ({type(b).__name__})"
        if not isinstance(b.ls1, nn.Identity) or not isinstance(b.ls2, nn.Identity):
            return "layer scale (ls1/ls2 gamma)"
        if not isinstance(b.attn.q_norm, nn.Identity) or not isinstance(b.attn.k_norm, nn.Identity):
            return "qk norm"
        if not isinstance(b.attn.norm, nn.Identity) or not isinstance(b.mlp.norm, nn.Identity):
            return "extra norms inside attention / MLP"
        if b.attn.proj.bias is None or b.mlp.fc1.bias is None:
            return "linear layers without bias"
        if not (isinstance(b.mlp.act, nn.GELU) and b.mlp.act.approximate == "none"):
            return f"activation {b.mlp.act} instead of exact GELU"
        if not isinstance(b.norm1, nn.LayerNorm) or b.norm1.eps != m.norm.eps:
            return "non-standard block norms"
    return None


def architecture(m: VisionTransformer) -> dict:
    b = m.blocks[0]
    return {
        "embed_dim": m.embed_dim,
        "depth": len(m.blocks),
        "num_heads": b.attn.num_heads,
        "patch_size": m.patch_embed.patch_size[0],
        "image_size": list(m.patch_embed.img_size),
        "mlp_dim": b.mlp.fc1.out_features,
        "qkv_bias": b.attn.qkv.bias is not None,
        "layer_norm_eps": m.norm.eps,
        "num_classes": m.num_classes,
    }


def preprocessing(cfg) -> dict:
    return {
        "input_size": list(cfg.input_size[1:]),
        "crop_pct": cfg.crop_pct,
        "crop_mode": cfg.crop_mode or "center",
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "num_classes": cfg.num_classes,
    }


def build_table() -> dict:
    table = {"timm_version": timm.__version__, "architectures": {}, "pretrained": {}, "unsupported": {}}
    table["generic"] = preprocessing(PretrainedCfg(**_cfg()))
    for name in timm.list_models(["vit_*", "deit_*"]):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        reason = unsupported_reason(model)
        if reason is not None:
            table["unsupported"][name] = reason
            continue
        default = timm.models.get_pretrained_cfg(name)  # the family default: timm's first-listed weights
        table["architectures"][name] = {**architecture(model), "default_tag": default.tag}
        table["pretrained"][f"{name}.{default.tag}"] = preprocessing(default)
        for tagged in timm.list_pretrained(f"{name}.*"):
            table["pretrained"][tagged] = preprocessing(timm.models.get_pretrained_cfg(tagged))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    table = build_table()
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(
        f"{args.out}: {len(table['architectures'])} architectures, {len(table['pretrained'])} weight sets, "
        f"{len(table['unsupported'])} unsupported"
    )


if __name__ == "__main__":
    main()
