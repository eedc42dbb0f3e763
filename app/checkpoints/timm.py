"""timm state dicts of `vit_*` / `deit_*` models (plain, DINOv2, CLIP, SigLIP, DeiT distilled, gap) -> a Checkpoint.

timm's parameter names are ours, so the weights load as they are. What the weights cannot tell comes from:

- `--arch NAME[.TAG]` (e.g. `vit_base_patch16_224.augreg2_in21k_ft_in1k`): the heads, and the preprocessing
  of that pretrained tag (the architecture's default tag when none is given), from app/data/timm_pretrained.json;
- a timm `config.json` beside the weights (what timm pushes to the Hub: "architecture", "pretrained_cfg",
  "label_names"; or just "num_heads" / "model_args": {"num_heads": ...});
- otherwise the keys: heads from the standard widths (192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16, 1280 -> 16;
  any other width is an error, never a guess), and the preprocessing of the first timm architecture with the
  same shape (vit_* before deit_*), or timm's generic ViT default when none matches.

LayerNorm eps is the architecture's (timm's 1e-6 without one). The families' variations (registers, distillation
token, layer scale, pre-norm, SwiGLU, average and MAP pooling) are read from the keys; the activation, which the
keys cannot tell, from the architecture: CLIP- and SigLIP-style weights without one are refused, asking for
`--arch`. A CLIP tag whose head is the image-text projection (no `_ft_`) makes that head the embedding's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.keys import check_arch, config_from_shape, infer_shape, square_image_size
from app.checkpoints.tables import heads_for_width, labels_for, timm_table, torchvision_table
from app.preprocess import RESAMPLE, PreprocessConfig

LAYER_NORM_EPS = 1e-6
DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, used when a config has none
MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "reg_token", "dist_token")


def is_timm_state_dict(keys) -> bool:
    return any(k in MARKERS or k.startswith("blocks.") for k in keys)


def is_timm_config(config: dict) -> bool:
    return "architecture" in config or "pretrained_cfg" in config


def parse_arch(arch: str) -> tuple[str, str | None]:
    """Split a timm name: "vit_base_patch16_224.augreg_in1k" -> ("vit_base_patch16_224", "augreg_in1k")."""
    name, _, tag = arch.strip().partition(".")
    return name, tag or None


def lookup_arch(name: str, source: str) -> dict:
    """The shape of a supported timm architecture; a clear error for unsupported or unknown names."""
    table = timm_table()
    if name in table["architectures"]:
        return table["architectures"][name]
    if name in table["unsupported"]:
        raise CheckpointError(
            f"{source}: timm architecture {name} has {table['unsupported'][name]}, which vitserve does not support"
        )
    hint = (
        " (a torchvision name: its weights have torchvision keys)"
        if name in torchvision_table()["architectures"]
        else ""
    )
    known = ", ".join(sorted(table["architectures"]))
    raise CheckpointError(f"{source}: unknown timm architecture {name!r}{hint}; known: {known}")


def read(
    path: Path, state_dict: dict[str, torch.Tensor], arch: str | None, side_config: dict | None, source: str
) -> Checkpoint:
    side = side_config or {}
    name, tag = parse_arch(arch) if arch else _arch_from_side(side)
    entry = lookup_arch(name, source) if name else None  # an unsupported architecture is refused by its reason
    hub = "mask_token" in state_dict or "register_tokens" in state_dict  # DINOv2's torch.hub layout
    state_dict = convert_dinov2_hub(state_dict)
    shape = infer_shape(state_dict, source)
    tagged = pretrained_cfg(name, tag, source) if arch and tag else None  # an unknown tag fails early
    if entry is not None and not arch:  # named by timm's config.json: its model_args override the defaults
        entry = with_model_args(entry, side.get("model_args") or {}, source)
    if entry is not None:
        check_arch(shape, entry, name, source)
        num_heads, eps, qkv_bias = entry["num_heads"], entry["layer_norm_eps"], entry["qkv_bias"]
    else:
        name = matching_arch(shape, square_image_size(shape, source))
        entry = timm_table()["architectures"][name] if name else None
        known = entry["num_heads"] if entry else None
        num_heads = side_num_heads(side) or known or heads_for_width(shape["embed_dim"], source)
        eps = entry["layer_norm_eps"] if entry else LAYER_NORM_EPS
        qkv_bias = shape["qkv_bias"]
    own_cfg = _side_pretrained_cfg(side)
    if tagged is not None:
        cfg = tagged
    elif own_cfg is not None:  # timm's config.json describes these very weights
        cfg = own_cfg
    else:
        cfg = pretrained_cfg(name, tag, source)
    variations = _variations(shape, entry, name, source)
    if hub:
        variations["family"] = "dinov2"
    published = timm_table()["pretrained"].get(f"{name}.{cfg.get('tag')}", {}) if name and cfg.get("tag") else {}
    variations["projection"] = bool(cfg.get("projection") or published.get("projection")) and shape["num_classes"] > 0
    config = config_from_shape(shape, source, num_heads=num_heads, qkv_bias=qkv_bias, layer_norm_eps=eps, **variations)
    preprocess = preprocess_config(cfg, source)
    labels = side.get("label_names") or (own_cfg or {}).get("label_names") or []
    if isinstance(labels, dict):  # {index: name} when the indices have gaps
        labels = [labels.get(str(i), labels.get(i, f"class_{i}")) for i in range(config.num_classes)]
    if len(labels) != config.num_classes:
        labels = labels_for(config.num_classes)
    return Checkpoint(config, state_dict, preprocess, "timm", source, path, [str(x) for x in labels])


def convert_dinov2_hub(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's torch.hub state dicts -> timm's names, as timm's DINOv2 filter converts them: the mask token is
    dropped; with registers, the class token absorbs its position embedding, which then covers the patches only;
    the giant's SwiGLU `w12` / `w3` become `fc1` / `fc2`."""
    if "mask_token" not in state_dict and "register_tokens" not in state_dict:
        return state_dict
    out = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in out.items()}


