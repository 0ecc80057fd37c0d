"""Summaries of documents longer than the context: token-exact chunks, map-reduce.

Why chunk with the server's own ``/tokenize``: the budget that matters is the engine's
context in *its* tokens; counting with another tokenizer either wastes context or
overflows it. Chunks are token ranges of the document (so a cut never falls inside a
token) re-assembled to text by ``/detokenize``; consecutive chunks share exactly
``overlap`` tokens so a fact cut at a border is seen whole by one of them.

Map: one summary per chunk (bounded concurrency). Reduce: the summaries joined; if
that fits the budget, one call writes the final summary, else they are grouped into
budget-sized groups, each summarized, and the reduce repeats on the shorter list. A
document that fits the budget is summarized in one call.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .chunking import Span, check_spans, group_by_budget, plan_spans, safe_cuts
from .http import AsyncClient, Client, message_text

DEFAULT_SYSTEM = ("You are an expert editor. You write concise, faithful summaries that keep "
                  "the key facts, names and numbers and add nothing that is not in the text.")
MAP_PROMPT = ("Summarize the following excerpt (part {part} of {parts} of a longer document)."
              "\n\n{text}")
REDUCE_PROMPT = ("The following are summaries of consecutive parts of one document. Combine "
                 "them into one coherent summary of the whole document.\n\n{text}")
SINGLE_PROMPT = "Summarize the following document.\n\n{text}"
SEPARATOR = "\n\n"
# Re-tokenizing detokenized text inside a chat prompt can merge a few tokens
# differently at the edges; this many tokens of slack absorb it.
SAFETY_MARGIN = 32


@dataclass
class Chunk:
    """One map input: token range ``[start, end)`` of the document, its ``token_ids``
    and text; after the map, ``summary`` and the ``prompt_tokens`` the server counted."""

    index: int
    start: int
    end: int
    token_ids: list[int] = field(repr=False)
    text: str = field(default="", repr=False)
    summary: str | None = field(default=None, repr=False)
    prompt_tokens: int | None = None


@dataclass
class Plan:
    """How a document is cut. ``chunk_tokens`` is the per-chunk budget actually used,
    ``context`` the engine's max_model_len, ``prompt_overhead`` the prompt's own tokens."""

    n_tokens: int
    chunk_tokens: int
    overlap: int
    context: int
    prompt_overhead: int
    max_tokens: int
    chunks: list[Chunk]

    def describe(self) -> str:
        """Human-readable boundaries, as printed by ``summarize --plan``."""
        head = (f"document: {self.n_tokens} tokens; context {self.context}, chunk budget "
                f"{self.chunk_tokens}, overlap {self.overlap}, max_tokens {self.max_tokens}; "
                f"{len(self.chunks)} chunk(s)")
        rows = [f"  chunk {c.index:>3}: tokens [{c.start}, {c.end})  {c.end - c.start} tokens"
                for c in self.chunks]
        return "\n".join([head, *rows])


@dataclass
class Summary:
    """Result of :func:`summarize`: the final ``summary``, the ``plan`` (with every chunk's
    summary), the number of model ``calls`` and reduce ``levels`` it took."""

    summary: str
    plan: Plan
    calls: int
    levels: int


def available_tokens(context: int, overhead: int, max_tokens: int) -> int:
    """Document tokens one call can carry: context minus prompt, answer and margin."""
    return context - overhead - max_tokens - SAFETY_MARGIN


def _template_probe(system: str) -> list[list[dict]]:
    """Prompts with empty text, to measure each template's own token cost."""
    probes = [MAP_PROMPT.format(part=9999, parts=9999, text=""),
              REDUCE_PROMPT.format(text=""), SINGLE_PROMPT.format(text="")]
    return [_messages(system, p) for p in probes]


