"""Several ingress workers in front of a real engine: one key's limit, the metrics and a
drain hold across them.

A second ingress, `qwen-serve ingress --engine URL` with ``server.workers: 2`` and its own
keys and limits, in front of the shared stack's engine: the launcher's worker path
(control channel, shared in-flight table, multiprocess metrics), as `serve` runs it.
Requests go over several connections, and the kernel hands connections to both workers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import psutil
import pytest

from benchmarks.stacks import Stack, engine_urls, start_ingress, stop_stack
from conftest import STACK_ENGINE_KEY
from serving.engine import guard

pytestmark = pytest.mark.stack

WORKERS = 2
RPM = 300
KEY = "workers-test-key-7c1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The drain test's own key: the limit test leaves KEY's bucket empty.
DRAIN_AUTH = {"Authorization": "Bearer workers-test-key-d2a9"}


def _workers(front: Stack) -> list[psutil.Process]:
    """The front's live workers: a killed one is a zombie until the launcher reaps it."""
    live = []
    for proc in psutil.Process(front.proc.pid).children():
        try:
            if "serving.ingress.worker" in " ".join(proc.cmdline()):
                live.append(proc)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return live


@pytest.fixture(scope="module")
def front(stack, tmp_path_factory) -> Stack:
    if stack.proc is None:
        pytest.skip("QWEN_SERVE_TEST_URL points at a stack this session did not start")
    tmp = tmp_path_factory.mktemp("workers")
    keys = tmp / "keys"
    keys.write_text(f"{KEY}\n{DRAIN_AUTH['Authorization'].split()[1]}\n")
    front = start_ingress(tmp, engine_urls(stack), "--set", f"server.workers={WORKERS}",
                          "--set", f"server.api_keys_file={keys}",
                          "--set", f"server.limits.requests_per_minute={RPM}",
                          "--set", "server.drain_timeout_s=60", name="front",
                          env={guard.ENV: STACK_ENGINE_KEY})
    try:
        assert len(_workers(front)) == WORKERS
        yield front
    finally:
        stop_stack(front)


def _cpu_s(procs: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


async def _tokenize_burst(base_url: str, count: int, lanes: int) -> tuple[list[int], float]:
    """``count`` /tokenize requests over ``lanes`` kept-alive connections, opened before
    the clock starts (the kernel spreads them over the workers); their statuses and the
    seconds from the first send to the last (the refill the limit could have granted)."""
    body = {"model": "smollm2-135m-instruct", "prompt": "How many tokens is this?"}
    sent: list[float] = []
    clients = [httpx.AsyncClient(base_url=base_url, timeout=60) for _ in range(lanes)]
    try:
        await asyncio.gather(*(c.get("/health") for c in clients))  # connected

        async def lane(client: httpx.AsyncClient, n: int) -> list[int]:
            statuses = []
            for _ in range(n):
                sent.append(time.monotonic())
                resp = await client.post("/tokenize", json=body, headers=AUTH)
                assert resp.status_code in (200, 429), resp.text
                if resp.status_code == 429:
                    assert int(resp.headers["retry-after"]) >= 1
                statuses.append(resp.status_code)
            return statuses

        per_lane = await asyncio.gather(*(lane(c, count // lanes) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return [s for statuses in per_lane for s in statuses], max(sent) - min(sent)


def _series(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_keys_limit_holds_across_workers(front):
    """300 requests/min for one key, 900 requests spread over 2 workers: the key gets its
    300 plus what the bucket refilled meanwhile (± 2 %), not 300 per worker. (A refused
    request costs no engine work, so the burst outruns the refill on a slow machine too.)"""
    workers = _workers(front)
    before = _cpu_s(workers)
    statuses, took_s = asyncio.run(_tokenize_burst(front.base_url, 3 * RPM, lanes=12))
    spent = [after - b for after, b in zip(_cpu_s(workers), before)]
    admitted, refused = statuses.count(200), statuses.count(429)
    expected = RPM + RPM / 60 * took_s
    print(f"\n{RPM} requests/min, {len(statuses)} sent over {took_s:.2f} s: {admitted} admitted "
          f"(expected {expected:.1f}), {refused} refused; worker CPU s {[round(s, 3) for s in spent]}")
    assert refused >= RPM / 2, "the burst did not outrun the refill: nothing was measured"
    assert abs(admitted - expected) <= 0.02 * RPM, (admitted, expected)
    assert all(s > 0 for s in spent), f"a worker served nothing: {spent}"
    # One scrape, any worker: the sums over both.
    text = httpx.get(f"{front.base_url}/metrics", headers=AUTH, timeout=30).text
    assert _series(text, "qwen_serve_requests_total", route="tokenize", status="200") == admitted
    assert _series(text, "qwen_serve_requests_total", route="tokenize", status="429") == refused
    assert _series(text, "qwen_serve_rejected_requests_total", reason="rate_limited") == refused


def test_a_worker_that_dies_is_replaced_and_the_others_serve_on(front):
    """SIGKILL to one worker (the OOM killer picks a process): the launcher starts another
    in its place; requests keep being answered meanwhile and after."""
    before = _workers(front)
    victim = before[0]
    victim.kill()
    deadline = time.monotonic() + 60
    while True:
        now = _workers(front)
        if len(now) == WORKERS and victim.pid not in {p.pid for p in now}:
            break
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.2)
    body = {"model": "smollm2-135m-instruct", "prompt": "Hello"}
    statuses = [httpx.post(f"{front.base_url}/tokenize", json=body, headers=DRAIN_AUTH,
                           timeout=60).status_code for _ in range(10)]
    assert statuses == [200] * 10
    assert "exited (-9); restarting it" in front.log_path.read_text()


async def _stream(base_url: str, started: asyncio.Event, counter: list[int]) -> tuple[int, int, bool]:
    """One chat stream on its own connection: (status, content events, ended with [DONE])."""
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 40, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count from one to one hundred."}]}
    events, done = 0, False
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                                 headers=DRAIN_AUTH) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    assert '"error"' not in line, line
                    if '"content"' in line and events == 0:
                        counter[0] += 1
                        if counter[0] == STREAMS:
                            started.set()
                    events += '"content"' in line
            return resp.status_code, events, done


STREAMS = 6


def test_sigterm_drains_every_worker(front):
    """Runs last (it stops the front): SIGTERM while 6 streams run on 2 workers; every
    stream finishes, new requests get 503, each worker drains and exits, exit code 0."""
    workers = _workers(front)

    async def scenario() -> tuple[list, int]:
        started, counter = asyncio.Event(), [0]
        streams = [asyncio.create_task(_stream(front.base_url, started, counter)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 120)
        front.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=30) as client:
            late = await client.post(f"{front.base_url}/v1/chat/completions", headers=DRAIN_AUTH,
                                     json={"model": "smollm2-135m-instruct", "max_tokens": 1,
                                           "messages": [{"role": "user", "content": "hi"}]})
        return await asyncio.gather(*streams), late.status_code

    results, late_status = asyncio.run(scenario())
    assert late_status == 503
    assert all(status == 200 and done for status, _, done in results), results
    assert all(events >= 30 for _, events, _ in results), results  # ran on, not cut
    assert front.proc.wait(60) == 0
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, alive
    log = front.log_path.read_text()
    assert len(re.findall(r"^qwen-serve: draining \(", log, re.M)) == WORKERS, log[-2000:]
