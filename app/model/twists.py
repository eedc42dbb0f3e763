"""The pieces that the ViT families deployed today add to the plain ViT of vit.py, one small module each.

- `LayerScale` (CaiT, Touvron et al. 2021; DINOv2): each residual branch scaled per channel by a learned gamma;
  `fold_into` moves the scale into the branch's last linear layer (or LayerNorm) for serving.
- `QuickGELU` (CLIP): x * sigmoid(1.702 x), the sigmoid approximation OpenAI trained CLIP with; `activation`
  maps each format's name for its activation to a module (SigLIP's tanh approximation included).
- `SwiGLU` (Shazeer 2020; DINOv2-giant): silu(x W1) * (x W2), W1 and W2 packed as one `fc1` as timm packs them.
- `MapHead` (multihead attention pooling, Zhai et al. 2022; SigLIP): a learned probe attends over the patch tokens,
  followed by a pre-norm MLP with a residual.

Parameter names follow timm (`ls1.gamma`, `mlp.fc1`, `attn_pool.latent`, ...), our native checkpoint layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (timm `ls1/ls2.gamma`, transformers `layer_scale1/2.lambda1`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    @torch.no_grad()
    def fold_into(self, module: nn.Linear | nn.LayerNorm) -> None:
        """Scale the per-channel output of `module` (the branch's last affine map: a linear layer's weight rows and
        bias, or a LayerNorm's affine weight and bias) by gamma, in place, so that `module` alone computes
        `self(module(x))`: this scale can then be replaced by `nn.Identity()`. Computed in float32."""
        gamma = self.gamma.float()
        for p in (module.weight, module.bias):
            if p is not None:
                p.copy_(p.float() * gamma.view(-1, *[1] * (p.dim() - 1)))


class QuickGELU(nn.Module):
    """CLIP's GELU: x * sigmoid(1.702 x). OpenAI's weights were trained with it, so the exact GELU shifts them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# each format's names for the activations our ViT implements -> ours
ACTIVATIONS = {
    "gelu": "gelu",  # exact (erf) GELU: the original ViT, DINOv2, DeiT, timm's CLIP files
    "gelu_tanh": "gelu_tanh",  # SigLIP (big_vision's default); transformers' gelu_pytorch_tanh
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",  # OpenAI CLIP
}


def activation(name: str) -> nn.Module:
    """The activation module for one of ACTIVATIONS' values."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(set(ACTIVATIONS.values())))}")


class SwiGLU(nn.Module):
    """silu(x1) * x2 with x1, x2 the two halves of one packed projection `fc1`, then `fc2` (timm's SwiGLUPacked,
    DINOv2's SwiGLUFFN with w12 / w3)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(x1) * x2)


class MapHead(nn.Module):
    """Multihead attention pooling: one learned query (`latent`) attends over the tokens; then x + MLP(LN(x)).

    Keys and values share one projection `kv` (k rows first), as in timm's AttentionPoolLatent; transformers'
    SiglipMultiheadAttentionPoolingHead stacks q, k, v in one `in_proj_weight`, which splits into `q` and `kv`.
    """

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D) tokens -> (B, D) pooled, and the probe's attention (B, heads, 1, N) when asked."""
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if need_weights:
            weights = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).float().softmax(dim=-1)
            out = weights.to(v.dtype) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        x = x + self.mlp(self.norm(x))
        return x[:, 0], weights
