"""`python -m serving.engine.supervise GRACE -- CMD...`: run an engine, and never leak it.

Why: vLLM's server starts an engine-core process, which starts workers. If the
server is killed (or the Ray replica that owns it dies mid-startup) those
descendants are orphaned and keep a core busy. This shim is a child subreaper,
so every orphaned descendant re-parents to it; when the engine exits, or when
we get SIGTERM (sent by the kernel if the owning replica dies: PR_SET_PDEATHSIG
is set by process.spawn), it terminates all of them, waits ``GRACE`` seconds,
kills what is left, and exits with the engine's code.

The engine itself is told to stop (SIGTERM, PR_SET_PDEATHSIG) if this shim dies
first: when the whole stack is stopped at once, Ray's raylet SIGKILLs the worker's
leftover children, this shim among them, and the engine re-parented to init lived
on (~940 MB, seen 4 of 4 times with SIGTERM to the stack's process group).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from ..stopping import terminate_then_kill

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate_all(grace_s: float) -> None:
    me = psutil.Process()
    # Orphans re-parented to us while we waited are caught by a second sweep (also).
    terminate_then_kill(me.children(recursive=True), grace_s, also=lambda: me.children(recursive=True))
    psutil.wait_procs(me.children(recursive=True), timeout=5)


# Grace for an engine whose replica is gone: nobody waits for its answers any more, and
# a stop must leave nothing running 15 s after the signal (docs/reliability.md).
ORPHANED_GRACE_S = 5.0


def main(argv: list[str]) -> int:
    grace_s = float(argv[0])
    cmd = argv[argv.index("--") + 1:]
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
    owner = os.getppid()
    child = subprocess.Popen(cmd, preexec_fn=_stop_with_parent)
    stopping = threading.Event()

    def on_signal(signum, frame):
        nonlocal grace_s
        if not stopping.is_set():
            if os.getppid() != owner:  # the replica died (PR_SET_PDEATHSIG), not asked us to stop
                grace_s = min(grace_s, ORPHANED_GRACE_S)
            stopping.set()
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = None
    while child.poll() is None:
        if stopping.is_set():
            deadline = deadline or time.monotonic() + grace_s
            if time.monotonic() > deadline:
                break
        time.sleep(0.2)
    _terminate_all(grace_s if child.poll() is None else 5.0)
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
