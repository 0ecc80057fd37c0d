"""Adapter affinity: a LoRA adapter's requests go where that adapter already is.

vLLM runs at most ``engine.max_loras`` distinct adapters in one batch: a request for
another adapter is deferred until a slot frees (vLLM's scheduler; on GPUs a slot
change also copies the adapter's weights in). Spread at random, two adapters on
two replicas with one slot each make both replicas alternate between them and
run half-empty batches. So before the routing policy picks, the candidates for
an adapter request are narrowed to the replicas that served that adapter most
recently (an LRU of ``slots`` names per replica, the same size as vLLM's), or
failing that to replicas with a slot nobody uses yet.

The balance rule is prefix affinity's: a replica is only preferred while its
in-flight count is within ``imbalance`` of the least loaded candidate; beyond
that every candidate is fair game, so one popular adapter spreads over the pool
instead of queueing on one replica. Base-model requests need no slot and pass
through untouched.
"""

from __future__ import annotations

from typing import Sequence

from .pool import Replica


class AdapterPlacement:
    def __init__(self, slots: int, imbalance: int = 4) -> None:
        self.slots = slots
        self.imbalance = imbalance

    def candidates(self, replicas: Sequence[Replica], adapter: str | None) -> Sequence[Replica]:
        """The replicas the policy should choose among for a request for ``adapter``."""
        if adapter is None or len(replicas) < 2:
            return replicas
        bound = min(r.in_flight for r in replicas) + self.imbalance
        within = [r for r in replicas if r.in_flight <= bound]
        holders = [r for r in within if adapter in r.recent_adapters]
        if holders:
            return holders
        free = [r for r in within if len(r.recent_adapters) < self.slots]
        return free or replicas

    def served(self, replica: Replica, adapter: str | None) -> None:
        """Record that ``replica`` was given a request for ``adapter``."""
        if adapter is None:
            return
        held = replica.recent_adapters
        held[adapter] = None
        held.move_to_end(adapter)
        while len(held) > self.slots:
            held.popitem(last=False)
