"""What the running server knows: its settings, metrics, decoder, loaded models, readiness and drain state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from app.batching import Batcher
from app.decode import Decoder
from app.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.accel import ThreadShare
    from app.engine import Model
    from app.model import ViTConfig

log = logging.getLogger("vitserve")


@dataclass
class ServedModel:
    """A loaded model with its batcher."""

    name: str
    model: Model
    batcher: Batcher
    _similarity: np.ndarray | None = field(default=None, repr=False)

    @property
    def info(self) -> dict:
        """The ModelInfo of API.md, and (beyond it) how this server runs the model."""
        return {"name": self.name, **self.model.info, "serving": self.serving}

    @property
    def serving(self) -> dict:
        b = self.batcher
        return {
            "max_batch_size": b.max_batch_size,
            "max_wait_ms": b.max_wait_s * 1000.0,
            "max_queue": b.max_queue,
            "lanes": b.lanes,  # forwards at once (app.tasks.forward_lanes)
            "fast_path": self.model.accel_strategy,  # app.accel: onednn, cudagraph, ...
        }

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    def similarity(self) -> np.ndarray:
        """Position-embedding similarity: fixed per model, computed once."""
        if self._similarity is None:
            from app.tasks import position_similarity

            self._similarity = position_similarity(self.model)
        return self._similarity


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    decoder: Decoder | None = None
    models: dict[str, ServedModel] = field(default_factory=dict)
    default_model: str | None = None
    expected: int = 0  # models to load
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    device_error: str | None = None  # a model's device failed for good while serving (`device_lost`)
    inflight: int = 0  # HTTP requests being answered
    thread_share: ThreadShare | None = None  # the forward's threads, shared by every model's CPU lanes
    on_fatal: Callable[[str], None] | None = None  # told when the server cannot go on (the CLI then exits 1)

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining and self.device_error is None

    def not_ready_reason(self) -> str:
        if self.device_error:
            return f"the server is stopping to be restarted: {self.device_error}; send requests to another instance"
        if self.draining:
            return "the server is shutting down; send requests to another instance"
        if self.load_error:
            return f"a model failed to load: {self.load_error}"
        return f"models are still loading ({len(self.models)} of {self.expected or '?'} ready); retry shortly"

    def device_lost(self, message: str) -> None:
        """A model's device can run nothing more (a sticky CUDA error, a hung forward): take no more requests and
        stop the process (`on_fatal`), so that what supervises it (the `--workers` supervisor, a container's restart
        policy, an orchestrator) starts a new one with a working device. On the event loop; only the first call
        counts."""
        if self.device_error is not None:
            return
        self.device_error = message
        log.critical("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and new /v1 requests get not_ready; accepted ones still finish."""
        self.draining = True
