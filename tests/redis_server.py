"""A throwaway real redis-server (Debian's package) on loopback, for cache tests.

Why a real server rather than a fake: the shared response cache relies on Redis
semantics (PX expiry, maxmemory eviction) that a fake would only imitate.
No persistence (``--save '' --appendonly no``) so nothing is written to disk.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

from benchmarks.stacks import free_port

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
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--protected-mode", "yes",
         "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ping(port):
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {out[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
