"""HTTP clients (sync and async) for a qwen-serve stack or any vLLM OpenAI server.

Why a client of our own instead of the ``openai`` package: the workflows need the
server's ``/tokenize`` and ``/detokenize`` routes (chunking by the server's own
tokenizer), retries that honour ``Retry-After`` from the ingress' admission control,
and one error type whose status code the CLI can turn into an exit code.

Both clients share the retry policy and error parsing below; only the transport
(``httpx.Client`` vs ``httpx.AsyncClient``) and the sleep differ.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "QWEN_SERVE_API_KEY"
# Statuses worth another try: admission control said "later" (429) or the ingress /
# a replica failed transiently (5xx). Any other 4xx is the request's own fault.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class APIError(Exception):
    """The server answered with an error (``status`` set) or could not be reached
    (``status`` is None). ``message`` is the server's own explanation when it gave one."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.body = body


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's ``Retry-After`` wins when present.

    ``max_retries`` counts extra attempts, so a request is sent at most
    ``max_retries + 1`` times.
    """

    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    retry_after_max: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        honoured = parse_retry_after(retry_after)
        if honoured is not None:
            return min(honoured, self.retry_after_max)
        exp = min(self.backoff_max, self.backoff_base * (2**attempt))
        # Jitter spreads clients that were all refused at the same instant.
        return exp * (0.5 + random.random() / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_message(response: httpx.Response) -> tuple[str, Any]:
    """The human message of an error response, for vLLM's and the ingress' shapes."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:500] or response.reason_phrase), text
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("message") or body.get("detail")
    return (str(msg) if msg else str(body)[:500]), body


def resolve_api_key(api_key: str | None) -> str | None:
    """Explicit key, else ``$QWEN_SERVE_API_KEY``, else none (open stack)."""
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


class _Common:
    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = resolve_api_key(api_key)
        self.retry = retry or RetryPolicy()
        # Generation on a CPU can take minutes for long prompts; connecting cannot.
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._model_cache: str | None = None
        self._max_model_len: int | None = None

    def _headers(self) -> dict[str, str]:
        h = {"accept": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _outcome(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            msg, body = error_message(response)
            raise APIError(msg, response.status_code, body)
        return response.json()

    def _remember_models(self, listing: dict) -> list[dict]:
        data = listing.get("data") or []
        if not data:
            raise APIError("the server lists no models at /v1/models")
        self._model_cache = self._model_cache or data[0]["id"]
        if data[0].get("max_model_len"):
            self._max_model_len = int(data[0]["max_model_len"])
        return data


class Client(_Common):
    """Blocking client. Use as a context manager or call :meth:`close`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, timeout=self._timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send with retries on 429/5xx and transport errors; return the JSON body."""
        attempt = 0
        while True:
            try:
                r = self._http.request(method, path, json=body, headers=self._headers())
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise APIError(f"cannot reach {self.base_url}: {exc}") from exc
                time.sleep(self.retry.delay(attempt))
            else:
                if r.status_code not in RETRY_STATUSES or attempt >= self.retry.max_retries:
                    return self._outcome(r)
                time.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
            attempt += 1

    def models(self) -> list[dict]:
        return self._remember_models(self.request("GET", "/v1/models"))

    def default_model(self) -> str:
        """The first served model: what ``--model`` means when not given."""
        if self._model_cache is None:
            self.models()
        assert self._model_cache is not None
        return self._model_cache

    def max_model_len(self) -> int:
        if self._max_model_len is None:
            self.models()
        if self._max_model_len is None:
            raise APIError("the server does not report max_model_len")
        return self._max_model_len

    def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        body = {"model": model or self.default_model(), "messages": messages, **params}
        return self.request("POST", "/v1/chat/completions", body)

    def tokenize(self, text: str, model: str | None = None, *, token_strs: bool = False) -> dict:
        body = {
            "model": model or self.default_model(),
            "prompt": text,
            "add_special_tokens": False,
            "return_token_strs": token_strs,
        }
        return self.request("POST", "/tokenize", body)

    def tokenize_chat(self, messages: list[dict], model: str | None = None) -> dict:
        body = {"model": model or self.default_model(), "messages": messages,
                "add_generation_prompt": True}
        return self.request("POST", "/tokenize", body)

    def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        body = {"model": model or self.default_model(), "tokens": tokens}
        return self.request("POST", "/detokenize", body)["prompt"]


class AsyncClient(_Common):
    """Asyncio client, same surface as :class:`Client` with awaitable methods."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=self._timeout,
            # The default pool (100) is fine; keep-alive matters for many short calls.
            limits=httpx.Limits(max_keepalive_connections=32),
        )

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        attempt = 0
        while True:
            try:
                r = await self._http.request(method, path, json=body, headers=self._headers())
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise APIError(f"cannot reach {self.base_url}: {exc}") from exc
                await asyncio.sleep(self.retry.delay(attempt))
            else:
                if r.status_code not in RETRY_STATUSES or attempt >= self.retry.max_retries:
                    return self._outcome(r)
                await asyncio.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
            attempt += 1

    async def models(self) -> list[dict]:
        return self._remember_models(await self.request("GET", "/v1/models"))

    async def default_model(self) -> str:
        if self._model_cache is None:
            await self.models()
        assert self._model_cache is not None
        return self._model_cache

    async def max_model_len(self) -> int:
        if self._max_model_len is None:
            await self.models()
        if self._max_model_len is None:
            raise APIError("the server does not report max_model_len")
        return self._max_model_len

    async def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        body = {"model": model or await self.default_model(), "messages": messages, **params}
        return await self.request("POST", "/v1/chat/completions", body)

    async def tokenize(self, text: str, model: str | None = None, *,
                       token_strs: bool = False) -> dict:
        body = {
            "model": model or await self.default_model(),
            "prompt": text,
            "add_special_tokens": False,
            "return_token_strs": token_strs,
        }
        return await self.request("POST", "/tokenize", body)

    async def tokenize_chat(self, messages: list[dict], model: str | None = None) -> dict:
        body = {"model": model or await self.default_model(), "messages": messages,
                "add_generation_prompt": True}
        return await self.request("POST", "/tokenize", body)

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        body = {"model": model or await self.default_model(), "tokens": tokens}
        return (await self.request("POST", "/detokenize", body))["prompt"]


def message_text(completion: dict) -> str:
    """The assistant text of a chat completion (empty string when none)."""
    return (completion["choices"][0]["message"].get("content") or "")


def finish_reason(completion: dict) -> str | None:
    return completion["choices"][0].get("finish_reason")
