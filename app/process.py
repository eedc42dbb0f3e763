"""The process: serving with uvicorn, the graceful drain, the one fatal path, and `--workers N`.

`run(settings)` serves until the server stops, then ends the process with its exit status: 0 after a clean or
graceful (SIGTERM) shutdown; 1 when a model cannot be loaded, or when its device fails for good or hangs while
serving (only a new process gets a working device); 3 when the port cannot be opened (uvicorn's own status).

One server process (`serve`) runs uvicorn's `Server` as `GracefulServer`:
- the first SIGTERM (or SIGINT) only starts draining: /readyz turns 503, new /v1 requests get 503 not_ready,
  and once every accepted request has been answered (or after --drain-timeout-s) uvicorn's own shutdown runs
  and the process exits 0 (uvicorn alone would close its socket at once and end with status -15). A second
  signal forces the exit.
- every fatal error of the app ends in `GracefulServer.on_fatal`: uvicorn's shutdown, then status 1.

`--workers N` (N > 1): one supervisor (`supervise`) and N server processes (`run_worker`) on one socket. The
HTTP side of one Python process tops out at a few thousand requests a second; N workers each run the whole
server (their own models, batchers, decode pool) and share the port. uvicorn's own supervisor restarts a worker
that exits with any status but 3 (so a fatal error would never end the service with status 1), and a worker of
its takes connections before its models are loaded. Ours:
- binds the socket and puts it to listening here (uvicorn's `Config.bind_socket`), then hands it to every
  worker, rather than SO_REUSEPORT: the port opens at once, before any worker has imported torch, and
  connections wait in the kernel's queue meanwhile; a bind error is one line from one process; and a worker
  that dies leaves no connection behind in a queue of its own. The first free worker accepts a connection;
  keep-alive connections stay with the worker that accepted them.
- spawns the workers, never forks them: fork after torch has started its OpenMP or CUDA runtime is unsafe, and
  the supervisor imports neither torch nor the app (it never calls `serve`). Settings travel pickled, exactly as
  parsed, with the port the socket actually got. Unless OMP_NUM_THREADS is set, each worker gets
  max(1, CPUs // N) intra-op threads.
- metrics: a fresh private PROMETHEUS_MULTIPROC_DIR for this run (a stale one would add old counts), set before
  the workers import prometheus-client, removed on exit; a worker's live gauges are dropped when it exits, its
  counters stay in the totals (app/metrics.py).
- talks to each worker over a pipe. The worker says "ready" once its models are warm, and "fatal" with the
  one-line reason (the supervisor logs a load failure once, for all workers). The supervisor orders "drain"
  (idempotent: a worker that got the signal itself too, from a terminal's Ctrl-C, drains once) and "exit".
- SIGTERM/SIGINT: every worker drains, and the supervisor exits 0 when all exit 0; a second signal forces their
  exit, a third kills them. A worker that fails before it is ready (a model that cannot be loaded) stops the
  others and the supervisor exits 1. A worker that dies once ready (killed, or its device failed for good) is
  replaced; the replacement joins the socket only once its models are ready, so it never takes a request it
  cannot answer. A worker whose supervisor has gone (SIGKILL) drains and exits rather than serve unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from app.connections import guarded_protocol, per_worker
from app.metrics import MULTIPROC_ENV
from app.settings import Settings, available_cpus

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from app.http.state import ServerState

log = logging.getLogger("vitserve")
GRACEFUL_SHUTDOWN_S = 5  # uvicorn's wait for open connections once the server stops
FATAL_EXIT_AFTER_S = GRACEFUL_SHUTDOWN_S + 10  # after a fatal error, the longest the shutdown may take
KILL_AFTER_FATAL_S = 30.0  # beyond the drain timeout: workers still loading when another failed


def run(settings: Settings) -> None:
    """Serve with `settings` until stopped, then exit the process with the status."""
    sleeping_openmp_threads(os.environ)
    if settings.workers > 1:
        sys.exit(supervise(settings))
    exit_process(serve(settings))


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


def uvicorn_config(settings: Settings, app: Any, pid: bool = False) -> uvicorn.Config:
    """uvicorn's configuration for `app` (creating it configures the logging)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level, pid=pid),
        access_log=False,  # our own middleware logs one line per request, with its id
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        http=guarded_protocol(per_worker(settings.max_connections, settings.workers), settings.header_timeout_s),
    )


# One server process


def serve(settings: Settings) -> int:
    """Run one server process, binding host:port itself, until it stops; its exit status (0 or 1)."""
    app = server_app(settings)
    server = GracefulServer(uvicorn_config(settings, app), app.state.vit, settings.drain_timeout_s)
    server.run()
    return server.exit_code


def server_app(settings: Settings) -> FastAPI:
    """The service, in a process whose forward threads are set. Imported here, never in the supervisor."""
    from app.http.factory import create_app
    from app.runner import set_threads

    set_threads(settings.forward_threads)  # deliberately: torch's default ignores a container's CPU quota
    return create_app(settings)


