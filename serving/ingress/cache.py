"""Exact-match response cache for deterministic OpenAI requests.

Why: repeated identical queries (FAQ bots, retries, evaluation loops) should not
cost an engine pass. Only requests whose answer is a function of the request are
cached: greedy decoding (``temperature == 0``) or sampling with a fixed ``seed``,
one choice, no logprobs. The key covers the normalized request body, the route and
the model revision, so a new model never serves an old answer.

One entry holds the full non-streaming JSON answer. Streaming clients are served
from the same entry by rendering it as SSE (:func:`sse_from_completion`), and a
streamed miss fills the cache by assembling its SSE back into that JSON shape
(:func:`completion_from_sse`, or :class:`StreamCapture` inside a relay loop).

Backends share one interface (``key_for`` / ``get`` / ``put`` / ``aclose``):
:class:`ResponseCache` is in-process (LRU bounded by bytes, TTL);
:class:`RedisResponseCache` is shared by several ingress replicas.

Hit/miss/bypass accounting: pass a prometheus ``Counter`` with one label
(``result``) as ``metrics_counter`` and the cache counts ``hit``/``miss`` in
``get`` and ``bypass`` when ``key_for`` refuses a request; the ingress then only
counts bypasses it decides itself (``Cache-Control: no-cache``).

Caveat: engines are not bit-exact across batch compositions, so "deterministic"
means the cache returns one valid greedy/seeded answer (the first one seen) for
the TTL, which is the usual contract of an exact-match cache.

This module has no HTTP framework code; the ingress owns requests and responses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .redis_client import FailureLog, connect
from .sse import decode_all

logger = logging.getLogger("qwen_serve.ingress.cache")

CACHEABLE_ROUTES = ("chat", "completions")
# Fields that change neither the generated tokens nor the JSON answer, only the
# transport or bookkeeping; dropped before hashing so they don't split the cache.
_IGNORED_FIELDS = frozenset({
    "user", "stream", "stream_options", "request_id", "priority", "metadata", "store",
    "service_tier", "safety_identifier", "prompt_cache_key",
})
# Requests asking for per-token data the cached JSON (or its SSE rendering) would
# not reproduce faithfully.
_PER_TOKEN_FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs", "return_token_ids",
                     "return_tokens_as_token_ids")
_KEY_VERSION = "v1"
# Rough per-entry bookkeeping cost in the in-process LRU (dict slot, tuple, object).
_ENTRY_OVERHEAD = 200


@dataclass(frozen=True)
class CachedResponse:
    status: int
    content_type: str
    body: bytes  # the full non-streaming JSON answer


def _truthy_request(value: Any) -> bool:
    """True when an OpenAI option is 'on' (logprobs=0 still asks for logprobs)."""
    return value is not None and value is not False


def _has_remote_media(messages: Any) -> bool:
    """Content parts fetched by URL may change between requests; data: URLs may not."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            for name, value in part.items():
                if isinstance(value, dict):
                    url = value.get("url")
                else:  # the flat form, e.g. {"type": "image_url", "image_url": "https://..."}
                    url = value if name == "url" or name.endswith("_url") else None
                if isinstance(url, str) and url.startswith(("http://", "https://", "file:")):
                    return True
    return False


def cache_refusal(route: str, body: dict) -> str | None:
    """Why a request must not be cached, or None when its answer is deterministic."""
    if route not in CACHEABLE_ROUTES:
        return "route"
    temperature = body.get("temperature")
    if temperature is None:  # OpenAI's default is 1.0 (vLLM may use the model's own default)
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        return "invalid"
    seed = body.get("seed")
    if temperature != 0 and (seed is None or isinstance(seed, bool) or not isinstance(seed, int)):
        return "sampled"
    for field in ("n", "best_of"):
        count = body.get(field, 1)
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int):
            return "invalid"
        if count > 1:
            return "multiple_choices"
    if any(_truthy_request(body.get(f)) for f in _PER_TOKEN_FIELDS):
        return "logprobs"
    if _has_remote_media(body.get("messages")):
        return "remote_media"
    return None