def _messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _make_plan(tok: dict, overhead: int, chunk_tokens: int | None, overlap: int,
               max_tokens: int) -> Plan:
    ids: list[int] = tok["tokens"]
    context = int(tok["max_model_len"])
    room = available_tokens(context, overhead, max_tokens)
    budget = room if chunk_tokens is None else chunk_tokens
    if budget > room:
        raise ValueError(f"chunk budget {budget} does not fit the context: at most {room} "
                         f"(context {context} - prompt {overhead} - max_tokens {max_tokens} "
                         f"- margin {SAFETY_MARGIN})")
    if budget < 2 * max_tokens + len(SEPARATOR):
        # Each reduce call must take at least two summaries, or the reduce could not shrink.
        raise ValueError(f"chunk budget {budget} must hold two summaries of max_tokens "
                         f"{max_tokens}: lower max_tokens or raise the chunk budget")
    if len(ids) <= room:
        spans = [Span(0, len(ids))]  # fits: one call, whatever the chunk size asked
    else:
        spans = plan_spans(len(ids), budget, overlap, safe_cuts(tok.get("token_strs"), len(ids)))
        check_spans(spans, len(ids), budget, overlap)
    chunks = [Chunk(i, s.start, s.end, ids[s.start:s.end]) for i, s in enumerate(spans)]
    return Plan(len(ids), budget, overlap, context, overhead, max_tokens, chunks)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr,
                disable=not progress, leave=False)


# --- sync ------------------------------------------------------------------------


def plan_document(text: str, *, client: Client, model: str | None = None,
                  chunk_tokens: int | None = None, overlap: int = 512,
                  max_tokens: int = 512, system: str = DEFAULT_SYSTEM) -> Plan:
    """Cut ``text`` into chunks by the server's tokenizer without calling the model.

    ``chunk_tokens=None`` uses the largest chunk the context allows. Chunk texts are
    not filled in (see :func:`summarize`).
    """
    tok = client.tokenize(text, model, token_strs=True)
    if "max_model_len" not in tok:  # older servers: ask /v1/models
        tok["max_model_len"] = client.max_model_len()
    overhead = max(client.tokenize_chat(m, model)["count"] for m in _template_probe(system))
    return _make_plan(tok, overhead, chunk_tokens, overlap, max_tokens)


