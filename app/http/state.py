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
    from app.engine import Model
    from app.http.pipeline import BodyReader
    from app.model import ViTConfig
    from app.runner import ThreadShare

log = logging.getLogger("vitserve")


@dataclass
class ServedModel:
    """A loaded model with its batcher, and what the routes read of it on every request."""

    name: str
    model: Model
    batcher: Batcher
    config: ViTConfig = field(init=False)
    num_classes: int = field(init=False)
    _similarity: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.config = self.model.config
        self.num_classes = int(self.model.num_classes)  # 0 for a projection head: no classifier

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
            "lanes": b.lanes,  # forwards at once (app.runner)
            "fast_path": b.runner.fast_path,  # onednn, cudagraph or eager
        }

    def similarity(self) -> np.ndarray:
        """Position-embedding similarity: fixed per model, computed once."""
        if self._similarity is None:
            self._similarity = self.model.position_similarity()
        return self._similarity


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    bodies: BodyReader  # every request body is read through it (bounded in bytes and time: app.http.pipeline)
    decoder: Decoder | None = None
    models: dict[str, ServedModel] = field(default_factory=dict)
    default_model: str | None = None
    expected: int = 0  # models to load
    ready: bool = False  # every model loaded and warm (`open`)
    draining: bool = False
    accepting: bool = False  # ready, not draining, the device working: what each request checks, kept by the methods
    load_error: str | None = None
    device_error: str | None = None  # a model's device failed for good while serving (`device_lost`)
    inflight: int = 0  # HTTP requests being answered
    thread_share: ThreadShare | None = None  # the forward's threads, shared by every model's CPU lanes
    on_fatal: Callable[[str], None] | None = None  # told when the server cannot go on (the CLI then exits 1)

    def open(self) -> None:
        """Every model is ready: take requests."""
        self.ready = True
        self.accepting = self.device_error is None and not self.draining

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
        self.accepting = False
        log.critical("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and new /v1 requests get not_ready; accepted ones still finish."""
        self.draining = True
        self.accepting = False
