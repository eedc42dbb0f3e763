"""The command line: `vit-serve [OPTIONS]` and `python -m app [OPTIONS]` start the server with uvicorn.

Flags become keyword arguments of `Settings`, so a flag wins over its `VIT_*` variable. The repeatable
`--model` / `--arch` / `--image-size` are paired here: `--arch` and `--image-size` belong to the `--model`
they follow; an `--image-size` before any `--model` applies to all. Given on the command line, the
model list replaces the variable's list; it never merges with it.

Exit status: 0 after a clean or graceful (SIGTERM) shutdown, 1 when a model cannot be loaded,
2 for a bad option. With `--workers N` (N > 1) a supervisor (`app.supervisor`) runs N of these servers on
one socket (`app.worker`); the exit statuses are the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from pydantic import ValidationError

from app.settings import Settings

log = logging.getLogger("vitserve")
GRACEFUL_SHUTDOWN_S = 5  # uvicorn's wait for open connections once the server stops
FATAL_EXIT_AFTER_S = GRACEFUL_SHUTDOWN_S + 10  # after a fatal error, the longest the shutdown may take

SCALARS = {
    # flag: (settings field, help)
    "--models-dir": ("models_dir", "the model repository (default ./models where it exists, else the bundled one)"),
    "--host": ("host", "address to listen on (default 127.0.0.1)"),
    "--port": ("port", "port to listen on (default 8000)"),
    "--device": ("device", "cpu, cuda, cuda:N or auto (default)"),
    "--dtype": ("dtype", "float32, bfloat16, float16, float8 (GPUs with float8 tensor cores) or auto (default)"),
    "--max-batch-size": ("max_batch_size", "most images in one forward pass (default 32 on a GPU, 8 on the CPU)"),
    "--max-wait-ms": ("max_wait_ms", "longest an image waits for its batch to fill (default 5)"),
    "--max-queue": ("max_queue", "per model: most images accepted and not yet answered (default 256)"),
    "--request-timeout-s": ("request_timeout_s", "per request, from the moment its body is read (default 30)"),
    "--max-upload-bytes": ("max_upload_bytes", "largest request body (default 20 MiB)"),
    "--max-images-per-request": ("max_images_per_request", "default 64"),
    "--max-image-pixels": ("max_image_pixels", "largest decoded width x height (default 40,000,000)"),
    "--api-key": ("api_key", "when set, every /v1 request needs 'Authorization: Bearer <key>'"),
    "--log-level": ("log_level", "debug, info (default), warning or error"),
    "--decode-workers": ("decode_workers", "decoding processes or threads (default min(4, CPUs); 0: inline)"),
    "--decode-pool": ("decode_pool", "auto (default: threads on <= 2 CPUs, else processes), process or thread"),
    "--jpeg-draft": ("jpeg_draft", "true (default) or false: JPEG DCT scaling for large images"),
    "--jpeg-decoder": ("jpeg_decoder", "auto (default: torchvision on a GPU), pil (exact) or torchvision (nvJPEG)"),
    "--warmup": ("warmup", "true (default) or false: run every batch size once before ready"),
    "--drain-timeout-s": ("drain_timeout_s", "after SIGTERM, longest wait for accepted requests (default 60)"),
    "--forward-timeout-s": ("forward_timeout_s", "a longer forward means a hung device: exit 1 (default 300; 0: off)"),
    "--compile": ("compile", "auto (default: oneDNN linears on a CPU, CUDA graphs on a GPU), on (torch.compile), off"),
    "--workers": ("workers", "server processes on one socket, each with its own models (default 1)"),
    "--threads": ("threads", "intra-op threads for the forward (default: the CPUs available, cgroup quota included)"),
    "--lanes": ("lanes", "CPU forwards of one model at once, sharing --threads (default 2 with 2+ threads; GPU: 1)"),
    "--data-dir": ("data_dir", "where the embedded PostgreSQL for collections lives (default ~/.local/share/vitserve)"),
    "--collections-url": ("collections_url", "a shared PostgreSQL with pgvector (postgresql://...) for collections"),
}


class _Ordered(argparse.Action):
    """Records (flag, value) in command-line order, so --arch/--image-size pair with their --model."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        namespace.ordered.append((self.dest, values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve Vision Transformer checkpoints over HTTP. Every option is also a VIT_<NAME> variable.",
    )
    p.set_defaults(ordered=[])
    p.add_argument("--model", dest="model", action=_Ordered, metavar="[NAME=]SPEC", help="a checkpoint (repeatable)")
    p.add_argument("--arch", dest="arch", action=_Ordered, help="architecture of the --model it follows")
    p.add_argument(
        "--image-size", dest="image_size", action=_Ordered, type=int, metavar="N", help="serve at N x N pixels"
    )
    for flag, (field, text) in SCALARS.items():
        p.add_argument(flag, dest=field, default=None, help=text)
    return p


