"""SPEC -> Checkpoint: resolve the spec to files, detect their format, hand them to that reader."""

from __future__ import annotations

from pathlib import Path

from app.checkpoints import native
from app.checkpoints.base import Checkpoint, CheckpointError


def read_checkpoint(spec: str, arch: str | None = None, models_dir: str | Path | None = None) -> Checkpoint:
    path = Path(spec)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1 and native.is_native(candidates[0]):
            return native.load(candidates[0], spec)
    elif path.is_file() and native.is_native(path):
        return native.load(path, spec)
    raise CheckpointError(f"{spec}: not a checkpoint vitserve can read")
