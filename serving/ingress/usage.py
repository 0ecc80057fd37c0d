"""What an answer cost in tokens: the engine's ``usage`` count, read from the answer.

The rate limiter charges an estimate at admission and settles it to these counts
(limits.py). A plain answer carries ``usage`` in its body; a stream carries it in
its last event only when the client asked for ``stream_options.include_usage``, so
a stream is read from a short tail kept while relaying — no JSON parsing on the
per-token path — and, without that event, its events are counted instead (vLLM
sends one per generated token and choice, plus the role and finish events).
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


class StreamUsage:
    """Meters a relayed SSE stream: keeps its last bytes and counts its events."""

    def __init__(self, prompt_tokens: int, max_bytes: int = _TAIL_BYTES,
                 tokens_per_event: int = 1) -> None:
        self.prompt_tokens = prompt_tokens  # the admission's estimate of the prompt
        # With vLLM's --stream-interval N an event carries up to N tokens: counting N
        # per event errs high by less than N tokens per stream, never low.
        self.tokens_per_event = tokens_per_event
        self.max_bytes = max_bytes
        self.events = 0
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        self._tail += chunk
        # Trimmed in batches: copying the whole tail on every chunk cost more than
        # the relay's own work per event.
        if len(self._tail) > 2 * self.max_bytes:
            del self._tail[:-self.max_bytes]

    def total_tokens(self) -> int:
        """The engine's count when the stream reported one, else prompt estimate + events."""
        reported = self.reported_tokens()
        if reported is not None:
            return reported
        return self.prompt_tokens + self.events * self.tokens_per_event

    def reported_tokens(self) -> int | None:
        """The last event's ``usage.total_tokens`` (cumulative, if every event has one)."""
        for line in reversed(bytes(self._tail[-self.max_bytes:]).splitlines()):
            if line.startswith(b"data: {") and b'"usage"' in line:
                if (total := total_tokens_of_body(line[len(b"data: "):])) is not None:
                    return total
        return None