def _normalize(body: dict) -> dict:
    """The part of the request that determines the answer, in a canonical form."""
    out: dict[str, Any] = {}
    for field, value in body.items():
        if field in _IGNORED_FIELDS:
            continue
        # 0 and 0.0 (or 1 and 1.0) ask for the same thing.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[field] = value
    if out.get("n") == 1:
        del out["n"]
    if out.get("best_of") == 1:
        del out["best_of"]
    if out.get("temperature") == 0:
        out.pop("seed", None)  # greedy decoding ignores the seed
    return out


class _KeyedCache:
    """Key derivation and counting shared by every backend."""

    # Whether an answer from the cache says so (config: response_cache.hit_header).
    hit_header: str = "per_key"

    def __init__(self, metrics_counter: Any = None) -> None:
        self._counter = metrics_counter
        self._counts: dict[str, Any] = {}  # result → the counter's child (labels() is slow)

    def announces_hit(self, scope: str) -> bool:
        """`x-cache: hit` for a request of this cache scope (a key's id, or "" with keys off)."""
        return self.hit_header == "always" or (self.hit_header == "per_key" and bool(scope))

    def _count(self, result: str) -> None:
        if self._counter is not None:
            child = self._counts.get(result)
            if child is None:
                child = self._counts[result] = self._counter.labels(result)
            child.inc()

    def key_for(self, route: str, body: dict, model_revision: str, *, scope: str = "") -> str | None:
        """A stable key for a deterministic request, or None when it must not be cached.

        ``scope`` separates tenants (e.g. a hash of the API key): without it, a
        sub-5 ms answer tells one tenant that another asked the same question.
        """
        if cache_refusal(route, body) is not None:
            self._count("bypass")
            return None
        try:
            canonical = json.dumps(
                {"route": route, "revision": model_revision, "scope": scope, "body": _normalize(body)},
                sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
            )
        except ValueError:  # NaN/Infinity (json.loads accepts them): the engine will refuse it
            self._count("bypass")
            return None
        return f"{_KEY_VERSION}:{hashlib.sha256(canonical.encode()).hexdigest()}"

    @staticmethod
    def storable(value: CachedResponse) -> bool:
        """Only complete successful answers are worth replaying."""
        return value.status == 200 and value.content_type.startswith("application/json")


