"""Metric aggregation: exact expected values, and agreement with vLLM's arithmetic."""

import pytest

from benchmarks.metrics import parse_slo, summarize
from benchmarks.stream import RequestRecord


def rec(i, ttft, itl, out, prompt=10, ok=True, error_class=None):
    e2e = None if ttft is None else ttft + sum(itl)
    return RequestRecord(
        index=i, start=0.0, ok=ok, status=200 if ok else None, error_class=error_class,
        error=None, ttft=ttft, itl=list(itl), e2e=e2e, prompt_tokens=prompt if ok else None,
        output_tokens=out if ok else 0, usage_reported=True,
    )


def records():
    return [
        # TTFT 0.1..0.4 s; E2E = TTFT + sum(ITL)
        rec(0, 0.1, [0.05, 0.05, 0.05], out=4),            # e2e .25, tpot .05
        rec(1, 0.2, [0.1, 0.1], out=3, prompt=20),         # e2e .4,  tpot .1
        rec(2, 0.3, [0.2], out=2, prompt=30),              # e2e .5,  tpot .2
        rec(3, 0.4, [], out=1, prompt=40),                 # e2e .4,  no tpot
        rec(4, None, [], out=0, ok=False, error_class="http_500"),
        rec(5, None, [], out=0, ok=False, error_class="timeout"),
        rec(6, None, [], out=0, ok=False, error_class="cancelled"),
    ]


def test_counts_throughput_and_errors():
    s = summarize(records(), duration_s=4.0)
    assert (s.sent, s.completed, s.failed, s.cancelled) == (7, 4, 2, 1)
    assert s.total_input_tokens == 100 and s.total_output_tokens == 10
    assert s.request_throughput == 1.0
    assert s.output_throughput == 2.5
    assert s.total_token_throughput == 27.5
    assert s.errors == {"http_500": 1, "timeout": 1, "cancelled": 1}
    assert s.error_rate == pytest.approx(2 / 6)
    assert s.goodput is None and s.slo_attainment is None


def test_latency_statistics_in_ms():
    s = summarize(records(), duration_s=4.0)
    approx = lambda v: pytest.approx(v, rel=1e-12)  # noqa: E731
    # TTFT [100, 200, 300, 400] ms; numpy linear percentiles
    assert s.ttft.count == 4
    assert s.ttft.mean == approx(250.0) and s.ttft.median == approx(250.0)
    assert s.ttft.p90 == approx(370.0) and s.ttft.p99 == approx(397.0)
    assert (s.ttft.min, s.ttft.max) == (approx(100.0), approx(400.0))
    # TPOT only for >1 output token: [50, 100, 200]
    assert s.tpot.count == 3 and s.tpot.mean == approx(350 / 3) and s.tpot.median == approx(100.0)
    assert s.tpot.p90 == approx(180.0) and s.tpot.p99 == approx(198.0)
    # ITL pooled over requests: [50, 50, 50, 100, 100, 200]
    assert s.itl.count == 6 and s.itl.mean == approx(550 / 6) and s.itl.median == approx(75.0)
    assert s.itl.p90 == approx(150.0) and s.itl.p99 == approx(195.0)
    # E2E [250, 400, 500, 400]
    assert s.e2el.median == approx(400.0) and s.e2el.mean == approx(387.5)


def test_goodput_counts_requests_meeting_every_slo():
    # ttft ≤ 300 ms keeps #0..#2; tpot ≤ 100 ms drops #2 (200 ms); #3 has 1 token
    # (TPOT counts as 0) but fails TTFT.
    s = summarize(records(), duration_s=4.0, slo_ms=parse_slo("ttft=300,tpot=100"))
    assert s.good_completed == 2 and s.goodput == 0.5 and s.slo_attainment == 0.5
    s = summarize(records(), duration_s=4.0, slo_ms=parse_slo("ttft=0.4s"))
    assert s.good_completed == 4
    s = summarize(records(), duration_s=2.0, slo_ms=parse_slo("e2e=399"))
    assert s.good_completed == 1 and s.goodput == 0.5


def test_parse_slo_units_and_errors():
    assert parse_slo("ttft=500, tpot=50ms,e2e=2s") == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    assert parse_slo("ttft:250") == {"ttft": 250.0}
    assert parse_slo(None) == {}
    for bad in ("itl=5", "ttft", "ttft=abc", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_no_successful_request_gives_zero_stats():
    s = summarize([rec(0, None, [], 0, ok=False, error_class="connect_error")], duration_s=1.0)
    assert s.completed == 0 and s.ttft.count == 0 and s.ttft.median == 0.0
    assert s.request_throughput == 0.0 and s.errors == {"connect_error": 1}


def test_same_figures_as_vllm_calculate_metrics():
    """Feed identical outputs to vLLM's own aggregation and compare every figure."""
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    ours = records()
    outputs = []
    for r in ours:
        o = RequestFuncOutput()
        o.success = r.ok
        if r.ok:
            o.ttft, o.itl, o.latency = r.ttft, r.itl, r.e2e
            o.output_tokens, o.prompt_len = r.output_tokens, r.prompt_tokens
        outputs.append(o)
    finished = [o for o, r in zip(outputs, ours) if r.error_class != "cancelled"]
    theirs, _ = serve.calculate_metrics(
        input_requests=[], outputs=finished, dur_s=4.0, tokenizer=None,
        selected_percentiles=[90.0, 99.0], goodput_config_dict={"ttft": 300.0, "tpot": 100.0},
    )
    s = summarize(ours, 4.0, {"ttft": 300.0, "tpot": 100.0})
    approx = lambda v: pytest.approx(v, rel=1e-9)  # noqa: E731
    assert s.completed == theirs.completed and s.failed == theirs.failed
    assert s.total_input_tokens == theirs.total_input
    assert s.total_output_tokens == theirs.total_output
    assert s.request_throughput == approx(theirs.request_throughput)
    assert s.output_throughput == approx(theirs.output_throughput)
    assert s.total_token_throughput == approx(theirs.total_token_throughput)
    assert s.goodput == approx(theirs.request_goodput)
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = getattr(s, name)
        assert stats.mean == approx(getattr(theirs, f"mean_{name}_ms"))
        assert stats.median == approx(getattr(theirs, f"median_{name}_ms"))
        pct = dict(getattr(theirs, f"percentiles_{name}_ms"))
        assert stats.p90 == approx(pct[90.0]) and stats.p99 == approx(pct[99.0])
