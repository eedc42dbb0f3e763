"""Our own format: one .safetensors file whose metadata carries the architecture, labels and preprocessing.

A single self-describing file: nothing beside it is needed, and nothing in it can run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.checkpoints.base import Checkpoint, CheckpointError
from app.model import ViTConfig
from app.preprocess import PreprocessConfig

METADATA_KEY = "vitserve"


def _raw_metadata(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(METADATA_KEY)


def read_metadata(path: Path) -> dict | None:
    """The vitserve metadata of a .safetensors file, or None when it is not ours."""
    raw = _raw_metadata(path)
    return json.loads(raw) if raw is not None else None


def is_native(path: Path) -> bool:
    """A .safetensors file with vitserve metadata (an unreadable file is not; its reader will say why)."""
    try:
        return path.suffix == ".safetensors" and _raw_metadata(path) is not None
    except Exception:
        return False


def save(
    path: str | Path,
    config: ViTConfig,
    state_dict: dict[str, torch.Tensor],
    preprocess: PreprocessConfig,
    labels: list[str],
    extra: dict | None = None,
) -> None:
    """Write a native checkpoint (what `app.train` produces)."""
    meta = {"config": config.to_dict(), "preprocess": preprocess.to_dict(), "labels": labels, **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def load(path: Path, source: str) -> Checkpoint:
    from app.checkpoints.files import load_tensors

    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: unreadable vitserve metadata in {path.name}: {e}") from None
    if meta is None:
        raise CheckpointError(f"{source}: {path.name} has no vitserve metadata")
    try:
        config = ViTConfig.from_dict(meta["config"])
        preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: malformed vitserve metadata in {path.name}: {e}") from None
    labels = [str(x) for x in meta.get("labels") or []]
    return Checkpoint(config, load_tensors(path, source), preprocess, "native", source, path, labels)
