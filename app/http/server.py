"""uvicorn's Server with a graceful drain on SIGTERM.

uvicorn alone closes its listening socket at the first SIGTERM and then re-raises the signal, so the
process ends with status -15. Here the first SIGTERM (or SIGINT) only starts draining: /readyz turns 503,
new /v1 requests get 503 not_ready, and once every accepted request has been answered (or after
`drain_timeout_s`) uvicorn's own shutdown runs and the process exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from app.http.state import ServerState

log = logging.getLogger("vitserve")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float = 60.0):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._drain_started: float | None = None

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
