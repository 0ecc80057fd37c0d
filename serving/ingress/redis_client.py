"""What the ingress's Redis users share: one way to connect, one way to complain.

The shared response cache (cache.py) and the shared per-key limits (redis_limits.py)
both treat Redis as optional help: a Redis that fails never fails a request, and the
failure is logged at most every 30 s, not once per request. The ``redis`` package is
imported only here and only when a Redis is configured (the ``redis`` extra).
"""

from __future__ import annotations

import logging
import time
from typing import Any


def connect(url: str, timeout_s: float) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class FailureLog:
    """A warning per failure kind at most every ``every_s`` seconds."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 30.0) -> None:
        self._logger, self._what, self._every_s = logger, what, every_s
        self._last = float("-inf")

    def __call__(self, op: str, exc: Exception, then: str) -> None:
        now = time.monotonic()
        if now - self._last > self._every_s:
            self._last = now
            self._logger.warning("%s: redis %s failed (%s: %s); %s", self._what, op,
                                 type(exc).__name__, exc, then)
