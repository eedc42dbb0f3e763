"""One of the N server processes of `--workers N`: started (spawned) by `app.supervisor`, never imported by it.

A worker is a plain `vit-serve` process (its own models, batchers, decode pool; `app.__main__.serve`) on
the socket the supervisor opened, with three additions that `WorkerServer` makes to `GracefulServer`:
- it obeys the supervisor over a pipe: "drain" starts the graceful drain (idempotent, so a worker that got
  the signal itself as well, from a terminal's Ctrl-C or systemd's control-group kill, still drains once),
  "exit" forces the exit; it tells the supervisor "ready" once its models are warm, and "fatal" with the
  one-line message when a model cannot be loaded (the supervisor logs that line, the worker does not) or when
  its device fails for good or hangs while serving (then it exits 1 and the supervisor starts a new one);
- a replacement worker (one started after another died) joins the shared socket only once its models are
  ready, so the load balancer never meets a loading worker beside ready ones;
- a worker whose supervisor has gone (SIGKILL) drains and exits rather than serve on, unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from functools import partial
from multiprocessing.connection import Connection

import uvicorn

from app.http.server import GracefulServer
from app.http.state import ServerState
from app.settings import Settings

log = logging.getLogger("vitserve")


class WorkerServer(GracefulServer):
    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        drain_timeout_s: float = 60.0,
        *,
        control: Connection,
        supervisor_pid: int,
        hold: bool = False,
    ):
        super().__init__(config, state, drain_timeout_s)
        self.control = control
        self.supervisor_pid = supervisor_pid
        self.hold = hold  # join the socket only once ready (a replacement worker)
        self._held: list[socket.socket] = []
        self._told_ready = False
        self._orphaned = False
        # The supervisor logs a load failure once, for all workers (it gets the message through the pipe).
        logging.getLogger("vitserve").addFilter(_not_the_load_error)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.hold and sockets:
            self._held, sockets = list(sockets), []
        await super().startup(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        self._obey_supervisor(check_parent=counter % 10 == 0)
        if self.state.ready and not self._told_ready:
            self._told_ready = True
            if self._held and not self.state.draining:
                await self._listen(self._held)
            self.tell("ready")
        return await super().on_tick(counter)

    def tell(self, *message: str) -> None:
        _tell(self.control, *message)

    def _obey_supervisor(self, check_parent: bool) -> None:
        try:
            while self.control.poll():
                self._obey(self.control.recv()[0])
        except (EOFError, OSError):
            self._supervisor_gone()
        if check_parent and os.getppid() != self.supervisor_pid:
            self._supervisor_gone()

    def _obey(self, order: str) -> None:
        if order == "drain" and self._drain_started is None and not self.should_exit:
            self.handle_exit(signal.SIGTERM, None)
        elif order == "exit":
            self.should_exit = self.force_exit = True

    def _supervisor_gone(self) -> None:
        if not self._orphaned:
            self._orphaned = True
            log.warning("the supervisor has gone; draining")
            self._obey("drain")

    async def _listen(self, sockets: list[socket.socket]) -> None:
        """What uvicorn's startup does with the sockets it is given, done later."""
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
            )

        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog)
            self.servers.append(server)


def _not_the_load_error(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.funcName == "load_all")


def run_worker(settings: Settings, sock: socket.socket, control: Connection, supervisor_pid: int, hold: bool) -> None:
    """The worker process's entry point (a `multiprocessing` spawn target)."""
    # Until uvicorn installs its handlers, the supervisor's "drain" (read once serving) is the way to stop:
    # a Ctrl-C meant for the supervisor must not end a worker with a traceback halfway through its imports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from app.__main__ import exit_process, serve

    make = partial(WorkerServer, control=control, supervisor_pid=supervisor_pid, hold=hold)
    code = serve(settings, sockets=[sock], make_server=make, report_fatal=lambda m: _tell(control, "fatal", m))
    exit_process(code)


def _tell(control: Connection, *message: str) -> None:
    with contextlib.suppress(OSError):  # the supervisor has gone; WorkerServer notices on its next tick
        control.send(message)
