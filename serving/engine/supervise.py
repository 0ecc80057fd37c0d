"""`python -m serving.engine.supervise GRACE -- CMD...`: run an engine, and never leak it.

Why: vLLM's server starts an engine-core process, which starts workers. If the
server is killed (or the Ray replica that owns it dies mid-startup) those
descendants are orphaned and keep a core busy. This shim is a child subreaper,
so every orphaned descendant re-parents to it; when the engine exits, or when
we get SIGTERM (sent by the kernel if the owning replica dies: PR_SET_PDEATHSIG
is set by process.spawn), it terminates all of them, waits ``GRACE`` seconds,
kills what is left, and exits with the engine's code.

It also gives the engine's session the engine's CPU priority. Ray starts its
workers at nice 15 so that they yield to everything else, but with the kernel's
autogroup scheduling (on by default on desktop and VM kernels) every session is
one scheduling group, groups share the CPU equally, and nice only ranks tasks
inside a group: an engine in its own session competed with the ingress as an
equal (on two cores, 10x overload: the ingress waited 4.4 s for a CPU in 17 s,
429 p99 ~110 ms). Keeping the engine in the ingress's session instead starved
every other session on the machine for seconds (vLLM's engine processes spin
on sched_yield while busy). A session at the engine's nice yields to both:
429 p99 7-10 ms, a client in another session never stalled more than 60 ms.
Raising a nice value needs no privilege; without autogroups this is a no-op.
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

_PR_SET_CHILD_SUBREAPER = 36


def _terminate_all(grace_s: float) -> None:
    me = psutil.Process()
    procs = me.children(recursive=True)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # Orphans re-parented to us while we waited are caught by a second sweep.
    for p in alive + me.children(recursive=True):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(me.children(recursive=True), timeout=5)


def _session_priority_follows_nice() -> None:
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:  # no autogroups (e.g. in a container's cgroup), or not allowed
        pass


def main(argv: list[str]) -> int:
    _session_priority_follows_nice()
    grace_s = float(argv[0])
    cmd = argv[argv.index("--") + 1:]
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
    child = subprocess.Popen(cmd)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
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
