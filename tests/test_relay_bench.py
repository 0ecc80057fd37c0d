"""The relay benchmark's pieces, run for real at small scale (synthetic engine + the real
ingress app in subprocesses): what a client gets through the ingress is what the engine
sent, and the benchmark's figures come out. Speed is not asserted (shared CI cores)."""

from __future__ import annotations

import json

import pytest

from benchmarks.relay import NON_STREAM_BODY, Harness, fetch, measure, stream_body

CREATED = 1_700_000_000  # fixed, so two answers to the same request are byte-identical


@pytest.fixture(scope="module")
def harness():
    with Harness(pin=False, created=CREATED) as h:  # stops both processes on any failure
        yield h


def _exchange(h: Harness, target: str, path: str, body: dict, request_id: str):
    return fetch(h.port(target), "POST", path, json.dumps(body).encode(),
                 {"x-request-id": request_id})


def _events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-80:]
    return body[:-2].split(b"\n\n")


@pytest.mark.parametrize("path, field", [("/v1/chat/completions", "delta"), ("/v1/completions", "text")])
def test_every_streamed_event_arrives_through_the_ingress_in_order_and_intact(harness, path, field):
    tokens = 20
    body = {**stream_body(tokens), "stream_options": {"include_usage": True}}
    if path == "/v1/completions":
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "hi"}
    status_d, _, direct = _exchange(harness, "direct", path, body, "relay-test-stream")
    status_t, headers_t, through = _exchange(harness, "through", path, body, "relay-test-stream")
    assert status_d == status_t == 200
    assert headers_t["content-type"].startswith("text/event-stream")
    d, t = _events(direct), _events(through)
    role = 1 if field == "delta" else 0
    assert len(d) == role + tokens + 3  # (role), tokens, finish, usage, [DONE]
    assert t == d
    assert t[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: "))["choices"][0] for e in t[role:role + tokens]]
    texts = [c["delta"]["content"] if field == "delta" else c["text"] for c in chunks]
    assert "".join(texts) == "".join(f" t{i}" for i in range(tokens))
    assert json.loads(t[-2].removeprefix(b"data: "))["usage"]["completion_tokens"] == tokens


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 5}),
    ("/v1/completions", NON_STREAM_BODY),
])
def test_non_stream_answers_pass_through_byte_identical(harness, path, body):
    status_d, _, direct = _exchange(harness, "direct", path, body, "relay-test-plain")
    status_t, headers_t, through = _exchange(harness, "through", path, body, "relay-test-plain")
    assert status_d == status_t == 200
    assert headers_t["content-type"] == "application/json"
    assert through == direct
    assert json.loads(through)["usage"]["completion_tokens"] == body["max_tokens"]


def test_the_benchmark_reports_relayed_events_and_ingress_cpu(harness):
    result = measure(harness, [16], max_tokens=16, warmup_s=0.3, seconds=1.5, non_stream_concurrency=8)
    (level,) = result["levels"]
    assert level["streams"] == 16 and level["offered_events_per_s"] == 16 * 50
    for run in (level["direct"], level["through"]):
        assert run["events_per_s"] > 0 and run["errors"] == 0 and run["itl_samples"] > 0
    assert level["ingress_cpu_us_per_event"] > 0
    ns = result["non_stream"]
    assert ns["direct"]["requests_per_s"] > 0 and ns["through"]["requests_per_s"] > 0
    assert ns["direct"]["errors"] == ns["through"]["errors"] == 0
    assert ns["ingress_cpu_us_per_request"] > 0