def _variations(shape: dict, entry: dict | None, name: str | None, source: str) -> dict:
    """The variations of the plain ViT: the keys fix the structure; the architecture its activation, family and
    whether a model with a class token pools the mean (timm's avg pool without fc_norm leaves no key)."""
    variations = dict(shape["variations"])
    if entry is None:
        if variations["pre_norm"] or variations["pool"] == "map" or not variations["class_token"]:
            raise CheckpointError(
                f"{source}: these timm weights (a pre-norm, attention pooling or no class token: CLIP or SigLIP "
                f"style) do not say which activation they were trained with; pass --arch with the timm architecture"
            )
        return variations
    variations["act"] = entry.get("act", "gelu")
    variations["family"] = entry.get("family", "vit")
    variations["post_norm"] = entry.get("post_norm", False)  # the same keys as a pre-norm block
    if entry.get("pool") == "mean" and variations["pool"] == "cls":
        variations["pool"] = "mean"
    return variations


def _side_pretrained_cfg(side: dict) -> dict | None:
    """The pretrained cfg in a timm config.json: nested (current timm) or at the top level (older exports)."""
    if isinstance(side.get("pretrained_cfg"), dict):
        return side["pretrained_cfg"]
    return side if "architecture" in side and "input_size" in side else None


# timm model_args that give a model our ViT does not have, and what they mean
REFUSED_ARGS = {"qk_norm": "qk norm", "scale_attn_norm": "scale norm", "scale_mlp_norm": "scale norm"}
ACT_LAYERS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
POOLS = {"token": "cls", "avg": "mean", "map": "map"}


