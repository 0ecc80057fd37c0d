"""Runs last (file name): stop the shared stack as a supervisor would, check it left nothing.

SIGTERM to the whole process group is what systemd (KillMode=control-group),
supervisord's stopasgroup and CI runners send; `docker stop` and Kubernetes send it
to the main process (test_reliability_stack's drain test). Either way the stack
must exit and leave no engine, Ray or helper process behind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from benchmarks.stacks import leftovers, stack_processes

pytestmark = pytest.mark.stack


def test_sigterm_to_the_process_group_leaves_no_process(stack):
    if stack.proc is None:
        pytest.skip("QWEN_SERVE_TEST_URL points at a stack this session did not start")
    family = stack_processes(stack)
    assert any("vllm" in " ".join(p.cmdline()) for p in family), "no engine process found"
    signalled = time.monotonic()
    os.killpg(stack.proc.pid, signal.SIGTERM)  # started with start_new_session: pgid = pid
    stack.proc.wait(timeout=120)
    left = leftovers(family, 60)
    print(f"\nSIGTERM to the group: all {len(family)} processes gone after "
          f"{time.monotonic() - signalled:.1f} s")
    assert not left, left
