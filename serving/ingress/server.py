"""The HTTP server around the ingress app: uvicorn with the stack's options, and draining.

Used as it is by the launcher (one ingress process) and by each ingress worker
(``server.workers`` > 1), so a worker serves exactly as a lone ingress does.
"""

from __future__ import annotations

import asyncio
import signal
import time

import uvicorn

from ..config import ServerConfig
from .http_protocol import header_bounded
from .state import IngressState


def uvicorn_config(app, srv: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(app, host=srv.host, port=srv.port, log_level="warning",
                          access_log=False, timeout_graceful_shutdown=5,
                          timeout_keep_alive=30, backlog=4096,
                          http=header_bounded(srv.header_timeout_s))


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains instead of closing at once.

    Draining: /ready turns 503 and new requests get 503 immediately, in-flight
    requests finish (up to the drain timeout), then the server exits with code 0.
    A second Ctrl-C forces the exit.
    """

    def __init__(self, config: uvicorn.Config, state: IngressState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_timeout_s = drain_timeout_s
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:  # runs in the signal handler
        if self._drain_started:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Start draining (once; a launcher's word and a signal may both ask)."""
        if self._drain_started or self._loop is None:
            return
        self._drain_started = True
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        state = self._state
        state.draining = True
        state.ready_cache = None
        print(f"qwen-serve: draining (up to {self._drain_timeout_s:.0f}s for in-flight requests)",
              flush=True)
        deadline = time.monotonic() + self._drain_timeout_s
        while time.monotonic() < deadline:
            if state.own_in_flight == 0:
                break
            await asyncio.sleep(0.1)
        self.should_exit = True


def run_loop(main) -> int:
    """Run ``main`` on the event loop uvicorn would pick (uvloop where installed), the loop
    the relay benchmark measures, rather than asyncio's default."""
    factory = uvicorn.Config(app=None).get_loop_factory()
    if factory is None or not hasattr(asyncio, "Runner"):  # Python 3.10: asyncio's own loop
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
