"""Runs last (file name): stop the shared stack like a user would and check it left nothing.

SIGTERM is what `docker stop`, Kubernetes and Ctrl-C's cousin send; the stack must
exit 0 and leave no engine, Ray or helper process behind.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

pytestmark = pytest.mark.stack


def test_sigterm_exits_zero_and_leaves_no_process(stack):
    if stack.proc is None:
        pytest.skip("QWEN_SERVE_TEST_URL points at a stack this session did not start")
    family = psutil.Process(stack.proc.pid).children(recursive=True)
    assert any("vllm" in " ".join(p.cmdline()) for p in family), "no engine process found"
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=120) == 0
    deadline = time.monotonic() + 30
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
