"""Per-request measurement from a recorded SSE exchange (pure, no I/O).

Why separate from the client: the client only timestamps events as they arrive,
so the arithmetic here can be tested on recorded event streams with exact values.

Definitions (identical to ``vllm bench serve``):

* a *token event* is an SSE chunk that carries generated output for choice 0
  (completions: a ``text`` field, even empty; chat: a delta with content, reasoning
  or tool calls — the bare ``{"role": "assistant", "content": ""}`` announcement
  and empty finish-only deltas are not tokens);
* TTFT = first token event − request start;
* ITLs = gaps between consecutive token events;
* E2E latency = last token event − request start (the trailing usage chunk and
  ``[DONE]`` do not count);
* output tokens = ``usage.completion_tokens`` from the server
  (``stream_options.include_usage``); only when the server sends no usage is the
  number of token events used, flagged by ``usage_reported=False``;
* TPOT = (E2E − TTFT) / (output tokens − 1), undefined for ≤ 1 output token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]

_CHAT_OUTPUT_KEYS = ("content", "reasoning_content", "reasoning", "tool_calls")


@dataclass
class RawExchange:
    """What the client saw: start time, status, one timestamped ``data:`` line per SSE
    event, failure."""

    start: float
    status: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    error_class: str | None = None
    error: str | None = None
    body: str | None = None  # non-200 response body (truncated)


@dataclass
class RequestRecord:
    """One request's measured outcome; times in seconds."""

    index: int
    start: float
    ok: bool
    status: int | None
    error_class: str | None
    error: str | None
    ttft: float | None
    itl: list[float]
    e2e: float | None
    prompt_tokens: int | None
    output_tokens: int
    usage_reported: bool
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """(E2E − TTFT)/(n − 1); None when fewer than two output tokens."""
        if not self.ok or self.output_tokens <= 1 or self.e2e is None or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self, with_text: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["tpot"] = self.tpot
        if not with_text:
            data.pop("text")
        return data


def _is_token_event(chunk: dict[str, Any], endpoint: Endpoint) -> tuple[bool, str]:
    """Return (is_token, text) for one parsed chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    if endpoint == "completions":
        if "text" not in choice:
            return False, ""
        return True, choice.get("text") or ""
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    if any(delta.get(key) for key in _CHAT_OUTPUT_KEYS):
        return True, text
    # vLLM may stream a token whose text is still empty (partial UTF-8); it is a
    # token unless the chunk is the role announcement.
    if "content" in delta and "role" not in delta:
        return True, ""
    return False, ""


def parse_exchange(raw: RawExchange, endpoint: Endpoint, index: int = 0) -> RequestRecord:
    """Turn a recorded exchange into a :class:`RequestRecord`."""
    token_times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    stream_error: str | None = None
    for stamp, line in raw.lines:
        if not line.startswith("data:"):
            continue  # comments (":"), "event:", "id:", "retry:"
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            stream_error = stream_error or f"malformed SSE data: {data[:200]}"
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            err = chunk["error"]
            stream_error = json.dumps(err)[:500] if not isinstance(err, str) else err[:500]
            continue
        is_token, text = _is_token_event(chunk, endpoint)
        if is_token:
            token_times.append(stamp)
            texts.append(text)
        if chunk.get("usage"):
            usage = chunk["usage"]

    error_class = raw.error_class
    error = raw.error
    if error_class is None and raw.status is not None and raw.status != 200:
        error_class, error = f"http_{raw.status}", (raw.body or "")[:500]
    if error_class is None and stream_error is not None:
        error_class, error = "stream_error", stream_error
    if error_class is None and not token_times:
        error_class, error = "no_tokens", "stream ended without any output token"
    ok = error_class is None

    ttft = token_times[0] - raw.start if token_times else None
    itl = [b - a for a, b in zip(token_times, token_times[1:])]
    e2e = token_times[-1] - raw.start if token_times else None
    usage_reported = usage is not None and usage.get("completion_tokens") is not None
    output_tokens = int(usage["completion_tokens"]) if usage_reported else len(token_times)
    prompt_tokens = usage.get("prompt_tokens") if usage else None
    return RequestRecord(
        index=index,
        start=raw.start,
        ok=ok,
        status=raw.status,
        error_class=error_class,
        error=error,
        ttft=ttft,
        itl=itl,
        e2e=e2e,
        prompt_tokens=int(prompt_tokens) if prompt_tokens is not None else None,
        output_tokens=output_tokens if ok else 0,
        usage_reported=usage_reported,
        text="".join(texts),
    )
