"""Batch translation: bounded concurrency, input order kept, failures kept per item.

Why per-item results instead of raising: in a batch of thousands, one text that the
server refuses (too long for the context, say) must not cost the others. Every input
gets exactly one :class:`TranslationItem`, at its own index, with either a
``translation`` or an ``error``. Transient refusals (429/5xx) are retried by the HTTP
client with backoff before an item is declared failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from tqdm import tqdm

from .http import APIError, AsyncClient, Client, finish_reason, message_text

LANGUAGES = {
    "en": "English", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "fr": "French",
    "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian",
    "ar": "Arabic", "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "vi": "Vietnamese",
}


@dataclass
class TranslationItem:
    """The outcome for input number ``index``: ``translation`` or ``error`` (with the
    HTTP ``status`` when the server gave one). ``meta`` carries the input's other
    fields (e.g. an ``id``) through to the output."""

    index: int
    source: str | None
    translation: str | None = None
    error: str | None = None
    status: int | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The JSONL record the CLI writes for this item."""
        rec: dict[str, Any] = {**self.meta, "index": self.index, "text": self.source}
        if self.ok:
            rec["translation"] = self.translation
            if self.finish_reason == "length":
                rec["truncated"] = True
        else:
            rec["error"] = {"message": self.error, "status": self.status}
        return rec


def language_name(code: str) -> str:
    return LANGUAGES.get(code.lower(), code)


def build_messages(text: str, target: str, source: str | None = None) -> list[dict]:
    """A translator role and the text alone as the user turn (no wrapper to echo)."""
    frm = f" from {language_name(source)}" if source else ""
    system = (f"You are a professional translator. Translate the user's text{frm} into "
              f"{language_name(target)}. Reply with the translation only.")
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def _as_item(i: int, x: str | TranslationItem) -> TranslationItem:
    return x if isinstance(x, TranslationItem) else TranslationItem(i, x)


def _done(item: TranslationItem, out: dict) -> TranslationItem:
    item.translation = message_text(out).strip()
    item.finish_reason = finish_reason(out)
    return item


def _failed(item: TranslationItem, exc: APIError) -> TranslationItem:
    item.error, item.status = exc.message, exc.status
    return item


# --- sync ------------------------------------------------------------------------


def iter_translate(
    texts: Sequence[str | TranslationItem], *, target: str, source: str | None = None,
    client: Client, model: str | None = None, concurrency: int = 4, max_tokens: int = 1024,
    temperature: float = 0.2, progress: bool = False,
) -> Iterator[TranslationItem]:
    """Yield one item per input, in input order, as soon as its turn is complete.

    Inputs may be pre-built items (e.g. already failed while reading the file);
    those pass through untouched.
    """
    model = model or client.default_model()
    params = {"max_tokens": max_tokens, "temperature": temperature}

    def one(pair: tuple[int, str | TranslationItem]) -> TranslationItem:
        item = _as_item(*pair)
        if item.error is not None or item.source is None:
            return item
        try:
            return _done(item, client.chat(build_messages(item.source, target, source),
                                           model=model, **params))
        except APIError as exc:
            return _failed(item, exc)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(texts), desc="translate", unit="item", file=sys.stderr,
                 disable=not progress) as bar:
        for item in pool.map(one, enumerate(texts)):  # map keeps input order
            bar.update(1)
            yield item


def translate_batch(
    texts: Sequence[str | TranslationItem], *, target: str, source: str | None = None,
    client: Client | None = None, base_url: str | None = None, api_key: str | None = None,
    model: str | None = None, concurrency: int = 4, max_tokens: int = 1024,
    temperature: float = 0.2, progress: bool = False,
) -> list[TranslationItem]:
    """Translate ``texts`` into ``target`` (a code like ``"en"`` or a language name).

    Returns one :class:`TranslationItem` per input, in input order; check ``.ok``.
    At most ``concurrency`` requests are in flight. Never raises for a single item.
    """
    own = client is None
    c = client or Client(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    try:
        return list(iter_translate(texts, target=target, source=source, client=c, model=model,
                                   concurrency=concurrency, max_tokens=max_tokens,
                                   temperature=temperature, progress=progress))
    finally:
        if own:
            c.close()


# --- async -----------------------------------------------------------------------


async def aiter_translate(
    texts: Sequence[str | TranslationItem], *, target: str, source: str | None = None,
    client: AsyncClient, model: str | None = None, concurrency: int = 4,
    max_tokens: int = 1024, temperature: float = 0.2, progress: bool = False,
) -> AsyncIterator[TranslationItem]:
    """Async twin of :func:`iter_translate`: in input order, bounded concurrency."""
    model = model or await client.default_model()
    params = {"max_tokens": max_tokens, "temperature": temperature}
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(texts), desc="translate", unit="item", file=sys.stderr,
               disable=not progress)

    async def one(i: int, x: str | TranslationItem) -> TranslationItem:
        item = _as_item(i, x)
        if item.error is None and item.source is not None:
            async with sem:
                try:
                    _done(item, await client.chat(build_messages(item.source, target, source),
                                                  model=model, **params))
                except APIError as exc:
                    _failed(item, exc)
        bar.update(1)
        return item

    tasks = [asyncio.ensure_future(one(i, x)) for i, x in enumerate(texts)]
    try:
        for task in tasks:  # awaiting in creation order = input order
            yield await task
    finally:
        for task in tasks:
            task.cancel()
        bar.close()


async def atranslate_batch(
    texts: Sequence[str | TranslationItem], *, target: str, source: str | None = None,
    client: AsyncClient | None = None, base_url: str | None = None,
    api_key: str | None = None, model: str | None = None, concurrency: int = 4,
    max_tokens: int = 1024, temperature: float = 0.2, progress: bool = False,
) -> list[TranslationItem]:
    """Async twin of :func:`translate_batch`."""
    own = client is None
    c = client or AsyncClient(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    try:
        return [item async for item in aiter_translate(
            texts, target=target, source=source, client=c, model=model,
            concurrency=concurrency, max_tokens=max_tokens, temperature=temperature,
            progress=progress)]
    finally:
        if own:
            await c.aclose()


def read_jsonl(lines: Sequence[str], field_name: str = "text") -> list[TranslationItem]:
    """Parse JSONL input: each line a JSON string or an object with ``field_name``.

    A bad line becomes a failed item at its place (status None) instead of aborting
    the batch; blank lines are skipped. Other keys of an object travel in ``meta``.
    """
    items: list[TranslationItem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        idx = len(items)
        try:
            rec = json.loads(line)
        except ValueError as exc:
            items.append(TranslationItem(idx, None, error=f"line {lineno}: invalid JSON: {exc}"))
            continue
        if isinstance(rec, str):
            items.append(TranslationItem(idx, rec))
        elif isinstance(rec, dict) and isinstance(rec.get(field_name), str):
            meta = {k: v for k, v in rec.items() if k not in (field_name, "index")}
            items.append(TranslationItem(idx, rec[field_name], meta=meta))
        else:
            items.append(TranslationItem(
                idx, None, error=f"line {lineno}: expected a JSON string or an object with "
                                 f"a string {field_name!r}"))
    return items