class ResponseCache(_KeyedCache):
    """In-process cache: LRU bounded by total bytes, entries expire after ``ttl_s``.

    No locking: every method runs on the event loop without awaiting inside.
    """

    def __init__(self, max_bytes: int, ttl_s: float, metrics_counter: Any = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(metrics_counter)
        if max_bytes <= 0 or ttl_s <= 0:
            raise ValueError("max_bytes and ttl_s must be positive")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int, CachedResponse]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self._bytes -= size

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self._clock():
            self._drop(key)
            entry = None
        if entry is None:
            self._count("miss")
            return None
        self._entries.move_to_end(key)
        self._count("hit")
        return entry[2]

    async def put(self, key: str, value: CachedResponse) -> None:
        if not self.storable(value):
            return
        size = len(key) + len(value.body) + len(value.content_type) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self.ttl_s, size, value)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisResponseCache(_KeyedCache):
    """Shared cache in Redis, for several ingress replicas.

    TTL is Redis's own (``SET ... PX``). The byte bound is split: entries larger
    than ``max_entry_bytes`` are refused here, and the total is Redis's
    ``maxmemory`` with an evicting policy — configure the server with e.g.
    ``maxmemory 256mb`` and ``maxmemory-policy volatile-lru`` (every entry has a
    TTL, so volatile-* policies apply to all of them).

    Redis trouble never fails a request: errors read as a miss and writes are
    dropped, with a throttled warning. Needs the ``redis`` package (imported
    lazily so the in-process cache works without it).
    """

    def __init__(self, url: str, ttl_s: float, max_entry_bytes: int = 1 << 20,
                 metrics_counter: Any = None, *, prefix: str = "qwen-serve:rc:",
                 timeout_s: float = 0.5, client: Any = None) -> None:
        super().__init__(metrics_counter)
        if max_entry_bytes <= 0 or ttl_s <= 0:
            raise ValueError("max_entry_bytes and ttl_s must be positive")
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_entry_bytes = max_entry_bytes
        self.prefix = prefix
        self._redis = client if client is not None else connect(url, timeout_s)
        self._failed = FailureLog(logger, "response cache")

    def _warn(self, what: str, exc: Exception) -> None:
        self._failed(what, exc, "serving uncached")

    async def get(self, key: str) -> CachedResponse | None:
        try:
            raw = await self._redis.get(self.prefix + key)
        except Exception as exc:  # any client/connection error: behave as a miss
            self._warn("GET", exc)
            raw = None
        value = _decode(raw) if raw is not None else None
        self._count("hit" if value is not None else "miss")
        return value

    async def put(self, key: str, value: CachedResponse) -> None:
        if not self.storable(value):
            return
        blob = _encode(value)
        if len(blob) > self.max_entry_bytes:
            return
        try:
            await self._redis.set(self.prefix + key, blob, px=self.ttl_ms)
        except Exception as exc:
            self._warn("SET", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _encode(value: CachedResponse) -> bytes:
    return f"{value.status}\n{value.content_type}\n".encode() + value.body


def _decode(raw: bytes) -> CachedResponse | None:
    try:
        status, content_type, body = raw.split(b"\n", 2)
        return CachedResponse(int(status), content_type.decode(), body)
    except ValueError:
        return None  # not ours (or an older format): treat as a miss


# --- SSE <-> JSON ------------------------------------------------------------

_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completions": "text_completion"}
_FULL_OBJECT = {"chat": "chat.completion", "completions": "text_completion"}


def _check_route(route: str) -> None:
    if route not in CACHEABLE_ROUTES:
        raise ValueError(f"no SSE shape for route {route!r}")


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def sse_from_completion(route: str, body: bytes, include_usage: bool) -> bytes:
    """Render a cached non-streaming answer as the OpenAI SSE stream for the same request.

    Each choice gets an opening chunk (the chat role), one chunk with its whole
    text, and a closing chunk with ``finish_reason``; then the usage chunk (empty
    ``choices``) when the client asked for ``include_usage``, then ``[DONE]``.
    """
    _check_route(route)
    answer = json.loads(body)
    head = {"id": answer.get("id"), "object": _CHUNK_OBJECT[route],
            "created": answer.get("created"), "model": answer.get("model")}
    if answer.get("system_fingerprint") is not None:
        head["system_fingerprint"] = answer["system_fingerprint"]
    extra_usage = {"usage": None} if include_usage else {}
    out: list[bytes] = []

    def chunk(choice: dict) -> None:
        out.append(_event({**head, "choices": [choice], **extra_usage}))

    for choice in answer.get("choices", []):
        index = choice.get("index", 0)
        closing = {"finish_reason": choice.get("finish_reason")}
        if "stop_reason" in choice:
            closing["stop_reason"] = choice["stop_reason"]
        if route == "chat":
            message = choice.get("message") or {}
            opening: dict[str, Any] = {"role": message.get("role") or "assistant"}
            if isinstance(message.get("content"), str):
                opening["content"] = ""
            chunk({"index": index, "delta": opening, "logprobs": None, "finish_reason": None})
            delta: dict[str, Any] = {}
            for field in ("reasoning", "reasoning_content"):
                if message.get(field):
                    delta[field] = message[field]
            if message.get("content"):
                delta["content"] = message["content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            if delta:
                chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
            chunk({"index": index, "delta": {}, "logprobs": None, **closing})
        else:
            if choice.get("text"):
                chunk({"index": index, "text": choice["text"], "logprobs": None, "finish_reason": None})
            chunk({"index": index, "text": "", "logprobs": None, **closing})
    if include_usage and answer.get("usage") is not None:
        out.append(_event({**head, "choices": [], "usage": answer["usage"]}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _sse_data(sse: bytes) -> list[str] | None:
    """The ``data:`` payloads of an SSE byte stream, one per event."""
    try:
        return [data.decode() for data in decode_all(sse)]
    except UnicodeDecodeError:
        return None


def completion_from_sse(route: str, sse: bytes, *, require_usage: bool = True) -> bytes | None:
    """Assemble a streamed answer into the non-streaming JSON answer, or None.

    None unless the stream is complete and clean: it ends with ``[DONE]``, holds
    no error event, every choice has a ``finish_reason``, and (``require_usage``)
    it carried a usage chunk — an entry without usage could not answer a
    non-streaming client faithfully. Clients that stream with
    ``stream_options.include_usage`` (the benchmark, the web page, most SDK users)
    therefore fill the cache; others only read from it.
    """
    _check_route(route)
    payloads = _sse_data(sse)
    if not payloads or payloads[-1] != "[DONE]":
        return None
    head: dict[str, Any] | None = None
    usage = None
    choices: dict[int, dict[str, Any]] = {}
    for data in payloads[:-1]:
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") != _CHUNK_OBJECT[route]:
            return None
        if head is None:
            head = {"id": chunk.get("id"), "object": _FULL_OBJECT[route],
                    "created": chunk.get("created"), "model": chunk.get("model")}
        if chunk.get("system_fingerprint") is not None:
            head["system_fingerprint"] = chunk["system_fingerprint"]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            if not _merge_choice(route, choices, part):
                return None
    if head is None or not choices or (require_usage and usage is None):
        return None
    if any(c.get("finish_reason") is None for c in choices.values()):
        return None
    answer = {**head, "choices": [_finish_choice(route, i, choices[i]) for i in sorted(choices)]}
    if usage is not None:
        answer["usage"] = usage
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode()


def _merge_choice(route: str, choices: dict[int, dict[str, Any]], part: Any) -> bool:
    if not isinstance(part, dict) or not isinstance(part.get("index", 0), int):
        return False
    acc = choices.setdefault(part.get("index", 0), {"text": [], "reasoning": {}, "tools": {}})
    if part.get("finish_reason") is not None:
        acc["finish_reason"] = part["finish_reason"]
    if "stop_reason" in part:
        acc["stop_reason"] = part["stop_reason"]
    if route == "completions":
        if isinstance(part.get("text"), str):
            acc["text"].append(part["text"])
        return True
    delta = part.get("delta") or {}
    if not isinstance(delta, dict):
        return False
    if delta.get("role"):
        acc["role"] = delta["role"]
    if isinstance(delta.get("content"), str):
        acc["text"].append(delta["content"])
    for field in ("reasoning", "reasoning_content"):
        if isinstance(delta.get(field), str):
            acc["reasoning"].setdefault(field, []).append(delta[field])
    for call in delta.get("tool_calls") or []:
        if not isinstance(call, dict):
            return False
        slot = acc["tools"].setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
        for field in ("id", "type"):
            if call.get(field):
                slot[field] = call[field]
        function = call.get("function") or {}
        for field in ("name", "arguments"):
            if isinstance(function.get(field), str):
                slot["function"][field] += function[field]
    return True


def _finish_choice(route: str, index: int, acc: dict[str, Any]) -> dict[str, Any]:
    text = "".join(acc["text"])
    if route == "completions":
        choice: dict[str, Any] = {"index": index, "text": text}
    else:
        message: dict[str, Any] = {"role": acc.get("role", "assistant"),
                                   "content": text if (text or not acc["tools"]) else None}
        for field, pieces in acc["reasoning"].items():
            message[field] = "".join(pieces)
        if acc["tools"]:
            message["tool_calls"] = [{"type": "function", **acc["tools"][i]} for i in sorted(acc["tools"])]
        choice = {"index": index, "message": message}
    choice.update(logprobs=None, finish_reason=acc["finish_reason"])
    if "stop_reason" in acc:
        choice["stop_reason"] = acc["stop_reason"]
    return choice


class StreamCapture:
    """Collects a relayed SSE stream so a streamed miss can fill the cache.

    Call :meth:`feed` with every raw chunk as it is forwarded (an append, no
    parsing on the per-token path); the capture gives up once the stream exceeds
    ``max_bytes``. :meth:`completion` assembles the answer at the end.
    """

    def __init__(self, route: str, max_bytes: int = 1 << 20,
                 store: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        _check_route(route)
        self.route = route
        self.max_bytes = max_bytes
        self._store = store  # called with the assembled answer of a complete stream
        self._parts: list[bytes] | None = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > self.max_bytes:
            self._parts = None
        else:
            self._parts.append(chunk)

    def completion(self) -> bytes | None:
        if self._parts is None:
            return None
        return completion_from_sse(self.route, b"".join(self._parts))

    async def close(self, complete: bool) -> None:
        if complete and self._store is not None and (full := self.completion()) is not None:
            await self._store(full)
