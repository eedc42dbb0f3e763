"""The Vision Transformer of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words".

An image (B, 3, H, W) is cut into (H/P) x (W/P) patches of P x P x 3 values; each flattened
patch is projected linearly to the embedding width D (a strided convolution is exactly that
projection). A learned class token is prepended, a learned 1-D position embedding is added, and
pre-norm transformer blocks follow. The head reads the class token after the final LayerNorm.

Parameter names follow timm's `VisionTransformer`, which is also our native checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000  # 0: no head, the model only embeds
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "image_size" in known:
            size = known["image_size"]
            known["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
        return cls(**known)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, gh*gw, D): non-overlapping P x P patches, linearly projected."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The fast path calls `scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU);
    with `need_weights=True` the weights softmax(QK^T / sqrt(d)) are materialised and returned.
    Both paths compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attend(x, need_weights)
        return self.proj(out), weights

    def attend(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads' attention-weighted values side by side, (B, T, D), before the output projection."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if need_weights:
            # softmax in float32 so that low-precision attention maps still sum to one
            weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
            out = weights.to(v.dtype) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, T, D), weights  # heads back side by side


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as in the paper's JAX code and all three libraries
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), need_weights)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, weights


@dataclass
class Features:
    tokens: torch.Tensor  # (B, 1 + gh*gw, D), after the final LayerNorm
    attentions: list[torch.Tensor | None] | None = field(default=None)  # depth x (B, heads, T, T); None: not asked


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        """The initialisation used for training from scratch (timm's 'jax'-style defaults)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(
        self, x: torch.Tensor, attentions: bool = False, layers: Collection[int] | None = None
    ) -> Features:
        """(B, 3, H, W) pixels -> final-normed tokens, and every layer's attention when asked (only `layers`' when
        given, None for the others: they keep the fused attention kernel)."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        maps = [] if attentions else None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights=attentions and (layers is None or i in layers))
            if maps is not None:
                maps.append(weights)
        return Features(self.norm(x), maps)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits from the class token, or None for a model without a head."""
        return self.head(tokens[:, 0]) if self.head is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x).tokens
        logits = self.forward_head(tokens)
        return tokens[:, 0] if logits is None else logits


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Interpolate a (1, 1 + gh*gw, D) position embedding to another patch grid.

    The class token's embedding is kept as it is; the patch part is treated as a D-channel
    gh x gw image and resized bicubically (antialiased when shrinking), in float32, as timm's
    `resample_abs_pos_embed` does, so a model served at another resolution agrees with timm.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dtype = pos_embed.dtype
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    if patch_pos.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {patch_pos.shape[1]} patches, not a {old_grid} grid")
    D = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)
