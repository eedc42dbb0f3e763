"""Float8 linear layers: `--dtype float8`, an opt-in precision for GPUs with float8 tensor cores (Ada, Hopper).

Each linear layer of the transformer blocks (qkv, proj, fc1, fc2: nearly all of a ViT's FLOPs) multiplies in
float8 e4m3 with float32 accumulation: its weight is quantised once at load, one scale per output channel, and
its input at every call, one scale per row (token), so that each row and each channel uses the format's whole
range. Everything else stays in bfloat16: the patch projection, LayerNorms, softmax, GELU, the head. This is the
"dynamic activation, per-row" recipe of torchao's float8 inference; the multiply is `torch._scaled_mm`, the op
torchao calls. It runs on a CPU too (emulated, slower than bfloat16), which is how the tests check it.

Float8 e4m3 keeps 3 mantissa bits: the logits move more than bfloat16's do (bench/float8.py reports by how much,
and the bundled digit model's accuracy under it); the top class rarely changes.
"""

from __future__ import annotations

import torch
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448
ACTIVATIONS = torch.bfloat16  # the dtype of everything around the float8 multiplies


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 (M, K) and float32 (M, 1) scales with x ~= q * scale, each row's largest magnitude
    mapped to e4m3's largest, 448. Three passes over x, each a single kernel, in x's own dtype: this runs before
    every multiply, and on a GPU its memory traffic is what float8 has to win back.

    No clamp is needed: |x| / scale exceeds 448 by x's rounding at most (a bfloat16 step is 2 there), and e4m3
    rounds everything below 464 to 448 (from 464 on it would give NaN, not saturate)."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)  # max |x| per row, one reduction
    scale = (amax.float().clamp_min(1e-12) / FLOAT8_MAX).to(x.dtype)
    return (x / scale).to(FLOAT8), scale.float()


class Float8Linear(nn.Module):
    """`nn.Linear` with its weight and input in float8 e4m3 (per-channel and per-row scales), output in bfloat16.

    Move it with `.to(device)` only: `.to(dtype)` would cast the float8 weight too (it is a floating-point buffer).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize_rows(linear.weight.detach().float())  # (out, in), (out, 1)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.T.contiguous())  # (1, out), as _scaled_mm takes it
        bias = None if linear.bias is None else linear.bias.detach().to(ACTIVATIONS)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = _quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(
            q,
            self.weight.t(),  # column-major, as the float8 GEMMs want their second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=ACTIVATIONS,
            use_fast_accum=True,  # as torchao's inference recipe; the CPU ignores it
        )
        return y.reshape(*lead, self.out_features)


def convertible(linear: nn.Module) -> bool:
    """Whether a layer can run in float8: the GEMMs need both its sizes to be multiples of 16."""
    return isinstance(linear, nn.Linear) and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def to_float8(net: nn.Module) -> int:
    """Swap every convertible linear layer inside `net.blocks` for a `Float8Linear`, in place; how many were."""
    swapped = 0
    for module in list(net.blocks.modules()):
        for name, child in list(module.named_children()):
            if convertible(child):
                setattr(module, name, Float8Linear(child))
                swapped += 1
    return swapped


def float8_problem(device: torch.device) -> str | None:
    """Why float8 multiplies cannot run on `device`, or None when they can: a GPU without float8 tensor cores, or
    a torch that cannot do `Float8Linear`'s multiply there (tried once on a 16 x 16 layer)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"float8 needs float8 tensor cores (compute capability 8.9 or higher); {name} is {major}.{minor}"
    try:
        layer = Float8Linear(nn.Linear(16, 16, device=device))
        layer(torch.ones(2, 16, dtype=ACTIVATIONS, device=device)).cpu()
    except Exception as e:  # RuntimeError or NotImplementedError mostly; a ValueError or TypeError from older checks
        return f"this build of torch cannot multiply float8 matrices on {device}: {' '.join(str(e).split())}"
    return None
