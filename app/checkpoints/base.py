"""What every checkpoint reader returns, and the one error type they raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.model import ViTConfig
from app.preprocess import PreprocessConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be served; the message names the spec and what is wrong."""


@dataclass
class Checkpoint:
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]  # in our (timm) parameter names
    preprocess: PreprocessConfig
    format: str  # "hf" | "timm" | "torchvision" | "open_clip" | "native"
    source: str  # the spec it came from
    weights_path: Path | None = None  # the file whose sha256 ModelInfo reports
    labels: list[str] = field(default_factory=list)
    # how the library the weights come from resamples the position embedding to another grid (bicubic either way)
    pos_antialias: bool = True
    serve_size: tuple[int, int] | None = None  # the size to serve at when not the weights' own (HF: the crop)
