"""The Batcher on its own: batch formation, admission, cancellation, keys, pipelining, split-on-failure.

The runner here (`FnRunner`) wraps plain functions that record what they were given (the batcher's contract is
just the runner's `prepare(items)` and `forward(prepared) -> results`); the real runners are exercised in
tests/test_runner.py and tests/http.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batching import Batcher, ForwardFailed, Overloaded, Stopped


class Recorder:
    """A run_batch that doubles numbers, records batches and threads, and can be slow or poisoned."""

    def __init__(self, delay: float = 0.0, poison: object = None):
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.poison = poison
        self.gate: threading.Event | None = None

    def __call__(self, items: list) -> list:
        if self.gate is not None:
            self.gate.wait(5)
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and self.poison in items:
            raise RuntimeError("poisoned batch")
        return [x * 2 for x in items]


class FnRunner:
    """The runner contract over plain functions: `forward(prepared) -> results`, and `prepare(items)` (the items as
    they are when None; given, it runs on a thread of its own beside the forward, as on CUDA)."""

    def __init__(self, forward, prepare=None, lanes: int = 1):
        self._forward, self._prepare = forward, prepare
        self.lanes = lanes
        self.overlap = prepare is not None

    def prepare(self, items: list) -> object:
        return self._prepare(items) if self._prepare is not None else items

    def forward(self, prepared) -> list:
        return self._forward(prepared)


def make(run, prepare=None, lanes: int = 1, **kw) -> Batcher:
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_wait_s", 0.02)
    kw.setdefault("max_queue", 64)
    return Batcher(FnRunner(run, prepare, lanes), name="t", **kw)


def run_async(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_forward_and_results_come_back_in_order():
    rec = Recorder()
    sizes: list[int] = []

    async def main():
        b = make(rec, on_batch=sizes.append)
        b.start()
        out = await asyncio.gather(*(b.run([i]) for i in range(4)))
        await b.stop()
        return out

    assert run_async(main()) == [[0], [2], [4], [6]]
    assert sizes == [4]  # all four requests in one forward
    assert rec.batches == [[0, 1, 2, 3]]


def test_a_request_larger_than_the_batch_spans_batches_in_order():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=3)
        b.start()
        out = await b.run(list(range(8)))
        await b.stop()
        return out

    assert run_async(main()) == [2 * i for i in range(8)]
    assert [len(x) for x in rec.batches] == [3, 3, 2]


def test_a_lone_item_waits_at_most_max_wait_then_runs_alone():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8, max_wait_s=0.05)
        b.start()
        b.admit(2)  # another image admitted and still decoding: worth waiting for, but not for ever
        with b.admit(1) as mine:
            out = await b.run([5], admission=mine)
        await b.stop()
        return out

    assert run_async(main()) == [10]
    assert rec.batches == [[5]]


def test_an_idle_batcher_runs_at_once_when_no_admitted_image_is_on_its_way():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8, max_wait_s=5.0)
        b.start()
        start = time.monotonic()
        with b.admit(1) as room:
            out = await b.run([5], admission=room)
        took = time.monotonic() - start
        await b.stop()
        return out, took

    out, took = run_async(main())
    assert out == [10]
    assert took < 2.5  # far less than max_wait: nothing else could have joined the batch


def test_a_queued_item_waits_for_admitted_images_still_decoding_and_shares_their_batch():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8, max_wait_s=5.0)
        b.start()
        slow = b.admit(2)  # admitted first; its images "decode" for a while

        async def late():
            await asyncio.sleep(0.2)
            with slow:
                return await b.run([1, 2], admission=slow)

        with b.admit(1) as quick:
            first = asyncio.ensure_future(b.run([3], admission=quick))
            out = await asyncio.gather(first, late())
        await b.stop()
        return out

    assert run_async(main()) == [[6], [2, 4]]
    assert rec.batches == [[3, 1, 2]]  # the quick item waited for the slow request's images


def test_a_place_reserved_while_a_body_is_read_counts_against_the_queue_but_is_not_waited_for():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8, max_wait_s=5.0, max_queue=3)
        b.start()
        reading = b.reserve()  # a request whose body is still arriving (it might take minutes)
        with pytest.raises(Overloaded):
            b.admit(3)  # its place is taken from the queue's room...
        start = time.monotonic()
        with b.admit(1) as mine:
            out = await b.run([5], admission=mine)  # ...but nothing waits for it (not "on its way")
        took = time.monotonic() - start
        reading.expect(2)  # its body held two images: room for both, now on their way
        assert (b._admitted, b._arriving) == (2, 2)
        with pytest.raises(Overloaded):
            reading.expect(4)  # more than the queue has room for: refused, the two places kept
        assert (b._admitted, b._arriving) == (2, 2)
        with reading:
            assert await b.run([1, 2], admission=reading) == [2, 4]
        assert (b._admitted, b._arriving) == (0, 0)  # everything given back
        await b.stop()
        return out, took

    out, took = run_async(main())
    assert out == [10]
    assert took < 2.5  # far less than max_wait


def test_an_admission_released_without_running_is_no_longer_awaited():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8, max_wait_s=5.0)
        b.start()
        gone = b.admit(3)
        with b.admit(1) as mine:
            first = asyncio.ensure_future(b.run([4], admission=mine))
            await asyncio.sleep(0.1)
            assert not first.done()  # waiting for the three images on their way
            start = time.monotonic()
            gone.release()  # say their request failed to decode: they will never come
            out = await first
        took = time.monotonic() - start
        await b.stop()
        return out, took

    out, took = run_async(main())
    assert out == [8]
    assert took < 2.5


def test_items_of_different_keys_never_share_a_forward():
    rec = Recorder()

    async def main():
        b = make(rec, max_batch_size=8)
        b.start()
        out = await asyncio.gather(b.run([1, 2], key="fast"), b.run([3], key="attention"), b.run([4], key="fast"))
        await b.stop()
        return out

    assert run_async(main()) == [[2, 4], [6], [8]]
    assert sorted(map(sorted, rec.batches)) == [[1, 2, 4], [3]]


def test_admission_refuses_the_whole_request_at_once_with_retry_after():
    async def main():
        b = make(Recorder(), max_queue=5)
        first = b.admit(3)
        assert b.depth == 3
        with pytest.raises(Overloaded) as refused:
            b.admit(3)  # 3 + 3 > 5: refused whole, nothing reserved
        assert refused.value.retry_after >= 1
        assert b.depth == 3
        second = b.admit(2)
        first.release()
        first.release()  # idempotent
        assert b.depth == 2
        with second:
            pass
        assert b.depth == 0

    run_async(main())


def test_retry_after_follows_the_measured_throughput():
    rec = Recorder(delay=0.05)

    async def main():
        b = make(rec, max_batch_size=2, max_queue=4)
        b.start()
        await b.run([1, 2])  # measures about 40 images/s
        rate = b.throughput
        with b.admit(4), pytest.raises(Overloaded) as refused:
            b.admit(4)
        await b.stop()
        return rate, refused.value.retry_after

    rate, retry_after = run_async(main())
    assert rate > 0
    assert retry_after == max(1, -(-4 // rate))  # ceil(excess / rate), at least one second


def test_cancelled_requests_are_dropped_from_the_queue():
    rec = Recorder()
    rec.gate = threading.Event()

    async def main():
        b = make(rec, max_batch_size=1, max_wait_s=0)
        b.start()
        first = asyncio.create_task(b.run([1]))
        await asyncio.sleep(0.05)  # [1] is running (held at the gate)
        doomed = asyncio.create_task(b.run([2, 3]))
        kept = asyncio.create_task(b.run([4]))
        await asyncio.sleep(0.05)
        doomed.cancel()  # a timeout or a disconnect
        await asyncio.gather(doomed, return_exceptions=True)
        rec.gate.set()
        out = await asyncio.gather(first, kept)
        await b.stop()
        return out

    assert run_async(main()) == [[2], [8]]
    assert [2] not in rec.batches and [3] not in rec.batches  # never ran


def run_four_single_items(run, **kw) -> tuple[list, list[int]]:
    """Items 0-3 as four single-item requests through one batcher of 4: each answer (a failed item's exception
    in its place), and the size of each forward the batcher counted."""
    sizes: list[int] = []

    async def main():
        b = make(run, max_batch_size=4, on_batch=sizes.append, **kw)
        b.start()
        out = await asyncio.gather(*(b.run([i]) for i in range(4)), return_exceptions=True)
        await b.stop()
        return out

    return run_async(main()), sizes


def test_a_failing_item_is_isolated_by_splitting_the_batch():
    rec = Recorder(poison=3)
    out, sizes = run_four_single_items(rec)
    assert out[:3] == [[0], [2], [4]]
    assert isinstance(out[3][0], ForwardFailed) and "poisoned" in str(out[3][0])
    # [0 1 2 3] failed -> [0 1] ok, [2 3] failed -> [2] ok, [3] fails alone
    assert rec.batches == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [3]]
    assert sizes == [2, 1]  # only successful forwards are counted


def test_a_failure_that_no_retry_can_fix_fails_the_batch_at_once():
    rec, errors = Recorder(poison=3), []

    def fatal(error: Exception) -> str | None:
        errors.append(error)
        return "the device is lost"

    out, sizes = run_four_single_items(rec, fatal=fatal)
    assert all(isinstance(o, Stopped) and "device is lost" in str(o) for (o,) in out)
    assert rec.batches == [[0, 1, 2, 3]] and sizes == []  # not split into retries that could only fail
    assert [str(e) for e in errors] == ["poisoned batch"]


def test_forwards_run_on_one_dedicated_thread_and_the_next_batch_is_sealed_while_one_runs():
    rec = Recorder(delay=0.05)

    async def main():
        b = make(rec, max_batch_size=2, max_wait_s=0.5)
        b.start()
        started = time.monotonic()
        out = await asyncio.gather(*(b.run([i]) for i in range(6)))
        elapsed = time.monotonic() - started
        await b.stop()
        return out, elapsed

    out, _ = run_async(main())
    assert out == [[2 * i] for i in range(6)]
    assert len(rec.threads) == 1 and threading.get_ident() not in rec.threads
    # full batches never waited for max_wait (0.5 s): each was sealed as soon as it was full
    assert [len(x) for x in rec.batches] == [2, 2, 2]


def test_with_two_lanes_two_batches_run_at_once_on_two_threads():
    both = threading.Barrier(2, timeout=5)  # passes only when two forwards are in progress together
    threads: set[int] = set()

    def run(items: list) -> list:
        threads.add(threading.get_ident())
        both.wait()
        return [x * 2 for x in items]

    async def main():
        b = make(run, max_batch_size=2, lanes=2)
        b.start()
        out = await asyncio.gather(*(b.run([i]) for i in range(4)))
        await b.stop()
        return out

    assert run_async(main()) == [[2 * i] for i in range(4)]
    assert len(threads) == 2


class HoldFirst(Recorder):
    """A Recorder whose first forward holds its lane until `release` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def __call__(self, items: list) -> list:
        if 1 in items:
            self.release.wait(5)
        return super().__call__(items)


