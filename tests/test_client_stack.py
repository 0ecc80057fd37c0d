"""The seed's three workflows against the real stack (embedded SmolLM2, 8192 context).

Kept small for two CPU cores: the 20 sentiment runs go all at once (one batch), the
summary of a document just over the context (9k tokens, three chunks) uses 48-token
chunk summaries, the 50-line batch 16-token translations.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from serving.client import (AsyncClient, Client, aextract_json, sentiment_prompt,
                            sentiment_schema, summarize)
from serving.client.cli import EXIT_PARTIAL
from serving.client.extract import SENTIMENT_SYSTEM
from serving.client.chunking import check_spans, plan_spans, safe_cuts

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent


def make_document(paragraphs: int, seed: int = 7) -> str:
    """A long, varied, deterministic text (~95 tokens a paragraph, some non-ASCII)."""
    r = random.Random(seed)
    towns = ["Arden", "Belmont", "Corwin", "Dunmore", "Elgin", "Fairview", "Glenrock"]
    things = ["bridge", "library", "railway station", "market", "harbour", "school", "mill"]
    out = []
    for i in range(paragraphs):
        out.append(
            f"Chapter {i + 1}. In {1800 + r.randint(0, 200)}, the people of {r.choice(towns)} "
            f"finished a new {r.choice(things)} after {r.randint(2, 40)} years of work. It cost "
            f"{r.randint(1, 900)} thousand crowns and employed {r.randint(10, 5000)} workers. "
            f"The mayor, {r.choice(['Ada', 'Boris', 'Clara', 'Dmitri', 'Elena'])} "
            f"{r.choice(['Stone', 'Rivers', 'Hale', 'Moss'])}, called it the pride of the "
            f"valley; critics said the money should have gone to the {r.choice(things)} "
            f"instead. Naïve visitors still café-hop there — “déjà vu”, they say.")
    return "\n\n".join(out)


def run_cli(stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if stack.api_key:
        env["QWEN_SERVE_API_KEY"] = stack.api_key
    return subprocess.run(
        [sys.executable, "-m", "serving.client", *args, "--base-url", stack.base_url,
         "--model", stack.model], input=stdin, capture_output=True, text=True, env=env,
        timeout=300, cwd=ROOT)


async def test_sentiment_example_is_strictly_valid_20_of_20(stack):
    schema = sentiment_schema()
    validator = jsonschema.Draft202012Validator(schema)
    async with AsyncClient(stack.base_url, stack.api_key) as c:
        # All at once: the engine batches them (64 sequences allowed), one wave, not two.
        results = await asyncio.gather(
            *(aextract_json(sentiment_prompt(), schema, client=c, model=stack.model,
                            system=SENTIMENT_SYSTEM, temperature=0.3) for _ in range(20)),
            return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)}/20 failed: {failures[:3]}"
    for r in results:
        value = json.loads(r.raw, strict=True)  # independent of the client's own check
        validator.validate(value)
        assert isinstance(value, list) and len(value) == 3
    first_try = sum(r.attempts == 1 for r in results)
    print(f"sentiment: 20/20 valid, {first_try}/20 on the first attempt")


def test_extract_cli_sentiment_example(stack):
    proc = run_cli(stack, "extract", "--example", "sentiment")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout, strict=True), sentiment_schema())


def test_summarize_longer_than_the_context_exact_chunks(stack):
    doc = make_document(95)
    chunk, overlap, max_tokens = 4096, 512, 48
    with Client(stack.base_url, stack.api_key) as c:
        ids = c.tokenize(doc, stack.model)["tokens"]
        # Over the 8,192 context (map-reduce is needed) and over two chunks, so that one
        # chunk shares its overlap on both sides.
        assert len(ids) >= 8_600 and -(-(len(ids) - overlap) // (chunk - overlap)) >= 3
        result = summarize(doc, client=c, model=stack.model, chunk_tokens=chunk,
                           overlap=overlap, max_tokens=max_tokens, concurrency=2)
        shared = [c.detokenize(a.token_ids[-overlap:], stack.model)
                  for a in result.plan.chunks[:-1]]
    plan = result.plan
    chunks = plan.chunks
    assert plan.n_tokens == len(ids) and plan.context == 8192
    assert chunks[0].start == 0 and chunks[-1].end == len(ids)
    assert len(chunks) == -(-(len(ids) - overlap) // (chunk - overlap))
    for ch in chunks:
        assert ch.end - ch.start <= chunk
        assert ch.token_ids == ids[ch.start:ch.end]
        # The server's own count of the whole prompt leaves room for the answer.
        assert ch.prompt_tokens + max_tokens <= plan.context
        assert ch.summary
    for a, b, text in zip(chunks, chunks[1:], shared):
        assert b.start == a.end - overlap
        assert a.token_ids[-overlap:] == b.token_ids[:overlap]
        # The same text closes one chunk and opens the next: no character was split.
        assert a.text.endswith(text) and b.text.startswith(text) and "\ufffd" not in text
    assert result.summary.strip() and result.levels >= 1
    assert result.calls == len(chunks) + result.levels  # one reduce call per level here

    # --plan prints the same boundaries without generating anything.
    proc = run_cli(stack, "summarize", "-", "--plan", "--chunk-tokens", str(chunk),
                   "--overlap", str(overlap), "--max-tokens", str(max_tokens), stdin=doc)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("[")[1].split(")")[0] for line in proc.stdout.splitlines()
            if "tokens [" in line]
    assert rows == [f"{ch.start}, {ch.end}" for ch in chunks]


def test_chunk_cuts_never_split_a_character(stack):
    """Chinese and emoji span several byte-level tokens: a cut between them would
    detokenize to U+FFFD. The plan, fed the server's token strings, avoids that."""
    doc = "今天天气很好，我们去公园散步。蝴蝶🦋在花丛中飞舞。" * 40
    with Client(stack.base_url, stack.api_key) as c:
        tok = c.tokenize(doc, stack.model, token_strs=True)
        ids = tok["tokens"]
        spans = plan_spans(len(ids), 97, 13, safe_cuts(tok["token_strs"], len(ids)))
        check_spans(spans, len(ids), 97, 13)
        naive = plan_spans(len(ids), 97, 13)
        texts = [c.detokenize(ids[s.start:s.end], stack.model) for s in spans]
        naive_texts = [c.detokenize(ids[s.start:s.end], stack.model) for s in naive]
    assert any("\ufffd" in t for t in naive_texts)  # the hazard is real here
    assert not any("\ufffd" in t for t in texts)