class GracefulServer(uvicorn.Server):
    """uvicorn's Server with the drain on SIGTERM and the fatal path (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float = 60.0):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._drain_started: float | None = None
        state.on_fatal = self.on_fatal  # every fatal error of the app (loading.py, ServerState.device_lost)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is not None or not self.started:
            # a second signal, or one before the socket opened: stop now, without re-raising the signal
            self.should_exit = True
            self.force_exit = self._drain_started is not None
            return
        self._drain_started = time.monotonic()
        self.state.begin_drain()
        log.info("signal %d: draining (%d requests in flight)", sig, self.state.inflight)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.state.inflight == 0 or waited > self.drain_timeout_s:
                if self.state.inflight:
                    log.warning("drain timeout: %d requests still in flight", self.state.inflight)
                self.should_exit = True
        return await super().on_tick(counter)

    def on_fatal(self, message: str) -> None:
        """A model cannot be loaded, or its device failed for good or hangs: uvicorn's own shutdown (which closes
        the decode pool and the batchers), then status 1."""
        self.exit_code = 1
        self.should_exit = True
        # should a thread stuck in a hung device hold the shutdown up (asyncio waits for its worker threads), leave
        # anyway once the shutdown has had its time
        deadline = threading.Timer(FATAL_EXIT_AFTER_S, exit_process, args=(1,))
        deadline.daemon = True
        deadline.start()


# A worker of `--workers N`: a spawned process


def run_worker(settings: Settings, sock: socket.socket, control: Connection, hold: bool) -> None:
    """A worker process's entry point. hold: join the socket only once ready (a replacement worker)."""
    # Until uvicorn installs its handlers, the supervisor's "drain" is the way to stop: a Ctrl-C meant for the
    # supervisor must not end a worker with a traceback halfway through its imports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("vitserve").addFilter(not_the_load_error)  # the supervisor logs it, once for all workers
    server = WorkerServer(settings, server_app(settings), sock, control, hold)
    server.run(sockets=server.listening)
    exit_process(server.exit_code)


def not_the_load_error(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.funcName == "load_all")


class WorkerServer(GracefulServer):
    """A GracefulServer that obeys the supervisor's orders, tells it "ready" and "fatal", and when held joins the
    socket only once its models are ready."""

    def __init__(self, settings: Settings, app: FastAPI, sock: socket.socket, control: Connection, hold: bool):
        self.control = control
        self.listening: list[socket.socket] = [] if hold else [sock]  # what uvicorn listens on
        served = self.hold_until_ready(app, sock) if hold else app
        super().__init__(uvicorn_config(settings, served, pid=True), app.state.vit, settings.drain_timeout_s)
        self._told_ready = False

    def hold_until_ready(self, app: ASGIApp, sock: socket.socket) -> ASGIApp:
        """`app`, its lifespan's start-up complete only once the models are ready. A server takes connections only
        after the start-up (ASGI's lifespan protocol): uvicorn then listens on `self.listening`, so the socket is
        added to it here, and never when the worker stops before it is ready."""

        async def held(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_once_ready(message: Message) -> None:
                if message["type"] == "lifespan.startup.complete":
                    while not (self.state.ready or self.should_exit):
                        await asyncio.sleep(0.1)
                    if not self.should_exit:
                        self.listening.append(sock)
                await send(message)

            await app(scope, receive, send_once_ready if scope["type"] == "lifespan" else send)

        return held

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's serve, with the supervisor's orders read from the start (also while a held worker loads)."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.control.fileno(), self.obey_supervisor)
        try:
            await super().serve(sockets=sockets)
        finally:
            loop.remove_reader(self.control.fileno())

    async def on_tick(self, counter: int) -> bool:
        if self.state.ready and not self._told_ready:
            self._told_ready = True
            self.tell("ready")
        return await super().on_tick(counter)

    def on_fatal(self, message: str) -> None:
        self.tell("fatal", message)
        super().on_fatal(message)

    def tell(self, *message: str) -> None:
        with contextlib.suppress(OSError):  # the supervisor has gone; obey_supervisor notices
            self.control.send(message)

    def obey_supervisor(self) -> None:
        try:
            while self.control.poll():
                self.obey(self.control.recv()[0])
        except (EOFError, OSError):  # the supervisor has gone (killed): its end of the pipe closed
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            log.warning("the supervisor has gone; draining")
            self.obey("drain")

    def obey(self, order: str) -> None:
        if order == "drain" and self._drain_started is None and not self.should_exit:
            self.handle_exit(signal.SIGTERM, None)
        elif order == "exit":
            self.should_exit = self.force_exit = True


# The supervisor of `--workers N`: never imports torch or the app


@dataclass
class Worker:
    index: int
    process: BaseProcess
    control: Connection
    ready: bool = False
    fatal: str | None = None  # why it stopped: a model that could not be loaded, a device that failed for good

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.process.pid})"


