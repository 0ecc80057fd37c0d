"""The ingress's live view of engine replicas: address, in-flight count, health.

Replicas come and go through the registry (Ray Serve restarts, scaling). The
in-flight count per replica is kept here because every request passes through the
ingress, which makes it exact and free, and it is what the routing policies use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .board import InFlightBoard

logger = logging.getLogger("qwen_serve.pool")

# A replica whose heartbeat is older than this is considered gone.
REGISTRY_MAX_AGE_S = 5.0
# After a connection failure, skip the replica for this long (it is usually dead).
DOWN_PENALTY_S = 3.0
# A replica whose join step failed (e.g. an adapter did not load) tries again after this.
JOIN_RETRY_S = 5.0


@dataclass
class Replica:
    replica_id: str
    url: str
    pid: int
    # With several ingress workers: the shared table of in-flight counts (board.py)
    # and this replica's column in it; None: this process's own count is the count.
    board: InFlightBoard | None = field(default=None, repr=False, compare=False)
    slot: int = -1
    # Requests this process has in flight on the replica (its leases).
    own_in_flight: int = 0
    down_until: float = 0.0
    # When the engine last sent bytes for a request (monotonic). A replica busy with
    # work it is visibly doing is alive; a probe would only queue behind that work.
    answered_at: float = 0.0
    # Joined, but not given traffic until the pool's join step (runtime adapters) is done.
    joining: bool = False
    # Adapters this replica was last given requests for, least recent first; the
    # ingress's view of the engine's LoRA slots (adapter_routing.py keeps it).
    recent_adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def in_flight(self) -> int:
        """Requests in flight on the replica, from every ingress worker."""
        if self.board is None:
            return self.own_in_flight
        return self.board.count(self.slot)

    @in_flight.setter
    def in_flight(self, value: int) -> None:  # tests and single-process callers
        self.lease(value - self.own_in_flight)

    def lease(self, delta: int) -> None:
        """Take (1) or give back (-1) one of this process's in-flight slots."""
        self.own_in_flight += delta
        if self.board is not None:
            self.board.add(self.slot, delta)

    @property
    def available(self) -> bool:
        return not self.joining and time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        self.down_until = time.monotonic() + DOWN_PENALTY_S
        self.answered_at = 0.0

    def answered(self) -> None:
        self.answered_at = time.monotonic()

    def answering_within(self, window_s: float) -> bool:
        """Serving requests now and sent bytes for one within ``window_s``."""
        return (self.in_flight > 0 and self.available
                and time.monotonic() - self.answered_at < window_s)


class ReplicaPool:
    """The replicas a process routes to. ``registry``: the Ray registry actor (polled), or
    None in an ingress worker, whose launcher pushes the list (``update``)."""

    def __init__(self, registry, accept: Callable[[dict], bool] | None = None,
                 board: InFlightBoard | None = None) -> None:
        self._registry = registry
        self._board = board
        # Which registry entries are the deployment's engines (the launcher checks the
        # entry's proof); the others are never routed to.
        self._accept = accept
        self._refused: set[str] = set()
        self._replicas: dict[str, Replica] = {}
        self._task: asyncio.Task | None = None
        # Run for each replica that joins before it gets traffic; True when it is done.
        self.on_join: Callable[[Replica], Awaitable[bool]] | None = None
        self._joins: set[asyncio.Task] = set()

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def available(self) -> list[Replica]:
        return [r for r in self._replicas.values() if r.available]

    async def refresh(self) -> None:
        self.update(await self._registry.snapshot.remote(REGISTRY_MAX_AGE_S))

    def update(self, entries: list[dict]) -> None:
        """Make the pool the replicas of ``entries`` (registry entries; with a ``slot``
        in the shared in-flight table when there are several workers)."""
        fresh: dict[str, Replica] = {}
        for entry in entries:
            rid = entry["replica_id"]
            if self._accept is not None and not self._accept(entry):
                if rid not in self._refused:
                    self._refused.add(rid)
                    logger.warning("registry entry %s is not signed by the engine key: ignored", rid)
                continue
            known = self._replicas.get(rid)
            slot = entry.get("slot", -1)
            if known is not None and known.url == entry["url"] and known.slot == slot:
                fresh[rid] = known
            else:
                fresh[rid] = replica = Replica(rid, entry["url"], entry["pid"],
                                               board=self._board, slot=slot)
                logger.info("engine replica %s at %s joined", rid, entry["url"])
                if self.on_join is not None:
                    replica.joining = True
                    task = asyncio.get_running_loop().create_task(self._join(replica))
                    self._joins.add(task)
                    task.add_done_callback(self._joins.discard)
        for rid in self._replicas.keys() - fresh.keys():
            logger.warning("engine replica %s left", rid)
        self._replicas = fresh

    async def _join(self, replica: Replica) -> None:
        while self._replicas.get(replica.replica_id) is replica:  # until it leaves
            try:
                if await self.on_join(replica):
                    break
            except Exception:  # noqa: BLE001 - retried; one replica must not stop the pool
                logger.exception("join step for replica %s failed", replica.replica_id)
            await asyncio.sleep(JOIN_RETRY_S)
        replica.joining = False

    async def _run(self, period_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep polling through transient Ray errors
                logger.exception("registry refresh failed")
            await asyncio.sleep(period_s)

    def start(self, period_s: float = 0.5) -> None:
        if self._registry is None:  # pushed by the launcher (update)
            return
        self._task = asyncio.get_running_loop().create_task(self._run(period_s))

    async def stop(self) -> None:
        for task in list(self._joins):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


class FixedRegistry:
    """A registry whose answer never changes: engines this process was told about
    (`qwen-serve ingress --engine URL`, the relay benchmark), not found through Ray.
    Same interface as the Ray actor's: ``await registry.snapshot.remote(max_age_s)``."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries = entries
        self.snapshot = _FixedSnapshot(self)


class _FixedSnapshot:
    def __init__(self, registry: FixedRegistry) -> None:
        self._registry = registry

    async def remote(self, max_age_s: float) -> list[dict]:
        return [dict(e) for e in self._registry.entries]