def test_a_free_lane_beside_a_running_forward_waits_for_a_full_batch_while_images_are_on_their_way():
    rec = HoldFirst()

    async def main():
        b = make(rec, max_batch_size=3, max_wait_s=0.01, lanes=2)
        b.start()
        first = asyncio.ensure_future(b.run([1]))  # an idle model: runs at once, alone
        await asyncio.sleep(0.05)
        coming = b.admit(2)
        with b.admit(1) as here:
            second = asyncio.ensure_future(b.run([2], admission=here))
            await asyncio.sleep(0.2)  # far beyond max_wait: still waiting, two images are on their way
            assert rec.batches == []  # and the first forward is still held
            with coming:
                rest = await asyncio.wait_for(asyncio.gather(second, b.run([3, 4], admission=coming)), 3)
        rec.release.set()
        out = [await first, *rest]
        await b.stop()
        return out

    assert run_async(main()) == [[2], [4], [6, 8]]
    assert sorted(map(sorted, rec.batches)) == [[1], [2, 3, 4]]  # the free lane took the whole batch


def test_a_free_lane_takes_a_partial_batch_once_nothing_more_is_on_its_way():
    rec = HoldFirst()

    async def main():
        b = make(rec, max_batch_size=3, max_wait_s=0.01, lanes=2)
        b.start()
        first = asyncio.ensure_future(b.run([1]))
        await asyncio.sleep(0.05)
        second = await asyncio.wait_for(b.run([2]), 3)  # runs on the free lane while the first is held
        rec.release.set()
        out = [await first, second]
        await b.stop()
        return out

    assert run_async(main()) == [[2], [4]]


