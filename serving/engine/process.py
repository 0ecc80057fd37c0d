"""Start and stop one engine process so that it never outlives its replica.

The replica actor can die abruptly (OOM, SIGKILL, node loss). The engine runs
under ``supervise`` (which takes the whole engine process tree down with it), and
that shim gets SIGTERM from the kernel when the replica dies (PR_SET_PDEATHSIG).
The kernel sends it when the *thread* that forked the child exits, so every spawn
happens on one daemon thread that lives exactly as long as the process.

The engine gets its own session, so ``stop`` can kill the whole tree. (With the
kernel's autogroup scheduling a session is also a scheduling group with an equal
share of the CPU. Two layouts that ranked engines below the ingress failed when
measured: in the ingress's session, vLLM's spinning engine processes starved
every other session for seconds; in a session at nice 15, an idle engine next to
a busy bare vLLM missed three 5 s health checks and was replaced.)
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_requests: "queue.Queue[tuple]" = queue.Queue()
_spawner: threading.Thread | None = None
_lock = threading.Lock()


def _child_setup(cpus: set[int] | None):
    def setup() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)  # inherited by the whole engine tree
    return setup


def _spawner_loop() -> None:
    while True:
        argv, env, log, cpus, box, done = _requests.get()
        try:
            box.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_child_setup(cpus)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box.append(exc)
        done.set()


def spawn(argv: list[str], env: dict[str, str], log=None, grace_s: float = 20.0,
          cpus: set[int] | None = None) -> subprocess.Popen:
    """Start ``argv`` under the supervisor shim, from the long-lived spawner thread,
    kept to ``cpus`` when given."""
    argv = [sys.executable, "-m", "serving.engine.supervise", str(grace_s), "--", *argv]
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawner_loop, name="engine-spawner", daemon=True)
            _spawner.start()
    box: list = []
    done = threading.Event()
    _requests.put((argv, env, log, cpus, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def engine_pid(proc: subprocess.Popen) -> int:
    """PID of the vLLM server itself (the supervisor's child)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return proc.pid
    return children[0].pid if children else proc.pid


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> int | None:
    """Ask the supervisor to stop the engine tree; kill the process group if it hangs."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()
