"""Stopping processes the polite way first: SIGTERM, a grace period, then SIGKILL.

Shared by the engine supervisor (engine/supervise.py) and the stack's reaper
(reaper.py); a process that is already gone is not an error for either.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil


def _signal(proc: psutil.Process, kill: bool) -> None:
    try:
        proc.kill() if kill else proc.terminate()
    except psutil.Error:
        pass


def terminate_then_kill(procs: list[psutil.Process], grace_s: float,
                        also: Callable[[], list[psutil.Process]] = list) -> None:
    """SIGTERM ``procs``; after ``grace_s``, SIGKILL those left and whatever ``also`` names then."""
    for proc in procs:
        _signal(proc, kill=False)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive + also():
        _signal(proc, kill=True)
