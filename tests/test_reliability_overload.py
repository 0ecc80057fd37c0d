"""Overload: ten times the measured capacity, offered open-loop.

What is measured (figures go to docs/reliability.md): how fast the excess gets its
429, and whether the requests that are admitted keep their time to first token.
The ingress under test is a second one (`qwen-serve ingress`, the same app the stack
serves) in front of the guarded stack's two engines (conftest.py), with the guarded
settings but a latency-first in-flight bound of 1 per replica: one pair of engines
for both modules. On one-core CPU replicas each admitted stream shares its core with
the others the bound lets in, so the bound, not the overload, sets admitted TTFT:
measured 0.74-1.75x an idle engine's at 1 per replica, 1.58-2.48x at 2, ~2.5x at 4
(and ~1.0-1.3x the TTFT at the bound without overload at each).

``QWEN_SERVE_OVERLOAD_URL`` points the module at such an ingress already running.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.stacks import Stack, engine_pids, engine_urls, start_ingress, stop_stack
from guarded import ENGINE_KEY, KEY_PLAIN, REPLICAS, ingress_args, write_keys
from serving.engine import guard
from test_reliability_stack import Outcome, is_openai_error, ms, record, wait_until_idle

pytestmark = pytest.mark.stack

MAX_IN_FLIGHT_PER_REPLICA = 1


@pytest.fixture(scope="module")
def bounded(guarded, tmp_path_factory) -> Stack:
    url = os.environ.get("QWEN_SERVE_OVERLOAD_URL")
    if url:
        yield Stack(url.rstrip("/"), "smollm2-135m-instruct", KEY_PLAIN, None, None)
        return
    if guarded.proc is None:
        pytest.skip("QWEN_SERVE_GUARDED_URL points at a stack this session did not start")
    tmp = tmp_path_factory.mktemp("overload")
    front = start_ingress(tmp, engine_urls(guarded), *ingress_args(write_keys(tmp), MAX_IN_FLIGHT_PER_REPLICA),
                          name="overload", env={guard.ENV: ENGINE_KEY})
    front.api_key = KEY_PLAIN
    try:
        yield front
    finally:
        stop_stack(front)


# Overload requests are longer so that capacity (and so 10x of it) stays within what one
# client and the ingress can offer and answer on two shared cores.
WORK = {"prompt": "Describe a lighthouse keeper's day in detail.", "max_tokens": 32, "ignore_eos": True,
        "stream": True, "temperature": 0.7}


class RawClient:
    """A minimal HTTP/1.1 client (one connection per request) for the latency figures.

    httpx costs a few ms of CPU per request; at hundreds of requests a second on two
    shared cores that cost, not the server, would dominate a 50 ms p99.
    """

    def __init__(self, base_url: str, body: dict) -> None:
        self.host, port = base_url.split("//", 1)[1].rsplit(":", 1)
        self.port = int(port)
        data = json.dumps(body).encode()
        self.request = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Authorization: Bearer {KEY_PLAIN}\r\nContent-Type: application/json\r\n"
                        "Cache-Control: no-cache\r\n"
                        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data

    async def send(self, timeout_s: float = 120) -> Outcome:
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(self._send(started), timeout_s)
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            return Outcome(None, time.perf_counter() - started, error=repr(exc))

    async def _send(self, started: float) -> Outcome:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.request)
            status = int((await reader.readline()).split()[1])
            ttft, data = None, b""
            while chunk := await reader.read(65536):
                if status != 200:
                    data += chunk
                elif ttft is None and b"data: " in chunk:
                    ttft = time.perf_counter() - started
            return Outcome(status, time.perf_counter() - started, ttft, body=data)  # headers + body
        finally:
            writer.close()


async def closed_loop(base_url: str, concurrency: int, duration_s: float, body: dict = WORK) -> list[Outcome]:
    client, out = RawClient(base_url, body), []
    stop = time.monotonic() + duration_s

    async def worker():
        while time.monotonic() < stop:
            out.append(await client.send())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(base_url: str, rate: float, duration_s: float, body: dict = WORK) -> list[Outcome]:
    client, tasks = RawClient(base_url, body), []
    start, i = time.monotonic(), 0
    while (due := start + i / rate) < start + duration_s:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(client.send()))
        i += 1
    return await asyncio.gather(*tasks)


class client_priority:
    """Keep the load generator from measuring itself.

    It shares two cores with the stack, so it runs ahead of the engines and without
    garbage-collector pauses (this test process holds a large heap by now). With the
    kernel's autogroup scheduling a session is a scheduling group whose share ignores
    the nice values inside it, so the session is raised too. Both need root;
    otherwise the figures say what ran.
    """

    NICE = -10

    def __enter__(self):
        self.before = os.getpriority(os.PRIO_PROCESS, 0)
        self.group_before = autogroup_nice()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self.NICE)
        except PermissionError:
            pass
        set_autogroup_nice(self.NICE)
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        gc.enable()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self.before)
        except PermissionError:
            pass
        if self.group_before is not None:
            set_autogroup_nice(self.group_before)

    @staticmethod
    def figures() -> dict:
        return {"client_nice": os.getpriority(os.PRIO_PROCESS, 0), "client_autogroup_nice": autogroup_nice()}


AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-N nice K" when autogroups are on


def autogroup_nice() -> int | None:
    try:
        return int(AUTOGROUP.read_text().rsplit("nice", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def set_autogroup_nice(nice: int) -> None:
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError:
        pass


OVERLOAD_S, CAPACITY_S, UNLOADED_S = 20, 10, 8


def test_overload_fast_429_and_admitted_latency_holds(bounded):
    base = bounded.base_url
    wait_until_idle(base)
    with client_priority() as priority:
        client = priority.figures()
        asyncio.run(closed_loop(base, 2, 2))  # warm up
        # One request at a time; ending at the first token gives many TTFT samples.
        unloaded = [o.ttft_s for o in asyncio.run(closed_loop(base, 1, UNLOADED_S, {**WORK, "max_tokens": 1}))
                    if o.status == 200]
        bound = REPLICAS * MAX_IN_FLIGHT_PER_REPLICA
        at_bound = asyncio.run(closed_loop(base, bound, CAPACITY_S))
        served = [o for o in at_bound if o.status == 200]
        capacity = len(served) / CAPACITY_S
        rate = 10 * capacity
        started = time.monotonic()
        outcomes = asyncio.run(open_loop(base, rate, OVERLOAD_S))
        wall = time.monotonic() - started
    ok = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status == 429]
    other = [o for o in outcomes if o.status not in (200, 429)]
    figures = {
        **client, "load_avg_1m": round(os.getloadavg()[0], 1), "unloaded_requests": len(unloaded),
        "unloaded_ttft_p50_ms": ms(unloaded), "unloaded_ttft_p99_ms": ms(unloaded, 99),
        "bound_in_flight": bound, "capacity_rps": round(capacity, 2),
        "at_bound_ttft_p50_ms": ms([o.ttft_s for o in served]),
        "at_bound_ttft_p99_ms": ms([o.ttft_s for o in served], 99),
        "offered_rps": round(rate, 1), "offered_for_s": OVERLOAD_S, "wall_s": round(wall, 1),
        "requests": len(outcomes), "admitted": len(ok), "rejected_429": len(rejected),
        "other_count": len(other), "other": [(o.status, o.error) for o in other[:5]],
        "reject_latency_p50_ms": ms([o.latency_s for o in rejected]),
        "reject_latency_p99_ms": ms([o.latency_s for o in rejected], 99),
        "reject_latency_max_ms": ms([max(o.latency_s for o in rejected)]) if rejected else None,
        "admitted_ttft_p50_ms": ms([o.ttft_s for o in ok]),
        "admitted_ttft_p99_ms": ms([o.ttft_s for o in ok], 99),
    }
    figures["admitted_p99_over_unloaded_p99"] = round(figures["admitted_ttft_p99_ms"] / figures["unloaded_ttft_p99_ms"], 2)
    figures["admitted_p99_over_at_bound_p99"] = round(figures["admitted_ttft_p99_ms"] / figures["at_bound_ttft_p99_ms"], 2)
    record("overload", figures)
    assert not other, figures["other"]  # every request got an answer: no hang, no 5xx
    for o in rejected[:50]:
        head, _, payload = o.body.partition(b"\r\n\r\n")
        assert b"\r\nretry-after: " in head.lower() and is_openai_error(payload), o.body
    assert len(rejected) > len(outcomes) / 2
    # The 429 is decided before any engine work: typically a couple of milliseconds.
    assert figures["reject_latency_p50_ms"] <= 50
    # Latency targets (429 p99 <= 50 ms, admitted p99 TTFT <= 2x unloaded) depend on what
    # else the machine runs, so they are measured and printed here, not asserted
    # (DEVELOPERS.md: speed targets live in benchmarks); docs/reliability.md has them.
    print(f"\noverload figures: {json.dumps(figures)}")
    assert httpx.get(f"{base}/ready", timeout=30).status_code == 200


def test_each_engine_keeps_to_its_own_core(guarded):
    """Two CPU replicas never share a core, whole process trees included (engine_args)."""
    if len(os.sched_getaffinity(0)) < REPLICAS:
        pytest.skip("fewer cores than replicas")
    if guarded.proc is None:
        pytest.skip("QWEN_SERVE_GUARDED_URL points at a stack this session did not start")
    trees = []
    for pid in engine_pids(guarded).values():
        engine = psutil.Process(pid)
        cores = {frozenset(p.cpu_affinity()) for p in [engine, *engine.children(recursive=True)]}
        assert len(cores) == 1 and len(next(iter(cores))) == 1, cores
        trees.append(next(iter(cores)))
    assert len(set(trees)) == REPLICAS, trees

