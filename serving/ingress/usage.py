"""What an answer cost in tokens: the engine's ``usage`` count, read from the answer.

The rate limiter charges an estimate at admission and settles it to these counts
(limits.py). A plain answer carries ``usage`` in its body; a stream carries it in
its last event only when the client asked for ``stream_options.include_usage``: the
meter decodes the relayed events (sse.py) and parses only the last one that has a
usage field, at the end — no JSON parsing on the per-token path. Without that
event, the events are counted instead (vLLM sends one per generated token and
choice, plus the role and finish events).
"""

from __future__ import annotations

import json
from typing import Callable

from .sse import DONE, SSEDecoder


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
    """Meters a relayed SSE stream: counts its events, keeps its last usage event.

    ``on_done`` is called with the total once, when ``[DONE]`` arrives (before the
    relay forwards it: the client's next request may follow at once) or at
    ``close`` for a stream that ended without it.
    """

    def __init__(self, prompt_tokens: int, on_done: Callable[[int], None] | None = None, *,
                 tokens_per_event: int = 1) -> None:
        self.prompt_tokens = prompt_tokens  # the admission's estimate of the prompt
        # With vLLM's --stream-interval N an event carries up to N tokens: counting N
        # per event errs high by less than N tokens per stream, never low.
        self.tokens_per_event = tokens_per_event
        self.events = 0
        self._on_done = on_done
        self._decoder = SSEDecoder()
        self._usage: bytes | None = None  # parsed only once, at the end

    def feed(self, chunk: bytes) -> None:
        for data in self._decoder.feed(chunk):
            if data.startswith(b"{"):
                self.events += 1
                if b'"usage"' in data and b'"usage":null' not in data \
                        and b'"usage": null' not in data:
                    self._usage = data
            elif data == DONE:
                self._settle()

    async def close(self, complete: bool) -> None:
        self._settle()

    def _settle(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(self.total_tokens())

    def total_tokens(self) -> int:
        """The engine's count when the stream reported one, else prompt estimate + events."""
        reported = self.reported_tokens()
        if reported is not None:
            return reported
        return self.prompt_tokens + self.events * self.tokens_per_event

    def reported_tokens(self) -> int | None:
        """The last usage event's ``usage.total_tokens`` (cumulative, if every event has one)."""
        return total_tokens_of_body(self._usage) if self._usage is not None else None
