"""The data tables shipped in app/data: timm's and torchvision's published configs, ImageNet-1k labels.

They are generated once from the libraries themselves (scripts/make_timm_table.py,
scripts/make_torchvision_table.py), so that neither library is needed at run time.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from app.checkpoints.base import CheckpointError

# Heads of the standard ViT widths (ViT-Ti/S/B/L/H), used when only the weights are known:
# the weights fix every shape except how the width is split into heads.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


@cache
def _load(name: str) -> object:
    return json.loads(resources.files("app").joinpath("data", name).read_text(encoding="utf-8"))


def timm_table() -> dict:
    """{"architectures": {name: shape}, "pretrained": {"name.tag": preprocessing}, "unsupported": {name: why}}."""
    return _load("timm_pretrained.json")


def torchvision_table() -> dict:
    """{"architectures": {name: shape}, "weights": {"name.enum": preprocessing}}."""
    return _load("torchvision_weights.json")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    return list(_load("imagenet_labels.json"))


def labels_for(num_classes: int) -> list[str]:
    """ImageNet-1k names for a 1000-class timm/torchvision head; otherwise none (the engine uses class_<i>)."""
    return imagenet_labels() if num_classes == 1000 else []


def heads_for_width(width: int, source: str, hint: str = "pass --arch") -> int:
    """Number of heads of a standard ViT of this width; an unknown width is an error, never a guess."""
    if width not in HEADS_BY_WIDTH:
        known = ", ".join(f"{w} -> {h}" for w, h in HEADS_BY_WIDTH.items())
        raise CheckpointError(
            f"{source}: cannot tell the number of attention heads of an embedding width of {width} from the weights "
            f"(known widths: {known}); {hint}"
        )
    return HEADS_BY_WIDTH[width]
