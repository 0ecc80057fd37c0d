"""Per-key limits in Redis (server.limits.redis_url) on a real redis-server: one bucket
per key for every ingress instance, with the in-process limiter's arithmetic."""

from __future__ import annotations

import asyncio

import pytest

from redis_server import redis_server
from serving.config import LimitsConfig
from serving.ingress.builder import make_limiter
from serving.ingress.limits import KeyLimiter
from serving.ingress.redis_limits import RedisLimiter
from serving.ports import reserved_port


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


async def test_two_instances_share_one_keys_requests_per_minute(redis_url):
    a, b = (RedisLimiter(redis_url, 30, None, prefix="t-rpm:") for _ in range(2))
    waits = await asyncio.gather(*((a if i % 2 else b).acquire("key", 1) for i in range(45)))
    assert sum(1 for w in waits if w == 0) == 30  # not 30 per instance
    assert min(w for w in waits if w) >= 1  # Retry-After: whole seconds, at least 1
    assert await a.acquire("other-key", 1) == 0
    await b.aclose()
    await a.aclose()


async def test_tokens_settle_and_refund_as_in_process(redis_url):
    """The same sequence against KeyLimiter and RedisLimiter gives the same answers."""
    local = KeyLimiter(6, 1000)
    shared = RedisLimiter(redis_url, 6, 1000, prefix="t-tpm:")
    other = RedisLimiter(redis_url, 6, 1000, prefix="t-tpm:")  # a second instance
    results = {}
    for name, first, second in (("local", local, local), ("redis", shared, other)):
        steps = [await first.acquire("k", 900)]
        steps.append(await second.acquire("k", 900))  # 100 left: wait ≈ 48 s
        first.settle("k", 900, 10)  # cost 10: 890 back
        await asyncio.sleep(0.05)
        steps.append(await second.acquire("k", 900))
        second.refund("k", 900)  # reached no engine: given back
        await asyncio.sleep(0.05)
        steps.append(await first.acquire("k", 950))
        first.settle("k", 950, 2950)  # cost 2,000 more than charged: into debt, one bucket deep
        await asyncio.sleep(0.05)
        steps.append(await second.acquire("k", 1))
        results[name] = steps
    assert results["local"][0] == results["redis"][0] == 0
    assert results["local"][2:4] == results["redis"][2:4] == [0, 0]
    for i in (1, 4):  # Retry-After within a second of each other (the clocks differ)
        assert abs(results["local"][i] - results["redis"][i]) <= 1, results
    assert results["redis"][4] >= 60  # a bucket of debt: more than a minute to pay off
    await shared.aclose()
    await other.aclose()


async def test_a_redis_that_does_not_answer_admits():
    with reserved_port() as port:  # held, nothing listening: connections are refused
        limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", 1, None, timeout_s=0.2)
        assert [await limiter.acquire("k", 1) for _ in range(3)] == [0, 0, 0]
        await limiter.aclose()


def test_the_config_picks_where_limits_live(redis_url):
    assert isinstance(make_limiter(LimitsConfig(requests_per_minute=5)), KeyLimiter)
    assert isinstance(make_limiter(LimitsConfig(requests_per_minute=5, redis_url=redis_url)), RedisLimiter)
    # No limit set: nothing to keep anywhere, Redis or not.
    assert isinstance(make_limiter(LimitsConfig(redis_url=redis_url)), KeyLimiter)
