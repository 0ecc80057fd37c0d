"""The ingress's HTTP client to engine replicas, and the three ways a call can fail.

Why not a client library on this path: it is the ingress's hot path, paid once per
request and once per streamed token. Measured on one core of the 2-core EPYC this
project is developed on (a load generator on the other core, 64 concurrent plain
requests): a Starlette route answering from memory costs 87 µs of CPU a request, the
same route forwarding to an engine through aiohttp 307 µs — ~220 µs of aiohttp's own
per-request machinery (request and response objects, header multidicts, timers, the
connector), spread over some twenty functions with no setting that removes it. httpx
cost ~10× aiohttp per streamed event (benchmarks/relay.py, issue #13's table). What
the ingress needs is small: HTTP/1.1 with keep-alive to a few engine addresses, the
status and headers, then the body as it arrives. So this module keeps connections
itself (asyncio protocols, a pool per address) and leaves parsing to httptools, the C
HTTP parser uvicorn itself uses, which handles chunked bodies and keep-alive.

Every failure is reported as one of three kinds, because each calls for a different
answer from the pipeline:

- ``Refused``: no connection was made, so nothing reached the engine (try another).
- ``Broken``: the connection failed after the request may have been sent (a stale
  keep-alive connection, or an engine that died); generation has no side effects,
  so one more try is safe while nothing reached the client.
- ``TimedOut``: the engine did not answer in time.

A response is read with ``read_all`` or ``iter_chunks`` and ended with ``finish``:
given back to the pool when it was read to its end, otherwise closed — which is what
tells vLLM to abort a generation nobody will read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

# Body bytes held for a reader before the engine's socket stops being read: a client
# that reads slowly then holds back its engine stream, not the ingress's memory.
_HIGH_WATER = 256 * 1024
# Idle connections kept per engine address (more are closed when given back).
_MAX_IDLE = 512


class UpstreamError(Exception):
    """A call to an engine replica failed."""


class Refused(UpstreamError):
    pass


class Broken(UpstreamError):
    pass


class TimedOut(UpstreamError):
    pass


@lru_cache(maxsize=4096)
def _target(url: str) -> tuple[str, int, bytes, bytes]:
    """(host, port, request target, Host header) of an ``http://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target.encode("latin-1"), parts.netloc.encode("latin-1")


class UpstreamResponse:
    """An engine's answer: ``status`` and ``headers`` (lower-case names) once they are
    in, then the body as it arrives."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self._headers_in = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._error: UpstreamError | None = None
        self.complete = False  # the whole body arrived
        self._keep_alive = False
        self._ended = False  # given back or closed

    # -- fed by the connection ------------------------------------------------------

    def _header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def _headers_done(self, status: int) -> None:
        self.status = status
        if not self._headers_in.done():
            self._headers_in.set_result(None)

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _done(self, keep_alive: bool) -> None:
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        if not self._headers_in.done():
            self._headers_in.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- read by the pipeline --------------------------------------------------------

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, as the bytes arrive (all that arrived since the last one, each time)."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                self._conn.resume()
                yield data
            elif self.complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    def release(self) -> None:
        """Give the connection back for the next request (only a response read to its end)."""
        if self._ended:
            return
        if not (self.complete and self._keep_alive and self._error is None):
            self.close()
            return
        self._ended = True
        self._conn.idle()

    def close(self) -> None:
        """Close the connection: the engine sees it and aborts the request."""
        if self._ended:
            return
        self._ended = True
        self._fail(Broken("closed by the ingress"))
        self._conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, and the response being read on it."""

    def __init__(self, pool: Upstream, key: tuple[str, int]) -> None:
        self._pool, self.key = pool, key
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.response is not None:
                self.response._fail(Broken(f"bad HTTP from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._fail(Broken(str(exc) if exc else "the engine closed the connection"))

    # httptools callbacks (a response to the request sent last)
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._header(name, value)

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response._headers_done(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._body(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._done(self._parser.should_keep_alive())

    # the pool's
    def send(self, data: bytes, response: UpstreamResponse) -> None:
        self.response = response
        assert self._transport is not None
        self._transport.write(data)

    def pause(self) -> None:
        if not self._paused and self._transport is not None and not self.closed:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def idle(self) -> None:
        self.resume()
        self.response = None
        self.idle_since = time.monotonic()
        self._pool._give_back(self)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class Upstream:
    """Keep-alive connections to every replica, one pool per address; ``headers`` go
    with every request (the engine key)."""

    def __init__(self, connect_timeout_s: float = 2.0, keepalive_s: float = 4.0,
                 headers: Mapping[str, str] | None = None) -> None:
        # Under the engines' own keep-alive timeout (vLLM's uvicorn: 5 s), so a kept
        # connection is rarely one the engine is closing as it is reused.
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._default = b"".join(_field(k, v) for k, v in (headers or {}).items())
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def start(self) -> None:
        """Nothing to open in advance; here for the app's lifespan symmetry."""

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def _give_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _MAX_IDLE:
            conn.close()
        else:
            idle.append(conn)

    def _kept(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used first: the least likely to be stale
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), *key), self.connect_timeout_s)
        except asyncio.TimeoutError as exc:
            raise Refused(f"no connection to {key[0]}:{key[1]} within {self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise Refused(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
        return conn

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send a request and return once the answer's status and headers are in.

        The caller reads the body (``read_all`` or ``iter_chunks``) and must
        ``finish`` it. No read timeout: how long an answer may take is the request's
        deadline's business (pipeline.py); cancelling this call closes the connection.
        """
        host, port, target, host_header = _target(url)
        payload = body or b""
        head = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", host_header, b"\r\n",
                self._default]
        if headers:
            head += [_field(k, v) for k, v in headers.items()]
        head.append(b"content-length: %d\r\n\r\n" % len(payload))
        key = (host, port)
        conn = self._kept(key) or await self._connect(key)
        response = UpstreamResponse(conn)
        conn.send(b"".join(head) + payload, response)
        try:
            await response._headers_in
        except BaseException:
            response.close()
            raise
        return response

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


def _field(name: str, value: str) -> bytes:
    if "\r" in value or "\n" in value:  # a header value can't smuggle another header
        raise ValueError(f"header {name!r} has a line break")
    return f"{name}: {value}\r\n".encode("latin-1")


async def read_all(resp: UpstreamResponse) -> bytes:
    """The whole body of ``resp``; a broken connection is ``Broken``."""
    if resp.complete:  # a plain answer usually arrives with its headers
        chunks, resp._chunks = resp._chunks, []
        return b"".join(chunks)
    return b"".join([chunk async for chunk in resp.iter_chunks()])


def finish(resp: UpstreamResponse, complete: bool) -> None:
    """Give the connection back when the body was read to its end; else close it."""
    if complete:
        resp.release()
    else:
        resp.close()
