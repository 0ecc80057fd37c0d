"""Client behaviour that needs exact server answers: retries, ordering, failure bookkeeping.

A real HTTP server on loopback answers from a script (a status, headers, a body, a
delay per request), so retries, Retry-After, out-of-order completion and a 400 in the
middle of a batch happen deterministically and in well under a second each.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from serving.client import (APIError, AsyncClient, Client, ExtractionError, RetryPolicy,
                            TranslationItem, atranslate_batch, extract_json, translate_batch)
from serving.client.cli import (EXIT_API, EXIT_INVALID_JSON, EXIT_OK, EXIT_PARTIAL,
                                EXIT_SCHEMA, EXIT_TRUNCATED, EXIT_USAGE, main)
from serving.client.http import parse_retry_after
from serving.client.translate import read_jsonl

Reply = tuple[int, dict, object, float]  # status, headers, JSON body, delay seconds
FAST = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.05)


class Scripted:
    """Loopback server whose replies come from ``script(path, body, n)``; ``n`` counts
    requests to that path. Records every request body."""

    def __init__(self, script: Callable[[str, dict, int], Reply]):
        self.script = script
        self.requests: list[tuple[str, dict, float]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _answer(self, body: dict) -> None:
                with outer._lock:
                    n = sum(1 for p, _, _ in outer.requests if p == self.path)
                    outer.requests.append((self.path, body, time.monotonic()))
                status, headers, payload, delay = outer.script(self.path, body, n)
                time.sleep(delay)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer({})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                self._answer(json.loads(self.rfile.read(length) or b"{}"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def models() -> Reply:
    return 200, {}, {"data": [{"id": "m", "max_model_len": 8192}]}, 0.0


def completion(text: str, reason: str = "stop") -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text},
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}


@pytest.fixture
def scripted():
    servers: list[Scripted] = []

    def make(script: Callable[[str, dict, int], Reply]) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# --- http ------------------------------------------------------------------------


def test_429_is_retried_after_the_servers_retry_after(scripted):
    def script(path, body, n):
        if path == "/v1/models":
            return models()
        if n == 0:
            return 429, {"retry-after": "1"}, {"error": {"message": "slow down"}}, 0.0
        return 200, {}, completion("ok"), 0.0

    srv = scripted(script)
    with Client(srv.url, retry=FAST) as c:
        assert c.chat([{"role": "user", "content": "hi"}])["choices"][0]["message"]["content"] == "ok"
    chats = [t for p, _, t in srv.requests if p == "/v1/chat/completions"]
    assert len(chats) == 2 and chats[1] - chats[0] >= 0.95  # honoured, not FAST's 10 ms


def test_5xx_retried_then_reported_400_never_retried(scripted):
    def script(path, body, n):
        if path == "/v1/models":
            return models()
        if body["messages"][0]["content"] == "bad":
            return 400, {}, {"error": {"message": "prompt too long", "code": 400}}, 0.0
        return 503, {}, {"message": "draining"}, 0.0

    srv = scripted(script)
    with Client(srv.url, retry=FAST) as c:
        with pytest.raises(APIError) as bad:
            c.chat([{"role": "user", "content": "bad"}])
        assert bad.value.status == 400 and bad.value.message == "prompt too long"
        with pytest.raises(APIError) as busy:
            c.chat([{"role": "user", "content": "x"}])
        assert busy.value.status == 503 and busy.value.message == "draining"
    contents = [b["messages"][0]["content"] for p, b, _ in srv.requests if p.startswith("/v1/chat")]
    assert contents.count("bad") == 1 and contents.count("x") == 1 + FAST.max_retries


def test_api_key_is_sent_as_bearer(scripted, monkeypatch):
    srv = scripted(lambda path, body, n: models())
    seen = {}

    class Probe(Client):
        def _headers(self):
            seen.update(super()._headers())
            return super()._headers()

    monkeypatch.setenv("QWEN_SERVE_API_KEY", "k-123")
    with Probe(srv.url) as c:
        assert c.default_model() == "m" and c.max_model_len() == 8192
    assert seen["authorization"] == "Bearer k-123"


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert RetryPolicy(retry_after_max=5).delay(0, "120") == 5


# --- translate bookkeeping ---------------------------------------------------------


def translator(fail: set[str]) -> Callable[[str, dict, int], Reply]:
    """Echo translations; earlier items answer later (so completion order is reversed);
    texts in ``fail`` get a 400, text "flaky" gets one 429 first."""
    flaky_seen = []

    def script(path, body, n):
        if path == "/v1/models":
            return models()
        text = body["messages"][-1]["content"]
        if text in fail:
            return 400, {}, {"error": {"message": f"refused {text}"}}, 0.0
        if text == "flaky" and not flaky_seen:
            flaky_seen.append(1)
            return 429, {"retry-after": "0"}, {"error": {"message": "busy"}}, 0.0
        delay = 0.02 * (10 - int(text[1:])) if text[1:].isdigit() else 0.0
        return 200, {}, completion(f"<{text}>"), max(delay, 0.0)

    return script


def test_translate_keeps_order_and_reports_the_failed_item(scripted):
    srv = scripted(translator(fail={"t3"}))
    texts = [f"t{i}" for i in range(8)] + ["flaky"]
    with Client(srv.url, retry=FAST) as c:
        out = translate_batch(texts, target="en", client=c, concurrency=4)
    assert [it.index for it in out] == list(range(9))
    assert [it.translation for it in out if it.ok] == [f"<{t}>" for t in texts if t != "t3"]
    (bad,) = [it for it in out if not it.ok]
    assert (bad.index, bad.status, bad.error) == (3, 400, "refused t3")
    # Completion order differed from input order (so ordering was really restored).
    done = [b["messages"][-1]["content"] for p, b, _ in srv.requests if p.startswith("/v1/chat")]
    assert done != texts


async def test_async_translate_bounds_concurrency_and_keeps_order(scripted):
    in_flight, peak, lock = [0], [0], threading.Lock()

    base = translator(fail={"t5"})

    def script(path, body, n):
        if path == "/v1/models":
            return models()
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            status, h, payload, delay = base(path, body, n)
            time.sleep(delay + 0.02)
            return status, h, payload, 0.0
        finally:
            with lock:
                in_flight[0] -= 1

    srv = scripted(script)
    texts = [f"t{i}" for i in range(10)]
    async with AsyncClient(srv.url, retry=FAST) as c:
        out = await atranslate_batch(texts, target="fr", source="en", client=c, concurrency=3)
    assert peak[0] <= 3
    assert [it.translation for it in out] == [None if t == "t5" else f"<{t}>" for t in texts]
    assert [it.status for it in out].count(400) == 1 and out[5].error == "refused t5"
    system = next(b for p, b, _ in srv.requests if p.startswith("/v1/chat"))["messages"][0]
    assert "from English into French" in system["content"]


def test_read_jsonl_keeps_places_of_bad_lines():
    items = read_jsonl(['"plain"', "", '{"id": 7, "text": "obj"}', "{oops", '{"x": 1}'])
    assert [(i.index, i.source) for i in items] == [(0, "plain"), (1, "obj"), (2, None), (3, None)]
    assert items[1].meta == {"id": 7} and "invalid JSON" in items[2].error
    assert items[3].to_json()["error"]["status"] is None


def test_translate_cli_writes_jsonl_in_order_and_exits_partial(scripted, tmp_path, capsys):
    srv = scripted(translator(fail={"t2"}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "text": f"t{i}"}) for i in range(6)) + "\n")
    rc = main(["translate", "--to", "en", str(src), "--base-url", srv.url, "--no-progress"])
    out, err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert rc == EXIT_PARTIAL
    assert [r["id"] for r in recs] == list(range(6))
    assert [r.get("translation") for r in recs] == ["<t0>", "<t1>", None, "<t3>", "<t4>", "<t5>"]
    assert recs[2]["error"] == {"message": "refused t2", "status": 400}
    assert "item 2 failed: HTTP 400" in err and "1 of 6" in err


# --- extract retry and exit codes ------------------------------------------------

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}},
          "required": ["n"], "additionalProperties": False}


def answers(*texts: tuple[str, str]) -> Callable[[str, dict, int], Reply]:
    def script(path, body, n):
        if path == "/v1/models":
            return models()
        text, reason = texts[min(n, len(texts) - 1)]
        return 200, {}, completion(text, reason), 0.0
    return script


def test_extract_sends_json_schema_and_retries_once(scripted):
    srv = scripted(answers(('{"n": 9}', "stop"), ('{"n": 4}', "stop")))
    got = extract_json("four", SCHEMA, base_url=srv.url)
    assert got.value == {"n": 4} and got.attempts == 2
    body, retry = [b for p, b, _ in srv.requests if p.startswith("/v1/chat")]
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == SCHEMA
    assert rf["json_schema"]["strict"] is True and body["temperature"] == 0.3
    # The retry decodes greedily: resampling repeats sampling's accidents (extract.py).
    assert retry["temperature"] == 0.0 and retry["response_format"] == rf


def test_extract_refuses_control_characters_strictly(scripted):
    srv = scripted(answers(('{"n": 1, "s": "a\tb"}', "stop")))
    with pytest.raises(ExtractionError) as exc:
        extract_json("x", {"type": "object"}, base_url=srv.url)
    assert exc.value.kind == "invalid_json" and exc.value.attempts == 2


@pytest.mark.parametrize("reply,code", [
    (('{"n": 2}', "stop"), EXIT_OK),
    (('{"n": 2', "stop"), EXIT_INVALID_JSON),
    (('{"n": 7}', "stop"), EXIT_SCHEMA),
    (('{"n": ', "length"), EXIT_TRUNCATED),
])
def test_extract_cli_exit_codes(scripted, tmp_path, capsys, reply, code):
    srv = scripted(answers(reply))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["extract", "--schema", str(schema), "two", "--base-url", srv.url]) == code
    out, err = capsys.readouterr()
    if code == EXIT_OK:
        assert json.loads(out) == {"n": 2}
    else:
        assert "after 2 attempt(s)" in err


def test_extract_cli_usage_and_server_errors(scripted, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    srv = scripted(lambda path, body, n: (401, {}, {"error": {"message": "no key"}}, 0.0))
    assert main(["extract", "--schema", str(bad), "x", "--base-url", srv.url]) == EXIT_USAGE
    assert main(["extract", "--schema", "sentiment", "x", "--base-url", srv.url]) == EXIT_API
    assert "HTTP 401: no key" in capsys.readouterr().err


def test_prebuilt_failed_items_pass_through(scripted):
    srv = scripted(translator(fail=set()))
    items = [TranslationItem(0, "t1"), TranslationItem(1, None, error="bad line")]
    out = translate_batch(items, target="en", base_url=srv.url)
    assert out[0].translation == "<t1>" and out[1].error == "bad line"
    assert sum(p.startswith("/v1/chat") for p, _, _ in srv.requests) == 1


# --- summarize map-reduce recursion ------------------------------------------------


def tiny_engine(context: int = 1000) -> Callable[[str, dict, int], Reply]:
    """A word-per-token engine with a small context; every summary is exactly
    ``max_tokens`` long, so the reduce cannot fit in one call and must recurse."""
    counter = [0]
    lock = threading.Lock()

    def script(path, body, n):
        if path == "/v1/models":
            return models()
        if path == "/tokenize":
            if "messages" in body:
                return 200, {}, {"count": 50, "tokens": [0] * 50, "max_model_len": context}, 0.0
            words = body["prompt"].split()
            return 200, {}, {"count": len(words), "tokens": [int(w[1:]) for w in words],
                             "token_strs": None, "max_model_len": context}, 0.0
        if path == "/detokenize":
            return 200, {}, {"prompt": " ".join(f"w{t}" for t in body["tokens"])}, 0.0
        with lock:
            counter[0] += 1
            k = counter[0]
        out = completion(f"S{k}")
        out["usage"]["completion_tokens"] = body["max_tokens"]
        return 200, {}, out, 0.0

    return script


@pytest.mark.parametrize("use_async", [False, True])
def test_summarize_reduces_recursively_until_one_call(scripted, use_async):
    from serving.client import asummarize, summarize

    srv = scripted(tiny_engine())
    doc = " ".join(f"w{i}" for i in range(3000))
    kw = dict(base_url=srv.url, chunk_tokens=300, overlap=50, max_tokens=100, concurrency=3)
    res = asyncio.run(asummarize(doc, **kw)) if use_async else summarize(doc, **kw)
    chunks = res.plan.chunks
    # 12 chunks of <= 300 tokens; summaries of 100 tokens pack 2 per 300-token call:
    # 12 -> 6 -> 3 -> 2 -> 1 final call.
    assert len(chunks) == 12 and res.levels == 4 and res.calls == 12 + 6 + 3 + 2 + 1
    assert all(ch.text == " ".join(f"w{i}" for i in range(ch.start, ch.end)) for ch in chunks)
    prompts = [b["messages"][-1]["content"] for p, b, _ in srv.requests if p.startswith("/v1/chat")]
    map_prompts, reduce_prompts = prompts[:12], prompts[12:]
    assert sorted(int(p.split("part ")[1].split(" ")[0]) for p in map_prompts) == list(range(1, 13))
    # Every reduce call got at most two summaries, the last one exactly two.
    assert all(p.count("\n\nS") <= 2 for p in reduce_prompts)
    assert reduce_prompts[-1].count("\n\nS") == 2
    assert res.summary == f"S{len(prompts)}"
