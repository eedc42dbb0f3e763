"""Start-up in the background: which models to serve, under which names; load, warm up, publish.

The lifespan starts `load_all` as a task and returns at once, so uvicorn opens the socket while the
models load; `/readyz` and `/v1/*` answer 503 not_ready until every model is warm. A model that cannot
be loaded ends the server: one log line naming the spec and the error, then `on_fatal(message)`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from app.batching import Batcher
from app.checkpoints.detect import default_models_dir, list_repository, model_name
from app.http.state import ServedModel, ServerState
from app.settings import ModelSpec, Settings

if TYPE_CHECKING:
    from app.engine import Model
    from app.runner import Runner

log = logging.getLogger("vitserve")

Loader = Callable[[ModelSpec, Settings, "Path | None"], "Model"]


class StartupError(Exception):
    """A configuration that cannot be served (duplicate names, an empty repository)."""


@dataclass(frozen=True)
class Planned:
    name: str
    spec: ModelSpec


def models_dir_of(settings: Settings) -> Path:
    return Path(settings.models_dir) if settings.models_dir else default_models_dir()


def plan(settings: Settings) -> list[Planned]:
    """The models to serve, in order (the first is the default), with their unique names."""
    specs = settings.model_specs()
    if not specs:
        repo = models_dir_of(settings)
        found = list_repository(repo)
        if not found:
            raise StartupError(f"no models to serve: the model repository {repo} holds none; pass --model SPEC")
        specs = [ModelSpec(str(folder), name, None, settings.global_image_size) for name, folder in found]
    planned = [Planned(s.name or model_name(s.spec), s) for s in specs]
    seen: dict[str, str] = {}
    for p in planned:
        if p.name in seen:
            raise StartupError(
                f"two models are named {p.name!r} ({seen[p.name]} and {p.spec.spec}); name them with --model NAME=SPEC"
            )
        seen[p.name] = p.spec.spec
    return planned


def engine_loader(spec: ModelSpec, settings: Settings, models_dir: Path | None) -> Model:
    """The default loader: `app.engine.load_model` with the settings' device and dtype."""
    from app.engine import load_model

    return load_model(
        spec.spec,
        arch=spec.arch,
        image_size=spec.image_size,
        device=settings.device,
        dtype=settings.dtype,
        models_dir=models_dir,
    )


def runner_for(state: ServerState, model: Model, max_batch_size: int) -> Runner:
    """The runner of `model`'s device, as the settings ask (on a worker thread: packing takes a moment)."""
    from app.runner import ThreadShare, make_runner

    settings = state.settings
    if state.thread_share is None:  # one per process: every model's lanes share the forward's threads
        state.thread_share = ThreadShare(settings.forward_threads)
    return make_runner(
        model,
        max_batch_size=max_batch_size,
        fast=settings.compile != "off",
        jpeg_decoder=settings.jpeg_decoder,
        share=state.thread_share,
        lanes=settings.lanes,
    )


def one_line(error: BaseException) -> str:
    """The error as one line; the type is kept unless the error is one of ours (already self-explanatory)."""
    text = " ".join(str(error).split())
    kind = type(error).__name__
    if isinstance(error, StartupError) or kind == "CheckpointError":
        return text or kind
    return f"{kind}: {text}" if text else kind


async def load_all(state: ServerState, loader: Loader) -> None:
    """Load, warm up and publish every model; on any failure log one line and call `state.on_fatal`."""
    settings = state.settings
    current = "start-up"
    try:
        planned = plan(settings)
        state.expected = len(planned)
        models_dir = models_dir_of(settings)
        if state.decoder is not None:
            await state.decoder.start()
        for p in planned:
            current = f"model {p.name!r} ({p.spec.spec})"
            served = await load_one(state, p, loader, models_dir)
            state.models[p.name] = served
            if state.default_model is None:
                state.default_model = p.name
        keep_out_of_garbage_collection()
        state.open()
        log.info("ready: serving %s (default %s)", ", ".join(state.models), state.default_model)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        message = f"cannot load {current}: {one_line(e)}" if current != "start-up" else f"start-up error: {one_line(e)}"
        state.load_error = message
        log.error("%s", message)
        if state.on_fatal is not None:
            state.on_fatal(message)


def device_lost(
    state: ServerState, loop: asyncio.AbstractEventLoop, name: str, model: Model, error: Exception
) -> str | None:
    """`Batcher(fatal=...)`, on the forward thread after `model`'s forward raised `error`: the reason when the
    device is lost for good (`Model.device_error`), and then the server stops (`ServerState.device_lost`) while
    the batch's requests get 503; None for any other failure (the batcher retries its halves)."""
    reason = model.device_error()
    if reason is None:
        return None
    message = f"model {name!r}: its device failed and cannot recover ({reason}); stopping for a new process"
    loop.call_soon_threadsafe(state.device_lost, message)
    return message


def forward_stalled(state: ServerState, name: str, seconds: float) -> None:
    """`Batcher(on_stall=...)`, on the event loop: a forward has run for longer than `--forward-timeout-s`. The
    device has hung (a GPU kernel that never returns), and nothing in this process can end that forward."""
    limit = state.settings.forward_timeout_s
    message = (
        f"model {name!r}: a forward has run for {seconds:.0f} s, past --forward-timeout-s {limit:g}; the device hangs"
    )
    state.device_lost(message)


def keep_out_of_garbage_collection() -> None:
    """Move everything alive after start-up (torch, the models, FastAPI's routes: some 360,000 objects) out of
    the garbage collector's sight. They live as long as the server, yet every full collection walked them all:
    about 200 ms each on a 2-core CPU with every thread stalled, every two seconds under load, which set the p99
    latency (bench/results/README.md, "Garbage collection"). `gc.unfreeze()` at shutdown gives them back."""
    gc.collect()
    gc.freeze()


async def load_one(state: ServerState, p: Planned, loader: Loader, models_dir: Path) -> ServedModel:
    settings, metrics = state.settings, state.metrics
    started = time.monotonic()
    model = await asyncio.to_thread(loader, p.spec, settings, models_dir)
    max_batch = settings.batch_size_for(model.device.type)
    runner = await asyncio.to_thread(runner_for, state, model, max_batch)
    if settings.lanes is not None and runner.lanes != settings.lanes:
        log.warning("model %s: --lanes applies on a CPU only; %d lane", p.name, runner.lanes)
    batcher = Batcher(
        runner,
        name=p.name,
        max_batch_size=max_batch,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        on_batch=metrics.batch_size.labels(p.name).observe,
        on_depth=metrics.queue_depth.labels(p.name).set,
        fatal=partial(device_lost, state, asyncio.get_running_loop(), p.name, model),
        stall_s=settings.forward_timeout_s,
        on_stall=partial(forward_stalled, state, p.name),
    )
    metrics.queue_depth.labels(p.name).set(0)  # present from the start, not from the first request
    batcher.start()
    try:
        if settings.warmup:  # without it, CUDA graphs are captured on first use
            await batcher.warmup()
    except BaseException:
        await batcher.stop()
        raise
    seconds = time.monotonic() - started
    metrics.load_seconds.labels(p.name).set(seconds)
    log.info(
        "model %s loaded from %s in %.2f s (max batch %d, lanes %d, %s)",
        p.name,
        p.spec.spec,
        seconds,
        max_batch,
        runner.lanes,
        runner.fast_path,
    )
    return ServedModel(p.name, model, batcher)