def pair_models(ordered: list[tuple[str, Any]], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ordered --model/--arch/--image-size flags -> Settings kwargs (aligned lists)."""
    models: list[str] = []
    arches: list[str | None] = []
    sizes: list[int | None] = []
    global_size: int | None = None
    for dest, value in ordered:
        if dest == "model":
            models.append(value)
            arches.append(None)
            sizes.append(global_size)
        elif dest == "arch":
            if not models:
                parser.error("--arch must follow the --model it describes")
            arches[-1] = value
        elif not models:
            global_size = value
        else:
            sizes[-1] = value
    if models:
        return {"model": models, "arch": arches, "image_size": sizes}
    return {"image_size": [global_size]} if global_size is not None else {}


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The command line (and the environment) -> Settings; a bad option ends the process with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kwargs = pair_models(args.ordered, parser)
    for field, _ in SCALARS.values():
        value = getattr(args, field)
        if value is not None:
            kwargs[field] = value
    try:
        return Settings(**kwargs)
    except (ValidationError, ValueError) as e:
        parser.error(one_line(e))
        raise  # unreachable: parser.error exits


def one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for err in error.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = err.get("msg", "").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(error)


def log_config(level: str, pid: bool = False) -> dict:
    """uvicorn's logging configuration, with our 'vitserve' logger beside its own.

    pid: prefix every line with the process id (with --workers, several processes write to one stream).
    """
    from uvicorn.config import LOGGING_CONFIG

    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in LOGGING_CONFIG.items()}
    config["loggers"] = dict(config["loggers"])
    config["loggers"]["vitserve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if pid:
        config["formatters"] = {k: dict(v) for k, v in config["formatters"].items()}
        config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(process)d] %(message)s"
    return config


def serve(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
    make_server: Callable[..., Any] | None = None,
    report_fatal: Callable[[str], None] | None = None,
) -> int:
    """Run one server process until it stops; its exit status: 0, or 1 when a model cannot be loaded or its
    device fails for good while serving (a sticky CUDA error, or a forward past --forward-timeout-s: only a new
    process gets a working device).

    sockets: listening sockets opened by a supervisor (`--workers`), else uvicorn binds host:port itself.
    make_server(config, state, drain_timeout_s): the server class (default GracefulServer).
    report_fatal(message): also told of either.
    """
    import uvicorn

    from app.accel import set_threads
    from app.http import create_app
    from app.http.server import GracefulServer

    set_threads(settings.forward_threads)  # deliberately: torch's default ignores a container's CPU quota

    server: GracefulServer | None = None
    exit_code = 0

    def on_fatal(message: str) -> None:
        nonlocal exit_code
        exit_code = 1
        if report_fatal is not None:
            report_fatal(message)
        if server is not None:
            server.should_exit = True  # uvicorn's own shutdown follows (closes the pool), then exit 1
        # should a thread stuck in a hung device hold the shutdown up (asyncio waits for its worker threads), leave
        # anyway once the shutdown has had its time
        deadline = threading.Timer(FATAL_EXIT_AFTER_S, exit_process, args=(1,))
        deadline.daemon = True
        deadline.start()

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level, pid=sockets is not None),
        access_log=False,  # our own middleware logs one line per request, with its id
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = (make_server or GracefulServer)(config, app.state.vit, drain_timeout_s=settings.drain_timeout_s)
    server.run(sockets=sockets)
    return exit_code


def sleeping_openmp_threads(environ: MutableMapping[str, str]) -> None:
    """OpenMP threads that sleep rather than spin at a barrier, so the forward does not starve the event loop and
    the decode workers of the cores (bench/results/README.md, "Spinning"). Set before torch loads its OpenMP
    runtime; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT (for cores kept free for the forward) wins."""
    if "GOMP_SPINCOUNT" not in environ:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def exit_process(code: int) -> None:
    """Exit with `code`, once the server has closed what it opened (sockets, decode pool, batchers). What Python
    would still do at exit is join every thread pool's threads, and a forward thread stuck in a hung device would
    keep it waiting for ever: flush the logs and leave at once."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    sleeping_openmp_threads(os.environ)
    settings = parse_settings(argv)
    if settings.workers > 1:
        from app.supervisor import supervise  # imports no torch: the workers are spawned, never forked

        sys.exit(supervise(settings))
    started = time.monotonic()
    exit_code = serve(settings)
    log.debug("served for %.1f s", time.monotonic() - started)
    exit_process(exit_code)


if __name__ == "__main__":
    main()
