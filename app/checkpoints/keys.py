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
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$|^head_dist\.", "a distillation token (dist_token / head_dist, DeiT distilled)"),
    (r"\.ls[12]\.gamma$|\.gamma_[12]$", "layer scale (ls1/ls2 gamma)"),
    (r"^fc_norm\.", "average pooling (fc_norm) instead of the class token"),
    (r"^attn_pool\.", "attention pooling (attn_pool) instead of the class token"),
    (r"\.attn\.[qk]_norm\.", "qk norm"),
    (r"^norm_pre\.", "a pre-norm before the blocks (norm_pre, CLIP style)"),
    (r"^pre_logits\.|^head\.pre_logits\.", "a representation layer before the head (pre_logits)"),
)
BLOCK = re.compile(r"^blocks\.(\d+)\.")


def refuse_unsupported(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming the first feature of the checkpoint that our ViT does not support."""
    for pattern, what in REFUSED:
        hits = sorted(k for k in state_dict if re.search(pattern, k))
        if hits:
            raise CheckpointError(
                f"{source}: the checkpoint has {what} (e.g. key {hits[0]!r}), which vitserve does not support; "
                f"it serves class-token ViTs / DeiTs without registers, distillation, layer scale or average pooling"
            )
    if "cls_token" not in state_dict and any(BLOCK.match(k) for k in state_dict):
        raise CheckpointError(f"{source}: the checkpoint has no class token (cls_token), which vitserve needs")


def _require(state_dict: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state_dict[key]


def infer_shape(state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """The ViTConfig fields the weights fix: embed_dim, depth, patch_size, in_chans, mlp_dim, qkv_bias,
    num_classes, and num_positions (the patch grid is 1-D in the weights: `square_grid` reads it when
    nothing else tells the image size)."""
    refuse_unsupported(state_dict, source)
    proj = _require(state_dict, "patch_embed.proj.weight", source)  # (D, C, P, P)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, not square patches")
    pos = _require(state_dict, "pos_embed", source)  # (1, 1 + N, D)
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: the checkpoint has no transformer blocks")
    fc1 = _require(state_dict, "blocks.0.mlp.fc1.weight", source)
    head = state_dict.get("head.weight")
    return {
        "embed_dim": proj.shape[0],
        "in_chans": proj.shape[1],
        "patch_size": proj.shape[2],
        "depth": depth,
        "num_positions": pos.shape[1],
        "mlp_dim": fc1.shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "num_classes": head.shape[0] if head is not None else 0,
    }


def check_arch(shape: dict, arch: dict, name: str, source: str) -> None:
    """The weights must have the shape of the architecture named by --arch (the image size may differ)."""
    fields = {"embed_dim": "embedding width", "depth": "depth", "patch_size": "patch size", "mlp_dim": "MLP width"}
    diffs = [f"{what} {shape[k]} (not {arch[k]})" for k, what in fields.items() if shape[k] != arch[k]]
    if diffs:
        raise CheckpointError(f"{source}: the weights do not fit architecture {name}: {', '.join(diffs)}")


def square_grid(num_positions: int, source: str) -> tuple[int, int]:
    """The square patch grid of a position embedding with one class-token slot."""
    side = math.isqrt(num_positions - 1)
    if side * side == num_positions - 1:
        return (side, side)
    if math.isqrt(num_positions) ** 2 == num_positions:
        raise CheckpointError(
            f"{source}: the position embedding has {num_positions} entries, one per patch and none for the class "
            f"token (timm's no_embed_class), which vitserve does not support"
        )
    raise CheckpointError(
        f"{source}: a position embedding of {num_positions} entries is not 1 + a square patch grid; "
        f"pass the image size (a config.json beside the weights) for a non-square model"
    )


def square_image_size(shape: dict, source: str) -> tuple[int, int]:
    """The image size that the weights of a square model fix: its patch grid times its patch size."""
    grid = square_grid(shape["num_positions"], source)
    return (grid[0] * shape["patch_size"], grid[1] * shape["patch_size"])


def config_from_shape(shape: dict, source: str, *, num_heads: int, qkv_bias: bool, layer_norm_eps: float) -> ViTConfig:
    """The ViTConfig of a square model from `infer_shape` and the three fields its weights leave open."""
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
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate q, k, v projections -> one fused qkv (rows: all of q, then k, then v), as timm lays it out."""
    return torch.cat([q, k, v], dim=0)