def test_summarize_short_document_is_one_call(stack):
    doc = make_document(3)
    result = summarize(doc, base_url=stack.base_url, api_key=stack.api_key, model=stack.model,
                       max_tokens=32)
    assert result.calls == 1 and len(result.plan.chunks) == 1 and result.summary


def test_translate_50_lines_one_too_long(stack, tmp_path):
    lines = [{"id": f"s{i}", "text": f"Bonjour, je m'appelle Marie et j'ai {i} chats."}
             for i in range(50)]
    lines[23]["text"] = "mot " * 9000  # > 8192 tokens: the server must refuse it
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    proc = run_cli(stack, "translate", "--to", "en", "--from", "fr", str(src),
                   "--max-tokens", "16", "--concurrency", "4", "--no-progress")
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in recs] == [x["id"] for x in lines]
    assert [r["index"] for r in recs] == list(range(50))
    failed = [r for r in recs if "error" in r]
    assert [r["id"] for r in failed] == ["s23"]
    assert failed[0]["error"]["status"] in (400, 413)  # engine's 400 or the ingress' limit
    ok = [r for r in recs if "error" not in r]
    assert len(ok) == 49 and all(isinstance(r["translation"], str) for r in ok)
    assert "1 of 50 item(s) failed" in proc.stderr
