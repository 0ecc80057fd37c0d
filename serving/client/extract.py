"""Schema-true JSON extraction: guided decoding on the server, validation here.

Why both: the engine's structured-output backend constrains tokens to the schema, but
backends differ in what they enforce (numeric bounds, control characters inside
strings) and a generation can still be cut by ``max_tokens``. So the answer is parsed
with strict ``json.loads`` (no raw control characters, no NaN) and validated with
``jsonschema``; a failure is retried once, then reported with its kind so the CLI can
exit with a distinct code.

The retry decodes greedily (temperature 0): repeating the sampling repeats its
accidents. The one seen here is a number whose digits never end ("0.9000…" until
``max_tokens``; the schema allows it): 2 of 40 sampled sentiment answers at
temperature 0.3, 0 of the greedy ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import jsonschema

from .http import AsyncClient, Client, finish_reason, message_text

FailureKind = Literal["invalid_json", "schema", "truncated"]

DEFAULT_SYSTEM = "You extract structured data from text."
SENTIMENT_SYSTEM = (
    "You are a sentiment analysis assistant. For each product review, in order, give the "
    "review text, its sentiment (positive, negative or neutral) and your confidence "
    "between 0 and 1."
)


class SchemaError(ValueError):
    """The schema itself is not a valid JSON Schema (a usage error, nothing was sent)."""


class ExtractionError(Exception):
    """Every attempt produced output that is not schema-valid JSON.

    ``kind`` says why the last attempt failed: ``invalid_json`` (strict parse failed),
    ``schema`` (parsed but violates the schema) or ``truncated`` (stopped by
    ``max_tokens`` before the JSON was complete). ``raw`` is that attempt's text.
    """

    def __init__(self, kind: FailureKind, detail: str, raw: str, attempts: int):
        super().__init__(f"{kind}: {detail} (after {attempts} attempt(s))")
        self.kind = kind
        self.detail = detail
        self.raw = raw
        self.attempts = attempts


@dataclass
class Extraction:
    """A schema-valid result: the parsed ``value``, the model's ``raw`` text and how many
    ``attempts`` it took (1 or 2)."""

    value: Any
    raw: str
    attempts: int


def validator_for(schema: dict) -> jsonschema.protocols.Validator:
    """A validator for ``schema``; raises :class:`SchemaError` if the schema is invalid."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"invalid JSON Schema: {exc.message}") from exc
    return cls(schema)


def schema_name(schema: dict) -> str:
    """The ``json_schema.name`` the OpenAI API wants: ``[A-Za-z0-9_-]{1,64}``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(schema.get("title") or "result")).strip("_")
    return (name or "result")[:64]


def build_messages(text: str, schema: dict, system: str | None = None) -> list[dict]:
    """System prompt = role + the schema (small models follow it better when they see it)."""
    role = system or DEFAULT_SYSTEM
    content = (f"{role}\nAnswer with JSON only, matching this JSON Schema:\n"
               f"{json.dumps(schema, separators=(',', ':'))}")
    return [{"role": "system", "content": content}, {"role": "user", "content": text}]


def request_params(schema: dict, temperature: float, max_tokens: int) -> dict:
    """Chat parameters that make the engine's guided decoding enforce ``schema``."""
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": schema_name(schema), "schema": schema, "strict": True},
        },
        "temperature": temperature,
        "max_tokens": max_tokens,
    }


def attempt_params(params: dict, attempt: int) -> dict:
    """The first attempt samples as asked; a retry decodes greedily (module docstring)."""
    return params if attempt == 1 else {**params, "temperature": 0.0}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_strict(raw: str) -> Any:
    """``json.loads`` in strict mode, also refusing NaN/Infinity (not JSON)."""
    return json.loads(raw, strict=True, parse_constant=_reject_constant)


def check_output(raw: str, reason: str | None, validator: Any) -> Any:
    """Parse and validate one answer; raise ``(kind, detail)`` as ExtractionError(attempts=0)."""
    try:
        value = parse_strict(raw)
    except ValueError as exc:
        kind: FailureKind = "truncated" if reason == "length" else "invalid_json"
        raise ExtractionError(kind, str(exc), raw, 0) from None
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ExtractionError("schema", f"at {where}: {e.message}", raw, 0)
    return value


def extract_json(
    text: str,
    schema: dict,
    *,
    client: Client | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    system: str | None = None,
    temperature: float = 0.3,
    max_tokens: int = 1024,
    retries: int = 1,
) -> Extraction:
    """Turn ``text`` into JSON that strictly parses and validates against ``schema``.

    Uses ``client`` if given, else opens one to ``base_url`` (default local stack).
    Raises :class:`SchemaError` for a bad schema, :class:`ExtractionError` when all
    ``retries + 1`` attempts failed, and ``APIError`` when the server refuses.
    """
    validator = validator_for(schema)
    messages = build_messages(text, schema, system)
    params = request_params(schema, temperature, max_tokens)
    own = client is None
    c = client or Client(**_conn(base_url, api_key))
    try:
        last: ExtractionError | None = None
        for attempt in range(1, retries + 2):
            out = c.chat(messages, model=model, **attempt_params(params, attempt))
            raw = message_text(out)
            try:
                return Extraction(check_output(raw, finish_reason(out), validator), raw, attempt)
            except ExtractionError as exc:
                last = exc
        assert last is not None
        raise ExtractionError(last.kind, last.detail, last.raw, retries + 1)
    finally:
        if own:
            c.close()


async def aextract_json(
    text: str,
    schema: dict,
    *,
    client: AsyncClient | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    system: str | None = None,
    temperature: float = 0.3,
    max_tokens: int = 1024,
    retries: int = 1,
) -> Extraction:
    """Async twin of :func:`extract_json` (same arguments, an :class:`AsyncClient`)."""
    validator = validator_for(schema)
    messages = build_messages(text, schema, system)
    params = request_params(schema, temperature, max_tokens)
    own = client is None
    c = client or AsyncClient(**_conn(base_url, api_key))
    try:
        last: ExtractionError | None = None
        for attempt in range(1, retries + 2):
            out = await c.chat(messages, model=model, **attempt_params(params, attempt))
            raw = message_text(out)
            try:
                return Extraction(check_output(raw, finish_reason(out), validator), raw, attempt)
            except ExtractionError as exc:
                last = exc
        assert last is not None
        raise ExtractionError(last.kind, last.detail, last.raw, retries + 1)
    finally:
        if own:
            await c.aclose()


def _conn(base_url: str | None, api_key: str | None) -> dict:
    return {"api_key": api_key, **({"base_url": base_url} if base_url else {})}


def _data(name: str) -> str:
    return resources.files("serving.client").joinpath("data", name).read_text("utf-8")


def sentiment_schema() -> dict:
    """The seed's sentiment schema: an array of {text, sentiment, confidence}."""
    return json.loads(_data("sentiment.schema.json"))


def sentiment_reviews() -> list[str]:
    """The seed's three example product reviews."""
    return [line for line in _data("sentiment_reviews.txt").splitlines() if line.strip()]


def sentiment_prompt(reviews: list[str] | None = None) -> str:
    """The user message for the sentiment example: the reviews, numbered."""
    reviews = sentiment_reviews() if reviews is None else reviews
    return "\n".join(f"{i}. {r}" for i, r in enumerate(reviews, 1))
