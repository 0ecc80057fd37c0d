"""Server-sent events as the engines send them, decoded incrementally.

The relay forwards the engine's bytes unchanged; whatever needs the events
themselves (usage metering, the response cache) decodes them here, from chunks
that follow the network's boundaries, not the events'. One decoder, so an event
split across two reads is read the same way everywhere.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SSEDecoder:
    """Feed raw chunks; get back the ``data`` of every event they complete.

    Follows the SSE format's rules that matter for OpenAI streams: lines end in
    LF or CRLF, ``data:`` drops one optional space, several ``data`` lines join
    with LF, a blank line ends the event, lines starting with ``:`` are comments,
    other fields (``event:``, ``id:``) are ignored.
    """

    def __init__(self) -> None:
        self._pending = b""  # an unfinished line
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._pending:
            chunk = self._pending + chunk
        lines = chunk.split(b"\n")
        self._pending = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


def decode_all(stream: bytes) -> list[bytes]:
    """Every event's ``data`` in a whole SSE body (an unterminated last event is dropped)."""
    return SSEDecoder().feed(stream)
