"""uvicorn's httptools protocol with a bound on how long a client may take to send headers.

Why: uvicorn waits for a request's headers without limit, and arms its keep-alive
timer only after a first response, so a client that opens connections and sends
nothing, or a header line every few seconds (slowloris), holds a socket and a file
descriptor each for as long as it likes. Every peer front end bounds this (nginx
``client_header_timeout``, 60 s; Go's ``ReadHeaderTimeout``). The body's bound is
the application's (admission's ``body_timeout_s``), where a 408 can still be an
OpenAI-style answer; here the request does not exist yet, so the answer is a plain
408 with the same JSON shape, and the connection closes.

The clock starts at a request's first byte and stops when its headers are complete.
A connection that sends nothing at all is idle, not slow: it is closed silently after
uvicorn's keep-alive timeout, as an idle kept-alive connection is (uvicorn itself
arms that timer only after a first response). Never a 408 on an idle connection: a
client's pool would read it as the answer to the next request it sends.
"""

from __future__ import annotations

import asyncio
import functools
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

_TIMEOUT_BODY = json.dumps(error_body(
    408, "The request headers did not arrive in time.", code="request_timeout")).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


class HeaderBoundedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that answers 408 and closes when headers take too long."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            # No earlier response is still being written, so the 408 cannot interleave.
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def header_bounded(header_timeout_s: float) -> functools.partial:
    """The ``http`` argument of ``uvicorn.Config`` for a header bound of ``header_timeout_s``."""
    return functools.partial(HeaderBoundedProtocol, header_timeout_s=header_timeout_s)
