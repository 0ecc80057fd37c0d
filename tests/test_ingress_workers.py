"""The pieces several ingress workers share: the in-flight table, replica slots, the
control channel's limits and replica list (no engine needed; the stack tests drive
real workers in front of real engines)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.config import LimitsConfig, load_config
from serving.ingress.admission import Admission
from serving.ingress.board import SLOTS, InFlightBoard, SlotAllocator
from serving.ingress.control import ControlClient, ControlServer, RemoteLimiter
from serving.ingress.limits import KeyLimiter
from serving.ingress.pool import ReplicaPool
from serving.plan import PlanError, make_plan

from test_plan import CONFIGS, QWEN05


def test_each_worker_writes_its_row_and_reads_the_column_sum(tmp_path: Path):
    path = InFlightBoard.create(tmp_path / "board", 3)
    boards = [InFlightBoard(path, 3, w) for w in range(3)]
    boards[0].add(5, 2)
    boards[1].add(5, 1)
    boards[2].add(6, 4)
    assert [b.count(5) for b in boards] == [3, 3, 3]
    assert boards[0].count(6) == 4 and boards[0].count(7) == 0
    boards[1].add(5, -1)
    assert boards[2].count(5) == 2
    boards[0].clear_row(0)  # the launcher, for a worker that died with two leases
    assert boards[1].count(5) == 0 and boards[1].count(6) == 4
    for b in boards:
        b.close()
    with pytest.raises(ValueError):
        InFlightBoard(path, 3, 3)


def test_replicas_on_a_board_count_every_workers_leases(tmp_path: Path):
    path = InFlightBoard.create(tmp_path / "board", 2)
    pools = [ReplicaPool(None, board=InFlightBoard(path, 2, w)) for w in range(2)]
    entries = [{"replica_id": "a", "url": "http://127.0.0.1:1", "pid": 1, "slot": 0},
               {"replica_id": "b", "url": "http://127.0.0.1:2", "pid": 2, "slot": 1}]
    for pool in pools:
        pool.update(entries)
    (a0, b0), (a1, _) = pools[0].replicas, pools[1].replicas
    a0.lease(1)
    a1.lease(1)
    a1.lease(1)
    assert (a0.in_flight, a1.in_flight, b0.in_flight) == (3, 3, 0)
    assert (a0.own_in_flight, a1.own_in_flight) == (1, 2)
    a1.lease(-1)
    assert a0.in_flight == 2


def test_slots_are_kept_while_a_replica_lives_and_not_reused_at_once():
    slots = SlotAllocator(slots=4)
    first = slots.assign(["a", "b"])
    assert first == {"a": 0, "b": 1}
    assert slots.assign(["b", "c"]) == {"b": 1, "c": 2}  # a left; c does not get 0
    assert slots.assign(["b", "c", "d"])["d"] == 3
    assert slots.assign(["b", "c", "d", "e"])["e"] == 0  # the ring came round
    with pytest.raises(RuntimeError):
        slots.assign(["b", "c", "d", "e", "f"])
    assert SLOTS >= 1024


def test_the_planner_advises_workers_and_refuses_runtime_adapters_in_several():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", ["engine.stream_interval=1"], environ={})
    assert make_plan(cfg, QWEN05).ingress_workers == 2  # 80,000 events/s, 43,772 per worker
    fixed = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", ["engine.stream_interval=1",
                                                                   "server.workers=1"], environ={})
    plan = make_plan(fixed, QWEN05)
    assert plan.ingress_workers == 1
    (warning,) = [w for w in plan.warnings if "ingress" in w]
    assert "set server.workers to 2" in warning
    lora = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", ["engine.runtime_lora=true",
                                                                  "server.workers=2"], environ={})
    with pytest.raises(PlanError, match="server.workers to 1"):
        make_plan(lora, QWEN05)


async def _pair(tmp_path: Path, limiter: KeyLimiter):
    server = ControlServer(tmp_path / "control.sock", limiter)
    await server.start()
    seen: list[list[list[dict]]] = [[], []]
    drained = [0, 0]
    clients = []
    for w in range(2):
        client = ControlClient(server.path, w, on_replicas=seen[w].append,
                               on_drain=lambda w=w: drained.__setitem__(w, drained[w] + 1),
                               on_lost=lambda: None)
        await client.connect()
        clients.append(client)
    return server, clients, seen, drained


async def _until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_one_keys_limit_holds_across_workers(tmp_path: Path):
    """60 requests/min for a key: however its requests fall on two workers, 60 pass."""
    server, clients, _, _ = await _pair(tmp_path, KeyLimiter(60, None))
    limiters = [RemoteLimiter(c, 60, None) for c in clients]
    waits = await asyncio.gather(*(limiters[i % 2].acquire("key-a", 1) for i in range(90)))
    assert sum(1 for w in waits if w == 0) == 60
    assert all(w >= 1 for w in waits if w)
    assert await limiters[1].acquire("key-b", 1) == 0  # another key is unaffected
    limiters[0].refund("key-a", 1)  # a request no engine saw gives its request back
    await asyncio.sleep(0.05)
    assert await limiters[1].acquire("key-a", 1) == 0
    for c in clients:
        await c.close()
    await server.close()


async def test_token_settling_reaches_the_shared_bucket(tmp_path: Path):
    server, clients, _, _ = await _pair(tmp_path, KeyLimiter(None, 1000))
    limits = LimitsConfig(tokens_per_minute=1000)
    a, b = (Admission(limits, None, limiter=RemoteLimiter(c, None, 1000)) for c in clients)
    assert await a.limiter.acquire("k", 900) == 0
    assert await b.limiter.acquire("k", 900) > 0  # the bucket is one, whatever the worker
    a.limiter.settle("k", 900, 10)  # the answer cost 10 tokens: 890 come back
    await asyncio.sleep(0.05)
    assert await b.limiter.acquire("k", 900) == 0
    for c in clients:
        await c.close()
    await server.close()


async def test_replicas_and_drain_reach_every_worker(tmp_path: Path):
    server, clients, seen, drained = await _pair(tmp_path, KeyLimiter(None, None))
    await _until(lambda: server.connected == {0, 1})
    entries = [{"replica_id": "a", "url": "http://127.0.0.1:1", "pid": 1, "slot": 0}]
    server.publish(entries)
    server.publish(entries)  # unchanged: not sent again
    await _until(lambda: all(s and s[-1] == entries for s in seen))
    assert [len(s) for s in seen] == [2, 2]  # the empty list on hello, then one update
    clients[0].listening()
    await _until(lambda: server.listening == {0})
    server.drain()
    await _until(lambda: drained == [1, 1])
    # A worker that connects during a drain (a replacement) is told at once.
    late_drained = []
    late = ControlClient(server.path, 2, on_replicas=lambda e: None,
                         on_drain=lambda: late_drained.append(1), on_lost=lambda: None)
    await late.connect()
    await _until(lambda: late_drained == [1])
    for c in (*clients, late):
        await c.close()
    await server.close()


async def test_a_worker_whose_launcher_is_gone_is_told(tmp_path: Path):
    server = ControlServer(tmp_path / "control.sock", KeyLimiter(60, None))
    await server.start()
    lost = []
    client = ControlClient(server.path, 0, on_replicas=lambda e: None, on_drain=lambda: None,
                           on_lost=lambda: lost.append(1))
    await client.connect()
    await _until(lambda: server.connected == {0})
    await server.close()
    await _until(lambda: lost == [1])
    # An admission asked of a launcher that is gone lets the request in, not hang.
    assert await RemoteLimiter(client, 60, None).acquire("k", 1) == 0
