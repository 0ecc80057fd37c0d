"""A throwaway real redis-server (Debian's package) on loopback, for cache tests.

Why a real server rather than a fake: the shared response cache relies on Redis
semantics (PX expiry, maxmemory eviction) that a fake would only imitate.
No persistence (``--save '' --appendonly no``) so nothing is written to disk.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from contextlib import contextmanager
from typing import Iterator

from local_service import running
from serving.ports import reserved_port

INSTALL_HINT = "redis-server is missing: run `make install-test` (apt-get install redis-server)"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(maxmemory: str = "8mb", policy: str = "volatile-lru",
                 timeout_s: float = 10.0) -> Iterator[str]:
    """Run redis-server on an ephemeral port; yields its ``redis://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    with reserved_port() as port:  # redis-server binds it with SO_REUSEADDR
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--protected-mode", "yes",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def output() -> str:
            return proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""

        with running(proc, "redis-server", lambda: _ping(port), output, timeout_s):
            yield f"redis://127.0.0.1:{port}/0"
