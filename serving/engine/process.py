"""Start and stop one engine process so that it never outlives its replica.

The replica actor can die abruptly (OOM, SIGKILL, node loss). The engine process
gets SIGTERM from the kernel when that happens (PR_SET_PDEATHSIG). The kernel
sends it when the *thread* that forked the child exits, so every spawn happens on
one daemon thread that lives exactly as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
import time

_PR_SET_PDEATHSIG = 1
_requests: "queue.Queue[tuple]" = queue.Queue()
_spawner: threading.Thread | None = None
_lock = threading.Lock()


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawner_loop() -> None:
    while True:
        argv, env, log, box, done = _requests.get()
        try:
            box.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box.append(exc)
        done.set()


def spawn(argv: list[str], env: dict[str, str], log=None) -> subprocess.Popen:
    """Popen on the long-lived spawner thread; the child gets its own process group."""
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawner_loop, name="engine-spawner", daemon=True)
            _spawner.start()
    box: list = []
    done = threading.Event()
    _requests.put((argv, env, log, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> int | None:
    """SIGTERM the engine's whole process group (API server + engine core), then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.poll()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()
