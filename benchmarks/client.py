"""One streaming request over httpx: build the payload, timestamp every SSE line.

Kept minimal on purpose: timestamps are taken as lines arrive and all parsing is
deferred to :func:`benchmarks.stream.parse_exchange`, so client overhead during the
stream is small and the measurement logic stays testable without a server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from serving.ingress.sse import SSEDecoder

from .stream import Endpoint, RawExchange
from .workloads import RequestSpec


@dataclass(frozen=True)
class Target:
    """Where and how to send: one OpenAI-compatible server."""

    base_url: str
    model: str
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(spec: RequestSpec, target: Target) -> dict[str, Any]:
    """The JSON body; streaming with usage so token counts come from the server."""
    payload: dict[str, Any] = {
        "model": target.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        payload["messages"] = spec.as_messages()
        payload["max_completion_tokens"] = spec.max_tokens
    else:
        payload["prompt"] = spec.as_prompt()
        payload["max_tokens"] = spec.max_tokens
    if target.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(target.extra_body)
    payload.update(spec.extra_body)
    return payload


def classify_exception(exc: BaseException) -> str:
    """A short, stable error class for counting (e.g. ``timeout``, ``connect_error``)."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol_error"
    if isinstance(exc, httpx.ReadError):
        return "read_error"
    if isinstance(exc, httpx.HTTPError):
        return "http_error"
    return type(exc).__name__


async def send(client: httpx.AsyncClient, spec: RequestSpec, target: Target) -> RawExchange:
    """Send one streaming request and record each SSE event's ``data:`` line with its
    arrival time."""
    payload = build_payload(spec, target)
    raw = RawExchange(start=time.perf_counter())
    try:
        async with client.stream(
            "POST", target.base_url + target.path, json=payload, headers=target.headers()
        ) as response:
            raw.status = response.status_code
            if response.status_code != 200:
                raw.body = (await response.aread()).decode("utf-8", "replace")[:2000]
                return raw
            # The ingress's SSE decoder, not aiter_lines(): that splits lines the way
            # str.splitlines() does, so a generated U+2028 or U+0085 — which JSON leaves
            # unescaped — cut an event in two and a good request counted as failed.
            decoder = SSEDecoder()
            async for chunk in response.aiter_bytes():
                for data in decoder.feed(chunk):
                    raw.lines.append((time.perf_counter(), "data: " + data.decode("utf-8", "replace")))
    except Exception as exc:  # recorded per request, never aborts the run
        raw.error_class = classify_exception(exc)
        raw.error = f"{type(exc).__name__}: {exc}"[:500]
    return raw


def make_client(max_connections: int, request_timeout: float) -> httpx.AsyncClient:
    """Pooled client; ignores proxy env vars (benchmarks must hit the server directly)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(request_timeout, connect=min(30.0, request_timeout)),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        trust_env=False,
    )
