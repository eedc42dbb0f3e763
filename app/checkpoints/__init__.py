"""Checkpoint readers: every format becomes a `Checkpoint` in our parameter names."""

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.detect import read_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "read_checkpoint"]
