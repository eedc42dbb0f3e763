"""The serving behaviour of the real app under load and faults: batching, backpressure, isolation, deadlines,
disconnects, readiness while loading, load failures, draining, metrics, the model repository.

Models are real tiny checkpoints; `Wrapped` only adds a delay (so requests pile up) or a fault for white
images (a server-side failure tied to one item). Requests are concurrent on one event loop via httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading

import pytest
from http_support import asgi_call, encode, metric, serve, settings_for, white, wrapping_loader
from PIL import Image

from app.http.factory import create_app
from app.http.loading import engine_loader
from app.settings import Settings

RAW = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def pngs(real_photos) -> list[bytes]:
    return [encode(real_photos[n], "PNG") for n in ("chelsea", "astronaut", "coffee", "china")]


async def until(condition, timeout: float = 30.0) -> None:
    """Wait (on the event loop) until `condition()` is true: no fixed sleeps that a slow machine outruns."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


def classify(client, data: bytes, url: str = "/v1/classify", **headers):
    return client.post(url, content=data, headers={**RAW, **headers})


def test_concurrent_requests_share_a_forward(checkpoints, pngs):
    created = []
    app = create_app(settings_for(checkpoints, "tiny", max_wait_ms=50), loader=wrapping_loader(created, delay=0.2))

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()  # forget the warm-up
            first = asyncio.create_task(classify(client, pngs[0]))  # occupies the forward for 0.2 s
            await until(lambda: created[0].batch_sizes)
            rest = await asyncio.gather(*(classify(client, pngs[i % 4]) for i in range(6)))
            answers = [await first, *rest]
            return answers, (await client.get("/metrics")).text

    answers, text = asyncio.run(main())
    assert [r.status_code for r in answers] == [200] * 7
    sizes = created[0].batch_sizes
    assert sum(sizes) == 7 and max(sizes) > 1  # the six waiting requests shared forwards
    assert metric(text, "vit_batch_size_count", model="tiny") == len(sizes)
    assert metric(text, "vit_batch_size_sum", model="tiny") == 7
    assert metric(text, "vit_batch_size_bucket", model="tiny", le="1.0") < len(sizes)
    assert metric(text, "vit_images_total", model="tiny", endpoint="/v1/classify") == 7


