"""Chunk-boundary arithmetic of the summarizer, checked exactly (no server needed)."""

from __future__ import annotations

import itertools
import random

import pytest

from serving.client.chunking import (Span, check_spans, first_byte, group_by_budget,
                                     plan_spans, safe_cuts)


def spans(*pairs: tuple[int, int]) -> list[Span]:
    return [Span(a, b) for a, b in pairs]


def test_document_that_fits_is_one_chunk():
    assert plan_spans(4096, 4096, 512) == spans((0, 4096))
    assert plan_spans(0, 10, 2) == spans((0, 0))


def test_exact_boundaries_balanced_with_exact_overlap():
    # 30000 tokens, budget 4096, overlap 512: ceil(29488 / 3584) = 9 chunks, each
    # ceil(29488 / 9) + 512 = 3789 tokens, every start 512 before the previous end.
    got = plan_spans(30000, 4096, 512)
    starts = [i * 3277 for i in range(9)]
    assert got == [Span(s, min(s + 3789, 30000)) for s in starts]
    assert got[-1] == Span(26216, 30000)


@pytest.mark.parametrize("n,chunk,overlap,expected", [
    (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
    (8, 4, 0, [(0, 4), (4, 8)]),
    (9, 4, 3, [(0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (5, 9)]),
    (4097, 4096, 512, [(0, 2305), (1793, 4097)]),  # balanced: no 1-token sliver
])
def test_small_cases(n, chunk, overlap, expected):
    assert plan_spans(n, chunk, overlap) == spans(*expected)


def test_invariants_over_a_grid():
    for n, chunk in itertools.product([1, 7, 100, 513, 5000], [2, 3, 64, 600, 4096]):
        for overlap in {0, 1, chunk // 2, chunk - 1}:
            got = plan_spans(n, chunk, overlap)
            check_spans(got, n, chunk, overlap)
            if n > chunk:  # the minimum number of chunks
                assert len(got) == -(-(n - overlap) // (chunk - overlap))


def test_unsafe_positions_move_cuts_earlier_but_keep_overlap_exact():
    rng = random.Random(1)
    for _ in range(300):
        n, chunk = rng.randint(50, 3000), rng.randint(20, 400)
        overlap = rng.randint(0, chunk // 2)
        unsafe = set(rng.sample(range(1, n), n // 4))
        got = plan_spans(n, chunk, overlap, lambda p: p not in unsafe)
        check_spans(got, n, chunk, overlap)
        for a in got[:-1]:
            # Every inner cut and the following start avoid unsafe positions when possible.
            assert a.end not in unsafe or all(
                (p in unsafe or p - overlap in unsafe) for p in range(a.start + overlap + 1, a.end))


def test_invalid_budgets_are_refused():
    with pytest.raises(ValueError):
        plan_spans(100, 10, 10)
    with pytest.raises(ValueError):
        plan_spans(100, 10, -1)


def test_byte_level_tokens_tell_character_boundaries():
    # SmolLM2's /tokenize of "Hello wörld, 你好" with return_token_strs.
    strs = ["Hello", "Ġw", "Ã¶r", "ld", ",", "Ġ", "ä½", "ł", "å¥", "½"]
    assert [first_byte(s) for s in strs] == [72, 32, 0xC3, 108, 44, 32, 0xE4, 0xA0, 0xE5, 0xBD]
    safe = safe_cuts(strs, len(strs))
    # Cutting before "ł" or "½" would split 你 / 好 into invalid UTF-8.
    assert [p for p in range(len(strs) + 1) if not safe(p)] == [7, 9]
    assert first_byte("<0xBF>") == 0xBF and first_byte("▁the") is None


def test_group_by_budget_packs_consecutive_items():
    assert group_by_budget([40, 40, 40, 40, 40], 100, sep=2) == [[0, 1], [2, 3], [4]]
    assert group_by_budget([10, 10, 10], 100, sep=2) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        group_by_budget([10, 200], 100)
