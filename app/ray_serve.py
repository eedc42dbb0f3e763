"""Ray Serve: the very same FastAPI app (/v1, /v2, health, metrics, the page) in every replica, behind Ray's proxy.

A replica is exactly one plain `vit-serve` process: its own models, batchers, decode pool and metrics, nothing
shared. `serve.ingress` is handed a builder function that runs inside the replica, so only the settings cross
from the driver, and `create_app` builds everything where it will run.

- GPUs: a replica asks Ray for one GPU when the device is CUDA (or `auto` on a cluster that has GPUs). Ray
  sets CUDA_VISIBLE_DEVICES for it, so inside the replica the device is "cuda".
- Autoscaling on ongoing requests: by default from 1 to 4 replicas, aiming at about one full batch of requests
  in flight per replica (`target_ongoing_requests` = the batch size), so batches fill before Ray scales out.
- Readiness: the replica's start-up (the ASGI lifespan that Ray runs) returns only once every model is loaded
  and warm, so Ray routes nothing to a cold replica; a model that cannot load fails the replica with its
  message, and `check_health` keeps reporting it.
- Draining: Ray stops routing to a replica it retires, waits for its ongoing requests up to
  `graceful_shutdown_timeout_s` (above `request_timeout_s`, so every accepted request is answered or gets
  its 504), then runs the app's shutdown (batchers stopped, decode pool closed).
- Each response names its replica in `X-Served-By` ("<Ray actor name> pid=<pid>"); the plain server has no
  such header.

    serve run deploy/ray/serve_config.yaml                          # the config file in the repository
    serve run app.ray_serve:app_builder model=vit=/models/my_vit    # or arguments on the command line

or from Python: `serve.run(build_app(Settings(model=[...]), num_replicas=2))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.factory import create_app
from app.http.state import ServerState
from app.settings import Settings

DEPLOYMENT = "vitserve"
SERVED_BY = "x-served-by"


class ServedBy:
    """Pure-ASGI middleware: every HTTP response carries the replica's name.

    Ray's proxy gives each request an `X-Request-ID` (the client's own when it sent one), which our request
    middleware adopts, and echoes it on the response itself; ours is dropped when it is that same id, so the
    client sees it once.
    """

    def __init__(self, app: ASGIApp, name: str):
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[SERVED_BY] = self.name
                if given and headers.get("x-request-id") == given:
                    del headers["x-request-id"]  # the proxy adds it back
            await send(message)

        await self.app(scope, receive, send_named)


def replica_name() -> str:
    """The replica's Ray actor name (unique per replica, new when Ray replaces one) and its process id."""
    import ray

    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    return f"{name or 'vitserve'} pid={os.getpid()}"


async def until_ready(state: ServerState, poll_s: float = 0.05) -> None:
    """Return once every model is loaded and warm; raise the load error if one cannot be loaded."""
    while not state.ready:
        if state.load_error:
            raise RuntimeError(state.load_error)
        await asyncio.sleep(poll_s)


def replica_app(settings: Settings) -> FastAPI:
    """The plain server's app, whose start-up waits for the models and whose responses name the replica."""
    app = create_app(settings)
    app.add_middleware(ServedBy, name=replica_name())
    serve_models = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        async with serve_models(a):
            await until_ready(a.state.vit)
            yield

    app.router.lifespan_context = lifespan
    return app


def replica_gpus(settings: Settings) -> int:
    """GPUs one replica asks Ray for: one on CUDA, none on the CPU; `auto` follows the cluster's resources."""
    if settings.device == "cpu":
        return 0
    if settings.device.startswith("cuda"):
        return 1
    import ray

    return int(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)


def deployment(settings: Settings, num_replicas: int | None = None, **options: Any) -> Deployment:
    """The Serve deployment for these settings: a fixed `num_replicas`, or autoscaling when None.

    `options` override any `serve.deployment` option (a config file's `deployments:` entry does the same).
    """
    gpus = replica_gpus(settings)
    # only what was set explicitly travels; the replica reads its own VIT_* variables for the rest
    fields = settings.model_dump(exclude_unset=True)
    if gpus and settings.device.startswith("cuda"):
        fields["device"] = "cuda"  # Ray makes the replica's GPU device 0
    batch = settings.batch_size_for("cuda" if gpus else "cpu")
    defaults: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus},
        # enough requests in flight per replica for the batcher to fill batches; its own queue limit
        # (max_queue, 503 overloaded) stays the real bound
        "max_ongoing_requests": max(32, 4 * batch),
        "graceful_shutdown_wait_loop_s": 2.0,
        "graceful_shutdown_timeout_s": settings.request_timeout_s + 15.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if num_replicas is None:
        defaults["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": batch,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
        }
    else:
        defaults["num_replicas"] = num_replicas
    defaults.update(options)

    def build() -> FastAPI:  # runs in the replica
        return replica_app(Settings(**fields))

    @serve.ingress(build)
    class VitServe:
        def check_health(self) -> None:
            state = self.app.state.vit  # type: ignore[attr-defined]
            if problem := state.load_error or state.device_error:  # Ray then replaces this replica
                raise RuntimeError(problem)

    return serve.deployment(VitServe, **defaults)


def build_app(settings: Settings, num_replicas: int | None = None, **options: Any) -> Application:
    """The Serve application: `serve.run(build_app(settings))`."""
    return deployment(settings, num_replicas, **options).bind()


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run` / `serve deploy`: `args` are Settings fields (as in a config file's `args:` or
    `key=value` on the command line), plus an optional `num_replicas` (default: autoscaling)."""
    args = dict(args)
    num_replicas = args.pop("num_replicas", None)
    settings = Settings(**args)
    return build_app(settings, int(num_replicas) if num_replicas is not None else None)
