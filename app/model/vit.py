"""The Vision Transformer of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words".

An image (B, 3, H, W) is cut into (H/P) x (W/P) patches of P x P x 3 values; each flattened
patch is projected linearly to the embedding width D (a strided convolution is exactly that
projection). A learned class token is prepended, a learned 1-D position embedding is added, and
pre-norm transformer blocks follow. The head reads the class token after the final LayerNorm.

The families deployed today vary this recipe in a few places, each a field of `ViTConfig` whose default is
the paper's, and each a small named piece (in twists.py; the block variants beside `Block` here):

- prefix tokens before the patches: the class token (none in SigLIP), DeiT's distillation token, R register
  tokens (Darcet et al. 2023); with `no_embed_class` (timm's DeiT-3 / big_vision layout, and DINOv2 with
  registers, whose class token then carries its own position embedding) the position embedding covers the
  patches only, else every token;
- a LayerNorm before the blocks (CLIP's `ln_pre`), layer scale, the activation, a SwiGLU MLP (DINOv2-giant);
  post-norm blocks and parallel blocks (two of timm's ViTs);
- pooling: the class token, the mean of the class and distillation tokens (DeiT distilled), the mean of the
  patch tokens through `fc_norm` (timm's `gap` models, whose final norm is then left out), or attention
  pooling (SigLIP's MAP head);
- the head: a classifier, a second classifier on the distillation token, or an image-text projection (CLIP).

Parameter names follow timm's `VisionTransformer`, which is also our native checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.model.twists import LayerScale, MapHead, SwiGLU, activation

POOLS = ("cls", "cls_dist", "mean", "map")
# what the classifier reads: the pooled embedding; the class token alone (transformers' DeiTForImageClassification);
# class and distillation tokens, each through its own head, averaged (DeiT distilled); the class token beside the
# mean patch token (Dinov2ForImageClassification); the plain mean of the patch tokens (SiglipForImageClassification)
HEAD_INPUTS = ("pool", "cls", "cls_dist", "cls_mean", "mean")


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
    # the families' variations (module docstring); the defaults are the plain ViT
    family: str = "vit"
    class_token: bool = True
    dist_token: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False  # the position embedding covers the patches only, no prefix token
    patch_bias: bool = True
    pre_norm: bool = False
    layer_scale: bool = False
    act: str = "gelu"  # gelu, gelu_tanh, quick_gelu
    mlp: str = "mlp"  # mlp, swiglu (mlp_dim is then the width after the gate)
    final_norm: bool = True  # False: timm's fc_norm models, which normalise the pooled vector instead
    pool: str = "cls"  # one of POOLS
    fc_norm: bool = False
    head_input: str = "pool"  # one of HEAD_INPUTS
    head_bias: bool = True
    projection: bool = False  # the head is an image-text projection (CLIP): it makes the embedding, no logits
    post_norm: bool = False  # each branch normed after it, before the residual addition (timm's ResPostBlock)
    parallel: int = 1  # attention branches (and MLP branches) side by side in a block (timm's ParallelThingsBlock)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers (in that order)."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def num_embedded_prefix(self) -> int:
        """Prefix tokens that have a slot in the position embedding: all of them, or none (`no_embed_class`)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def is_plain(self) -> bool:
        """The paper's ViT, with none of the families' variations (whichever family the weights come from)."""
        fields = self.__dataclass_fields__
        return all(getattr(self, k) == fields[k].default for k in VARIATIONS if k != "family")

    @property
    def prefix_tokens(self) -> dict[str, int]:
        return {"class": int(self.class_token), "distillation": int(self.dist_token), "registers": self.reg_tokens}

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


