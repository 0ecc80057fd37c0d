"""serving/reaper.py: the descendants of a process killed unannounced are stopped.

The stack's version (SIGKILL to `qwen-serve serve` alone) is in test_lora_stack.py;
this one is a parent that starts a child in a session of its own, as Ray starts its
workers, so that neither a group signal nor the parent's death would reach it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                         start_new_session=True)
subprocess.Popen([sys.executable, "-m", "serving.reaper", str(__import__("os").getpid())])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_child_that_ignores_sigterm_is_killed_after_its_parent_is():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        time.sleep(1.5)  # the reaper has seen the child
        assert child.is_running()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        started = time.monotonic()
        while time.monotonic() - started < 20:
            if not child.is_running() or child.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the child outlived its killed parent by 20 s")
        # It ignores SIGTERM: only the reaper's SIGKILL after the grace period stops it.
        assert time.monotonic() - started > 5
    finally:
        if child.is_running():
            child.kill()