def with_model_args(entry: dict, model_args: dict, source: str) -> dict:
    """An architecture's shape after the model_args a timm config.json records (depth=2, patch_size=8, ...)."""
    for arg, what in REFUSED_ARGS.items():
        if model_args.get(arg):
            raise CheckpointError(
                f"{source}: the timm model_args ask for {what} ({arg}), which vitserve does not support"
            )
    if model_args.get("global_pool", "token") not in POOLS:
        raise CheckpointError(f"{source}: the timm model_args ask for {model_args['global_pool']!r} pooling")
    if model_args.get("act_layer") not in (None, *ACT_LAYERS):
        raise CheckpointError(f"{source}: the timm model_args ask for activation {model_args['act_layer']!r}")
    out = dict(entry)
    if "act_layer" in model_args:
        out["act"] = ACT_LAYERS[model_args["act_layer"]]
    if "global_pool" in model_args:
        out["pool"] = POOLS[model_args["global_pool"]]
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "qkv_bias"):
        if key in model_args:
            out[key] = model_args[key]
    packed = 2 if entry.get("mlp") == "swiglu" else 1  # timm's SwiGLUPacked: mlp_ratio counts both halves
    ratio = model_args.get("mlp_ratio", packed * entry["mlp_dim"] / entry["embed_dim"])
    out["mlp_dim"] = int(out["embed_dim"] * ratio) // packed
    return out


def _arch_from_side(side: dict) -> tuple[str | None, str | None]:
    """The architecture a timm config.json names, when our table knows it (else the keys decide)."""
    name = side.get("architecture")
    table = timm_table()
    if not isinstance(name, str) or (name not in table["architectures"] and name not in table["unsupported"]):
        return None, None
    return name, (side.get("pretrained_cfg") or {}).get("tag")


def side_num_heads(side: dict) -> int | None:
    """Heads from a config.json beside the weights: timm's model_args, a plain num_heads, or transformers'."""
    for value in (
        side.get("num_heads"),
        (side.get("model_args") or {}).get("num_heads"),
        side.get("num_attention_heads"),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return None


def matching_arch(shape: dict, image_size: tuple[int, int]) -> str | None:
    """The timm architecture with this shape, structure and input size (vit_* before deit_*), for its
    preprocessing and activation."""
    size = list(image_size)
    keys = ("embed_dim", "depth", "patch_size", "mlp_dim")
    structure = ("class_token", "dist_token", "reg_tokens", "pre_norm", "layer_scale", "mlp", "fc_norm", "parallel")
    v = shape["variations"]
    matches = [
        name
        for name, a in timm_table()["architectures"].items()
        if all(a[k] == shape[k] for k in keys)
        and a["image_size"] == size
        and all(a.get(k, v[k]) == v[k] for k in structure)
    ]
    return min(matches, key=lambda n: (not n.startswith("vit_"), n), default=None)


def pretrained_cfg(name: str | None, tag: str | None, source: str) -> dict:
    """The pretrained cfg of `name.tag` (the family default without a tag; timm's generic one without a name)."""
    table = timm_table()
    if name is None:
        return table["generic"]
    key = f"{name}.{tag or table['architectures'][name]['default_tag']}"
    if key not in table["pretrained"]:
        tags = sorted(k.partition(".")[2] for k in table["pretrained"] if k.startswith(f"{name}."))
        raise CheckpointError(f"{source}: timm has no pretrained tag {tag!r} for {name}; known tags: {', '.join(tags)}")
    return table["pretrained"][key]


def preprocess_config(cfg: dict, source: str) -> PreprocessConfig:
    """timm's eval transform (`transforms_imagenet_eval`) as a PreprocessConfig.

    center: resize the shortest edge to floor(size / crop_pct), centre-crop size; squash: resize both edges
    to floor(size / crop_pct), centre-crop size.
    """
    h, w = (int(x) for x in cfg["input_size"][-2:])
    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    mode = cfg.get("crop_mode") or "center"
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if mode == "squash":
        resize: int | tuple[int, int] = scale
    elif mode == "center" and scale[0] == scale[1]:
        resize = scale[0]
    else:
        raise CheckpointError(f"{source}: timm crop_mode {mode!r} at input size {h}x{w} is not supported")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in RESAMPLE:
        raise CheckpointError(f"{source}: timm interpolation {interpolation!r} is not supported")
    return PreprocessConfig(
        resize=resize,
        crop=(h, w),
        interpolation=interpolation,
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        crop_pct=crop_pct,
    )
