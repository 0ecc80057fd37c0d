"""Token-exact chunk arithmetic for documents longer than the model's context.

Why a module of its own: the boundaries are pure arithmetic over token positions, so
they can be tested exactly without a server, and ``--plan`` can print them.

Conventions: a document is ``n`` tokens (the server's own tokenizer, no special
tokens); a chunk is the half-open token range ``[start, end)``. Chunks cover the
document, each is at most ``chunk_tokens`` long, and every chunk after the first
starts exactly ``overlap`` tokens before the previous one ended.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Span:
    """Half-open token range ``[start, end)`` of the document."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_spans(
    n_tokens: int,
    chunk_tokens: int,
    overlap: int,
    safe_cut: Callable[[int], bool] | None = None,
) -> list[Span]:
    """Split ``n_tokens`` into spans of at most ``chunk_tokens`` with exact ``overlap``.

    The number of chunks is the minimum possible, ``ceil((n - overlap) / (chunk -
    overlap))``, and the chunks are balanced so the last one is not a sliver.
    ``safe_cut(p)`` says whether a cut before token ``p`` keeps whole characters (a
    token may hold part of a multi-byte character); a boundary is moved earlier, never
    later, until both the cut and the next chunk's start are safe. When no such place
    exists within a chunk, the cut stays at the token boundary.
    """
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    if overlap < 0:
        raise ValueError("overlap must be >= 0")
    if chunk_tokens <= overlap:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be larger than overlap ({overlap})")
    if n_tokens <= chunk_tokens:
        return [Span(0, n_tokens)]
    stride_max = chunk_tokens - overlap
    count = math.ceil((n_tokens - overlap) / stride_max)
    target = math.ceil((n_tokens - overlap) / count) + overlap  # <= chunk_tokens
    ok = safe_cut or (lambda _p: True)
    spans: list[Span] = []
    start = 0
    while True:
        if n_tokens - start <= chunk_tokens:
            spans.append(Span(start, n_tokens))
            return spans
        end = start + target
        cut = end
        while cut - overlap > start and not (ok(cut) and ok(cut - overlap)):
            cut -= 1
        if cut - overlap <= start:
            cut = end
        spans.append(Span(start, cut))
        start = cut - overlap


def check_spans(spans: Sequence[Span], n_tokens: int, chunk_tokens: int, overlap: int) -> None:
    """Assert the plan's invariants (used by tests and as a guard before sending)."""
    assert spans and spans[0].start == 0 and spans[-1].end == n_tokens, "must cover the document"
    for s in spans:
        assert 0 < s.length <= chunk_tokens or n_tokens == 0, f"chunk {s} exceeds {chunk_tokens}"
    for a, b in zip(spans, spans[1:]):
        assert b.start == a.end - overlap, f"{a} -> {b}: overlap is not {overlap}"
        assert b.end > a.end, f"{a} -> {b}: no progress"


# --- character safety of a cut ---------------------------------------------------
#
# Byte-level BPE tokenizers (GPT-2 family: Qwen2.5, SmolLM2) print each byte as one
# printable character. Printable Latin-1 bytes stand for themselves; the remaining
# bytes are numbered in order from U+0100. Inverting that tells the first byte of a
# token, and a cut before a UTF-8 continuation byte (0b10xxxxxx) would split a
# character. SentencePiece byte-fallback tokens look like "<0xE4>".

_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]


def _byte_level_decoder() -> dict[str, int]:
    table = {chr(b): b for b in _PRINTABLE}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF = _byte_level_decoder()
_HEX_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def first_byte(token_str: str) -> int | None:
    """The first UTF-8 byte a token stands for, or None if it cannot be told."""
    m = _HEX_TOKEN.match(token_str)
    if m:
        return int(m.group(1), 16)
    if token_str and all(ch in _BYTE_OF for ch in token_str):
        return _BYTE_OF[token_str[0]]
    return None


def safe_cuts(token_strs: Sequence[str] | None, n_tokens: int) -> Callable[[int], bool]:
    """``safe(p)``: does a cut before token ``p`` keep every character whole?

    Without token strings (or for tokens whose bytes cannot be told) every token
    boundary counts as safe, which is what "never cut inside a token" requires.
    """
    if not token_strs:
        return lambda _p: True
    unsafe = frozenset(
        p for p, s in enumerate(token_strs)
        if (b := first_byte(s)) is not None and 0x80 <= b <= 0xBF
    )
    return lambda p: p <= 0 or p >= n_tokens or p not in unsafe


def group_by_budget(sizes: Sequence[int], budget: int, sep: int = 0) -> list[list[int]]:
    """Pack consecutive items (token ``sizes``) into groups of at most ``budget`` tokens,
    counting ``sep`` tokens between neighbours; returns the item indices per group."""
    groups: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if size > budget:
            raise ValueError(f"item {i} ({size} tokens) exceeds the budget of {budget}")
        if groups and used + sep + size <= budget:
            groups[-1].append(i)
            used += sep + size
        else:
            groups.append([i])
            used = size
    return groups