class Staged:
    """A prepare/forward pair: prepare tags the items (and may be poisoned), forward doubles them; both record
    their thread and what they saw. `overlap` is set when a prepare ran while a forward was in progress."""

    def __init__(self, poison_prepare: object = None, poison_forward: object = None):
        self.prepared: list[list] = []
        self.forwarded: list[list] = []
        self.prepare_threads: set[int] = set()
        self.forward_threads: set[int] = set()
        self.poison_prepare, self.poison_forward = poison_prepare, poison_forward
        self.in_forward = threading.Event()
        self.overlap = threading.Event()

    def prepare(self, items: list) -> tuple:
        self.prepare_threads.add(threading.get_ident())
        self.prepared.append(list(items))
        if self.in_forward.is_set():
            self.overlap.set()
        if self.poison_prepare is not None and self.poison_prepare in items:
            raise RuntimeError("poisoned while preparing")
        return ("prepared", list(items))

    def forward(self, prepared: tuple) -> list:
        tag, items = prepared
        assert tag == "prepared"
        self.forward_threads.add(threading.get_ident())
        self.forwarded.append(items)
        self.in_forward.set()
        if len(self.forwarded) == 1:
            self.overlap.wait(5)  # the first forward holds on until the next batch has been prepared beside it
        self.in_forward.clear()
        if self.poison_forward is not None and self.poison_forward in items:
            raise RuntimeError("poisoned in the forward")
        return [x * 2 for x in items]


