"""The CUDA runner: each batch prepared on a side stream beside the running forward, then CUDA graphs.

- `prepare` runs on the batcher's prepare thread (`overlap`): the uint8 pixels are stacked straight into
  pinned, reused host buffers and copied without blocking the host, JPEGs are decoded by nvJPEG
  (`app.gpu_decode`), and the batch is normalised, all on a high-priority side stream. A lock keeps one batch
  at a time on that stream: the prepare thread, and a failed batch's split retry on the forward thread (nvJPEG's
  outputs rely on the stream being idle when it allocates them).
- `forward` waits for that stream, then replays one CUDA graph per batch-size bucket (captured at warm-up over
  the plain model; a batch is padded up to the next bucket, as a GPU's cost is nearly flat in the batch size).
  Graphs remove the kernel-launch cost that dominates small batches: 3.4x the eager forward at batch 1 and 2.3x
  at batch 8 on an H200 (B/16, bfloat16; docs/design.md). Forwards that return attention weights run eagerly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.runner import Prepared, default_buckets, forward_items, prepare_items, run_warmup
from app.tasks import Item

if TYPE_CHECKING:
    from app.engine import Model, Output

log = logging.getLogger("vitserve")


class CudaRunner:
    lanes = 1  # one stream; the graphs replay from shared buffers
    overlap = True

    def __init__(self, model: Model, *, max_batch_size: int, graphs: bool = True, takes_jpeg: bool = False):
        self.model = model
        self.takes_jpeg = takes_jpeg
        device = model.device
        # a high-priority stream comes from a pool of its own: never the stream a CUDA graph is captured on
        # (`torch.cuda.Stream()` hands out the default-priority pool's streams in turn), and the short copies
        # and normalisations get ahead of the forward's kernels
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.stager = PinnedStager(device)
        self.lock = threading.Lock()
        self.graphs = GraphBuckets(model, default_buckets(max_batch_size)) if graphs else None
        self.fast_path = "cudagraph" if graphs else "eager"

    def prepare(self, items: list[Item]) -> Prepared:
        with self.lock, torch.inference_mode(), torch.cuda.stream(self.stream):
            prepared = prepare_items(self.model, items, partial(self.stager.upload, stream=self.stream))
            prepared.ready = torch.cuda.Event()
            prepared.ready.record(self.stream)
        return prepared

    def forward(self, prepared: Prepared) -> list[object]:
        if prepared.ready is not None:
            # the forward's stream waits for the side stream, and the caching allocator learns that it uses the
            # input's memory (so that memory is not handed out again before the forward has read it)
            current = torch.cuda.current_stream(self.model.device)
            current.wait_event(prepared.ready)
            prepared.inputs.record_stream(current)
        return forward_items(self.model, prepared, fast=self.graphs)

    def warmup(self, max_batch_size: int) -> None:
        if self.graphs is not None:
            self.graphs.capture_all()
        run_warmup(self, max_batch_size)


class GraphBuckets:
    """The forward without attention weights as one CUDA graph per batch-size bucket; call it like the model."""

    def __init__(self, model: Model, buckets: list[int]):
        self.model = model
        self.buckets = sorted(buckets)
        self.build_seconds: dict[int, float] = {}
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the graphs then share one memory pool)."""
        for b in reversed(self.buckets):
            self._graph(b)

    def __call__(self, x: torch.Tensor) -> Output:
        parts, start, n = [], 0, x.shape[0]
        while start < n:
            rows = min(n - start, self.buckets[-1])
            bucket = next(b for b in self.buckets if b >= rows)
            parts.append(self._graph(bucket).run(x[start : start + rows]))
            start += rows
        tokens = torch.cat([p[0] for p in parts])
        logits = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return self.model.output(tokens, logits)

    def _graph(self, bucket: int) -> _Graph:
        if bucket not in self._graphs:
            start = time.perf_counter()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            shape = (bucket, self.model.config.in_chans, *self.model.config.image_size)
            self._graphs[bucket] = _Graph(self.model.fast_forward, shape, self.model, self._pool)
            self.build_seconds[bucket] = time.perf_counter() - start
            log.info("cuda graph for batch %d captured in %.1f s", bucket, self.build_seconds[bucket])
        return self._graphs[bucket]


