"""`--workers N`: one supervisor process and N server processes (`app.worker`) on one listening socket.

The HTTP side of one Python process tops out at a few thousand requests a second (issue 6); N workers each
run the whole server (their own models, batchers, decode pool) and share the port.

Choices, and why:
- One socket, bound and put to listening here and handed to every worker (what uvicorn's and gunicorn's
  supervisors do), rather than SO_REUSEPORT: the port opens at once, before any worker has imported torch,
  and connections wait in the kernel's queue meanwhile; a bind error (port in use) is one line from one
  process; port 0 needs no second lookup; and a worker that dies leaves no connection behind in a queue of
  its own (with SO_REUSEPORT the kernel drops what it had queued for that socket). The kernel wakes the
  workers that wait on the socket and the first free one accepts, so an idle worker takes the next
  connection. Keep-alive connections stay with the worker that accepted them.
- Workers are spawned, never forked: fork after torch has started its OpenMP or CUDA runtime is unsafe,
  and this module imports neither torch nor the app. Settings travel pickled, exactly as parsed (flags
  included), with the port the socket actually got.
- Threads: unless OMP_NUM_THREADS is set, each worker gets max(1, CPUs // N) intra-op threads, so N
  forwards at once do not oversubscribe the cores. Each worker still starts its own decode pool of
  --decode-workers.
- Metrics: a fresh private PROMETHEUS_MULTIPROC_DIR for this run (a stale one would add old counts), set
  before the workers import prometheus-client, removed on exit; a worker's live gauges are dropped when
  it exits (`mark_process_dead`), its counters stay in the totals. See app/metrics.py.
- Lifecycle: SIGTERM/SIGINT -> every worker drains (GracefulServer) and the supervisor exits 0 when all
  exit 0; a second signal forces the workers' exit, a third kills them. A worker that exits before it is
  ready (a model that cannot be loaded) stops the others and the supervisor exits 1 with one line. A worker
  that dies once ready is replaced; the replacement joins the socket when its models are ready.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from app.metrics import MULTIPROC_ENV
from app.settings import Settings, available_cpus

log = logging.getLogger("vitserve")
STARTUP_FAILURE = 3  # uvicorn's exit status when it cannot listen, so one process and N fail alike
KILL_AFTER_FATAL_S = 30.0  # beyond the drain timeout: workers still loading when another failed


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
    """Serve with `settings.workers` processes until stopped; the exit status (0, 1, or 3: cannot listen)."""
    from app.__main__ import log_config

    logging.config.dictConfig(log_config(settings.log_level, pid=True))
    try:
        sock = listen(settings.host, settings.port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return STARTUP_FAILURE
    metrics_dir = tempfile.mkdtemp(prefix="vitserve-metrics-")
    try:
        port = sock.getsockname()[1]
        os.environ.update(worker_environment(settings.workers, metrics_dir))
        return Supervisor(settings.model_copy(update={"port": port}), sock, metrics_dir).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def listen(host: str, port: int) -> socket.socket:
    """The shared listening socket (as uvicorn binds it: SO_REUSEADDR, IPv6 when the host says so)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


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
                "supervisor: %d workers (pids %s) on http://%s:%d; metrics from all of them in %s",
                len(self.workers),
                pids,
                self.settings.host,
                self.settings.port,
                self.metrics_dir,
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
        from app.worker import run_worker  # only a reference: the module is imported in the child

        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=run_worker,
            args=(self.settings, self.sock, theirs, os.getpid(), hold),
            name=f"vitserve-worker-{index}",
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