def test_with_a_prepare_step_the_next_batch_is_prepared_on_its_own_thread_while_one_runs():
    staged = Staged()

    async def main():
        b = make(staged.forward, prepare=staged.prepare, max_batch_size=2, max_wait_s=0.5)
        b.start()
        out = await asyncio.gather(*(b.run([i]) for i in range(6)))
        await b.stop()
        return out

    assert run_async(main()) == [[2 * i] for i in range(6)]
    assert staged.overlap.is_set()  # batch 2 was prepared while batch 1's forward ran
    assert [len(x) for x in staged.forwarded] == [2, 2, 2]
    assert len(staged.prepare_threads) == len(staged.forward_threads) == 1
    assert staged.prepare_threads != staged.forward_threads
    assert threading.get_ident() not in staged.prepare_threads | staged.forward_threads


@pytest.mark.parametrize("where", ["prepare", "forward"])
def test_with_a_prepare_step_a_failing_item_is_still_isolated(where):
    staged = Staged(**{f"poison_{where}": 3})
    staged.overlap.set()  # no holding back here
    out, sizes = run_four_single_items(staged.forward, prepare=staged.prepare)
    assert out[:3] == [[0], [2], [4]]
    assert isinstance(out[3][0], ForwardFailed) and "poisoned" in str(out[3][0])
    assert sizes == [2, 1]
    # the halves were prepared and run again on the forward thread, one after the other
    seen = staged.prepared if where == "prepare" else staged.forwarded
    assert seen[1:] == [[0, 1], [2, 3], [2], [3]]


def test_an_exception_returned_as_one_items_result_fails_that_item_alone():
    class BadInput(Exception):
        pass

    def run(items: list) -> list:
        return [BadInput(f"item {x} is bad") if x == 2 else x * 2 for x in items]

    async def main():
        b = make(run, max_batch_size=4)
        b.start()
        out = await asyncio.gather(*(b.run([i]) for i in range(4)), return_exceptions=True)
        await b.stop()
        return out

    out = run_async(main())
    assert out[0] == [0] and out[1] == [2] and out[3] == [6]
    assert isinstance(out[2][0], BadInput)  # in its own place, for the caller to name


@pytest.mark.parametrize("prepare", [None, list], ids=["one step", "prepared beside the forward"])
def test_a_forward_that_hangs_halts_the_batcher_and_fails_its_items_at_once(prepare):
    rec = Recorder()
    rec.gate = threading.Event()  # closed: the forward blocks, as on a device that never answers
    stalls: list[float] = []
    b = make(rec, prepare=prepare, max_batch_size=1, max_wait_s=0, stall_s=0.2, on_stall=stalls.append)

    async def main():
        b.start()
        try:
            jobs = [asyncio.ensure_future(b.run([x], "k")) for x in (1, 2, 3)]  # one forward hangs, two queued
            done, _ = await asyncio.wait(jobs, timeout=3)
            outcomes = [j.exception() if j in done else "pending" for j in jobs]
            return outcomes, await asyncio.gather(b.run([4], "k"), return_exceptions=True)
        finally:
            rec.gate.set()
            await asyncio.sleep(0.2)  # the hung forward ends: the batch sealed behind it must not run now
            await b.stop()

    outcomes, (later,) = run_async(main())
    assert all(isinstance(o, Stopped) and "the device hangs" in str(o) for o in outcomes), outcomes
    assert len(stalls) == 1 and stalls[0] > 0.2
    # nothing runs after the halt: not the batch sealed behind the hung one, nor a new one
    assert isinstance(later, Stopped) and rec.batches == [[1]]


def test_forwards_within_the_stall_limit_never_trip_it():
    stalls: list[float] = []
    b = make(Recorder(delay=0.05), stall_s=0.5, on_stall=stalls.append)

    async def main():
        b.start()
        try:
            return [await b.run([x], "k") for x in range(8)]
        finally:
            await b.stop()

    assert run_async(main()) == [[2 * x] for x in range(8)] and stalls == []
