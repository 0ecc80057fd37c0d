"""Ingress guards without an engine: API keys, per-key token buckets, admission.

These run the real admission code inside a real Starlette app (httpx's ASGI
transport), so every status, header and body is the one a client would see; only
the engine is absent (admission never reaches it). Time-dependent arithmetic is
tested on the bucket with an explicit clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.config import LimitsConfig
from serving.ingress.admission import Admission, Rejected
from serving.ingress.auth import ApiKeyError, ApiKeys, bearer_token, key_id
from serving.ingress.limits import KeyLimiter, TokenBucket
from serving.ingress.shape import estimate_tokens
from serving.ingress.usage import (StreamEvents, StreamUsage, TokenCounts, token_counts,
                                   token_counts_of_body, total_tokens, total_tokens_of_body)

PLAIN, HASHED = "sk-plain-0123456789", "sk-hashed-9876543210"


def keys_file(tmp_path, text: str):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return path


@pytest.fixture
def keys(tmp_path) -> ApiKeys:
    digest = hashlib.sha256(HASHED.encode()).hexdigest()
    return ApiKeys.load(keys_file(tmp_path, f"# team keys\n\n  {PLAIN}  \nsha256:{digest.upper()}\n"))


# --- API keys ---------------------------------------------------------------

def test_plain_and_hashed_keys_both_work_and_yield_short_ids(keys):
    assert keys.check(PLAIN) == key_id(PLAIN) == hashlib.sha256(PLAIN.encode()).hexdigest()
    assert keys.check(HASHED) == key_id(HASHED)
    assert len(keys.digests) == 2  # the comment and the blank line are not keys


@pytest.mark.parametrize("presented", [None, "", "sk-wrong", PLAIN + " ", PLAIN[:-1],
                                       hashlib.sha256(HASHED.encode()).hexdigest()])
def test_wrong_keys_are_refused(keys, presented):
    # Presenting the stored hash itself must not authenticate.
    assert keys.check(presented) is None


@pytest.mark.parametrize("text, match", [
    ("", "holds no keys"),
    ("# only a comment\n", "holds no keys"),
    ("sha256:abc\n", "64 hex digits"),
    ("sha256:" + "g" * 64 + "\n", "64 hex digits"),
    ("ключ-доступа\n", "printable ASCII"),
    ("two words\n", "only .models=a,b. may follow"),  # a space ends the key
])
def test_bad_key_files_fail_with_the_line(tmp_path, text, match):
    with pytest.raises(ApiKeyError, match=match):
        ApiKeys.load(keys_file(tmp_path, text))


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(ApiKeyError, match="cannot read API keys file"):
        ApiKeys.load(tmp_path / "absent.txt")


def test_keys_file_reloads_when_it_changes_and_keeps_the_old_keys_if_broken(tmp_path):
    import os

    from serving.ingress.auth import KeysFile

    path = keys_file(tmp_path, f"{PLAIN}\n{HASHED}\n")
    keys = KeysFile(path)
    assert keys.check(HASHED) and not keys.reload_if_changed()  # unchanged: nothing to do
    fresh = tmp_path / "new"
    fresh.write_text(f"{PLAIN}\n")
    os.replace(fresh, path)
    assert keys.reload_if_changed()
    assert keys.check(HASHED) is None and keys.check(PLAIN) == key_id(PLAIN)
    path.write_text("sha256:not-hex\n")  # a half-edited file
    assert not keys.reload()
    assert keys.check(PLAIN) == key_id(PLAIN)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"),
    ("Basic abc", None), ("Bearer", None), ("Bearer   ", None), ("abc", None), (None, None),
])
def test_bearer_parsing(header, token):
    assert bearer_token(header) == token


# --- token buckets ------------------------------------------------------------

def test_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate_per_s=1.0, capacity=5, stamp=100.0)
    for _ in range(5):
        assert bucket.wait_for(1, now=100.0) == 0
        bucket.take(1)
    assert bucket.wait_for(1, now=100.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=100.5) == pytest.approx(0.5)
    assert bucket.wait_for(1, now=101.0) == 0
    # Never above capacity, however long it idles.
    assert bucket.wait_for(5, now=10_000.0) == 0 and bucket.level == 5


def test_request_bigger_than_a_minutes_budget_is_refused_not_capped():
    # Capping its charge at one bucket let a 1,000-prompt batch run for a minute's price.
    limiter = KeyLimiter(requests_per_minute=None, tokens_per_minute=600)
    assert limiter.too_large(601) and not limiter.too_large(600)
    assert not KeyLimiter(None, None).too_large(10**12)
    bucket = TokenBucket(rate_per_s=10.0, capacity=600, stamp=0.0)
    bucket.take(600)
    assert bucket.wait_for(600, now=0.0) == pytest.approx(60.0)
    assert bucket.wait_for(600, now=60.0) == 0


async def test_too_large_is_429_without_retry_after():
    async with client_for(app_for(LimitsConfig(tokens_per_minute=10_000), None)) as client:
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": ["x"] * 100,
                                                          "max_tokens": 512})
        err = assert_openai_error(resp, 429)
        assert err["code"] == "request_too_large" and "51,200" in err["message"]
        assert "retry-after" not in resp.headers
        # Nothing was charged: a request that fits still passes.
        ok = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 9_000})
        assert ok.status_code == 200


def test_requests_per_minute_limit_and_retry_after():
    limiter = KeyLimiter(requests_per_minute=5, tokens_per_minute=None)
    assert [limiter.admit("k1", 10) for _ in range(5)] == [0.0] * 5
    # One request refills every 12 s; Retry-After is whole seconds, rounded up.
    assert limiter.admit("k1", 10) == 12
    assert limiter.admit("k2", 10) == 0  # keys have their own buckets


def test_tokens_per_minute_limit_charges_nothing_when_refused():
    limiter = KeyLimiter(requests_per_minute=None, tokens_per_minute=1000)
    assert limiter.admit("k", 600) == 0
    assert limiter.admit("k", 600) == 12  # 200 missing at 1000/60 per second
    assert limiter.admit("k", 400) == 0   # the refused request took nothing


def test_both_limits_answer_with_the_longer_wait():
    limiter = KeyLimiter(requests_per_minute=60, tokens_per_minute=600)
    assert limiter.admit("k", 600) == 0
    assert limiter.admit("k", 300) == 30  # tokens: 30 s; requests: 1 s


def test_a_refund_gives_back_both_charges_up_to_the_capacity():
    limiter = KeyLimiter(requests_per_minute=1, tokens_per_minute=1000)
    assert limiter.admit("k", 600) == 0
    limiter.refund("k", 600)
    assert limiter.admit("k", 1000) == 0  # the request and its 600 tokens came back
    limiter.refund("k", 5000)
    limiter.refund("k", 5000)
    assert limiter.admit("k", 1000) == 0 and limiter.admit("k", 1) > 0  # never above a full bucket
    limiter.refund("unknown", 10)  # nothing charged, nothing to give back


def test_settling_gives_back_what_was_not_used():
    limiter = KeyLimiter(requests_per_minute=None, tokens_per_minute=1000)
    assert limiter.admit("k", 900) == 0
    assert limiter.admit("k", 900) > 0
    limiter.settle("k", charged=900, used=40)  # a short answer to a large max_tokens
    assert limiter.admit("k", 900) == 0
    limiter.settle("k", charged=900, used=5000)  # never above a full bucket when refunding,
    limiter.settle("k", charged=5000, used=0)
    assert limiter.admit("k", 1000) == 0 and limiter.admit("k", 1) > 0


def test_settling_charges_what_the_estimate_missed_down_to_one_minute_of_debt():
    limiter = KeyLimiter(requests_per_minute=None, tokens_per_minute=600)  # 10 tokens/s
    assert limiter.admit("k", 100) == 0
    limiter.settle("k", charged=100, used=400)
    assert limiter.admit("k", 201) == 1  # 200 left: 1 token short, 0.1 s, rounded up to 1
    limiter.settle("k", charged=0, used=10_000)  # far more than a minute's budget
    assert 119 <= limiter.admit("k", 600) <= 120  # 600 of debt plus the 600 asked, at 10/s
    limiter.settle("unknown", charged=10, used=20)  # nothing charged, nothing to settle
    KeyLimiter(requests_per_minute=5, tokens_per_minute=None).settle("k", 1, 2)  # no token bucket


def test_bucket_settle_refills_first_then_adjusts():
    bucket = TokenBucket(rate_per_s=1.0, capacity=100, stamp=0.0)
    bucket.take(100)
    bucket.settle(-30, now=10.0)  # 10 refilled, 30 given back
    assert bucket.level == pytest.approx(40)
    bucket.settle(500, now=10.0)
    assert bucket.level == -100  # debt is at most one bucket deep
    bucket.settle(-1000, now=10.0)
    assert bucket.level == 100


def test_disabled_limiter():
    assert not KeyLimiter(None, None).enabled


def test_token_estimate_is_prompt_quarter_plus_max_tokens_times_n():
    assert estimate_tokens({"max_tokens": 10, "n": 3}, "x" * 400) == 100 + 30
    assert estimate_tokens({"max_completion_tokens": 7}, "") == 7
    assert estimate_tokens({}, "abcd") == 1 + 256  # no max_tokens: the default is charged
    assert estimate_tokens({"max_tokens": "lots", "n": "two"}, "") == 256
    assert estimate_tokens({"max_tokens": 10}, "x" * 400, generates=False) == 100


async def test_routes_that_generate_nothing_are_charged_only_the_prompt():
    async with client_for(app_for(LimitsConfig(tokens_per_minute=10_000), None)) as client:
        body = {"model": "m", "prompt": "x" * 400}
        assert (await client.post("/tokenize", json=body)).json()["charged_tokens"] == 100
        assert (await client.post("/v1/completions", json=body)).json()["charged_tokens"] == 100 + 256


# --- admission through a real ASGI app ---------------------------------------

def app_for(limits: LimitsConfig, keys: ApiKeys | None) -> Starlette:
    admission = Admission(limits, keys)

    async def endpoint(request: Request):
        try:
            admitted = await admission.admit(request)
        except Rejected as rej:
            return rej.response
        return JSONResponse({"admitted": True, "key_id": admitted.key_id,
                             "charged_tokens": admitted.charged_tokens})

    return Starlette(routes=[Route("/v1/completions", endpoint, methods=["POST"]),
                             Route("/tokenize", endpoint, methods=["POST"])])


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    return err


GOOD = {"model": "m", "prompt": "hello", "max_tokens": 4}


async def test_auth_is_checked_before_anything_else(keys):
    async with client_for(app_for(LimitsConfig(), keys)) as client:
        resp = await client.post("/v1/completions", content=b"not json",
                                 headers={"content-type": "text/plain"})
        err = assert_openai_error(resp, 401)
        assert err["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
        for key in (PLAIN, HASHED):
            ok = await client.post("/v1/completions", json=GOOD,
                                   headers={"authorization": f"Bearer {key}"})
            assert ok.json()["key_id"] == key_id(key)


@pytest.mark.parametrize("body, param", [
    ({**GOOD, "n": 0}, "n"), ({**GOOD, "n": 9}, "n"), ({**GOOD, "n": 2.0}, "n"), ({**GOOD, "n": True}, "n"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"), ({**GOOD, "max_tokens": -3}, "max_tokens"),
    ({**GOOD, "max_tokens": "8"}, "max_tokens"), ({**GOOD, "max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({**GOOD, "temperature": -0.1}, "temperature"), ({**GOOD, "temperature": 2.5}, "temperature"),
    ({**GOOD, "temperature": "hot"}, "temperature"), ({**GOOD, "top_p": 0}, "top_p"),
    ({**GOOD, "top_p": 1.01}, "top_p"), ({**GOOD, "top_p": False}, "top_p"),
])
async def test_sampling_bounds_are_400_naming_the_parameter(body, param):
    async with client_for(app_for(LimitsConfig(), None)) as client:
        assert_openai_error(await client.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\"text\"", b"\xff\xfe", b"", b"{\"temperature\": NaN}"])
async def test_malformed_or_non_object_json_is_400(raw):
    async with client_for(app_for(LimitsConfig(), None)) as client:
        resp = await client.post("/v1/completions", content=raw,
                                 headers={"content-type": "application/json"})
        assert_openai_error(resp, 400)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"])
async def test_wrong_content_type_is_415(ctype):
    async with client_for(app_for(LimitsConfig(), None)) as client:
        resp = await client.post("/v1/completions", content=json.dumps(GOOD),
                                 headers={"content-type": ctype})
        assert_openai_error(resp, 415)


async def test_body_size_cap_with_and_without_content_length():
    async with client_for(app_for(LimitsConfig(max_body_bytes=1000), None)) as client:
        big = json.dumps({**GOOD, "prompt": "x" * 2000}).encode()
        assert_openai_error(await client.post("/v1/completions", content=big,
                                              headers={"content-type": "application/json"}), 413)

        async def chunked():  # no Content-Length: the cap applies while reading
            for i in range(0, len(big), 100):
                yield big[i:i + 100]
        resp = await client.post("/v1/completions", content=chunked(),
                                 headers={"content-type": "application/json"})
        assert "content-length" not in resp.request.headers
        assert_openai_error(resp, 413)
        exact = json.dumps({**GOOD, "prompt": ""}).encode()
        exact = exact.replace(b'"prompt": ""', b'"prompt": "' + b"y" * (1000 - len(exact)) + b'"')
        assert len(exact) == 1000
        ok = await client.post("/v1/completions", content=exact, headers={"content-type": "application/json"})
        assert ok.status_code == 200


async def test_rate_limit_429_has_retry_after_and_is_per_key(keys):
    limits = LimitsConfig(requests_per_minute=2)
    async with client_for(app_for(limits, keys)) as client:
        auth = {"authorization": f"Bearer {PLAIN}"}
        for _ in range(2):
            assert (await client.post("/v1/completions", json=GOOD, headers=auth)).status_code == 200
        resp = await client.post("/v1/completions", json=GOOD, headers=auth)
        err = assert_openai_error(resp, 429)
        assert err["type"] == "rate_limit_error" and int(resp.headers["retry-after"]) == 30
        other = await client.post("/v1/completions", json=GOOD, headers={"authorization": f"Bearer {HASHED}"})
        assert other.status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12)
message_like = st.fixed_dictionaries({}, optional={
    "role": json_values, "content": json_values | st.lists(st.dictionaries(
        st.sampled_from(["type", "text", "image_url"]), json_values, max_size=3), max_size=3)})
bodies = st.fixed_dictionaries({}, optional={
    "model": json_values, "prompt": json_values, "messages": st.lists(message_like, max_size=3) | json_values,
    "max_tokens": json_values, "max_completion_tokens": json_values, "n": json_values,
    "temperature": json_values, "top_p": json_values, "stream": json_values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(body=bodies)
@example(body={"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})
@example(body={"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
def test_admission_answers_every_json_body_without_crashing(body):
    """Any JSON object is either admitted or refused with an OpenAI-shaped 4xx — never an exception."""
    import asyncio

    async def run() -> httpx.Response:
        async with client_for(app_for(LimitsConfig(tokens_per_minute=10**9), None)) as client:
            return await client.post("/v1/completions", json=body)

    resp = asyncio.run(run())
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert_openai_error(resp, 400)


class _EmptyRegistry:
    class snapshot:  # noqa: N801 - stands in for a Ray actor method
        @staticmethod
        async def remote(max_age_s: float) -> list[dict]:
            return []


async def test_requests_no_engine_saw_are_not_charged_to_the_key(keys):
    """503 no_replica (and 429 at capacity) come after the rate-limit charge; the
    retry a client makes must not then be refused for the attempt that never ran."""
    from serving.ingress.app import IngressSettings, build_app
    from serving.ingress.pool import ReplicaPool

    settings = IngressSettings(model="m", expected_replicas=1, api_keys=keys,
                               limits=LimitsConfig(tokens_per_minute=1000))
    app = build_app(settings, ReplicaPool(_EmptyRegistry()))
    body = {"model": "m", "prompt": "hello", "max_tokens": 600}
    async with client_for(app) as client:
        for _ in range(3):  # 3 x 600 > 1000 tokens/min: only refunds keep these 503, not 429
            resp = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {PLAIN}"})
            assert assert_openai_error(resp, 503)["code"] == "no_replica"


# --- usage the engine reports (the limiter settles to it) -----------------------------------

def test_usage_of_a_plain_answer():
    assert total_tokens_of_body(b'{"usage": {"prompt_tokens": 3, "total_tokens": 12}}') == 12
    for bad in (b"not json", b"[]", b'{"usage": null}', b'{"usage": {"total_tokens": "12"}}',
                b'{"usage": {"total_tokens": true}}', b'{"usage": {"total_tokens": -1}}', b"\xff"):
        assert total_tokens_of_body(bad) is None
    assert total_tokens({"usage": {"total_tokens": 0}}) == 0


def test_usage_of_a_stream_is_its_last_usage_event_even_when_split_across_chunks():
    events = [b'data: {"choices": [{"text": "Par"}], "usage": null}\n\n',
              b'data: {"choices": [{"text": "is"}], "usage": {"total_tokens": 7}}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 8}}\n\n',
              b"data: [DONE]\n\n"]
    raw = b"".join(events)
    meter = StreamUsage(prompt_tokens=100)
    for i in range(0, len(raw), 7):  # the engine's chunks don't follow event boundaries
        meter.feed(raw[i:i + 7])
    assert meter.reported_tokens() == 8 and meter.total_tokens() == 8


def test_a_stream_without_usage_is_counted_by_its_events():
    # vLLM: a role event, one event per generated token, a finish event, [DONE].
    chat = [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n']
    chat += [b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'] * 40
    chat += [b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n', b"data: [DONE]\n\n"]
    meter = StreamUsage(prompt_tokens=12)
    for event in chat:
        meter.feed(event)
    assert meter.reported_tokens() is None
    assert meter.total_tokens() == 12 + 42  # the estimate errs by the 2 events without a token


def test_a_stream_of_grouped_tokens_is_never_charged_less_than_it_made():
    # engine.stream_interval 4: the first token alone, then up to 4 per event.
    made = 40
    groups = [1] + [4] * ((made - 1) // 4) + ([(made - 1) % 4] if (made - 1) % 4 else [])
    chat = [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n']
    chat += [b'data: {"choices": [{"delta": {"content": "%s"}}]}\n\n' % (b"x" * n) for n in groups]
    chat += [b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n', b"data: [DONE]\n\n"]
    meter = StreamUsage(prompt_tokens=12, tokens_per_event=4)
    for event in chat:
        meter.feed(event)
    assert 12 + made <= meter.total_tokens() <= 12 + made + 4 * 3


def test_token_counts_come_from_usage_or_are_estimated_from_events():
    assert token_counts({"usage": {"prompt_tokens": 3, "completion_tokens": 9}}) == \
        TokenCounts(3, 9, reported=True)
    for bad in ({}, {"usage": None}, {"usage": {"prompt_tokens": 3}},
                {"usage": {"prompt_tokens": True, "completion_tokens": 1}}):
        assert token_counts(bad) is None
    answer = {"choices": [{"text": 'a "usage": {"prompt_tokens": 1} in the text'}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    assert token_counts_of_body(json.dumps(answer).encode()) == TokenCounts(3, 9, reported=True)
    for bad in (b"", b'{"usage": null}', b'{"usage": {"prompt_tokens": 3', b'{"usage"}',
                b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}\xff'):
        assert token_counts_of_body(bad) is None, bad
    usage = StreamUsage(prompt_tokens=50)
    usage.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6, '
               b'"total_tokens": 10}}\n\ndata: [DONE]\n\n')
    assert usage.counts() == TokenCounts(4, 6, reported=True)


def test_stream_events_counts_events_however_the_reads_cut_them():
    # vLLM: a role event, one event per generated token, a finish event, [DONE].
    chat = [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n']
    chat += [b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'] * 40
    chat += [b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n', b"data: [DONE]\n\n"]
    raw = b"".join(chat)
    decoded = StreamUsage(prompt_tokens=12)
    decoded.feed(raw)
    for cut in (1, 2, 7, 61, len(raw)):  # every place an event's blank line can be split
        meter = StreamEvents(prompt_tokens=12)
        for i in range(0, len(raw), cut):
            meter.feed(raw[i:i + cut])
        meter.feed(b"")
        assert meter.counts() == decoded.counts() == TokenCounts(12, 42, reported=False)
    grouped = StreamEvents(prompt_tokens=0, tokens_per_event=3)
    grouped.feed(b'data: {"choices": []}\n\n' * 5)  # cut off before [DONE]: all 5 count
    assert grouped.counts().completion == 15


def test_stream_meter_reads_the_last_usage_event_and_settles_once_at_done():
    settled = []
    meter = StreamUsage(prompt_tokens=0, on_done=settled.append)
    meter.feed(b'data: {"choices": [], "usage": {"total_tokens": 9}}\n\n')
    meter.feed(b'data: {"choices": [{"text": "x"}], "usage": null}\n\n')  # not a count
    meter.feed(b'data: {"choices": [], "usage": {"total_tokens": 11}}\n\ndata: [DO')
    assert settled == []  # [DONE] not complete yet
    meter.feed(b"NE]\n\n")
    assert settled == [11]
    asyncio.run(meter.close(True))
    assert settled == [11]  # once


def test_a_broken_stream_is_settled_to_what_it_streamed():
    settled = []
    meter = StreamUsage(prompt_tokens=5, on_done=settled.append)
    for _ in range(7):
        meter.feed(b'data: {"choices": [{"text": "x"}]}\n\n')
    asyncio.run(meter.close(False))
    assert settled == [5 + 7]


# --- shape bounds and pricing (ingress/shape.py) ---------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, param", [
    ({**GOOD, "best_of": 1000}, "best_of"), ({**GOOD, "best_of": 0}, "best_of"),
    ({**GOOD, "logit_bias": {"50256": 1e9}}, "logit_bias"),
    ({**GOOD, "logit_bias": {"1": -101}}, "logit_bias"), ({**GOOD, "logit_bias": {"1": "x"}}, "logit_bias"),
    ({**GOOD, "logit_bias": [1, 2]}, "logit_bias"),
    ({**GOOD, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({**GOOD, "stop": ["x"] * 17}, "stop"),
    ({**GOOD, "prompt": ["p"] * 1025}, "prompt"),
    ({**GOOD, "prompt": [[1, 2]] * 1025}, "prompt"),
    ({**GOOD, "prompt": ["p"] * 200, "n": 8}, "n"),           # 1,600 sequences
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}, "text"]}, "messages[1]"),
    ({**CHAT, "messages": "hello"}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
    ({**CHAT, "tools": [{"type": "function"}] * 129}, "tools"),
])
async def test_lists_maps_and_roles_are_bounded_400_naming_the_parameter(body, param):
    async with client_for(app_for(LimitsConfig(), None)) as client:
        assert_openai_error(await client.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("depth", [65, 5_000, 100_000])
async def test_deep_nesting_is_400_not_500(depth):
    raw = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
    async with client_for(app_for(LimitsConfig(), None)) as client:
        resp = await client.post("/v1/completions", content=raw,
                                 headers={"content-type": "application/json"})
        assert "nests deeper than 64" in assert_openai_error(resp, 400)["message"]


async def test_bounds_are_configurable_and_valid_shapes_pass():
    limits = LimitsConfig(max_stop=2, max_prompts=3, max_json_depth=4)
    async with client_for(app_for(limits, None)) as client:
        assert_openai_error(await client.post("/v1/completions", json={**GOOD, "stop": ["a", "b", "c"]}), 400, "stop")
        assert_openai_error(await client.post("/v1/completions", json={**GOOD, "prompt": ["a"] * 4}), 400, "prompt")
        ok = [{**GOOD, "stop": ["a", "b"]}, {**GOOD, "prompt": ["a", "b", "c"]}, {**GOOD, "prompt": [1, 2, 3, 4, 5]},
              {**CHAT, "messages": [{"role": r, "content": "x"} for r in ("system", "user", "assistant")]},
              {**GOOD, "logit_bias": {"1": 100, "2": -100}}, {**GOOD, "best_of": 8}]
        for body in ok:
            resp = await client.post("/v1/completions", json=body)
            assert resp.status_code == 200, (body, resp.text)


def test_a_batch_is_priced_for_every_prompt_and_sequence():
    one = estimate_tokens({"prompt": "x" * 400, "max_tokens": 512}, "x" * 400)
    batch = {"prompt": ["x" * 400] * 1000, "max_tokens": 512}
    assert estimate_tokens(batch, "x" * 400) == 1000 * one
    # Token-id prompts count their ids; a batch of them each one.
    assert estimate_tokens({"prompt": list(range(300)), "max_tokens": 10}, "") == 300 + 10
    assert estimate_tokens({"prompt": [list(range(300))] * 4, "max_tokens": 10}, "") == 4 * (300 + 10)
    # best_of generates best_of sequences per prompt even when n is smaller.
    assert estimate_tokens({"prompt": "", "max_tokens": 10, "n": 2, "best_of": 5}, "") == 50


async def test_a_1000_prompt_batch_is_charged_1000_times():
    async with client_for(app_for(LimitsConfig(tokens_per_minute=10_000_000), None)) as client:
        one = (await client.post("/v1/completions", json={"model": "m", "prompt": "x" * 400,
                                                          "max_tokens": 512})).json()["charged_tokens"]
        batch = {"model": "m", "prompt": ["x" * 400] * 1000, "max_tokens": 512}
        charged = (await client.post("/v1/completions", json=batch)).json()["charged_tokens"]
        assert charged == 1000 * one == 1000 * (100 + 512)


# --- per-key model access (keys file "models=") --------------------------------------

async def test_a_key_limited_to_some_models_gets_403_naming_model_for_others(tmp_path):
    keys = ApiKeys.load(keys_file(tmp_path, f"{PLAIN} models=base,tone\nsha256:"
                                  f"{hashlib.sha256(HASHED.encode()).hexdigest()}\n"))
    admission_app = Starlette(routes=[Route("/v1/completions", _admit_endpoint(
        Admission(LimitsConfig(), keys, default_model="base")), methods=["POST"])])
    limited, free = {"Authorization": f"Bearer {PLAIN}"}, {"Authorization": f"Bearer {HASHED}"}
    async with client_for(admission_app) as client:
        for model, code in (("base", 200), ("tone", 200), (None, 200), ("other", 403), (["base"], 403)):
            body = {"prompt": "hi"} if model is None else {"model": model, "prompt": "hi"}
            resp = await client.post("/v1/completions", json=body, headers=limited)
            if code == 403:
                assert assert_openai_error(resp, 403, param="model")["code"] == "model_not_allowed"
            else:
                assert resp.status_code == 200, resp.text
        resp = await client.post("/v1/completions", json={"model": "other", "prompt": "hi"}, headers=free)
        assert resp.status_code == 200


def test_keys_file_options_are_checked(tmp_path):
    for bad in (f"{PLAIN} model=a", f"{PLAIN} models=", f"{PLAIN} models=a extra"):
        with pytest.raises(ApiKeyError, match="models=a,b"):
            ApiKeys.load(keys_file(tmp_path, bad + "\n"))


def _admit_endpoint(admission: Admission):
    async def endpoint(request: Request):
        try:
            admitted = await admission.admit(request)
        except Rejected as rej:
            return rej.response
        return JSONResponse({"admitted": True, "key_id": admitted.key_id})
    return endpoint
