"""Runs last (file name): stop the shared stack as a supervisor would, check it left nothing.

SIGTERM to the whole process group is what systemd (KillMode=control-group),
supervisord's stopasgroup and CI runners send; `docker stop` and Kubernetes send it
to the main process (test_reliability_stack's drain test). Either way the stack
must exit and leave no engine, Ray or helper process behind.
"""

from __future__ import annotations

import os
import signal

import pytest

from benchmarks.stacks import stack_processes, stop_leaves_nothing

pytestmark = pytest.mark.stack


def test_sigterm_to_the_process_group_leaves_no_process_within_15_s(stack):
    if stack.proc is None:
        pytest.skip("QWEN_SERVE_TEST_URL points at a stack this session did not start")
    assert any("vllm" in " ".join(p.cmdline()) for p in stack_processes(stack)), "no engine process found"
    # Nothing is in flight, so the drain is immediate: the 15 s bound of docs/reliability.md.
    left, took = stop_leaves_nothing(stack, lambda pid: os.killpg(pid, signal.SIGTERM), 15)
    print(f"\nSIGTERM to the group: every process gone after {took:.1f} s")
    assert not left, left
    assert stack.proc.returncode == 0
