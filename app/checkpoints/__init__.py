"""Checkpoint readers: every format becomes a `Checkpoint` in our parameter names."""

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.detect import default_models_dir, list_repository, model_name, read_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "default_models_dir", "list_repository", "model_name", "read_checkpoint"]
