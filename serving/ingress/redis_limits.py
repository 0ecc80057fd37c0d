"""Per-key limits kept in Redis: one pair of buckets per key for every ingress instance.

Why: the launcher's buckets (control.py) make a key's limit hold across the workers of
one instance; two instances in front of the same engines (HA, `serve --address` twice)
would each grant the whole limit. With ``server.limits.redis_url`` every worker of every
instance charges the same buckets, in Redis, by one script call per admission: the
same token-bucket arithmetic as limits.KeyLimiter (refill, all-or-nothing admission of
both buckets, settling into debt at most one bucket deep, refunds), run atomically by
the server on its own clock, so instances on different machines agree.

A Redis that does not answer never refuses a request: it is admitted and the failure
logged (throttled), as the shared response cache reads a failing Redis as a miss.
Needs the ``redis`` package (the ``redis`` extra).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .redis_client import FailureLog, connect

logger = logging.getLogger("qwen_serve.limits")

# Each bucket is a hash {l: level, t: stamp in µs}; a key's buckets expire once idle
# long enough to have refilled (they would be full again anyway).
# KEYS: requests bucket, tokens bucket. ARGV: op, rpm, tpm, tokens (admit: the charge;
# settle: extra tokens, negative gives back; refund: tokens).
_SCRIPT = """
local op = ARGV[1]
local caps = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local amounts = {1, tonumber(ARGV[4])}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local levels = {}
for i = 1, 2 do
  local cap = caps[i]
  if cap > 0 then
    local got = redis.call('HMGET', KEYS[i], 'l', 't')
    local level, stamp = tonumber(got[1]), tonumber(got[2])
    if level == nil then level, stamp = cap, now end
    level = math.min(cap, level + (now - stamp) * cap / 60000000)
    levels[i] = level
  end
end
local function store(i, level)
  -- As strings: a Lua number passed on is cut to 14 digits, and the stamp has 16.
  redis.call('HSET', KEYS[i], 'l', string.format('%.17g', level), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[i], 120000)
end
if op == 'admit' then
  local wait = 0
  for i = 1, 2 do
    if levels[i] ~= nil and levels[i] < amounts[i] then
      wait = math.max(wait, (amounts[i] - levels[i]) * 60 / caps[i])
    end
  end
  if wait > 0 then return tostring(wait) end
  for i = 1, 2 do
    if levels[i] ~= nil then store(i, levels[i] - amounts[i]) end
  end
  return '0'
end
-- settle (tokens bucket only) or refund (both): never below one bucket of debt
local from = 2
if op == 'refund' then from = 1 end
for i = from, 2 do
  if levels[i] ~= nil then
    local change = amounts[i]
    if op == 'refund' then change = -amounts[i] end
    store(i, math.max(-caps[i], math.min(caps[i], levels[i] - change)))
  end
end
return '0'
"""


class RedisLimiter:
    """The Limiter of limits.py, with its buckets in Redis (see the module's docstring)."""

    def __init__(self, url: str, requests_per_minute: int | None, tokens_per_minute: int | None,
                 *, prefix: str = "qwen-serve:limit:", timeout_s: float = 0.5,
                 client: Any = None) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.prefix = prefix
        self._redis = client if client is not None else connect(url, timeout_s)
        self._script = self._redis.register_script(_SCRIPT)
        self._failed = FailureLog(logger, "rate limits")

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def too_large(self, tokens: int) -> bool:
        return self.tpm is not None and tokens > self.tpm

    async def _run(self, op: str, key: str, tokens: int) -> float:
        keys = [f"{self.prefix}{key}:r", f"{self.prefix}{key}:t"]
        try:
            return float(await self._script(keys=keys, args=[op, self.rpm or 0, self.tpm or 0, tokens]))
        except Exception as exc:  # noqa: BLE001 - Redis trouble admits, it never refuses
            self._failed(op, exc, "admitting")
            return 0.0

    async def acquire(self, key: str, tokens: int) -> float:
        wait = await self._run("admit", key, tokens)
        return float(max(1, -(-wait // 1))) if wait > 0 else 0.0

    def settle(self, key: str, charged: int, used: int) -> None:
        if used != charged:
            self._later("settle", key, used - charged)

    def refund(self, key: str, tokens: int) -> None:
        self._later("refund", key, tokens)

    def _later(self, op: str, key: str, tokens: int) -> None:
        task = asyncio.get_running_loop().create_task(self._run(op, key, tokens))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def aclose(self) -> None:
        await self._redis.aclose()


# Settles and refunds in flight (kept referenced until done: the loop holds tasks weakly).
_pending: set = set()
