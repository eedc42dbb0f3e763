"""What the attention maps and position embeddings say, as numbers (the pictures live in visuals.py).

Every function takes batched tensors as the engine returns them and is pure torch, so it runs on
the model's device right after the forward pass. Definitions follow API.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_max(heatmap: torch.Tensor) -> torch.Tensor:
    """Divide each map (leading dim = batch) by its maximum, so values lie in [0, 1]."""
    peak = heatmap.flatten(1).amax(dim=1).clamp_min(torch.finfo(heatmap.dtype).tiny)
    return heatmap / peak.view(-1, *([1] * (heatmap.dim() - 1)))


def cls_attention(
    attentions: list[torch.Tensor], layer: int = -1, head: int | None = None, prefix: int = 1
) -> torch.Tensor:
    """(B, N) attention from the class token to every patch in `layer`, head-mean or one head. `prefix` tokens
    (class, distillation, registers) come before the patches; their columns are left out."""
    weights = attentions[layer]  # (B, heads, T, T)
    weights = weights.mean(dim=1) if head is None else weights[:, head]  # (B, T, T)
    return normalize_max(weights[:, 0, prefix:])


def mean_attention(
    attentions: list[torch.Tensor], layer: int = -1, head: int | None = None, prefix: int = 0
) -> torch.Tensor:
    """(B, N) the mean of the patch rows over the patch columns in `layer`: an average-pooled model's stand-in for
    the class token's row."""
    weights = attentions[layer]
    weights = weights.mean(dim=1) if head is None else weights[:, head]
    return normalize_max(weights[:, prefix:, prefix:].float().mean(dim=1))


def probe_attention(probe: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """(B, N) a MAP head's probe attention over the patch tokens, (B, heads, 1, N) -> head-mean or one head."""
    weights = probe.mean(dim=1) if head is None else probe[:, head]
    return normalize_max(weights[:, 0])


def rollout(attentions: list[torch.Tensor], prefix: int = 1, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) attention rollout (Abnar & Zuidema, 2020): class-token row of A_L ... A_1 over patches,

    where A_l is the head-mean attention plus the identity, rows renormalised to sum to one, over all tokens
    (registers included); the heatmap is its patch columns (after `prefix` tokens). Only that one row is wanted,
    so it is carried from the last layer down as a row vector, e_cls A_L ... A_1: T^2 work a layer, not T^3.
    `start` (B, T) replaces e_cls for models without a class token: the mean of the patch rows, or a MAP probe's
    attention (see `attention_heatmap`).
    """
    row = None if start is None else start.float()[:, None]
    for weights in reversed(attentions):  # last layer first
        a = weights.float().mean(dim=1)  # (B, T, T)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        row = a[:, :1] if row is None else row @ a  # (B, 1, T)
    assert row is not None
    return normalize_max(row[:, 0, prefix:])


def attention_heatmap(
    attentions: list[torch.Tensor],
    method: str,
    *,
    prefix: int,
    pool: str,
    probe: torch.Tensor | None = None,
    layer: int = -1,
    head: int | None = None,
) -> tuple[torch.Tensor, str]:
    """(B, N) heatmap for /v1/attention's `method` ("cls" or "rollout") and the method the response names.

    A class-token model reads the class token's row; a MAP model (pool "map", no class token) its probe's
    attention ("probe": one layer of its own, so `layer` does not apply; "probe_rollout": the probe row times R);
    an average-pooled model without a class token the mean of the patch rows ("mean", "mean_rollout").
    """
    if method not in ("cls", "rollout"):
        raise ValueError(f"unknown attention method {method!r}; use cls or rollout")
    if pool == "map" and probe is not None:
        if method == "cls":
            return probe_attention(probe, head), "probe"
        start = F.pad(probe.float().mean(dim=1)[:, 0], (prefix, 0))  # (B, T): zero on the prefix tokens
        return rollout(attentions, prefix, start), "probe_rollout"
    if pool in ("mean", "map"):  # no class-token row to read
        if method == "cls":
            return mean_attention(attentions, layer, head, prefix), "mean"
        T = attentions[-1].shape[-1]
        start = torch.zeros(attentions[-1].shape[0], T, device=attentions[-1].device)
        start[:, prefix:] = 1.0 / (T - prefix)
        return rollout(attentions, prefix, start), "mean_rollout"
    if method == "cls":
        return cls_attention(attentions, layer, head, prefix), "cls"
    return rollout(attentions, prefix), "rollout"


def patch_centres(grid: tuple[int, int], patch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(N, 2) pixel coordinates (row, col) of each patch, patch index times patch size (API.md)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float().to(device) * patch_size


def attention_distance(
    attentions: list[torch.Tensor], grid: tuple[int, int], patch_size: int, prefix: int = 1
) -> torch.Tensor:
    """(B, depth, heads) mean attention distance in pixels (the ViT paper's Figure 7).

    Per layer and head: attention restricted to patch queries and keys, rows renormalised,
    then the mean over queries of sum_k A[q, k] * |c_q - c_k|. The `prefix` tokens (class, ...) are left out.
    """
    centres = patch_centres(grid, patch_size, attentions[0].device)
    dist = torch.cdist(centres, centres)  # (N, N) Euclidean pixel distances
    per_layer = []
    for weights in attentions:
        a = weights[:, :, prefix:, prefix:].float()  # (B, heads, N, N)
        a = a / a.sum(dim=-1, keepdim=True)
        per_layer.append((a * dist).sum(dim=-1).mean(dim=-1))  # (B, heads)
    return torch.stack(per_layer, dim=1)


def position_similarity(pos_embed: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """(N, N) cosine similarity between every pair of patch position embeddings (the `prefix` slots left out)."""
    patches = F.normalize(pos_embed.reshape(-1, pos_embed.shape[-1])[prefix:].float(), dim=-1)
    return patches @ patches.T
