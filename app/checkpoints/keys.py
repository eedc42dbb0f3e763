"""What a state dict in our (timm) parameter names says about its model.

Every reader converts its format's names to ours first; from then on the same code refuses the
features our ViT does not have and reads the shapes the weights fix (width, depth, patch, grid, MLP
width, qkv bias, head). Only the number of heads and the preprocessing cannot be read from weights.
"""

from __future__ import annotations

import math
import re

import torch

from app.checkpoints.base import CheckpointError
from app.model import ViTConfig

# (pattern over our key names, what it means): the features a checkpoint may carry that our ViT lacks.
REFUSED = (
    (r"\.attn\.[qk]_norm\.", "qk norm"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "extra norms inside attention / MLP (scale norm)"),
    (r"^pre_logits\.|^head\.pre_logits\.", "a representation layer before the head (pre_logits)"),
    (r"relative_position|rel_pos", "relative position bias"),
    (r"(^|\.)rope\.|freqs", "rotary position embeddings (RoPE: DINOv3, EVA-02)"),
    (r"\.attn\.q_proj\.|\.mlp\.fc1_[gx]\.", "an EVA-style block (RoPE: EVA-02, DINOv3)"),
    (r"^patch_embed\.backbone\.|^patch_embed\.stem\.", "a hybrid CNN stem (ResNet-ViT)"),
)
BLOCK = re.compile(r"^blocks\.(\d+)\.")
PARALLEL = re.compile(r"^blocks\.0\.attns\.(\d+)\.")  # a parallel block's attention branches