# the ViTConfig fields that vary the plain ViT (all but the shapes)
VARIATIONS = (
    "family", "class_token", "dist_token", "reg_tokens", "no_embed_class", "patch_bias", "pre_norm", "layer_scale",
    "act", "mlp", "final_norm", "pool", "fc_norm", "head_input", "head_bias", "projection", "post_norm", "parallel",
)  # fmt: skip


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, gh*gw, D): non-overlapping P x P patches, linearly projected."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        # CLIP's patch projection has no bias (its pre-norm follows at once)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

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
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation(act)  # exact (erf) GELU in the paper's JAX code; CLIP and SigLIP differ (twists.py)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_mlp(cfg: ViTConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.embed_dim, cfg.mlp_dim)
    return Mlp(cfg.embed_dim, cfg.mlp_dim, cfg.act)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)); each branch layer-scaled where the model
    has layer scale."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = make_mlp(cfg)
        self.ls2 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.ls1(attn_out)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, weights


class PostNormBlock(Block):
    """Residual post-norm (Liu et al. 2022, Swin v2; timm's ResPostBlock): x + LN(MSA(x)), then x + LN(MLP(x))."""

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(x, need_weights)
        x = x + self.ls1(self.norm1(attn_out))
        x = x + self.ls2(self.norm2(self.mlp(x)))
        return x, weights


class AttentionBranch(nn.Module):
    """LS(MSA(LN(x))): one of a parallel block's attention branches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.ls = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn(self.norm(x), need_weights)
        return self.ls(out), weights


class MlpBranch(nn.Module):
    """LS(MLP(LN(x))): one of a parallel block's MLP branches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = make_mlp(cfg)
        self.ls = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls(self.mlp(self.norm(x)))


