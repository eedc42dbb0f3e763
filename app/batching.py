"""Dynamic batching, per model: admission, batch formation, cancellation, fault isolation.

Nothing here knows FastAPI or torch. A `Batcher` is handed a runner (`app.runner`: one per device) and calls
its `prepare(items)` and `forward(prepared) -> results` on its own forward thread(s), off the event loop:

- `admit(n)` takes room for a request's n images once they are known (its body has been read), or raises
  `Overloaded` with a Retry-After estimate. The room is held while the images decode, wait and run, and given
  back when the request is answered (or dropped). A body still being read holds none (app.http.pipeline bounds
  those).
- `run(items, key)` queues the items and returns their results in order; an item that failed has its exception
  in its place (`ForwardFailed`, the runner's own, or `Stopped` when the device is lost), so the caller knows
  which one. Items with the same `key` may share a forward; a request with many items may span several batches.
- the worker seals a batch when it is full, or when the forward thread is free and either the oldest item
  has waited `max_wait_s` or no admitted image is still on its way (decoding): waiting then would only add
  latency, since nothing more can join the batch soon. While one batch runs, the next one fills (and, once
  full, is sealed and queued behind it), so the forward thread never waits for the event loop.
- with the runner's `lanes` > 1 (the CPU), that many forwards may run at once, each on its own thread. A lane
  that frees up beside a running forward takes a full batch, or a partial one only once it has waited
  `max_wait_s` and nothing more is on its way, so lanes do not chop the queue into small batches.
- cancelling `run` (a timeout, a client that went away) removes its items that have not started.
- a batch whose forward raises is split in halves and retried; only items that fail alone get an
  error (`ForwardFailed`), so one poisoned item never takes its batch-mates down with it. Unless `fatal(error)`
  gives a reason that no retry can succeed (the device itself is lost): then the batch fails at once, with
  `Stopped(reason)`.
- a runner that `overlap`s (CUDA) has each batch prepared on a second thread as soon as it is sealed: the next
  batch is assembled (stacked, copied to the GPU, decoded) while the current one runs. Otherwise both steps
  run one after the other on the forward thread. A failure in either step falls back to the split-in-halves
  retry, where both steps run on the forward thread.
- a result that is an exception (for example an image that turned out to be undecodable) is that item's alone;
  the batch is not split for it.
- with `stall_s` > 0, a forward still running after `stall_s` seconds means the device has hung (a GPU kernel
  that never returns). Nothing can interrupt the thread stuck in it; only a new process helps. So the batcher
  halts: the running and queued items fail with `Stopped`, no batch is formed any more, and `on_stall(seconds)`
  is told (once, on the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.runner import Runner

log = logging.getLogger("vitserve.batching")


class Overloaded(Exception):
    """The queue has no room for the request; try again after `retry_after` seconds (>= 1)."""

    def __init__(self, retry_after: int, message: str = "the server is overloaded"):
        super().__init__(message)
        self.retry_after = retry_after


class ForwardFailed(Exception):
    """The forward pass failed for this item even when it ran alone: a fault of the server."""


class Stopped(Exception):
    """The batcher was stopped before the item ran."""


@dataclass(eq=False)
class Entry:
    item: Any
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    dropped: bool = False  # set on the event loop when its request has gone; read by the forward thread


@dataclass
class Staged:
    """A batch prepared on the prepare thread, or what preparing it raised."""

    batch: Any
    error: Exception | None = None


class Admission:
    """Room for `n` images in a batcher's queue; give it back with `release()` (or use `with`)."""

    def __init__(self, batcher: Batcher, n: int):
        self._batcher = batcher
        self.n = n
        self.on_the_way = n  # images not handed to `Batcher.run` yet
        self._released = False

    def arrived(self, n: int) -> None:
        """n of its images reached the queue (`Batcher.run` calls this)."""
        n = min(n, self.on_the_way)
        self.on_the_way -= n
        self._batcher._count(arriving=-n)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.arrived(self.on_the_way)  # those never queued (a bad image, a timeout) are not coming
            self._batcher._count(admitted=-self.n)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Batcher:
    def __init__(
        self,
        runner: Runner,
        *,
        name: str = "model",
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        fatal: Callable[[Exception], str | None] | None = None,
        stall_s: float = 0.0,
        on_stall: Callable[[float], None] | None = None,
    ):
        self.runner = runner
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.lanes = max(1, runner.lanes)  # forwards that may run at once, one thread each
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        # after a forward fails: why no retry can succeed (the device is lost), or None; such a batch is not split
        self._fatal = fatal or (lambda e: None)
        self.stall_s = stall_s
        self._on_stall = on_stall or (lambda seconds: None)
        self._forward_started: dict[int, float] = {}  # forward thread id -> when its current forward began
        self._in_flight: list[list[Entry]] = []  # the batches handed to the forward threads, not finished
        self._halted: str | None = None  # why no batch is formed any more (a forward hangs)
        self._started_lock = threading.Lock()
        self._queue: deque[Entry] = deque()
        self._admitted = 0
        self._arriving = 0  # admitted images not queued yet
        self._running = 0
        self._rate = 0.0  # images per second through the forward, smoothed
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._prepare_thread: ThreadPoolExecutor | None = None

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running event loop (and the forward thread)."""
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(self.lanes, thread_name_prefix=f"forward-{self.name}")
        if self.runner.overlap:
            self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{self.name}")
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name=f"batcher-{self.name}")
        if self.stall_s > 0:
            self._watchdog = loop.create_task(self._watch(), name=f"watchdog-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; items still queued fail with `Stopped`."""
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._watchdog = None
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(Stopped("the server is shutting down"))
        for pool in (self._prepare_thread, self._thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._thread = self._prepare_thread = None

    async def warmup(self) -> None:
        """The runner's warm-up, on a forward thread (CUDA graphs replay on the thread that captured them)."""
        assert self._thread is not None, "start() the batcher first"
        await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.warmup, self.max_batch_size)

    # -- admission -------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Images admitted and not yet answered."""
        return self._admitted

    @property
    def throughput(self) -> float:
        """Measured images per second through the forward (0 before the first batch)."""
        return self._rate

    def check_room(self, n: int = 1) -> None:
        """Raise `Overloaded` if n more images would not fit (nothing is reserved: see `admit`)."""
        if self._admitted + n > self.max_queue:
            raise Overloaded(
                self.retry_after(n),
                f"model {self.name!r} has {self._admitted} images queued (at most {self.max_queue}); "
                "retry after the time in the Retry-After header",
            )

    def admit(self, n: int) -> Admission:
        """Reserve room for n images, all of them on their way to the queue, or raise `Overloaded` at once (the
        whole request, before any work)."""
        self.check_room(n)
        self._count(admitted=n, arriving=n)
        return Admission(self, n)

    def _count(self, admitted: int = 0, arriving: int = 0) -> None:
        """The one place the admission counters change (`Admission` calls it)."""
        self._arriving += arriving
        if admitted:
            self._admitted += admitted
            self._on_depth(self._admitted)
            if admitted < 0 and self._wake is not None:  # images the worker waited for are not coming any more
                self._wake.set()

    def retry_after(self, n: int) -> int:
        """Whole seconds until room for n more images should free up, from the measured throughput."""
        excess = self._admitted + n - self.max_queue
        if self._rate <= 0:
            return 1
        return max(1, min(3600, math.ceil(excess / self._rate)))

    # -- work ------------------------------------------------------------------------------------
    async def run(self, items: Sequence[Any], key: Hashable = None, admission: Admission | None = None) -> list[Any]:
        """Queue `items` (which may share forwards with other requests' items of the same `key`) and
        return their results in order, a failed item's exception in its place. Raises `Stopped` when the
        batcher stops or halts first. Cancelling this coroutine drops the items that have not started.
        `admission`: the room these items were admitted with, so that the batcher knows they are no longer on
        their way."""
        if self._wake is None:
            raise Stopped("the server is shutting down")  # stopped, or not started yet
        if self._halted is not None:
            raise Stopped(self._halted)
        loop = asyncio.get_running_loop()
        entries = [Entry(item, key, loop.create_future()) for item in items]
        if admission is not None:
            admission.arrived(len(entries))
        self._queue.extend(entries)
        self._wake.set()
        try:
            return [await entry.future for entry in entries]
        finally:
            self._drop(entries)

    def _drop(self, entries: list[Entry]) -> None:
        """Forget entries whose request has gone (answered, failed, timed out or disconnected)."""
        for entry in entries:
            if entry.future.done() and not entry.future.cancelled():
                entry.future.exception()  # answered (an exception too: read, so that asyncio does not log it)
                continue
            entry.dropped = True  # a sealed batch that has not started skips it
            entry.future.cancel()
            with contextlib.suppress(ValueError):  # not queued any more: sealed or running
                self._queue.remove(entry)

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._running += 1
            staged = None
            if self._prepare_thread is not None:  # starts now, beside the forward that may be running
                staged = self._prepare_thread.submit(self._prepare_live, batch)
            self._in_flight.append(batch)
            future = loop.run_in_executor(self._thread, self._timed_forward, batch, staged)
            future.add_done_callback(lambda f, b=batch: self._finish(b, f))

    async def _next_batch(self) -> list[Entry]:
        """Wait until a batch should be sealed, then take it off the queue."""
        assert self._wake is not None
        while True:
            timeout = None
            if self._queue:
                first = self._queue[0]
                ready = [e for e in self._queue if e.key == first.key][: self.max_batch_size]
                full = len(ready) >= self.max_batch_size
                waited_enough = time.monotonic() >= first.enqueued + self.max_wait_s
                nothing_coming = self._arriving == 0
                if self._seal(full, waited_enough, nothing_coming):
                    for entry in ready:
                        self._queue.remove(entry)
                    return ready
                if self._running < self.lanes and not waited_enough:
                    timeout = first.enqueued + self.max_wait_s - time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _seal(self, full: bool, waited_enough: bool, nothing_coming: bool) -> bool:
        """Whether the batch at the head of the queue should go now."""
        if self._running == 0:  # an idle model: no reason to wait for more than max_wait, or for nothing
            return full or waited_enough or nothing_coming
        if self._running < self.lanes:  # a free lane beside a running forward: no small batches
            return full or (waited_enough and nothing_coming)
        return full and self._running < self.lanes + 1  # one full batch queued behind them, prepared, ready to go

    def _prepare_live(self, batch: list[Entry]) -> tuple[list[int], Staged]:
        """On the prepare thread: prepare the entries not dropped yet; returns them and the prepared batch, or
        what preparing raised (the forward thread then splits the batch)."""
        live = [i for i, e in enumerate(batch) if not e.dropped]
        if not live:
            return live, Staged(None)
        try:
            return live, Staged(self.runner.prepare([batch[i].item for i in live]))
        except Exception as e:
            return live, Staged(None, e)

    def _timed_forward(self, batch: list[Entry], staged: Future | None) -> tuple[list[Any], float]:
        """On the forward thread: skip entries dropped while the batch waited its turn, run the rest."""
        started = time.monotonic()
        with self._started_lock:
            self._forward_started[threading.get_ident()] = started
        try:
            if staged is None:
                live, prepared = [i for i, e in enumerate(batch) if not e.dropped], None
            else:
                live, prepared = staged.result()  # prepared beside the previous forward: normally ready by now
                if all(batch[i].dropped for i in live):
                    live = []  # every request went away (or the batcher halted) while it was prepared
            results: list[Any] = [Stopped("the request has gone")] * len(batch)
            if live:
                for i, result in zip(live, self._forward([batch[i].item for i in live], prepared), strict=True):
                    results[i] = result
            return results, time.monotonic() - started
        finally:
            with self._started_lock:
                del self._forward_started[threading.get_ident()]

    async def _watch(self) -> None:
        """Tell `on_stall` (once) when a forward has run for longer than `stall_s`."""
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.stall_s / 4)))
            with self._started_lock:  # the forward threads write it
                oldest = min(self._forward_started.values(), default=None)
            if oldest is not None and (seconds := time.monotonic() - oldest) > self.stall_s:
                self._halt(f"a forward has run for {seconds:.1f} s: the device hangs")
                self._on_stall(seconds)
                return

    def _halt(self, reason: str) -> None:
        """Form no more batches, and fail every item queued or handed to a forward thread with `Stopped(reason)`."""
        self._halted = reason
        if self._task is not None:
            self._task.cancel()
        for entry in [*self._queue, *(e for batch in self._in_flight for e in batch)]:
            entry.dropped = True  # a batch sealed behind the hung one skips it, should its turn ever come
            if not entry.future.done():
                entry.future.set_exception(Stopped(reason))
        self._queue.clear()

    def _forward(self, items: list[Any], staged: Staged | None = None) -> list[Any]:
        """On the forward thread: the whole batch (already prepared if `staged`, else both steps here), or its
        halves on failure, down to single items."""
        try:
            if staged is None:
                prepared = self.runner.prepare(items)
            elif staged.error is not None:
                raise staged.error
            else:
                prepared = staged.batch
            results = list(self.runner.forward(prepared))
            if len(results) != len(items):
                raise RuntimeError(f"the forward returned {len(results)} results for {len(items)} items")
            self._on_batch(len(items))
            return results
        except Exception as e:
            if reason := self._fatal(e):
                return [Stopped(reason)] * len(items)
            if len(items) == 1:
                log.error("model %s: forward failed for an item even alone: %r", self.name, e, exc_info=e)
                return [ForwardFailed(f"{type(e).__name__}: {e}")]
            log.warning("model %s: a batch of %d failed (%r); retrying its halves", self.name, len(items), e)
            mid = len(items) // 2
            return self._forward(items[:mid]) + self._forward(items[mid:])

    def _finish(self, batch: list[Entry], future: asyncio.Future) -> None:
        """On the event loop: hand each entry its result, update the throughput estimate."""
        self._running -= 1
        self._in_flight.remove(batch)
        assert self._wake is not None
        self._wake.set()
        if future.cancelled():
            results: list[Any] = [Stopped("the forward was cancelled")] * len(batch)
        elif future.exception() is not None:
            results = [ForwardFailed(repr(future.exception()))] * len(batch)
        else:
            results, elapsed = future.result()
            ran = sum(not isinstance(r, Stopped) for r in results)
            # lanes still running ran beside this batch: the model's rate is about that many times the batch's
            rate = ran / max(elapsed, 1e-6) * min(self.lanes, self._running + 1)
            if ran:
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        for entry, result in zip(batch, results, strict=True):
            if not entry.future.done():  # else its request has gone
                entry.future.set_result(result)
