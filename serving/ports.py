"""Listening sockets bound early, and ports held for a server that binds later.

Why this exists: "find a free port, close it, start the server on it" races with
every other process that asks the kernel for an ephemeral port in between. Ray
does so constantly while it starts (workers, gRPC servers, object transfers), and
a vLLM engine takes seconds before it binds, so a port picked that way was taken
by someone else often enough to fail a CI run ("address already in use").

A socket bound with SO_REUSEADDR but not listening closes that window on Linux:
the kernel hands out neither that port to other ephemeral binds or connects, nor
lets a plain ``bind`` take it, yet a server that also sets SO_REUSEADDR (vLLM,
uvicorn, Prometheus, redis-server all do) can bind and listen on it. The holder
closes its socket once the server is up.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator


def bind_reusable(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` with SO_REUSEADDR, not yet listening.

    Port 0 takes a free ephemeral port (read it with ``getsockname()``). Raises
    OSError (errno EADDRINUSE, EADDRNOTAVAIL, ...) when the address can't be bound.
    """
    # uvicorn's and vLLM's rule: an address with a colon is IPv6, anything else IPv4.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A free port on ``host`` that nobody else can take until the block ends.

    Start the server inside the block and leave it once the server listens; the
    server must bind with SO_REUSEADDR. Until then, connecting is refused.
    """
    sock = bind_reusable(host)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
