"""Request lists: what is sent, independent of how fast it is sent.

A run's request list is built once, up front and deterministically from ``--seed``,
so the same list can be replayed against several servers (A/B) and repeats.
Workloads: ``synthetic`` (token-length distributions), ``shared-prefix`` (a common
system prompt → prefix-cache reuse), ``repeated`` (identical queries → response /
prefix cache), the seed's tasks (``sentiment``, ``translate``, ``summarize``; see
:mod:`benchmarks.seed_tasks`) and ``jsonl`` (user prompts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from . import seed_tasks
from .tokenizing import TokenCounter

Endpoint = Literal["chat", "completions"]

WORKLOADS = (
    "synthetic", "shared-prefix", "repeated", "sentiment", "translate", "summarize", "jsonl",
)
# Length-controlled workloads need ignore_eos so outputs really reach max_tokens.
LENGTH_CONTROLLED = ("synthetic", "shared-prefix")

# Plain, common words: one token each for most BPE vocabularies (with leading space).
_WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city name "
    "team minute idea kid body information back parent face others level office door "
    "health person art war history party result change morning reason research girl "
    "guy moment air teacher force education open green small large early young "
    "important public bad same able good new first last long great little own other "
    "old big high different local sure free better best full special easy clear"
).split()


@dataclass
class RequestSpec:
    """One request to send: a raw prompt (completions) or chat messages."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    expected_input_tokens: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def as_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}]

    def as_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        raise ValueError(
            "this request has chat messages only; use --endpoint chat "
            "(completions needs a raw prompt)"
        )


@dataclass
class WorkloadOptions:
    name: str = "synthetic"
    input_len: str = "128"
    output_len: str | None = None  # None: workload default
    system_prompt_len: int = 512
    num_prefixes: int = 1
    prompt: str | None = None
    jsonl: str | None = None
    doc_len: int = 1500


def parse_length(spec: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    """``N`` | ``uniform:LO:HI`` | ``normal:MEAN:STD`` | ``exp:MEAN`` → sampler (≥ 1)."""
    parts = str(spec).strip().lower().split(":")
    try:
        nums = [float(p) for p in parts[1:]] if len(parts) > 1 else [float(parts[0])]
    except ValueError:
        raise ValueError(f"length {spec!r}: numbers expected") from None
    kind = parts[0] if len(parts) > 1 else "fixed"
    arity = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}
    if kind not in arity or len(nums) != arity[kind]:
        raise ValueError(
            f"length {spec!r}: use N, uniform:LO:HI, normal:MEAN:STD or exp:MEAN"
        )

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        if kind == "fixed":
            values = np.full(n, nums[0])
        elif kind == "uniform":
            values = rng.integers(int(nums[0]), int(nums[1]) + 1, size=n)
        elif kind == "normal":
            values = np.rint(rng.normal(nums[0], nums[1], size=n))
        else:
            values = np.rint(rng.exponential(nums[0], size=n))
        return np.maximum(values, 1).astype(int)

    return sample


def synthetic_text(tokenizer: TokenCounter, rng: np.random.Generator, n_tokens: int) -> str:
    """Random common words cut to exactly ``n_tokens`` tokens of ``tokenizer``.

    Random words (not random token ids) keep the text tokenizer-stable, so the
    server counts the same length; distinct random starts avoid accidental
    prefix-cache hits between prompts.
    """
    words = list(rng.choice(_WORDS, size=n_tokens + 8))
    while True:
        ids = tokenizer.encode(" ".join(words))
        if len(ids) >= n_tokens:
            return tokenizer.decode(ids[:n_tokens]).strip()
        words += list(rng.choice(_WORDS, size=n_tokens - len(ids) + 8))


def _synthetic(opts: WorkloadOptions, n: int, rng, tokenizer) -> list[RequestSpec]:
    ins = parse_length(opts.input_len)(rng, n)
    outs = parse_length(opts.output_len or "128")(rng, n)
    tok = tokenizer()
    return [
        RequestSpec(
            max_tokens=int(o), prompt=synthetic_text(tok, rng, int(i)), expected_input_tokens=int(i)
        )
        for i, o in zip(ins, outs)
    ]


def _shared_prefix(opts: WorkloadOptions, n: int, rng, tokenizer) -> list[RequestSpec]:
    tok = tokenizer()
    prefixes = [
        "You are a careful assistant. Context: "
        + synthetic_text(tok, rng, opts.system_prompt_len)
        for _ in range(max(1, opts.num_prefixes))
    ]
    ins = parse_length(opts.input_len)(rng, n)
    outs = parse_length(opts.output_len or "128")(rng, n)
    specs = []
    for k, (i, o) in enumerate(zip(ins, outs)):
        system = prefixes[k % len(prefixes)]
        user = synthetic_text(tok, rng, int(i))
        specs.append(RequestSpec(
            max_tokens=int(o),
            prompt=f"{system}\n\n{user}",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        ))
    return specs


def _repeated(opts: WorkloadOptions, n: int, rng, tokenizer) -> list[RequestSpec]:
    prompt = opts.prompt or "Explain in three sentences why the sky is blue."
    out = int(parse_length(opts.output_len or "64")(rng, 1)[0])
    return [RequestSpec(max_tokens=out, prompt=prompt) for _ in range(n)]


def _jsonl(opts: WorkloadOptions, n: int, rng, tokenizer) -> list[RequestSpec]:
    """Lines: {"prompt": str} or {"messages": [...]}, optional "max_tokens"/"output_tokens".

    The file is cycled in order until ``n`` requests are built.
    """
    if not opts.jsonl:
        raise ValueError("workload jsonl needs --jsonl FILE")
    rows = []
    for lineno, line in enumerate(Path(opts.jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise ValueError(f"{opts.jsonl}:{lineno}: need a 'prompt' or 'messages' field")
        rows.append(row)
    if not rows:
        raise ValueError(f"{opts.jsonl}: no prompts")
    default_out = int(parse_length(opts.output_len or "128")(rng, 1)[0])
    specs = []
    for k in range(n):
        row = rows[k % len(rows)]
        out = row.get("max_tokens", row.get("output_tokens", default_out))
        specs.append(RequestSpec(
            max_tokens=int(out), prompt=row.get("prompt"), messages=row.get("messages"),
        ))
    return specs


def _seed(task: str):
    def build(opts: WorkloadOptions, n: int, rng, tokenizer) -> list[RequestSpec]:
        out = int(opts.output_len) if opts.output_len else None
        return [
            RequestSpec(max_tokens=out or t.max_tokens, messages=t.messages)
            for t in seed_tasks.build(task, n, rng, doc_words=opts.doc_len)
        ]
    return build


_BUILDERS = {
    "synthetic": _synthetic,
    "shared-prefix": _shared_prefix,
    "repeated": _repeated,
    "jsonl": _jsonl,
    "sentiment": _seed("sentiment"),
    "translate": _seed("translate"),
    "summarize": _seed("summarize"),
}


def default_endpoint(name: str) -> Endpoint:
    """Raw-prompt workloads default to /v1/completions (as ``vllm bench serve``)."""
    return "completions" if name in ("synthetic", "repeated") else "chat"


def build_requests(
    opts: WorkloadOptions, n: int, seed: int, tokenizer: Callable[[], TokenCounter]
) -> list[RequestSpec]:
    """Build ``n`` requests; ``tokenizer`` is called only by length-controlled workloads."""
    if opts.name not in _BUILDERS:
        raise ValueError(f"unknown workload {opts.name!r} (choose: {', '.join(WORKLOADS)})")
    return _BUILDERS[opts.name](opts, n, np.random.default_rng(seed), tokenizer)
