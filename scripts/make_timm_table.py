"""Write app/data/timm_pretrained.json from timm's own registry (run once; timm is not a run-time dependency).

For every timm `vit_*` / `deit_*` architecture the script builds the model on the meta device (no weights,
no memory), decides whether our ViT can hold it, and records:

- "architectures": name -> the shape our ViT needs (width, depth, heads, patch, image size, mlp width, qkv bias,
  LayerNorm eps), the variations of the plain ViT it uses (app.model.vit.VARIATIONS: prefix tokens, layer scale,
  activation, pooling, ...), its family, and its default pretrained tag (timm's family default, used when no tag
  is given);
- "pretrained": "arch.tag" -> the eval preprocessing of that weight set (input_size, crop_pct, crop_mode,
  interpolation, mean, std), its class count, and whether its head is CLIP's image-text projection;
- "generic": timm's ViT default config (`vision_transformer._cfg()`), for weights whose architecture is unknown;
- "unsupported": name -> why our ViT cannot hold it (RoPE, relative position bias, a hybrid CNN stem, ...),
  so that `--arch` with such a name is refused with a reason instead of "unknown architecture".

Usage: python scripts/make_timm_table.py [--out app/data/timm_pretrained.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.layers import AttentionPoolLatent, GluMlp, LayerScale, PatchEmbed, QuickGELU
from timm.models import PretrainedCfg
from timm.models.vision_transformer import (
    Attention,
    Block,
    Mlp,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
    _cfg,
)
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "app" / "data" / "timm_pretrained.json"
WHY = {  # timm model classes that are not a VisionTransformer, by what our ViT lacks
    "Eva": "rotary position embeddings (RoPE: EVA-02, DINOv3, PE) in an EVA block",
    "VisionTransformerRelPos": "relative position bias",
    "VisionTransformerHybrid": "a hybrid CNN stem (ResNet-ViT)",
}


def act_name(act: nn.Module) -> str | None:
    if isinstance(act, QuickGELU) or type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act).__name__ == "GELUTanh":
        return "gelu_tanh"
    if type(act).__name__ == "GELU":  # timm's own GELU module: exact
        return "gelu"
    return None


def mlp_of(mlp: nn.Module) -> tuple[str, int, str | None] | str:
    """("mlp" | "swiglu", hidden width, activation) or why it is not one of ours."""
    if not isinstance(mlp.norm, nn.Identity) or mlp.fc1.bias is None:
        return "an MLP with an inner norm or without biases"
    if type(mlp) is GluMlp:
        if mlp.gate_last or not isinstance(mlp.act, nn.SiLU):
            return "a gated MLP other than SwiGLU"
        return ("swiglu", mlp.fc2.in_features, "gelu")
    if type(mlp) is not Mlp:
        return f"a non-standard MLP ({type(mlp).__name__})"
    act = act_name(mlp.act)
    return ("mlp", mlp.fc1.out_features, act) if act else f"activation {mlp.act}"


def block_parts(b: nn.Module) -> tuple[str, list[nn.Module], list[nn.Module], list[nn.Module], list[nn.Module]] | None:
    """(kind, attentions, MLPs, norms, layer scales) of a block our ViT has, else None."""
    if type(b) is Block:
        return "pre", [b.attn], [b.mlp], [b.norm1, b.norm2], [b.ls1, b.ls2]
    if type(b) is ResPostBlock:
        return "post", [b.attn], [b.mlp], [b.norm1, b.norm2], []
    if type(b) is ParallelThingsBlock:
        branches = [*b.attns, *b.ffns]
        return (
            "parallel",
            [a.attn for a in b.attns],
            [f.mlp for f in b.ffns],
            [x.norm for x in branches],
            [x.ls for x in branches],
        )
    return None


def describe(m: nn.Module) -> dict | str:
    """The architecture entry of timm model `m` for our ViT, or why our ViT cannot hold it."""
    if not isinstance(m, VisionTransformer):
        return WHY.get(type(m).__name__, f"{type(m).__name__} is not a VisionTransformer")
    pe = m.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity):
        return "a hybrid CNN stem or non-standard patch embedding"
    if pe.patch_size[0] != pe.patch_size[1]:
        return "non-square patches"
    if m.pos_embed is None:
        return "no absolute position embedding"
    if m.global_pool not in ("token", "avg", "map") or m.pool_include_prefix:
        return f"{m.global_pool!r} pooling"
    dist = getattr(m, "dist_token", None) is not None
    parts = [block_parts(b) for b in m.blocks]
    if any(p is None for p in parts):
        bad = next(b for b, p in zip(m.blocks, parts, strict=True) if p is None)
        return f"a non-standard block ({type(bad).__name__})"
    kind, attns0, mlps0, norms0, ls0 = parts[0]
    b0 = attns0[0]
    mlp = mlp_of(mlps0[0])
    if isinstance(mlp, str):
        return mlp
    eps = norms0[0].eps if isinstance(norms0[0], nn.LayerNorm) else None
    for k, attns, mlps, norms, scales in parts:
        if k != kind or len(attns) != len(attns0) or len(scales) != len(ls0):
            return "blocks that differ"
        for attn in attns:
            if type(attn) is not Attention:
                return f"a non-standard attention ({type(attn).__name__})"
            if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
                return "qk norm"
            if not isinstance(attn.norm, nn.Identity):
                return "extra norms inside attention / MLP (scale norm)"
            if attn.proj.bias is None:
                return "linear layers without bias"
        if any(mlp_of(x) != mlp for x in mlps):
            return "blocks that differ"
        if any(not isinstance(n, nn.LayerNorm) or n.eps != eps for n in norms):
            return "non-standard block norms"
        if any(isinstance(x, LayerScale) != isinstance(ls0[0], LayerScale) for x in scales):
            return "blocks that differ"
    norms = [n for n in (m.norm_pre, m.norm, m.fc_norm) if not isinstance(n, nn.Identity)]
    if any(not isinstance(n, nn.LayerNorm) or n.eps != eps for n in norms):
        return "non-standard norms"
    pool = {"token": "cls_dist" if dist else "cls", "avg": "mean", "map": "map"}[m.global_pool]
    if pool == "cls" and not m.has_class_token:
        return "class-token pooling without a class token"
    if m.attn_pool is not None:
        ap = m.attn_pool
        if type(ap) is not AttentionPoolLatent or ap.latent_len != 1 or ap.pos_embed is not None:
            return "an attention pool other than a one-query MAP head"
        if not isinstance(ap.q_norm, nn.Identity) or mlp_of(ap.mlp) != mlp or ap.norm.eps != eps:
            return "an attention pool whose MLP differs from the blocks'"
    name = m.default_cfg.get("architecture", "")
    family = next((f for f in ("dinov2", "clip", "siglip") if f in name), None)
    if family is None:
        family = "deit_distilled" if dist else "deit" if name.startswith("deit") else "vit"
        family = "vit_gap" if family == "vit" and pool == "mean" else family
    return {
        "embed_dim": m.embed_dim,
        "depth": len(m.blocks),
        "num_heads": b0.num_heads,
        "patch_size": pe.patch_size[0],
        "image_size": list(pe.img_size),
        "mlp_dim": mlp[1],
        "qkv_bias": b0.qkv.bias is not None,
        "layer_norm_eps": eps,
        "num_classes": m.num_classes,
        "family": family,
        "class_token": m.has_class_token,
        "dist_token": dist,
        "reg_tokens": m.num_reg_tokens,
        "no_embed_class": m.no_embed_class,
        "patch_bias": pe.proj.bias is not None,
        "pre_norm": not isinstance(m.norm_pre, nn.Identity),
        "layer_scale": bool(ls0) and isinstance(ls0[0], LayerScale),
        "post_norm": kind == "post",
        "parallel": len(attns0),
        "act": mlp[2],
        "mlp": mlp[0],
        "final_norm": not isinstance(m.norm, nn.Identity),
        "pool": pool,
        "fc_norm": not isinstance(m.fc_norm, nn.Identity),
        "head_input": "cls_dist" if dist else "pool",
    }


def preprocessing(cfg, family: str | None = None) -> dict:
    entry = {
        "input_size": list(cfg.input_size[1:]),
        "crop_pct": cfg.crop_pct,
        "crop_mode": cfg.crop_mode or "center",
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "num_classes": cfg.num_classes,
    }
    if family == "clip" and cfg.num_classes and "_ft_" not in (cfg.tag or ""):
        entry["projection"] = True  # the head is CLIP's image-text projection (openai, laion2b, ...), no classifier
    return entry


def build_table() -> dict:
    table = {"timm_version": timm.__version__, "architectures": {}, "pretrained": {}, "unsupported": {}}
    table["generic"] = preprocessing(PretrainedCfg(**_cfg()))
    for name in timm.list_models(["vit_*", "deit_*"]):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        entry = describe(model)
        if isinstance(entry, str):
            table["unsupported"][name] = entry
            continue
        default = timm.models.get_pretrained_cfg(name)  # the family default: timm's first-listed weights
        table["architectures"][name] = {**entry, "default_tag": default.tag}
        table["pretrained"][f"{name}.{default.tag}"] = preprocessing(default, entry["family"])
        for tagged in timm.list_pretrained(f"{name}.*"):
            table["pretrained"][tagged] = preprocessing(timm.models.get_pretrained_cfg(tagged), entry["family"])
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
