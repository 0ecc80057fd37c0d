"""Ctrl-C, in each of the ways it arrives, and SIGKILL to the group stop the whole stack within 15 s.

A terminal sends SIGINT to the foreground process group; a script or a supervisor
to the main process alone; an impatient user presses Ctrl-C a second time. Each
time every process the stack started (Ray's, the engine supervisors, vLLM's server,
engine core and workers, the reaper) must be gone 15 s after the (first) signal.
SIGKILL to the group (the OOM killer's cgroup kill, `kill -9` of a supervisor's
group) gives nobody a chance to clean up: the engines must go by themselves.
The other stops are tested where a stack ends anyway: SIGTERM to the group
(test_zz_shutdown), SIGTERM to the main process with streams in flight
(test_reliability_stack's drain) and SIGKILL to the main process alone (test_lora_stack).

The four stacks are started at once (one eager 1-replica engine each): on two
cores that takes about as long as two or three started one after the other.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.stacks import stack_processes, stop_leaves_nothing
from conftest import Stack, start_stack, stop_stack

pytestmark = pytest.mark.stack

BOUND_S = 15.0  # docs/reliability.md: nothing of a stack runs 15 s after a stop signal
SMALL = ["--set", "engine.enforce_eager=true", "--set", "engine.cpu_kv_cache_bytes=536870912"]


def to_main(sig: int):
    return lambda pid: os.kill(pid, sig)


def to_group(sig: int):
    return lambda pid: os.killpg(pid, sig)  # started with start_new_session: pgid = pid


def twice_to_group(sig: int):
    def send(pid: int) -> None:
        os.killpg(pid, sig)
        time.sleep(1.0)  # a second press, once the first one is being handled
        os.killpg(pid, sig)
    return send


STOPS = {"sigint-main": to_main(signal.SIGINT), "sigint-group": to_group(signal.SIGINT),
         "sigint-twice-group": twice_to_group(signal.SIGINT),
         "sigkill-group": to_group(signal.SIGKILL)}
CLEAN = {"sigint-main", "sigint-group"}  # a first Ctrl-C is a clean stop: exit code 0


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, Stack]:
    tmp = tmp_path_factory.mktemp("stops")
    with ThreadPoolExecutor(len(STOPS)) as pool:
        futures = {name: pool.submit(start_stack, tmp, *SMALL, name=name) for name in STOPS}
    started = {}
    try:
        for name, future in futures.items():
            started[name] = future.result()
        yield started
    finally:
        for name, future in futures.items():
            if future.exception() is None:
                stop_stack(future.result())


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stop_leaves_no_process_within_15_s(stacks, stop):
    stack = stacks[stop]
    assert any("vllm.entrypoints" in " ".join(p.cmdline()) for p in stack_processes(stack))
    left, took = stop_leaves_nothing(stack, STOPS[stop], BOUND_S)
    print(f"\n{stop}: every process gone after {took:.1f} s (exit code {stack.proc.returncode})")
    assert not left, left
    assert stack.proc.returncode is not None
    if stop in CLEAN:
        assert stack.proc.returncode == 0
