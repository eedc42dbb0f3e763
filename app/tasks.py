"""What a request asks of a forward: the tasks of the /v1 and /v2 endpoints, and the items the batcher queues.

Nothing here imports torch: the HTTP layer builds tasks and items, a runner (`app.runner`) computes them on
the model's device, and the per-item answers come back as numpy arrays.

An item carries its image in one of three forms, each in a field of its own: `pixels`, uint8 (h, w, 3) at the
model's input size (the usual case); `jpeg`, a checked JPEG that the batch decodes on the device (when the
runner `takes_jpeg`); `tensor`, float32 (3, H, W) already preprocessed (the Open Inference Protocol's FP32
input). Preprocessed items travel under their own batch key, so one forward never mixes them with the others.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.decode import Encoded

FAST = "fast"  # no attention weights: the packed or graph-captured forward
ATTENTION = "attention"  # attention weights materialised


@dataclass(frozen=True)
class Classify:
    top_k: int
    key = FAST


@dataclass(frozen=True)
class Embed:
    pool: Literal["default", "cls", "mean"] = "default"  # default: the family's own embedding (app.engine)
    normalize: bool = False
    key = FAST


@dataclass(frozen=True)
class AttentionMap:
    method: Literal["rollout", "cls"] = "rollout"
    layer: int = -1
    head: int | None = None  # None: the mean over heads
    key = ATTENTION


@dataclass(frozen=True)
class AttentionDistance:
    key = ATTENTION


@dataclass(frozen=True)
class Tensors:
    """The Open Inference Protocol's outputs: each item gets {name: float32 array} for the names asked."""

    outputs: tuple[str, ...]

    @property
    def key(self) -> str:
        return ATTENTION if "attention_rollout" in self.outputs else FAST


Task = Classify | Embed | AttentionMap | AttentionDistance | Tensors


@dataclass(frozen=True)
class Item:
    task: Task
    pixels: np.ndarray | None = None  # uint8 (h, w, 3) at the model's input size
    jpeg: Encoded | None = None  # a checked JPEG, decoded with its batch on the device
    tensor: np.ndarray | None = None  # float32 (3, H, W), already preprocessed


def batch_key(item: Item) -> Hashable:
    """The batcher key: the task's path, kept apart for already-preprocessed pixels (uint8 pixels and JPEGs
    share batches)."""
    return item.task.key if item.tensor is None else (item.task.key, "preprocessed")


@dataclass(frozen=True)
class Heatmap:
    values: np.ndarray  # float32 (gh, gw), divided by its maximum
    method: str  # what the map is for this model's tokens: cls, rollout, probe, probe_rollout, mean, mean_rollout


@dataclass(frozen=True)
class Predictions:
    indices: np.ndarray  # int64 (k,)
    scores: np.ndarray  # float32 (k,), softmax probabilities, highest first


def top_k(probabilities: np.ndarray, k: int) -> Predictions:
    """The k most probable classes of one image, highest first (ties: the lower index first)."""
    indices = np.argsort(-probabilities, kind="stable")[:k]
    return Predictions(indices, probabilities[indices])