def summarize(
    text: str,
    *,
    client: Client | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    chunk_tokens: int | None = None,
    overlap: int = 512,
    concurrency: int = 2,
    max_tokens: int = 512,
    temperature: float = 0.2,
    system: str = DEFAULT_SYSTEM,
    progress: bool = False,
) -> Summary:
    """Summarize ``text`` of any length with map-reduce over token-exact chunks.

    ``chunk_tokens`` (default: as large as the context allows) bounds each chunk,
    ``overlap`` tokens are shared by neighbouring chunks, ``concurrency`` bounds
    requests in flight, ``max_tokens`` bounds every generated summary. Raises
    ``ValueError`` for budgets that cannot fit the context, ``APIError`` on refusal.
    """
    own = client is None
    c = client or Client(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    try:
        model = model or c.default_model()
        plan = plan_document(text, client=c, model=model, chunk_tokens=chunk_tokens,
                             overlap=overlap, max_tokens=max_tokens, system=system)
        params = {"max_tokens": max_tokens, "temperature": temperature}

        def call(prompt: str) -> dict:
            return c.chat(_messages(system, prompt), model=model, **params)

        if len(plan.chunks) == 1:
            out = call(SINGLE_PROMPT.format(text=text))
            ch = plan.chunks[0]
            ch.text, ch.summary = text, message_text(out).strip()
            ch.prompt_tokens = out["usage"]["prompt_tokens"]
            return Summary(ch.summary, plan, calls=1, levels=0)

        n = len(plan.chunks)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
                _bar(n, "summarize chunks", progress) as bar:
            def map_one(ch: Chunk) -> tuple[str, int]:
                ch.text = c.detokenize(ch.token_ids, model)
                out = call(MAP_PROMPT.format(part=ch.index + 1, parts=n, text=ch.text))
                ch.summary = message_text(out).strip()
                ch.prompt_tokens = out["usage"]["prompt_tokens"]
                bar.update(1)
                return ch.summary, out["usage"]["completion_tokens"]

            items = list(pool.map(map_one, plan.chunks))
            calls, levels = n, 0
            # The chunk budget bounds every call's input, the reduce's too.
            room = min(plan.chunk_tokens,
                       available_tokens(plan.context, plan.prompt_overhead, max_tokens))
            while True:
                levels += 1
                sep = len(SEPARATOR)
                groups = group_by_budget([t for _, t in items], room, sep)
                if len(groups) == 1:
                    out = call(REDUCE_PROMPT.format(text=SEPARATOR.join(s for s, _ in items)))
                    return Summary(message_text(out).strip(), plan, calls + 1, levels)
                with _bar(len(groups), f"reduce level {levels}", progress) as rbar:
                    def reduce_one(g: list[int]) -> tuple[str, int]:
                        out = call(REDUCE_PROMPT.format(
                            text=SEPARATOR.join(items[i][0] for i in g)))
                        rbar.update(1)
                        return message_text(out).strip(), out["usage"]["completion_tokens"]

                    items = list(pool.map(reduce_one, groups))
                calls += len(groups)
    finally:
        if own:
            c.close()


# --- async -----------------------------------------------------------------------


async def aplan_document(text: str, *, client: AsyncClient, model: str | None = None,
                         chunk_tokens: int | None = None, overlap: int = 512,
                         max_tokens: int = 512, system: str = DEFAULT_SYSTEM) -> Plan:
    """Async twin of :func:`plan_document`."""
    tok = await client.tokenize(text, model, token_strs=True)
    if "max_model_len" not in tok:
        tok["max_model_len"] = await client.max_model_len()
    counts = [(await client.tokenize_chat(m, model))["count"] for m in _template_probe(system)]
    return _make_plan(tok, max(counts), chunk_tokens, overlap, max_tokens)


async def asummarize(
    text: str,
    *,
    client: AsyncClient | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    chunk_tokens: int | None = None,
    overlap: int = 512,
    concurrency: int = 2,
    max_tokens: int = 512,
    temperature: float = 0.2,
    system: str = DEFAULT_SYSTEM,
    progress: bool = False,
) -> Summary:
    """Async twin of :func:`summarize` (same arguments, an :class:`AsyncClient`)."""
    own = client is None
    c = client or AsyncClient(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    try:
        model = model or await c.default_model()
        plan = await aplan_document(text, client=c, model=model, chunk_tokens=chunk_tokens,
                                    overlap=overlap, max_tokens=max_tokens, system=system)
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        sem = asyncio.Semaphore(max(1, concurrency))

        async def call(prompt: str) -> dict:
            async with sem:
                return await c.chat(_messages(system, prompt), model=model, **params)

        if len(plan.chunks) == 1:
            out = await call(SINGLE_PROMPT.format(text=text))
            ch = plan.chunks[0]
            ch.text, ch.summary = text, message_text(out).strip()
            ch.prompt_tokens = out["usage"]["prompt_tokens"]
            return Summary(ch.summary, plan, calls=1, levels=0)

        n = len(plan.chunks)
        with _bar(n, "summarize chunks", progress) as bar:
            async def map_one(ch: Chunk) -> tuple[str, int]:
                ch.text = await c.detokenize(ch.token_ids, model)
                out = await call(MAP_PROMPT.format(part=ch.index + 1, parts=n, text=ch.text))
                ch.summary = message_text(out).strip()
                ch.prompt_tokens = out["usage"]["prompt_tokens"]
                bar.update(1)
                return ch.summary, out["usage"]["completion_tokens"]

            items = list(await asyncio.gather(*(map_one(ch) for ch in plan.chunks)))
        calls, levels = n, 0
        room = min(plan.chunk_tokens,
                   available_tokens(plan.context, plan.prompt_overhead, max_tokens))
        while True:
            levels += 1
            groups = group_by_budget([t for _, t in items], room, len(SEPARATOR))
            if len(groups) == 1:
                out = await call(REDUCE_PROMPT.format(text=SEPARATOR.join(s for s, _ in items)))
                return Summary(message_text(out).strip(), plan, calls + 1, levels)
            with _bar(len(groups), f"reduce level {levels}", progress) as rbar:
                async def reduce_one(g: list[int]) -> tuple[str, int]:
                    out = await call(REDUCE_PROMPT.format(
                        text=SEPARATOR.join(items[i][0] for i in g)))
                    rbar.update(1)
                    return message_text(out).strip(), out["usage"]["completion_tokens"]

                items = list(await asyncio.gather(*(reduce_one(g) for g in groups)))
            calls += len(groups)
    finally:
        if own:
            await c.aclose()
