"""Admission: everything the ingress checks before a request may reach an engine.

In order, cheapest first, each failure an OpenAI-style error: draining (503),
API key (401), content type (415), body size (413), JSON (400), shape bounds
(400, shape.py), per-key rate limits (429 + Retry-After) charged for all of the
request's work. Capacity (429 when every
replica is at its in-flight bound) is checked when a replica is chosen.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..config import LimitsConfig
from .auth import ApiKeys, KeysFile, bearer_token
from .errors import error_response
from .limits import KeyLimiter, Limiter
from .shape import ShapeError, check, estimate_tokens
from .routing import routing_text


@dataclass
class Admitted:
    raw: bytes
    body: dict
    prompt_text: str
    key_id: str | None
    # Whose rate-limit buckets were charged, and how many tokens (for a refund).
    charged_to: str | None = None
    charged_tokens: int = 0


_timeout = getattr(asyncio, "timeout", None)


class Rejected(Exception):
    def __init__(self, reason: str, response: Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


class Admission:
    def __init__(self, limits: LimitsConfig, keys: ApiKeys | KeysFile | None,
                 default_model: str = "", body_timeout_s: float = 60.0,
                 limiter: Limiter | None = None) -> None:
        self.limits = limits
        self.body_timeout_s = body_timeout_s
        self.keys = keys
        self.default_model = default_model  # what a request without "model" gets
        self.limiter: Limiter = limiter or KeyLimiter(limits.requests_per_minute,
                                                      limits.tokens_per_minute)

    def authenticate(self, request: Request) -> str | None:
        """The caller's key id, or None when keys are off; raises Rejected(401)."""
        if self.keys is None:
            return None
        kid = self.keys.check(bearer_token(request.headers.get("authorization")))
        if kid is None:
            raise Rejected("unauthorized", error_response(
                401, "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return kid

    async def admit(self, request: Request) -> Admitted:
        kid = self.authenticate(request)
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise Rejected("invalid", error_response(
                415, "Content-Type must be application/json.", code="unsupported_media_type"))
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Rejected("invalid", error_response(
                400, "The request body is not valid JSON.", code="invalid_json")) from None
        except RecursionError:  # nested deeper than the parser's stack
            raise Rejected("invalid", error_response(
                400, f"The request body nests deeper than {self.limits.max_json_depth} levels.",
                code="invalid_json")) from None
        if not isinstance(body, dict):
            raise Rejected("invalid", error_response(
                400, "The request body must be a JSON object.", code="invalid_json"))
        self._check_bounds(body)
        if kid is not None:
            self._check_model_access(kid, body)
        text = routing_text(body)
        if not self.limiter.enabled:
            return Admitted(raw, body, text, kid)
        who = kid or (request.client.host if request.client else "anonymous")
        tokens = estimate_tokens(body, text, generates=request.url.path.endswith("/completions"))
        if self.limiter.too_large(tokens):
            # OpenAI answers "Request too large ... on tokens per min" the same way: 429,
            # but without Retry-After, since waiting cannot help.
            raise Rejected("rate_limited", error_response(
                429, f"Request too large: it may cost {tokens:,} tokens and this key's limit is "
                     f"{self.limiter.tpm:,} tokens per minute. Lower max_tokens, n or the batch size.",
                code="request_too_large"))
        wait = await self.limiter.acquire(who, tokens)
        if wait:
            raise Rejected("rate_limited", error_response(
                429, f"Rate limit reached for this key; retry after {wait:.0f}s.",
                code="rate_limit_exceeded", headers={"Retry-After": f"{wait:.0f}"}))
        return Admitted(raw, body, text, kid, charged_to=who, charged_tokens=tokens)

    def _check_model_access(self, kid: str, body: dict) -> None:
        allowed = self.keys.models_for(kid)
        model = body.get("model") or self.default_model
        if allowed is not None and (not isinstance(model, str) or model not in allowed):
            raise Rejected("forbidden", error_response(
                403, f"This API key may not use the model {model!r}; it may use: "
                     f"{', '.join(sorted(allowed))}.", param="model", code="model_not_allowed"))

    def settle(self, admitted: Admitted, used_tokens: int) -> None:
        """Charge what the engine reported using instead of the admission estimate."""
        if admitted.charged_to is not None:
            self.limiter.settle(admitted.charged_to, admitted.charged_tokens, used_tokens)

    def refund(self, admitted: Admitted) -> None:
        """Give back what ``admit`` charged, for a request that reached no engine."""
        if admitted.charged_to is not None:
            self.limiter.refund(admitted.charged_to, admitted.charged_tokens)

    async def _read_body(self, request: Request) -> bytes:
        cap = self.limits.max_body_bytes

        def too_large() -> Rejected:  # built only when needed: this runs for every request
            return Rejected("too_large", error_response(
                413, f"The request body exceeds {cap} bytes.", code="request_too_large"))

        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise too_large()
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise too_large()
                chunks.append(chunk)

        try:
            if _timeout is not None:  # Python 3.11+: no extra task per request
                async with _timeout(self.body_timeout_s):
                    await read()
            else:
                await asyncio.wait_for(read(), self.body_timeout_s)
        except ClientDisconnect:
            raise Rejected("invalid", error_response(400, "The client went away.",
                                                     code="client_disconnected")) from None
        except asyncio.TimeoutError:
            # The rest of the body may still be on its way: close rather than read it.
            raise Rejected("slow_client", error_response(
                408, f"The request body did not arrive within {self.body_timeout_s:g} s.",
                code="request_timeout", headers={"Connection": "close"})) from None
        return b"".join(chunks)

    def _check_bounds(self, body: dict) -> None:
        try:
            check(body, self.limits)
        except ShapeError as exc:
            raise Rejected("invalid", error_response(400, str(exc), param=exc.param,
                                                     code="invalid_value")) from None
