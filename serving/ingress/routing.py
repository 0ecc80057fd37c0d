"""Routing policies: which engine replica serves a request.

Every policy sees the ingress's exact in-flight counts (see pool.py). Chosen in
the config as ``router.policy``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import OrderedDict
from typing import Protocol, Sequence

from .pool import Replica


class RoutingPolicy(Protocol):
    def choose(self, replicas: Sequence[Replica], prefix: str) -> Replica: ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[Replica], prefix: str) -> Replica:
        return replicas[next(self._counter) % len(replicas)]


class PowerOfTwo:
    """Sample two replicas, take the one with fewer requests in flight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, replicas: Sequence[Replica], prefix: str) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self._rng.sample(list(replicas), 2)
        return a if a.in_flight <= b.in_flight else b


class PrefixAffinity:
    """Send a prompt where its longest prefix was last served, unless that replica is busy.

    The prompt is cut into fixed-size character blocks; the hash of each cumulative
    prefix maps to the replica that last served it, in an LRU bounded by
    ``max_entries`` (memory stays bounded, old prefixes are evicted). A match is
    only taken if its replica's in-flight count is within ``imbalance`` of the least
    loaded one; otherwise — and for new prefixes — power-of-two decides, so an
    unseen prefix never piles onto one replica.
    """

    def __init__(self, block_chars: int = 128, max_blocks: int = 64, max_entries: int = 100_000,
                 imbalance: int = 4, rng: random.Random | None = None) -> None:
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.max_entries = max_entries
        self.imbalance = imbalance
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self._fallback = PowerOfTwo(rng)

    def _prefix_hashes(self, prefix: str) -> list[bytes]:
        digest = hashlib.blake2b(digest_size=16)
        hashes = []
        for i in range(0, min(len(prefix), self.block_chars * self.max_blocks), self.block_chars):
            block = prefix[i:i + self.block_chars]
            if len(block) < self.block_chars:
                break  # only whole blocks: engine prefix caching is per full block too
            digest.update(block.encode("utf-8", "surrogatepass"))
            hashes.append(digest.copy().digest())
        return hashes

    def choose(self, replicas: Sequence[Replica], prefix: str) -> Replica:
        by_id = {r.replica_id: r for r in replicas}
        least = min(r.in_flight for r in replicas)
        hashes = self._prefix_hashes(prefix)
        chosen = None
        for h in reversed(hashes):
            owner = by_id.get(self._owner.get(h, ""))
            if owner is not None:
                if owner.in_flight <= least + self.imbalance:
                    chosen = owner
                break
        if chosen is None:
            chosen = self._fallback.choose(replicas, prefix)
        for h in hashes:
            self._owner[h] = chosen.replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return chosen


def make_policy(name: str) -> RoutingPolicy:
    return {"round_robin": RoundRobin, "power_of_two": PowerOfTwo,
            "prefix_affinity": PrefixAffinity}[name]()


def routing_text(body: dict) -> str:
    """The text whose prefix identifies cached KV: chat messages in order, or the prompt.

    Any JSON may arrive here (validation is the engine's job), so anything that is
    not the expected shape simply contributes no text.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(t for p in content if isinstance(p, dict)
                                  and isinstance(t := p.get("text"), str))
            role = m.get("role")
            parts.append(f"{role if isinstance(role, str) else ''}\n"
                         f"{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""
