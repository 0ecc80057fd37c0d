"""Run a real helper server (redis-server, Prometheus) for as long as a test needs it."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class ServiceFailed(RuntimeError):
    pass


@contextmanager
def running(proc: subprocess.Popen, name: str, ready: Callable[[], bool], output: Callable[[], str],
            timeout_s: float, poll_s: float = 0.05, grace_s: float = 5.0) -> Iterator[None]:
    """Wait until ``ready()`` (raising ServiceFailed with ``output()`` if ``proc`` exits
    or the time runs out), then always stop ``proc``: SIGTERM, SIGKILL after ``grace_s``."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                raise ServiceFailed(f"{name} exited with {proc.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{name} did not become ready within {timeout_s:g} s")
            time.sleep(poll_s)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
