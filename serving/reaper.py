"""`python -m serving.reaper PID`: when ``qwen-serve serve`` dies unannounced, stop what it started.

Why: the stack is many processes (Ray's GCS, raylet, agents and workers, each engine
and its supervisor) in several process groups. A clean stop shuts them down; a
SIGKILL of the main process alone (the OOM killer picks one process, not a group)
gives it no chance to. Ray's own processes and the engines notice their parent's
death and go, but not all of them promptly: Ray's DashboardAgent outlived the
killed main process by more than 60 s here. So the launcher starts this watcher
first; it notes the main process's descendants each second and, once the main
process is gone, sends them SIGTERM, then SIGKILL to whatever is left after
``GRACE_S``. Processes are matched by pid and start time, so a recycled pid is never
signalled. It ignores SIGINT/SIGTERM/SIGHUP sent to its group: a Ctrl-C or a
service stop is the main process's to handle; this one cleans up after it.
"""

from __future__ import annotations

import signal
import sys
import time

import psutil

from .stopping import terminate_then_kill

POLL_S = 1.0
# Short: the main process is gone, so there is nothing left to drain (a stop leaves
# nothing running 15 s after the signal).
GRACE_S = 5.0


def _descendants(main: psutil.Process) -> dict[int, float]:
    found = {}
    for proc in main.children(recursive=True):
        try:
            found[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    found.pop(psutil.Process().pid, None)
    return found


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    out = []
    for pid, started in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def watch(pid: int) -> int:
    try:
        main = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, float] = {}
    while True:
        try:
            if main.status() == psutil.STATUS_ZOMBIE:
                break
            known = _descendants(main) or known
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    terminate_then_kill(_alive(known), GRACE_S)
    return 0


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return watch(int(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