class _Graph:
    """One CUDA graph over `fn` at a fixed input shape: copy in, replay, copy out."""

    def __init__(self, fn, shape: tuple[int, ...], model: Model, pool: object):  # type: ignore[no-untyped-def]
        device = model.device
        # Random (not zero) contents: warm-up runs and capture see realistic values; rows beyond a short
        # batch keep whatever the previous batch left there, which is finite and never read back.
        self.static_in = torch.randn(shape, device=device).to(model.dtype)
        with torch.inference_mode():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS handles and autotuning happen here
                    fn(self.static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up stream (its cuBLAS workspace exists already); "thread_local": work that other
            # threads put on the GPU meanwhile (decoding, copies) does not break this capture.
            with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                self.static_out = fn(self.static_in)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[0]
        self.static_in[:n].copy_(x, non_blocking=True)
        self.graph.replay()
        tokens, logits = self.static_out
        # Copies: the next replay overwrites the static outputs while the caller may still hold these.
        return tokens[:n].clone(), None if logits is None else logits[:n].clone()


@dataclass
class _Slot:
    host: torch.Tensor  # pinned uint8 (capacity, *shape)
    copied: torch.cuda.Event | None = None  # recorded after the last copy out of `host`


class PinnedStager:
    """Double-buffered pinned host buffers for one device and one image shape (h, w, 3), grown on demand.

    `upload(arrays, stream)` stacks the arrays into the next free buffer and enqueues the copy to the device
    on `stream`; it returns the device tensor (allocated on `stream`). Thread-safe: the forward thread (warm-up,
    split retries) and the prepare thread may both upload; a lock keeps each buffer to one batch at a time.
    """

    def __init__(self, device: torch.device, slots: int = 2):
        if device.type != "cuda":
            raise ValueError(f"pinned staging is for CUDA devices, not {device}")
        self.device = device
        self._slots: list[_Slot | None] = [None] * slots
        self._next = 0
        self._lock = threading.Lock()

    def upload(self, arrays: list[np.ndarray], stream: torch.cuda.Stream) -> torch.Tensor:
        n, shape = len(arrays), arrays[0].shape
        with self._lock:
            index = self._next
            self._next = (index + 1) % len(self._slots)
            slot = self._slot(index, n, shape, arrays[0].dtype)
            if slot.copied is not None:
                slot.copied.synchronize()  # the copy that last read this buffer has finished
            host = slot.host[:n]
            np.stack(arrays, out=host.numpy())  # straight into pinned memory: the only host copy
            with torch.cuda.stream(stream):
                device = host.to(self.device, non_blocking=True)
                if slot.copied is None:
                    slot.copied = torch.cuda.Event()
                slot.copied.record(stream)
        return device

    def _slot(self, index: int, n: int, shape: tuple[int, ...], dtype: np.dtype) -> _Slot:
        slot = self._slots[index]
        torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        if slot is None or slot.host.shape[0] < n or slot.host.shape[1:] != shape or slot.host.dtype != torch_dtype:
            if slot is not None and slot.copied is not None:
                slot.copied.synchronize()  # never free pinned memory that a copy may still read
            capacity = 1 << max(0, n - 1).bit_length()  # powers of two: a few allocations, then none
            host = torch.empty((capacity, *shape), dtype=torch_dtype, pin_memory=True)
            slot = _Slot(host)
            self._slots[index] = slot
        return slot

    @property
    def capacity(self) -> list[int]:
        """Rows each buffer holds now (0 before its first use)."""
        return [0 if s is None else int(s.host.shape[0]) for s in self._slots]
