"""The ingress's HTTP client to engine replicas, and the three ways a call can fail.

Why aiohttp here while the client library, probes in tests and benchmarks use httpx:
on the relay hot path (one SSE event per generated token) httpx cost ~260 µs of ingress
CPU per event on one core and aiohttp ~27 µs (benchmarks/relay.py; issue #13's table).
A 4-GPU box makes tens of thousands of events a second, so the upstream client, not
the engines, would have set the box's throughput.

Every failure is reported as one of three kinds, because each calls for a different
answer from the pipeline:

- ``Refused``: no connection was made, so nothing reached the engine (try another).
- ``Broken``: the connection failed after the request may have been sent (a stale
  keep-alive connection, or an engine that died); generation has no side effects,
  so one more try is safe while nothing reached the client.
- ``TimedOut``: the engine did not answer in time.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

import aiohttp

# What a read from a response being relayed raises when its connection breaks or is
# closed under it (the deadline closes it on purpose).
READ_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)


class UpstreamError(Exception):
    """A call to an engine replica failed; ``__cause__`` is aiohttp's exception."""


class Refused(UpstreamError):
    pass


class Broken(UpstreamError):
    pass


class TimedOut(UpstreamError):
    pass


def classify(exc: BaseException) -> UpstreamError | None:
    """The kind of failure ``exc`` is, or None when it is not a connection failure."""
    # Order matters: aiohttp's connect timeout is also a ServerTimeoutError, and a
    # refused connect is also a ClientOSError.
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return Refused(str(exc) or type(exc).__name__)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return TimedOut(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientError):
        return Broken(str(exc) or type(exc).__name__)
    return None


class Upstream:
    """One pooled aiohttp session to every replica, opened and closed with the app."""

    def __init__(self, connect_timeout_s: float = 2.0, keepalive_s: float = 30.0,
                 headers: Mapping[str, str] | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.headers = dict(headers or {})  # sent with every request (the engine key)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No pool limit: the ingress's own in-flight bounds decide how many requests
        # an engine gets; a client-side cap would queue them invisibly instead.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive_s)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(sock_connect=self.connect_timeout_s))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        """Send a request and return once the answer's headers are in.

        The caller reads the body (``read_all`` or ``response.content``) and must
        ``finish`` it. No read timeout: how long an answer may take is the request's
        deadline's business (pipeline.py), and aiohttp re-arms a read timer on every
        chunk received (~5 % of the relay's CPU in a profile at 256 streams).
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        try:
            return await self._session.request(method, url, data=body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - re-raised, classified
            kind = classify(exc)
            if kind is None:
                raise
            raise kind from exc

    async def fetch(self, method: str, url: str, *, body: bytes | None = None,
                    headers: Mapping[str, str] | None = None,
                    timeout_s: float) -> tuple[int, Mapping[str, str], bytes]:
        """A whole exchange (status, headers, body) within ``timeout_s``."""
        async def exchange() -> tuple[int, Mapping[str, str], bytes]:
            resp = await self.open(method, url, body=body, headers=headers)
            complete = False
            try:
                content = await read_all(resp)
                complete = True
                return resp.status, resp.headers, content
            finally:
                finish(resp, complete)

        try:
            return await asyncio.wait_for(exchange(), timeout_s)
        except asyncio.TimeoutError as exc:
            raise TimedOut(f"no answer within {timeout_s:g} s") from exc


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body of ``resp``; a broken connection is ``Broken``."""
    try:
        return await resp.read()
    except Exception as exc:  # noqa: BLE001 - re-raised, classified
        kind = classify(exc)
        if kind is None:
            raise
        raise kind from exc


def finish(resp: aiohttp.ClientResponse, complete: bool) -> None:
    """Give the connection back when the body was read to its end; else close it.

    Closing is what tells vLLM to abort a generation nobody will read.
    """
    if complete:
        resp.release()
    else:
        resp.close()
