"""Per-key rate limits: requests/min and tokens/min token buckets.

Tokens are charged at admission from what the request can cost at most — its
prompt length (≈ 4 characters a token, before any tokenization, so a rejected
request costs the engine nothing) plus ``max_tokens`` (or a default) — and
settled to what the answer cost (usage.py: the engine's ``usage`` count, or a
stream's events when it reports none). So a short answer to a large
``max_tokens`` gives the rest back, and a long answer to a request without
``max_tokens`` pays for what it generated. The answer to an over-limit request
is 429 with ``Retry-After``: the seconds until the bucket refills enough.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol


class Limiter(Protocol):
    """Per-key limits as admission uses them: this process's ``KeyLimiter``, or with
    several ingress workers the launcher's, asked over the control channel (control.py)."""

    rpm: int | None
    tpm: int | None

    @property
    def enabled(self) -> bool: ...

    def too_large(self, tokens: int) -> bool: ...

    async def acquire(self, key: str, tokens: int) -> float: ...

    def settle(self, key: str, charged: int, used: int) -> None: ...

    def refund(self, key: str, tokens: int) -> None: ...


@dataclass
class TokenBucket:
    rate_per_s: float
    capacity: float
    level: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
        self.stamp = now

    def wait_for(self, amount: float, now: float | None = None) -> float:
        """0 if ``amount`` can be taken now, else the seconds until it can."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.level >= amount:
            return 0.0
        return (amount - self.level) / self.rate_per_s

    def take(self, amount: float) -> None:
        self.level -= amount

    def settle(self, extra: float, now: float | None = None) -> None:
        """Take ``extra`` more (or give back, if negative) after the fact: the level
        may go into debt, at most one full bucket deep."""
        self._refill(time.monotonic() if now is None else now)
        self.level = max(-self.capacity, min(self.capacity, self.level - extra))


class KeyLimiter:
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 max_keys: int = 100_000) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _for(self, key: str):
        pair = self._buckets.get(key)
        if pair is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            pair = (TokenBucket(self.rpm / 60, self.rpm) if self.rpm else None,
                    TokenBucket(self.tpm / 60, self.tpm) if self.tpm else None)
            self._buckets[key] = pair
        return pair

    def too_large(self, tokens: int) -> bool:
        """Whether a request costs more than a whole minute's budget: it could never be
        admitted (``admit`` would ask it to wait forever), so it is refused outright."""
        return self.tpm is not None and tokens > self.tpm

    def admit(self, key: str, tokens: int) -> float:
        """0 and charge both buckets if allowed; else the Retry-After seconds (nothing charged).

        ``tokens`` must fit a minute's budget (see :meth:`too_large`).
        """
        requests, toks = self._for(key)
        now = time.monotonic()
        wait = max(requests.wait_for(1, now) if requests else 0.0,
                   toks.wait_for(tokens, now) if toks else 0.0)
        if wait > 0:
            return max(1.0, math.ceil(wait))
        if requests:
            requests.take(1)
        if toks:
            toks.take(tokens)
        return 0.0

    async def acquire(self, key: str, tokens: int) -> float:
        """``admit``, as every limiter answers it (control.RemoteLimiter asks the launcher)."""
        return self.admit(key, tokens)

    def settle(self, key: str, charged: int, used: int) -> None:
        """Replace an ``admit`` charge of ``charged`` tokens by what was ``used``.

        Using more than was charged can leave the bucket in debt (at most one
        minute's budget): the key then waits until it is paid off.
        """
        pair = self._buckets.get(key)
        if pair is not None and pair[1] is not None and used != charged:
            pair[1].settle(used - charged)

    def refund(self, key: str, tokens: int) -> None:
        """Undo an ``admit`` charge for a request no engine saw (e.g. 429 at capacity)."""
        pair = self._buckets.get(key)
        if pair is None:
            return
        requests, toks = pair
        if requests:
            requests.settle(-1)
        if toks:
            toks.settle(-tokens)
