"""torchvision `vit_b_16`, `vit_b_32`, `vit_l_16`, `vit_l_32`, `vit_h_14` state dicts -> a Checkpoint.

Key names are the same for every size (so a tiny `VisionTransformer(...)` exercises the same converter):
`conv_proj`, `class_token`, `encoder.pos_embedding`, `encoder.layers.encoder_layer_N.{ln_1, self_attention
.in_proj_weight/bias (q, k, v stacked as timm's qkv), self_attention.out_proj, ln_2, mlp.0 / mlp.3 (older
releases: mlp.linear_1 / mlp.linear_2)}`, `encoder.ln`, `heads.head`. A `heads.pre_logits` layer (a
representation layer before the head) is refused.

A bare state dict does not name its weight set, so the published transform (app/data/torchvision_weights.json)
is chosen by architecture and position-embedding length: 197 positions of vit_b_16 are IMAGENET1K_V1 (resize
256, crop 224, bilinear), 577 are IMAGENET1K_SWAG_E2E_V1 (384, bicubic), and so on; where two sets share a
size (IMAGENET1K_V1 and the SWAG linear-probe set at 224) the architecture's DEFAULT wins, and
`--arch vit_b_16.swag_linear` (or the full enum name, `vit_b_16.imagenet1k_swag_linear_v1`) picks the other.
Weights of another shape get the heads from `--arch`, a config.json beside them or the standard widths, and
the classic IMAGENET1K_V1 transform scaled to their size. LayerNorm eps is torchvision's 1e-6.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.keys import check_arch, config_from_shape, infer_shape
from app.checkpoints.tables import heads_for_width, labels_for, timm_table, torchvision_table
from app.checkpoints.timm import side_num_heads
from app.preprocess import PreprocessConfig

LAYER_NORM_EPS = 1e-6
FALLBACK_WEIGHTS = "vit_b_16.imagenet1k_v1"  # the classic torchvision ImageNet transform
TOP = {
    "class_token": "cls_token",
    "encoder.pos_embedding": "pos_embed",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}
IN_BLOCK = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "self_attention.out_proj": "attn.proj",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
}
TV_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)\.(weight|bias)$")
IN_PROJ = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$")


def is_torchvision_state_dict(keys) -> bool:
    return any(
        k in ("class_token", "conv_proj.weight", "encoder.pos_embedding")
        or k.startswith("encoder.layers.encoder_layer_")
        for k in keys
    )


def convert_state_dict(tv: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """torchvision's names -> ours. Keys it does not know keep their name, so strict loading names them."""
    pre_logits = sorted(k for k in tv if k.startswith("heads.pre_logits"))
    if pre_logits:
        raise CheckpointError(
            f"{source}: the checkpoint has a representation layer before the head ({pre_logits[0]}), "
            f"which vitserve does not support"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in tv.items():
        if key in TOP:
            out[TOP[key]] = value
        elif m := IN_PROJ.match(key):
            out[f"blocks.{m.group(1)}.attn.qkv.{m.group(2)}"] = value  # already q, k, v stacked
        elif (m := TV_BLOCK.match(key)) and m.group(2) in IN_BLOCK:
            out[f"blocks.{m.group(1)}.{IN_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value
    return out


def parse_arch(arch: str) -> tuple[str, str | None]:
    name, _, tag = arch.strip().partition(".")
    return name, tag.lower() or None


def lookup_arch(name: str, source: str) -> dict:
    table = torchvision_table()["architectures"]
    if name in table:
        return table[name]
    hint = " (a timm name: its weights have timm keys)" if name in timm_table()["architectures"] else ""
    raise CheckpointError(f"{source}: unknown torchvision architecture {name!r}{hint}; known: {', '.join(table)}")


def matching_arch(shape: dict) -> str | None:
    keys = ("embed_dim", "depth", "patch_size", "mlp_dim")
    table = torchvision_table()["architectures"]
    return next((name for name, a in table.items() if all(a[k] == shape[k] for k in keys)), None)


def weight_set(name: str | None, tag: str | None, image_size: int, source: str) -> dict:
    """The published transform of the weights: by tag, else by architecture and image size."""
    weights = torchvision_table()["weights"]
    sets = {k.partition(".")[2]: v for k, v in weights.items() if name and k.startswith(f"{name}.")}
    if tag is not None:
        aliases = (tag, f"imagenet1k_{tag}", f"imagenet1k_{tag}_v1", f"{tag}_v1")  # swag_linear, v1, full name
        chosen = next((v for k, v in sets.items() if k in aliases), None)
        if chosen is None:
            raise CheckpointError(
                f"{source}: torchvision has no weight set {tag!r} for {name}; known: {', '.join(sets)}"
            )
        if chosen["image_size"] != image_size:
            raise CheckpointError(
                f"{source}: {chosen['enum']} is for {chosen['image_size']} px images, but the position embedding "
                f"of these weights is for {image_size} px"
            )
        return chosen
    fits = [v for v in sets.values() if v["image_size"] == image_size]
    if fits:
        return next((v for v in fits if v["default"]), fits[0])
    defaults = [v for v in sets.values() if v["default"]]
    return defaults[0] if defaults else weights[FALLBACK_WEIGHTS]


def preprocess_config(ws: dict) -> PreprocessConfig:
    """`ImageClassification(crop_size, resize_size, interpolation)`: resize the shortest edge, centre-crop."""
    return PreprocessConfig(
        resize=ws["resize"],
        crop=(ws["crop"], ws["crop"]),
        interpolation=ws["interpolation"],
        mean=tuple(ws["mean"]),
        std=tuple(ws["std"]),
    )


def read(
    path: Path, tv_state_dict: dict[str, torch.Tensor], arch: str | None, side_config: dict | None, source: str
) -> Checkpoint:
    state_dict = convert_state_dict(tv_state_dict, source)
    shape = infer_shape(state_dict, source)
    name, tag = parse_arch(arch) if arch else (matching_arch(shape), None)
    if name is not None:
        entry = lookup_arch(name, source)
        check_arch(shape, entry, name, source)
        num_heads = entry["num_heads"]
    else:
        num_heads = side_num_heads(side_config or {}) or heads_for_width(shape["embed_dim"], source)
    # nn.MultiheadAttention always has an in_proj_bias
    config = config_from_shape(shape, source, num_heads=num_heads, qkv_bias=True, layer_norm_eps=LAYER_NORM_EPS)
    preprocess = preprocess_config(weight_set(name, tag, config.image_size[0], source))
    return Checkpoint(config, state_dict, preprocess, "torchvision", source, path, labels_for(config.num_classes))
