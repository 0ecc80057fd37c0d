"""The async load generator: fixed concurrency or Poisson/gamma arrivals, bounded.

Semantics match ``vllm bench serve``: every request of the list "arrives" on the
schedule (all at once for fixed concurrency), a semaphore caps how many are in
flight, and a request's clock starts when it is actually sent. The run's duration
is first dispatch → last completion, and it is the denominator of throughput.

Every run is bounded twice: by the length of the request list and by
``max_duration``; at the deadline in-flight requests are cancelled and recorded as
``cancelled`` (not failures), requests never sent are left out.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .client import Target, make_client, send
from .stream import RequestRecord, parse_exchange
from .workloads import RequestSpec


@dataclass(frozen=True)
class LoadShape:
    """Fixed concurrency (``rate=inf``) or an arrival rate with optional cap."""

    concurrency: int | None = None
    rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be ≥ 1")
        if self.rate <= 0 or self.burstiness <= 0:
            raise ValueError("rate and burstiness must be > 0")
        if self.concurrency is None and math.isinf(self.rate):
            raise ValueError("give a concurrency, a finite rate, or both")

    @property
    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if not math.isinf(self.rate):
            parts.append(f"rate={self.rate:g}/s")
            if self.burstiness != 1.0:
                parts.append(f"burstiness={self.burstiness:g}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "rate": None if math.isinf(self.rate) else self.rate,
            "burstiness": self.burstiness,
        }


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s from start) of ``n`` requests.

    Gaps are gamma-distributed with mean ``1/rate`` and shape ``burstiness``:
    1 is a Poisson process, < 1 burstier, > 1 more regular. The first request is
    sent at 0. ``rate=inf`` sends everything at 0.
    """
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    timed_out: bool
    started_at: float  # wall-clock epoch seconds


async def run_load(
    specs: list[RequestSpec],
    target: Target,
    shape: LoadShape,
    *,
    max_duration: float,
    request_timeout: float,
    seed: int = 0,
    warmup: int = 0,
    progress: bool = True,
    desc: str = "bench",
) -> RunResult:
    """Send ``specs`` to ``target`` with ``shape``; never runs past ``max_duration``."""
    n = len(specs)
    limit = shape.concurrency or max(n, 1)
    async with make_client(max(1, min(limit, max(n, warmup, 1))), request_timeout) as client:
        # Pay httpx's lazy imports and the first connection outside the measured window.
        try:
            await client.get(target.base_url + "/v1/models", headers=target.headers())
        except Exception:  # the run itself will record the failure per request
            pass
        if warmup > 0 and specs:
            sem_w = asyncio.Semaphore(limit)

            async def warm(i: int) -> None:
                async with sem_w:
                    await send(client, specs[i % n], target)

            await asyncio.wait_for(
                asyncio.gather(*(warm(i) for i in range(warmup))), timeout=request_timeout
            )

        sem = asyncio.Semaphore(limit)
        records: list[RequestRecord | None] = [None] * n
        sent_at: list[float | None] = [None] * n
        bar = tqdm(total=n, desc=desc, unit="req", disable=not progress, leave=False)
        offsets = arrival_offsets(n, shape.rate, shape.burstiness, seed)

        async def one(i: int) -> None:
            async with sem:
                sent_at[i] = time.perf_counter()
                raw = await send(client, specs[i], target)
            records[i] = parse_exchange(raw, target.endpoint, i)
            bar.update(1)

        async def dispatch() -> None:
            tasks = []
            for i, offset in enumerate(offsets):
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

        wall0 = time.time()
        t0 = time.perf_counter()
        timed_out = False
        try:
            await asyncio.wait_for(dispatch(), timeout=max_duration)
        except asyncio.TimeoutError:
            timed_out = True
        duration = time.perf_counter() - t0
        bar.close()

    out: list[RequestRecord] = []
    for i in range(n):
        rec = records[i]
        if rec is None:
            if sent_at[i] is None:
                continue  # never sent before the deadline
            rec = RequestRecord(
                index=i, start=sent_at[i], ok=False, status=None, error_class="cancelled",
                error=f"still running at the {max_duration:g}s deadline", ttft=None, itl=[],
                e2e=None, prompt_tokens=None, output_tokens=0, usage_reported=False,
            )
        rec.start -= t0  # store send times relative to the run start
        out.append(rec)
    return RunResult(records=out, duration_s=duration, timed_out=timed_out, started_at=wall0)