def test_two_lanes_run_two_forwards_at_once_and_answer_as_one_lane_does(checkpoints, pngs):
    def answers_with(lanes: int):
        created = []
        settings = settings_for(checkpoints, "tiny", lanes=lanes, max_batch_size=2, max_wait_ms=20)
        app = create_app(settings, loader=wrapping_loader(created, delay=0.1))

        async def main():
            async with serve(app) as client:
                created[0].forwards.clear()  # forget the warm-up
                created[0].most_at_once = 0
                got = await asyncio.gather(*(classify(client, pngs[i % 4], "/v1/classify?top_k=10") for i in range(8)))
                assert (await client.get("/v1/models/tiny")).json()["serving"]["lanes"] == lanes
                return [r.json()["results"][0]["predictions"] for r in got]

        return asyncio.run(main()), created[0]

    one, single = answers_with(1)
    two, wrapped = answers_with(2)
    assert single.most_at_once == 1
    assert wrapped.most_at_once == 2 and len({thread for thread, _ in wrapped.forwards}) == 2
    threads = settings_for(checkpoints, "tiny").forward_threads
    seen = {n for _, n in wrapped.forwards}
    assert max(seen) <= threads and max(1, threads // 2) in seen  # two forwards at once share the threads
    for a, b in zip(one, two, strict=True):
        assert [p["index"] for p in a] == [p["index"] for p in b]
        assert [p["score"] for p in a] == pytest.approx([p["score"] for p in b], abs=1e-5)


def test_the_lanes_of_two_models_share_one_set_of_threads(checkpoints, pngs):
    threads = settings_for(checkpoints).forward_threads
    if threads < 2:
        pytest.skip("needs two or more intra-op threads to share")
    created = []
    app = create_app(settings_for(checkpoints, "tiny", "other", lanes=2), loader=wrapping_loader(created, delay=0.3))

    async def main():
        async with serve(app) as client:
            for model in created:
                model.forwards.clear()
            urls = ["/v1/classify?model=tiny", "/v1/classify?model=other&top_k=3"]
            answers = await asyncio.gather(*(classify(client, pngs[0], url) for url in urls))  # one each, at once
            return [r.status_code for r in answers]

    assert asyncio.run(main()) == [200, 200]
    (a,), (b,) = (m.forwards for m in created)  # one forward per model, each alone in its own batcher
    assert sorted([a[1], b[1]]) == [threads // 2, threads]  # the second to start got half: one set of threads


def test_start_up_objects_are_kept_out_of_garbage_collection_while_serving(checkpoints, pngs):
    import gc

    app = create_app(settings_for(checkpoints, "tiny"))

    async def main():
        async with serve(app) as client:
            frozen = gc.get_freeze_count()
            status = (await classify(client, pngs[0])).status_code
        return frozen, status

    frozen, status = asyncio.run(main())
    assert status == 200
    assert frozen > 10_000  # torch, the model, the app: the full collections no longer walk them
    assert gc.get_freeze_count() == 0  # given back at shutdown


def test_without_warm_up_the_fast_path_still_serves(checkpoints, pngs):
    from app.runner import has_onednn_linear

    def classify_with(warmup: bool):
        app = create_app(settings_for(checkpoints, "tiny", warmup=warmup))

        async def main():
            async with serve(app) as client:
                answer = (await classify(client, pngs[0], "/v1/classify?top_k=10")).json()
                return answer["results"][0]["predictions"], (await client.get("/v1/models/tiny")).json()["serving"]

        return asyncio.run(main())

    cold, cold_serving = classify_with(False)
    warm, warm_serving = classify_with(True)
    assert cold_serving["fast_path"] == warm_serving["fast_path"] == ("onednn" if has_onednn_linear() else "eager")
    assert [p["index"] for p in cold] == [p["index"] for p in warm]
    assert [p["score"] for p in cold] == pytest.approx([p["score"] for p in warm], abs=1e-5)


def test_a_burst_beyond_max_queue_gets_503_with_retry_after_and_nothing_else_fails(checkpoints, pngs):
    settings = settings_for(checkpoints, "tiny", max_queue=4, max_images_per_request=2, max_batch_size=2)
    app = create_app(settings, loader=wrapping_loader(delay=0.1))

    async def main():
        async with serve(app) as client:
            answers = await asyncio.gather(*(classify(client, pngs[i % 4]) for i in range(16)))
            after = await classify(client, pngs[0])  # once the burst is over, room again
            return answers, after

    answers, after = asyncio.run(main())
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= 4
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
    assert after.status_code == 200


def test_bodies_being_read_hold_no_place_in_the_queue_only_bytes_of_the_budget(checkpoints, pngs):
    """A slow upload takes nothing from the model's queue (it would keep images that are ready from the model): two
    of them leave a queue of two empty, and another request is answered meanwhile. What they hold is bytes of
    --max-pending-body-bytes: with those taken, a request is refused before a byte of its body is read; once the
    uploads end, the bytes are back."""
    budget = 200 + len(pngs[2])  # the slow uploads' first 100 bytes each, and one more image
    settings = settings_for(checkpoints, "tiny", max_queue=2, max_images_per_request=1, max_pending_body_bytes=budget)
    app = create_app(settings)

    async def held(data: bytes, gate: asyncio.Event):
        yield data[:100]
        await gate.wait()  # the rest comes later, as from a slow client
        yield data[100:]

    async def main():
        async with serve(app) as client:
            batcher, bodies = app.state.vit.models["tiny"].batcher, app.state.vit.bodies
            gate = asyncio.Event()
            slow = [asyncio.ensure_future(asgi_call(app, "POST", "/v1/classify", RAW, held(p, gate))) for p in pngs[:2]]
            await until(lambda: bodies.pending == 200)  # chunked: they hold what has arrived
            depth_while_reading = batcher.depth
            meanwhile = await classify(client, pngs[2])
            too_much = {**RAW, "content-length": str(budget)}  # more than the room left
            refused = await asgi_call(app, "POST", "/v1/classify", too_much, [pngs[2]])
            gate.set()
            return depth_while_reading, meanwhile, refused, await asyncio.gather(*slow), batcher.depth, bodies.pending

    depth_while_reading, meanwhile, refused, slow, depth, pending = asyncio.run(main())
    assert depth_while_reading == 0
    assert meanwhile.status_code == 200
    assert refused["status"] == 503 and refused["pulled"] == 0
    assert [r["status"] for r in slow] == [200, 200]
    assert depth == 0 and pending == 0


def test_a_full_queue_refuses_before_reading_the_images(checkpoints, pngs):
    """Under overload the refusal comes first: a request is not parsed (nor its images checked) only to be
    refused, so a body that would be a 400 or 422 gets the 503 too, and the refusal reserves nothing."""
    app = create_app(settings_for(checkpoints, "tiny", max_queue=4, max_images_per_request=2))

    async def main():
        async with serve(app) as client:
            served = app.state.vit.models["tiny"]
            with served.batcher.admit(served.batcher.max_queue):  # the queue is full
                refused = [
                    await classify(client, b"not an image at all"),
                    await client.post(
                        "/v1/classify", content=b"--x--", headers={"content-type": "multipart/form-data"}
                    ),
                    await client.post("/v2/models/tiny/infer", content=b"{not json"),
                ]
                depth = served.batcher.depth
            return refused, depth, await classify(client, b"not an image at all"), await classify(client, pngs[0])

    refused, depth, bad_after, good_after = asyncio.run(main())
    for r in refused:
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert refused[0].json()["error"]["code"] == "overloaded"
    assert depth == 4  # only the test's own reservation: the refusals held no room
    assert bad_after.status_code == 400  # with room again, the same body is read and refused for what it is
    assert good_after.status_code == 200


def test_a_truncated_jpeg_fails_alone_beside_good_requests(checkpoints, real_photos, pngs):
    app = create_app(settings_for(checkpoints, "tiny", max_wait_ms=100), loader=wrapping_loader(delay=0.05))
    jpeg = encode(real_photos["coffee"], "JPEG")

    async def main():
        async with serve(app) as client:
            good = [classify(client, p) for p in pngs]
            bad = classify(client, jpeg[: len(jpeg) // 2], **{"content-type": "image/jpeg"})
            return await asyncio.gather(good[0], good[1], bad, good[2], good[3])

    answers = asyncio.run(main())
    assert [r.status_code for r in answers] == [200, 200, 400, 200, 200]
    assert answers[2].json()["error"]["code"] == "invalid_image"


def test_the_server_keeps_answering_after_a_decoding_process_is_killed(checkpoints, pngs):
    app = create_app(settings_for(checkpoints, "tiny", decode_pool="process", decode_workers=2))

    async def main():
        async with serve(app) as client:
            decoder = app.state.vit.decoder
            pool = decoder._pool
            workers = list(pool._processes.values())
            for worker in workers:  # the OOM killer's way, both at once
                with contextlib.suppress(ProcessLookupError):  # the pool may have stopped it on seeing the other die
                    os.kill(worker.pid, signal.SIGKILL)
            for worker in workers:
                worker.join(10)
            # requests only once the pool knows it is broken: images handed to it before then could fill the pipe to
            # the dead workers, where Python 3.11.2's feeder thread then blocks for good (the process never exits)
            for _ in range(1000):
                if pool._broken:
                    break
                await asyncio.sleep(0.01)
            answers = await asyncio.gather(*(classify(client, p) for p in pngs))
            return answers, (await client.get("/metrics")).text

    answers, text = asyncio.run(main())
    assert [r.status_code for r in answers] == [200] * len(pngs)
    assert metric(text, "vit_decoder_restarts_total") == 1


def test_a_forward_fault_is_split_off_and_fails_alone_with_500(checkpoints, pngs):
    created = []
    app = create_app(
        settings_for(checkpoints, "tiny", max_wait_ms=200, max_batch_size=8),
        loader=wrapping_loader(created, poison=True),
    )

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()
            jobs = [classify(client, p) for p in pngs]
            jobs.insert(2, classify(client, white(), **{"X-Request-ID": "poisoned-1"}))
            return await asyncio.gather(*jobs), (await client.get("/metrics")).text

    answers, text = asyncio.run(main())
    assert [r.status_code for r in answers] == [200, 200, 500, 200, 200]
    err = answers[2].json()["error"]
    assert err["code"] == "internal_error" and "poisoned-1" in err["message"]  # the request id, for a report
    assert "injected" not in err["message"]  # no internals leak to the client
    sizes = created[0].batch_sizes
    assert sizes[0] == 5 and sizes.count(1) >= 1  # one forward for all five, then halves down to the culprit
    assert metric(text, "vit_requests_total", endpoint="/v1/classify", status="500") == 1
    assert metric(text, "vit_requests_total", endpoint="/v1/classify", status="200") == 4


def test_a_device_lost_for_good_stops_the_server_with_503s_not_500s(checkpoints, pngs):
    created, fatal = [], []
    app = create_app(
        settings_for(checkpoints, "tiny", max_wait_ms=200, max_batch_size=8),
        loader=wrapping_loader(created, sticky=True),
        on_fatal=fatal.append,
    )

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()
            jobs = [classify(client, p) for p in pngs]
            jobs.insert(2, classify(client, white()))
            answers = await asyncio.gather(*jobs)
            await asyncio.sleep(0.05)  # the forward thread hands the news to the event loop
            later = await classify(client, pngs[0])
            return answers, later, await client.get("/readyz"), await client.get("/healthz")

    answers, later, readyz, healthz = asyncio.run(main())
    # the batch that met the fault is not split into single-image retries that all fail: its requests, and
    # every one after it, get 503 and are told to go elsewhere; none gets a 500
    assert [r.status_code for r in answers] == [503] * 5 and created[0].batch_sizes == [5]
    assert all(r.json()["error"]["code"] == "not_ready" for r in answers)
    assert later.status_code == 503 and "illegal memory access" in later.json()["error"]["message"]
    assert readyz.status_code == 503 and healthz.status_code == 200  # until the process has exited
    assert len(fatal) == 1 and "'tiny'" in fatal[0] and "illegal memory access" in fatal[0]


def test_a_forward_that_hangs_stops_the_server(checkpoints, pngs):
    # a forward that does not end (a GPU kernel that never returns) cannot be retried or interrupted: once it has
    # run past --forward-timeout-s the server takes no more requests and asks to be restarted
    created, fatal = [], []
    settings = settings_for(checkpoints, "tiny", forward_timeout_s=0.3, warmup=False, max_wait_ms=0)
    app = create_app(settings, loader=wrapping_loader(created, delay=1.5), on_fatal=fatal.append)

    async def main():
        async with serve(app) as client:
            hung = asyncio.ensure_future(classify(client, pngs[0]))
            await asyncio.sleep(0.8)  # past the limit and the watchdog's next look, before the forward ends
            answered_early = hung.done()
            later, readyz = await classify(client, pngs[1]), await client.get("/readyz")
            return later, readyz, await hung, answered_early

    later, readyz, hung, answered_early = asyncio.run(main())
    assert len(fatal) == 1 and "'tiny'" in fatal[0] and "--forward-timeout-s 0.3" in fatal[0]
    assert later.status_code == 503 and later.json()["error"]["code"] == "not_ready"
    assert "hangs" in later.json()["error"]["message"] and readyz.status_code == 503
    # the request stuck in that forward is answered then, not when its timeout or the shutdown ends it
    assert answered_early and hung.status_code == 503 and hung.json()["error"]["code"] == "not_ready"
    assert "the device hangs" in hung.json()["error"]["message"]


def test_a_slow_forward_within_the_limit_is_not_a_hang(checkpoints, pngs):
    fatal = []
    settings = settings_for(checkpoints, "tiny", forward_timeout_s=1.0, warmup=False, max_wait_ms=0)
    app = create_app(settings, loader=wrapping_loader(delay=0.5), on_fatal=fatal.append)

    async def main():
        async with serve(app) as client:
            answers = [await classify(client, p) for p in pngs[:2]]
            return answers, await client.get("/readyz")

    answers, readyz = asyncio.run(main())
    assert [r.status_code for r in answers] == [200, 200] and readyz.status_code == 200 and fatal == []


def test_504_timeout_drops_the_work(checkpoints, pngs):
    created = []
    settings = settings_for(checkpoints, "tiny", request_timeout_s=0.3, max_batch_size=1, max_wait_ms=0)
    app = create_app(settings, loader=wrapping_loader(created, delay=0.5))

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()
            answers = await asyncio.gather(*(classify(client, p) for p in pngs))
            await asyncio.sleep(0.6)  # let the forward that was running end
            return answers, (await client.get("/metrics")).text

    answers, text = asyncio.run(main())
    for r in answers:
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert len(created[0].batch_sizes) < 4  # the queued ones were dropped, never run
    assert metric(text, "vit_queue_depth", model="tiny") == 0


def test_a_client_that_disconnects_has_its_queued_work_dropped(checkpoints, pngs):
    created = []
    settings = settings_for(checkpoints, "tiny", max_batch_size=1, max_wait_ms=0, lanes=1)  # one forward at a time
    app = create_app(settings, loader=wrapping_loader(created, delay=0.4))

    async def main():
        async with serve(app) as client:
            created[0].batch_sizes.clear()
            busy = asyncio.create_task(classify(client, pngs[0]))  # holds the forward
            await until(lambda: created[0].batch_sizes)
            gone = asyncio.Event()
            leaving = asyncio.create_task(asgi_call(app, "POST", "/v1/classify", RAW, [pngs[1]], disconnect=gone))
            batcher = app.state.vit.models["tiny"].batcher
            await until(lambda: batcher._queue or batcher._running == 2)  # decoded, waiting behind the busy one
            depth_while_queued = metric((await client.get("/metrics")).text, "vit_queue_depth", model="tiny")
            gone.set()
            out = await leaving
            await busy
            await asyncio.sleep(0.5)
            return depth_while_queued, out, (await client.get("/metrics")).text

    depth, out, text = asyncio.run(main())
    assert depth == 2
    assert out["status"] is None  # nobody to answer
    assert created[0].batch_sizes == [1]  # only the first request ever ran
    assert metric(text, "vit_queue_depth", model="tiny") == 0
    assert metric(text, "vit_requests_total", endpoint="/v1/classify", status="499") == 1


def test_not_ready_while_a_slow_model_loads(checkpoints, pngs):
    release = threading.Event()

    def slow(spec, settings, models_dir):
        release.wait(30)
        return engine_loader(spec, settings, models_dir)

    app = create_app(settings_for(checkpoints, "tiny", "other"), loader=slow)

    async def main():
        async with serve(app, wait=False) as client:
            seen = {
                "healthz": await client.get("/healthz"),
                "readyz": await client.get("/readyz"),
                "classify": await classify(client, pngs[0]),
                "models": await client.get("/v1/models"),
            }
            release.set()
            for _ in range(500):
                ready = await client.get("/readyz")
                if ready.status_code == 200:
                    break
                await asyncio.sleep(0.02)
            return seen, ready, await classify(client, pngs[0])

    seen, ready, after = asyncio.run(main())
    assert seen["healthz"].status_code == 200
    for key in ("readyz", "classify", "models"):
        assert seen[key].status_code == 503 and seen[key].json()["error"]["code"] == "not_ready"
    assert "loading" in seen["readyz"].json()["error"]["message"]
    assert ready.json() == {"status": "ready", "models": ["tiny", "other"]}
    assert after.status_code == 200


def test_a_model_that_cannot_load_is_fatal_with_one_message(checkpoints, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    fatal: list[str] = []
    settings = settings_for(checkpoints, "tiny")
    settings = settings.model_copy(update={"model": [*settings.model, f"broken={bad}"]})
    app = create_app(settings, on_fatal=fatal.append)

    async def main():
        async with serve(app, wait=False) as client:
            for _ in range(500):
                if fatal:
                    break
                await asyncio.sleep(0.02)
            return await client.get("/readyz")

    readyz = asyncio.run(main())
    assert len(fatal) == 1 and "\n" not in fatal[0]
    assert str(bad) in fatal[0] and "'broken'" in fatal[0]
    assert readyz.status_code == 503 and str(bad) in readyz.json()["error"]["message"]


def test_two_models_with_one_name_are_a_start_up_error(checkpoints):
    fatal: list[str] = []
    s = settings_for(checkpoints, "tiny")
    s = s.model_copy(update={"model": [f"same={checkpoints['tiny']}", f"same={checkpoints['other']}"]})
    app = create_app(s, on_fatal=fatal.append)

    async def main():
        async with serve(app, wait=False):
            for _ in range(500):
                if fatal:
                    return
                await asyncio.sleep(0.02)

    asyncio.run(main())
    assert len(fatal) == 1 and "two models are named 'same'" in fatal[0]


def test_draining_turns_readiness_off_and_refuses_new_work(checkpoints, pngs):
    app = create_app(settings_for(checkpoints, "tiny"))

    async def main():
        async with serve(app) as client:
            before = await classify(client, pngs[0])
            app.state.vit.begin_drain()  # what SIGTERM does (see tests/test_main.py for the real signal)
            return before, await client.get("/readyz"), await classify(client, pngs[0]), await client.get("/healthz")

    before, readyz, refused, healthz = asyncio.run(main())
    assert before.status_code == 200 and healthz.status_code == 200
    assert readyz.status_code == 503 and "shutting down" in readyz.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"


def test_metrics_names_and_labels(client, pngs):
    client.get("/v1/models/tiny")
    client.post("/v1/embed?model=headless", content=pngs[0], headers=RAW)
    client.get("/nowhere")
    text = client.get("/metrics").text
    assert metric(text, "vit_requests_total", endpoint="/v1/models/{name}", status="200") >= 1
    assert metric(text, "vit_requests_total", endpoint="unmatched", status="404") >= 1
    assert metric(text, "vit_request_duration_seconds_count", endpoint="/v1/embed") >= 1
    assert metric(text, "vit_images_total", model="headless", endpoint="/v1/embed") >= 1
    assert metric(text, "vit_batch_size_count", model="headless") >= 1
    assert "vit_queue_depth" in text
    for name in ("tiny", "other", "headless"):
        assert metric(text, "vit_model_load_seconds", model=name) > 0


def test_the_model_repository_is_served_default_first(tiny_models_dir, real_photos):
    settings = Settings(models_dir=str(tiny_models_dir), device="cpu", dtype="float32", decode_workers=0)
    app = create_app(settings)

    async def main():
        async with serve(app) as client:
            return await client.get("/readyz"), await client.post(
                "/v1/embed", content=encode(real_photos["chelsea"]), headers=RAW
            )

    readyz, embedded = asyncio.run(main())
    assert readyz.json()["models"] == ["beta", "alpha"]  # DEFAULT names beta
    assert embedded.json()["model"] == "beta"


def test_image_sizes_beyond_the_input_are_resampled(client):
    tall = encode(Image.new("RGB", (3, 900), (10, 200, 30)))
    r = client.post("/v1/classify", content=tall, headers=RAW)
    assert r.status_code == 200


def test_a_bug_becomes_a_500_envelope_with_the_request_id_never_a_traceback(checkpoints):
    class Buggy:
        def __init__(self, model):
            self._model = model

        def __getattr__(self, name):
            return getattr(self._model, name)

        def __call__(self, *args, **kwargs):
            return self._model(*args, **kwargs)

        @property
        def info(self):
            raise KeyError("a bug in the server")

    app = create_app(settings_for(checkpoints, "tiny"), loader=lambda *a: Buggy(engine_loader(*a)))

    async def main():
        async with serve(app) as client:
            return await client.get("/v1/models", headers={"X-Request-ID": "bug-1"}), await client.get("/healthz")

    r, healthz = asyncio.run(main())
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json() == {"error": {"code": "internal_error", "message": r.json()["error"]["message"]}}
    assert "bug-1" in r.json()["error"]["message"] and "Traceback" not in r.text and "KeyError" not in r.text
    assert healthz.status_code == 200  # the server carries on