def refuse_unsupported(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming the first feature of the checkpoint that our ViT does not support."""
    for pattern, what in REFUSED:
        hits = sorted(k for k in state_dict if re.search(pattern, k))
        if hits:
            raise CheckpointError(
                f"{source}: the checkpoint has {what} (e.g. key {hits[0]!r}), which vitserve does not support"
            )


def variations_from_keys(state_dict: dict[str, torch.Tensor]) -> dict:
    """The ViTConfig variations (app.model.vit) that the keys of a state dict in our names fix. The activation
    and the family are not among them: the format's config or the architecture tells those."""
    sd = state_dict
    reg = sd.get("reg_token")
    parallel = len({m.group(1) for k in sd if (m := PARALLEL.match(k))})
    mlp = "blocks.0.ffns.0.mlp" if parallel else "blocks.0.mlp"
    fc1, fc2 = sd.get(f"{mlp}.fc1.weight"), sd.get(f"{mlp}.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    if "attn_pool.latent" in sd:
        pool = "map"
    elif "fc_norm.weight" in sd or "cls_token" not in sd:
        pool = "mean"
    elif "dist_token" in sd:
        pool = "cls_dist"
    else:
        pool = "cls"
    return {
        "class_token": "cls_token" in sd,
        "dist_token": "dist_token" in sd,
        "reg_tokens": int(reg.shape[1]) if reg is not None else 0,
        "patch_bias": "patch_embed.proj.bias" in sd,
        "pre_norm": "norm_pre.weight" in sd,
        "layer_scale": "blocks.0.ls1.gamma" in sd or "blocks.0.attns.0.ls.gamma" in sd,
        "parallel": max(parallel, 1),
        "mlp": "swiglu" if swiglu else "mlp",
        "final_norm": "norm.weight" in sd,
        "fc_norm": "fc_norm.weight" in sd,
        "pool": pool,
        "head_input": "cls_dist" if "head_dist.weight" in sd else "pool",
        "head_bias": "head.weight" not in sd or "head.bias" in sd,
    }


def _require(state_dict: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state_dict[key]


def infer_shape(state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """The ViTConfig fields the weights fix: embed_dim, depth, patch_size, in_chans, mlp_dim, qkv_bias,
    num_classes, num_positions (the patch grid is 1-D in the weights: `square_grid` reads it when
    nothing else tells the image size), and under "variations" those of `variations_from_keys`."""
    refuse_unsupported(state_dict, source)
    proj = _require(state_dict, "patch_embed.proj.weight", source)  # (D, C, P, P)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, not square patches")
    pos = _require(state_dict, "pos_embed", source)  # (1, 1 + N, D)
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: the checkpoint has no transformer blocks")
    parallel = "blocks.0.attns.0.attn.qkv.weight" in state_dict  # the first branch of a parallel block
    first = "blocks.0.attns.0." if parallel else "blocks.0."
    fc2 = _require(state_dict, "blocks.0.ffns.0.mlp.fc2.weight" if parallel else "blocks.0.mlp.fc2.weight", source)
    head = state_dict.get("head.weight")
    variations = variations_from_keys(state_dict)
    slots = embedded_prefix(variations)
    if slots and not _is_square(pos.shape[1] - slots) and _is_square(pos.shape[1]):
        variations["no_embed_class"] = True  # timm's DeiT-3 / DINOv2-with-registers layout
    return {
        "embed_dim": proj.shape[0],
        "in_chans": proj.shape[1],
        "patch_size": proj.shape[2],
        "depth": depth,
        "num_positions": pos.shape[1],
        "mlp_dim": fc2.shape[1],  # the hidden width (after SwiGLU's gate)
        "qkv_bias": f"{first}attn.qkv.bias" in state_dict,
        "num_classes": head.shape[0] if head is not None else 0,
        "variations": variations,
    }


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def check_arch(shape: dict, arch: dict, name: str, source: str) -> None:
    """The weights must have the shape of the architecture named by --arch (the image size may differ)."""
    fields = {"embed_dim": "embedding width", "depth": "depth", "patch_size": "patch size", "mlp_dim": "MLP width"}
    diffs = [f"{what} {shape[k]} (not {arch[k]})" for k, what in fields.items() if shape[k] != arch[k]]
    if diffs:
        raise CheckpointError(f"{source}: the weights do not fit architecture {name}: {', '.join(diffs)}")


def square_grid(num_positions: int, source: str, num_prefix: int = 1) -> tuple[int, int]:
    """The square patch grid of a position embedding with `num_prefix` slots before the patches."""
    side = math.isqrt(num_positions - num_prefix)
    if side * side == num_positions - num_prefix:
        return (side, side)
    raise CheckpointError(
        f"{source}: a position embedding of {num_positions} entries is not {num_prefix} + a square patch grid; "
        f"pass the image size (a config.json beside the weights) for a non-square model"
    )


def embedded_prefix(variations: dict) -> int:
    """Position-embedding slots before the patches: every prefix token, unless `no_embed_class`."""
    if variations.get("no_embed_class"):
        return 0
    v = variations
    return int(v.get("class_token", True)) + int(v.get("dist_token", False)) + int(v.get("reg_tokens", 0))


def square_image_size(shape: dict, source: str) -> tuple[int, int]:
    """The image size that the weights of a square model fix: its patch grid times its patch size."""
    grid = square_grid(shape["num_positions"], source, embedded_prefix(shape["variations"]))
    return (grid[0] * shape["patch_size"], grid[1] * shape["patch_size"])


def config_from_shape(
    shape: dict, source: str, *, num_heads: int, qkv_bias: bool, layer_norm_eps: float, **variations
) -> ViTConfig:
    """The ViTConfig of a square model from `infer_shape` and the three fields its weights leave open; `variations`
    (activation, family, ...) override those the keys fix."""
    variations = {**shape.get("variations", {}), **variations}
    shape = {**shape, "variations": variations}
    return ViTConfig(
        image_size=square_image_size(shape, source),
        patch_size=shape["patch_size"],
        in_chans=shape["in_chans"],
        embed_dim=shape["embed_dim"],
        depth=shape["depth"],
        num_heads=num_heads,
        mlp_dim=shape["mlp_dim"],
        num_classes=shape["num_classes"],
        qkv_bias=qkv_bias,
        layer_norm_eps=layer_norm_eps,
        **variations,
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate q, k, v projections -> one fused qkv (rows: all of q, then k, then v), as timm lays it out."""
    return torch.cat([q, k, v], dim=0)