def supervise(settings: Settings) -> int:
    """Serve with `settings.workers` processes until stopped; the exit status (0 or 1; 3: cannot listen)."""
    config = uvicorn_config(settings, app=None, pid=True)  # the supervisor serves no app: its logging, its socket
    sock = config.bind_socket()  # logs where it listens; exits with status 3 when it cannot
    sock.listen(config.backlog)
    metrics_dir = tempfile.mkdtemp(prefix="vitserve-metrics-")
    try:
        port = sock.getsockname()[1]
        os.environ.update(worker_environment(settings.workers, metrics_dir))
        return Supervisor(settings.model_copy(update={"port": port}), sock, metrics_dir).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_environment(workers: int, metrics_dir: str) -> dict[str, str]:
    """What the workers find in their environment: the metrics directory, and their share of the CPUs."""
    env = {MULTIPROC_ENV: metrics_dir}
    if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // workers))
    return env


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, settings: Settings, sock: socket.socket, metrics_dir: str):
        self.settings = settings
        self.sock = sock
        self.metrics_dir = metrics_dir
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.pending_signals: list[int] = []
        self.signals_seen = 0
        self.stopping = False
        self.kill_at: float | None = None  # when stopping after a failure: the last moment to wait
        self.exit_code = 0
        self.all_ready_logged = False

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.workers = [self.start(i, hold=False) for i in range(self.settings.workers)]
            pids = ", ".join(str(w.process.pid) for w in self.workers)
            log.info(
                "supervisor: %d workers (pids %s); metrics of all in %s", len(self.workers), pids, self.metrics_dir
            )
            while self.workers:
                self.step()
        except BaseException:
            self.kill_all()  # never leave workers behind, serving unsupervised
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.exit_code

    def start(self, index: int, hold: bool) -> Worker:
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=run_worker, args=(self.settings, self.sock, theirs, hold), name=f"vitserve-worker-{index}"
        )
        process.start()
        theirs.close()
        return Worker(index, process, ours)

    def step(self) -> None:
        """Wait a little for a message, an exit or a signal, then act on each."""
        waitables: list = [w.control for w in self.workers] + [w.process.sentinel for w in self.workers]
        wait(waitables, timeout=0.2)
        while self.pending_signals:
            self.on_signal(self.pending_signals.pop(0))
        for worker in list(self.workers):
            self.read(worker)
        for worker in list(self.workers):
            if worker.process.exitcode is not None:
                self.on_exit(worker)
        if self.kill_at is not None and time.monotonic() > self.kill_at:
            self.kill_at = None
            log.warning("supervisor: workers still running %.0f s after a failure; killing them", KILL_AFTER_FATAL_S)
            self.kill_all()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.pending_signals.append(sig)  # acted on in the loop, not inside the handler

    def on_signal(self, sig: int) -> None:
        self.signals_seen += 1
        if self.signals_seen == 1:
            log.info("supervisor: signal %d: draining %d workers", sig, len(self.workers))
            self.stop()
        elif self.signals_seen == 2:
            log.info("supervisor: signal %d again: forcing the workers' exit", sig)
            self.order_all("exit")
        else:
            self.kill_all()

    def stop(self) -> None:
        self.stopping = True
        self.order_all("drain")

    def order_all(self, order: str) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):  # it has just exited; on_exit will see it
                worker.control.send((order,))

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.process.exitcode is None:
                worker.process.kill()

    def read(self, worker: Worker) -> None:
        try:
            while worker.control.poll():
                kind, *rest = worker.control.recv()
                if kind == "ready":
                    self.on_ready(worker)
                elif kind == "fatal":
                    worker.fatal = rest[0]
                    # one that could not start stops them all (the others load the same models); one that was
                    # serving (its device failed for good) exits by itself and is replaced (`on_exit`)
                    if not self.stopping and not worker.ready:
                        self.fail(worker)
        except (EOFError, OSError):  # it exited; its sentinel says how
            pass

    def on_ready(self, worker: Worker) -> None:
        worker.ready = True
        if self.all_ready_logged:
            log.info("supervisor: %s ready", worker.name)
        elif all(w.ready for w in self.workers):
            self.all_ready_logged = True
            log.info("supervisor: all %d workers ready", len(self.workers))

    def on_exit(self, worker: Worker) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        self.workers.remove(worker)
        worker.control.close()
        code = worker.process.exitcode
        mark_process_dead(worker.process.pid, self.metrics_dir)
        if self.stopping:
            if code != 0 and not self.exit_code:
                log.warning("supervisor: %s %s", worker.name, describe_exit(code))
                self.exit_code = 1
            return
        if not worker.ready:
            self.fail(worker, code)
            return
        why = f" ({worker.fatal})" if worker.fatal else ""  # a device that failed for good, say
        log.warning("supervisor: %s %s%s; starting a new one", worker.name, describe_exit(code), why)
        self.workers.append(self.start(worker.index, hold=True))

    def fail(self, worker: Worker, code: int | None = None) -> None:
        """A worker could not start: the one line that says why, then every worker stops."""
        reason = worker.fatal or f"{worker.name} {describe_exit(code)} before it was ready"
        log.error("%s; stopping the workers", reason)
        self.exit_code = 1
        self.kill_at = time.monotonic() + self.settings.drain_timeout_s + KILL_AFTER_FATAL_S
        self.stop()
