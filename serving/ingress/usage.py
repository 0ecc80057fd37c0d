"""The token counts an engine reports (OpenAI ``usage``), read from its answers.

The rate limiter charges an estimate at admission and settles it to these counts
(limits.py). A plain answer carries ``usage`` in its body; a stream carries it in
its last event only when the client asked for ``stream_options.include_usage``,
so streams are read from a short tail kept while relaying — no parsing on the
per-token path.
"""

from __future__ import annotations

import json

_TAIL_BYTES = 16 * 1024  # far more than the last events of a stream take


def total_tokens(answer: object) -> int | None:
    """``usage.total_tokens`` of a parsed answer, or None when it has none."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


def total_tokens_of_body(body: bytes) -> int | None:
    try:
        return total_tokens(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return None


class StreamTail:
    """The last bytes of a relayed SSE stream, enough to find its usage event."""

    def __init__(self, max_bytes: int = _TAIL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk)[-self.max_bytes:]

    def total_tokens(self) -> int | None:
        """The last event's ``usage.total_tokens`` (cumulative, if every event has one)."""
        for line in reversed(self._tail.splitlines()):
            if line.startswith(b"data: {") and b'"usage"' in line:
                if (total := total_tokens_of_body(line[len(b"data: "):])) is not None:
                    return total
        return None
