"""Load shapes, bounds, sweep stop rules and A/B ratio bookkeeping."""

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from benchmarks.client import Target
from benchmarks.compare import CompareLevel, order_for
from benchmarks.loadgen import LoadShape, RunResult, arrival_offsets, run_load
from benchmarks.metrics import summarize
from benchmarks.stream import RequestRecord
from benchmarks.sweep import LevelResult, StopRule, parse_sweep, saturation_reason
from benchmarks.workloads import RequestSpec


def test_fixed_concurrency_sends_everything_at_once():
    assert list(arrival_offsets(4, math.inf, 1.0, seed=0)) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_mean_rate_and_burstiness(burstiness):
    t = arrival_offsets(40001, rate=5.0, burstiness=burstiness, seed=7)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    # gamma(shape=b): coefficient of variation 1/sqrt(b)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert np.array_equal(t, arrival_offsets(40001, 5.0, burstiness, seed=7))


def test_shapes_and_sweep_parsing():
    with pytest.raises(ValueError):
        LoadShape()  # unbounded: neither concurrency nor rate
    with pytest.raises(ValueError):
        LoadShape(concurrency=0)
    assert [s.concurrency for s in parse_sweep("concurrency=1,8,32")] == [1, 8, 32]
    rates = parse_sweep("rate=0.5,2", burstiness=0.5, cap=16)
    assert [(s.rate, s.burstiness, s.concurrency) for s in rates] == [(0.5, 0.5, 16), (2, 0.5, 16)]
    assert rates[0].label == "concurrency=16, rate=0.5/s, burstiness=0.5"
    for bad in ("qps=1", "concurrency=", "rate=a"):
        with pytest.raises(ValueError):
            parse_sweep(bad)


def _record(i, ok=True, ttft=0.1, error_class=None):
    return RequestRecord(i, 0.0, ok, 200, error_class, None, ttft if ok else None,
                         [0.01] if ok else [], ttft + 0.01 if ok else None, 5, 2 if ok else 0, True)


def _level(records, duration=1.0, slo=None, timed_out=False, shape=None, target="A", rep=0):
    run = RunResult(records, duration, timed_out, 0.0)
    return LevelResult(shape or LoadShape(concurrency=1), run, summarize(records, duration, slo),
                       target=target, repeat=rep)


def test_saturation_rules():
    rule = StopRule(max_error_rate=0.1, min_slo_attainment=0.9)
    healthy = _level([_record(i) for i in range(10)])
    assert saturation_reason(healthy, rule) is None
    errors = _level([_record(i) for i in range(8)]
                    + [_record(8, ok=False, error_class="http_503")] * 2)
    assert "error rate 20.0%" in saturation_reason(errors, rule)
    slow = _level([_record(i, ttft=0.1 if i < 8 else 2.0) for i in range(10)], slo={"ttft": 500})
    assert "SLO attainment 80.0%" in saturation_reason(slow, rule)
    assert "time limit" in saturation_reason(_level([_record(0)], timed_out=True), rule)


def test_ab_order_alternates_and_ratios_pair_repeats():
    assert [order_for(r) for r in range(3)] == [("A", "B"), ("B", "A"), ("A", "B")]
    level = CompareLevel(LoadShape(concurrency=2))
    # A: 4 req in 2 s, 2 s, 2 s → 2 req/s; B: 4 req in 4 s, 2 s, 1 s → 1, 2, 4 req/s
    for rep, (da, db) in enumerate([(2.0, 4.0), (2.0, 2.0), (2.0, 1.0)]):
        level.runs.append(_level([_record(i) for i in range(4)], da, target="A", rep=rep))
        level.runs.append(_level([_record(i) for i in range(4)], db, target="B", rep=rep))
    r = level.ratios()["request_throughput"]
    assert r.values == [0.5, 1.0, 2.0]
    assert (r.median, r.low, r.high) == (1.0, 0.5, 2.0)
    assert level.ratios()["ttft.median"].values == [1.0, 1.0, 1.0]


# --- the load generator against a tiny local SSE server ------------------------------

class _Server:
    """Streams `tokens` chunks `gap` s apart; records the peak number in flight."""

    def __init__(self, tokens=3, gap=0.05):
        self.tokens, self.gap = tokens, gap
        self.in_flight = self.peak = self.total = 0

        async def completions(request):
            body = await request.json()

            async def gen():
                self.in_flight += 1
                self.total += 1
                self.peak = max(self.peak, self.in_flight)
                try:
                    for i in range(self.tokens):
                        await asyncio.sleep(self.gap)
                        yield "data: " + json.dumps({"choices": [{"text": f"t{i}"}]}) + "\n\n"
                    yield "data: " + json.dumps({"choices": [], "usage": {
                        "prompt_tokens": len(body["prompt"].split()),
                        "completion_tokens": self.tokens}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(gen(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _specs(n):
    return [RequestSpec(max_tokens=3, prompt="a b c") for _ in range(n)]


def test_concurrency_cap_is_honoured_and_every_request_measured():
    with _Server(tokens=3, gap=0.05) as srv:
        target = Target(srv.url, "m", "completions")
        run = asyncio.run(run_load(_specs(9), target, LoadShape(concurrency=3),
                                   max_duration=30, request_timeout=10, progress=False))
    assert srv.peak == 3 and srv.total == 9
    s = summarize(run.records, run.duration_s)
    assert s.completed == 9 and s.total_output_tokens == 27 and s.total_input_tokens == 27
    assert not run.timed_out and s.ttft.min >= 45 and s.itl.count == 18
    # three waves of ~0.15 s each
    assert 0.4 < run.duration_s < 2.0


def test_deadline_cancels_in_flight_and_skips_unsent():
    with _Server(tokens=50, gap=0.05) as srv:  # 2.5 s per request
        target = Target(srv.url, "m", "completions")
        run = asyncio.run(run_load(_specs(6), target, LoadShape(concurrency=2),
                                   max_duration=0.5, request_timeout=10, progress=False))
    assert run.timed_out and run.duration_s < 1.5
    s = summarize(run.records, run.duration_s)
    assert s.sent == 2 and s.cancelled == 2 and s.completed == 0 and s.failed == 0


def test_poisson_rate_spreads_arrivals():
    with _Server(tokens=1, gap=0.0) as srv:
        target = Target(srv.url, "m", "completions")
        run = asyncio.run(run_load(_specs(11), target, LoadShape(rate=20.0), seed=1,
                                   max_duration=30, request_timeout=10, progress=False))
    starts = [r.start for r in sorted(run.records, key=lambda r: r.index)]
    expected = arrival_offsets(11, 20.0, 1.0, seed=1)
    assert np.allclose(starts, expected, atol=0.05)
