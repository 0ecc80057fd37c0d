"""Request-list generation: lengths, determinism, payloads."""

import json

import numpy as np
import pytest

from benchmarks.client import Target, build_payload
from benchmarks.tokenizing import WordTokenizer
from benchmarks.workloads import (RequestSpec, WorkloadOptions, build_requests, parse_length,
                                  synthetic_text)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert list(parse_length("64")(rng, 3)) == [64, 64, 64]
    u = parse_length("uniform:10:20")(rng, 1000)
    assert u.min() >= 10 and u.max() <= 20 and len(set(u)) == 11
    n = parse_length("normal:100:10")(rng, 5000)
    assert abs(n.mean() - 100) < 1 and n.min() >= 1
    e = parse_length("exp:50")(rng, 5000)
    assert abs(e.mean() - 50) < 3 and e.min() >= 1
    for bad in ("uniform:1", "gauss:1:2", "abc"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_synthetic_prompt_has_exact_token_count():
    tok = WordTokenizer()
    rng = np.random.default_rng(1)
    for n in (1, 17, 300):
        assert len(tok.encode(synthetic_text(tok, rng, n))) == n


def test_synthetic_requests_are_deterministic_per_seed():
    opts = WorkloadOptions(name="synthetic", input_len="uniform:5:50", output_len="8")
    a = build_requests(opts, 20, seed=3, tokenizer=WordTokenizer)
    b = build_requests(opts, 20, seed=3, tokenizer=WordTokenizer)
    c = build_requests(opts, 20, seed=4, tokenizer=WordTokenizer)
    assert [s.prompt for s in a] == [s.prompt for s in b] != [s.prompt for s in c]
    assert all(s.max_tokens == 8 for s in a)
    assert all(len(s.prompt.split()) == s.expected_input_tokens for s in a)


def test_shared_prefix_requests_share_the_system_prompt():
    opts = WorkloadOptions(name="shared-prefix", input_len="10", system_prompt_len=40,
                           num_prefixes=2)
    specs = build_requests(opts, 6, seed=0, tokenizer=WordTokenizer)
    systems = [s.messages[0]["content"] for s in specs]
    assert len(set(systems)) == 2 and systems[0] == systems[2] == systems[4]
    assert len({s.messages[1]["content"] for s in specs}) == 6
    assert specs[0].prompt.startswith(systems[0])


def test_repeated_and_seed_tasks():
    rep = build_requests(WorkloadOptions(name="repeated", prompt="Why?"), 4, 0, WordTokenizer)
    assert {s.prompt for s in rep} == {"Why?"}
    for task, marker in (("sentiment", "JSON"), ("translate", "Translate"),
                         ("summarize", "Summarize")):
        specs = build_requests(WorkloadOptions(name=task), 3, 0, WordTokenizer)
        again = build_requests(WorkloadOptions(name=task), 3, 0, WordTokenizer)
        assert [s.messages for s in specs] == [s.messages for s in again]
        assert any(marker in m["content"] for m in specs[0].messages)
    doc = build_requests(WorkloadOptions(name="summarize", doc_len=800), 1, 0, WordTokenizer)[0]
    assert len(doc.messages[0]["content"].split()) >= 800
    zh = build_requests(WorkloadOptions(name="translate"), 1, 0, WordTokenizer)[0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.messages[1]["content"])


def test_jsonl_workload(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "max_tokens": 5}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "b"}]}) + "\n")
    specs = build_requests(WorkloadOptions(name="jsonl", jsonl=str(f), output_len="9"), 3, 0,
                           WordTokenizer)
    assert [s.max_tokens for s in specs] == [5, 9, 5]
    assert specs[1].messages[0]["content"] == "b" and specs[2].prompt == "a"
    f.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError):
        build_requests(WorkloadOptions(name="jsonl", jsonl=str(f)), 1, 0, WordTokenizer)


def test_payloads_stream_with_usage():
    spec = RequestSpec(max_tokens=7, prompt="hi")
    cmpl = build_payload(spec, Target("http://x", "m", "completions", ignore_eos=True,
                                      extra_body={"temperature": 0.0}))
    assert cmpl == {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                    "prompt": "hi", "max_tokens": 7, "ignore_eos": True, "temperature": 0.0}
    chat = build_payload(spec, Target("http://x", "m", "chat"))
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["max_completion_tokens"] == 7 and "ignore_eos" not in chat
    with pytest.raises(ValueError):
        build_payload(RequestSpec(max_tokens=1, messages=[{"role": "user", "content": "x"}]),
                      Target("http://x", "m", "completions"))
