"""open_clip image towers (`visual.*` keys of an open_clip CLIP state dict) -> a Checkpoint; the text tower is ignored.

Keys: `visual.conv1` (no bias), `visual.class_embedding` (D), `visual.positional_embedding` (1 + N, D),
`visual.ln_pre`, `visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked as timm's qkv),
attn.out_proj, ls_1.gamma, ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma}`, `visual.ln_post`, `visual.proj` (D, E: the
image-text projection, applied as x @ proj). The embedding is `encode_image`'s: the projected, final-normed class
token. Attention pooling (CoCa), average pooling and a LayerNorm after pooling are refused.

What the keys cannot tell comes from `open_clip_config.json` beside the weights (as open_clip pushes to the Hub:
"model_cfg" with `quick_gelu` and `vision_cfg.head_width`, "preprocess_cfg"), or from `--arch`: an open_clip model
name, QuickGELU when it ends in `-quickgelu` (OpenAI's weights), else the exact GELU. The preprocessing is
open_clip's: resize the shortest edge, centre-crop, bicubic, OpenAI's mean and std unless the config says otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.files import read_json
from app.checkpoints.keys import config_from_shape, infer_shape
from app.preprocess import PreprocessConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which open_clip uses
SWAPS = (
    ("conv1", "patch_embed.proj"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_1", "norm1"),
    ("ln_2", "norm2"),
    ("ls_1", "ls1"),
    ("ls_2", "ls2"),
    ("attn.in_proj_", "attn.qkv."),
    ("attn.out_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
REFUSED = re.compile(r"^visual\.(attn_pool|ln_q|attn_pool_contrastive)\b")


def is_open_clip_state_dict(keys) -> bool:
    return any(k in ("visual.conv1.weight", "visual.class_embedding") for k in keys)


def convert_state_dict(oc: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """open_clip's image-tower names -> ours (timm's `_convert_openai_clip`, the projection without a bias)."""
    refused = sorted(k for k in oc if REFUSED.match(k))
    if refused:
        raise CheckpointError(
            f"{source}: the image tower has attention pooling ({refused[0]}), which vitserve does not support"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in oc.items():
        if not key.startswith("visual."):
            continue  # the text tower, logit_scale
        name = key.removeprefix("visual.")
        if name == "proj":
            out["head.weight"] = value.T
        elif name == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            for old, new in SWAPS:
                name = name.replace(old, new)
            out[name] = value
    return out


def read(path: Path, oc: dict[str, torch.Tensor], arch: str | None, source: str) -> Checkpoint:
    side_path = path.parent / "open_clip_config.json"
    side = read_json(side_path, source) if side_path.is_file() else {}
    model_cfg = side.get("model_cfg") or {}
    vision = model_cfg.get("vision_cfg") or {}
    if vision.get("attentional_pool") or vision.get("final_ln_after_pool") or vision.get("pool_type", "tok") != "tok":
        raise CheckpointError(
            f"{source}: open_clip vision_cfg pools other than by the class token, which vitserve does not support"
        )
    if model_cfg:
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
    elif arch:
        quick_gelu = arch.lower().removesuffix(".openai").endswith("quickgelu") or arch.lower().endswith("openai")
    else:
        raise CheckpointError(
            f"{source}: an open_clip state dict does not say its activation; put its open_clip_config.json beside it "
            f"or pass --arch with the open_clip model name (e.g. ViT-B-16-quickgelu for OpenAI's weights)"
        )
    state_dict = convert_state_dict(oc, source)
    shape = infer_shape(state_dict, source)
    head_width = int(vision.get("head_width", 64))
    if shape["embed_dim"] % head_width:
        raise CheckpointError(f"{source}: width {shape['embed_dim']} is not a multiple of head_width {head_width}")
    config = config_from_shape(
        shape,
        source,
        num_heads=shape["embed_dim"] // head_width,
        qkv_bias=shape["qkv_bias"],
        layer_norm_eps=LAYER_NORM_EPS,
        act="quick_gelu" if quick_gelu else "gelu",
        family="clip",
        projection="head.weight" in state_dict,
    )
    pp = side.get("preprocess_cfg") or {}
    size = config.image_size
    if pp.get("resize_mode", "shortest") != "shortest":
        raise CheckpointError(f"{source}: open_clip resize_mode {pp['resize_mode']!r} is not supported")
    preprocess = PreprocessConfig(
        resize=size[0] if size[0] == size[1] else tuple(size),
        crop=tuple(size),
        interpolation=pp.get("interpolation", "bicubic"),
        mean=tuple(float(m) for m in pp.get("mean", OPENAI_MEAN)),
        std=tuple(float(s) for s in pp.get("std", OPENAI_STD)),
    )
    return Checkpoint(config, state_dict, preprocess, "open_clip", source, path, pos_antialias=False)