class ParallelBlock(nn.Module):
    """Parallel ViT block (Touvron et al. 2022, "Three things everyone should know about ViTs"):
    x + sum_i MSA_i(LN_i(x)), then x + sum_i MLP_i(LN_i(x)). The branches' attention maps are returned side by side,
    as if they were more heads of one attention."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attns = nn.ModuleList(AttentionBranch(cfg) for _ in range(cfg.parallel))
        self.ffns = nn.ModuleList(MlpBranch(cfg) for _ in range(cfg.parallel))

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs = [branch(x, need_weights) for branch in self.attns]
        x = x + sum(out for out, _ in outs)
        x = x + sum(ffn(x) for ffn in self.ffns)
        return x, torch.cat([w for _, w in outs], dim=1) if need_weights else None


def fold_layer_scales(net: nn.Module) -> int:
    """Fold every layer scale of `net` into the affine map that ends its branch (`LayerScale.fold_into`) and
    replace it by `nn.Identity()`: the same function, one pass over the activations fewer. Returns how many."""
    folded = 0
    for block in net.modules():
        if isinstance(block, PostNormBlock):  # x + ls(LN(branch)): into the LayerNorm's affine weight and bias
            pairs = [("ls1", block.norm1), ("ls2", block.norm2)]
        elif isinstance(block, Block):  # x + ls(attn.proj(...)), x + ls(mlp.fc2(...))
            pairs = [("ls1", block.attn.proj), ("ls2", block.mlp.fc2)]
        elif isinstance(block, AttentionBranch):
            pairs = [("ls", block.attn.proj)]
        elif isinstance(block, MlpBranch):
            pairs = [("ls", block.mlp.fc2)]
        else:
            continue
        for name, target in pairs:
            scale = getattr(block, name)
            if isinstance(scale, LayerScale):
                scale.fold_into(target)
                setattr(block, name, nn.Identity())
                folded += 1
    return folded


def make_block(cfg: ViTConfig) -> nn.Module:
    if cfg.parallel > 1:
        return ParallelBlock(cfg)
    return PostNormBlock(cfg) if cfg.post_norm else Block(cfg)


@dataclass
class Features:
    # (B, P + gh*gw, D), after the final LayerNorm; P prefix tokens (class, distillation, registers) first
    tokens: torch.Tensor
    attentions: list[torch.Tensor | None] | None = field(default=None)  # depth x (B, heads, T, T); None: not asked


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pool not in POOLS or cfg.head_input not in HEAD_INPUTS:
            raise ValueError(f"pool {cfg.pool!r} / head_input {cfg.head_input!r}: use one of {POOLS} / {HEAD_INPUTS}")
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_embedded_prefix + cfg.num_patches, D))
        self.norm_pre = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.fc_norm else nn.Identity()
        self.attn_pool = MapHead(D, cfg.num_heads, make_mlp(cfg), cfg.layer_norm_eps) if cfg.pool == "map" else None
        head_in = 2 * D if cfg.head_input == "cls_mean" else D
        has_head = cfg.num_classes > 0
        self.head = nn.Linear(head_in, cfg.num_classes, bias=cfg.head_bias) if has_head else None
        self.head_dist = nn.Linear(D, cfg.num_classes) if has_head and cfg.head_input == "cls_dist" else None
        self.init_weights()

    def init_weights(self) -> None:
        """The initialisation used for training from scratch (timm's 'jax'-style defaults)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        for head in (self.head, self.head_dist):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias) if head.bias is not None else None

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P + N, D): the prefix tokens, then the patches, position embeddings added."""
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None
        ]
        if self.cfg.no_embed_class:  # the position embedding covers the patches only
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward_features(
        self, x: torch.Tensor, attentions: bool = False, layers: Collection[int] | None = None
    ) -> Features:
        """(B, 3, H, W) pixels -> final-normed tokens, and every layer's attention when asked (only `layers`' when
        given, None for the others: they keep the fused attention kernel)."""
        x = self.norm_pre(self.embed_patches(x))  # (B, P + N, D)
        maps = [] if attentions else None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights=attentions and (layers is None or i in layers))
            if maps is not None:
                maps.append(weights)
        return Features(self.norm(x), maps)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.cfg.num_prefix_tokens :]

    def pool(self, tokens: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own pooled vector (B, D) before any projection, and the MAP probe's attention when asked."""
        pool = self.cfg.pool
        if pool == "cls":
            return tokens[:, 0], None
        if pool == "cls_dist":  # DeiT: the two tokens were trained to agree, their mean is the representation
            return (tokens[:, 0] + tokens[:, 1]) / 2, None
        if pool == "mean":
            return self.fc_norm(self.patch_tokens(tokens).mean(dim=1)), None
        assert self.attn_pool is not None
        return self.attn_pool(self.patch_tokens(tokens), need_weights)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The default embedding: the pooled vector, through the image-text projection where the model has one."""
        pooled, _ = self.pool(tokens)
        return self.head(pooled) if self.cfg.projection and self.head is not None else pooled

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits from the classifier(s), or None for a model without a classifier (no head, or a projection)."""
        if self.head is None or self.cfg.projection:
            return None
        how = self.cfg.head_input
        if how == "cls":
            return self.head(tokens[:, 0])
        if how == "cls_dist":
            assert self.head_dist is not None
            return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2
        if how == "cls_mean":
            return self.head(torch.cat([tokens[:, 0], self.patch_tokens(tokens).mean(dim=1)], dim=-1))
        if how == "mean":
            return self.head(self.patch_tokens(tokens).mean(dim=1))
        return self.head(self.pool(tokens)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x).tokens
        logits = self.forward_head(tokens)
        return self.embed(tokens) if logits is None else logits


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix: int = 1,
    antialias: bool = True,
) -> torch.Tensor:
    """Interpolate a (1, num_prefix + gh*gw, D) position embedding to another patch grid.

    The prefix tokens' embeddings are kept as they are; the patch part is treated as a D-channel gh x gw image
    and resized bicubically in float32. timm (`resample_abs_pos_embed`) and transformers' DINOv2 with registers
    pass antialias=True (torch then uses PIL's bicubic kernel, a = -0.5, which differs even when enlarging);
    transformers' DINOv2, CLIP, SigLIP and DeiT do not (a = -0.75): each checkpoint is resampled as its own
    library would, so that a model served at another resolution agrees with it.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dtype = pos_embed.dtype
    prefix_pos, patch_pos = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if patch_pos.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {patch_pos.shape[1]} patches, not a {old_grid} grid")
    D = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias, align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(dtype)
    return torch.cat([prefix_pos, patch_pos], dim=1)
