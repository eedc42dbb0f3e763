"""Host -> device for uint8 batches: pinned, reusable staging buffers and copies that do not block the host.

On the CPU a batch is one `np.stack` and `torch.from_numpy` (the stack is the only copy). On CUDA the images are
stacked straight into a page-locked (pinned) host buffer through its numpy view, and copied to the device with
`non_blocking=True` on a side stream, so the copy overlaps whatever the default stream runs (the forward of the
previous batch). The buffer is reused, which brings one hazard: a non-blocking copy reads the host memory after
the call returns, so the next batch must not overwrite a buffer while its copy is still in flight. Each buffer
carries an event recorded after its copy; it is waited on (host side) before the buffer is filled again, and
two buffers alternate so that waiting is rare.

The caller says which stream does the work (`side`) and gets back the device tensor and the event to wait on
before another stream reads it (see `app.tasks`: `wait_stream`/`wait_event` and `record_stream`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch


def stack_host(arrays: list[np.ndarray]) -> torch.Tensor:
    """Equal-shaped arrays -> one CPU tensor (B, ...): one copy, no more."""
    return torch.from_numpy(np.stack(arrays))


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
