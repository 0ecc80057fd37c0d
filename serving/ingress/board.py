"""In-flight counts per engine replica, shared by the ingress's worker processes.

Why: the routing policies and the capacity bounds read how many requests each replica
has in flight. With several ingress workers (``server.workers``) each sees only the
requests it relays unless the counts are shared, and a bound of 4 per replica would
become 4 per replica per worker. So the counts live in one shared table, a memory-mapped
file: a row per worker, a column per replica slot. Each worker writes only its own row
(one writer per cell, so no lock is needed), and a replica's count is the sum of its
column, read in a few hundred nanoseconds. A worker that dies leaves its row behind; the
launcher zeroes that row before the worker's replacement starts.

Slots are handed out by the launcher, which alone sees replicas join and leave
(workers get them with the replica list), and are not reused until the table has
gone round once, so a lease still held on a departed replica never counts against a
new one in practice.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SLOTS = 1024  # replica slots; a deployment with more replicas than this is not a thing
_CELL = 8  # bytes: one signed 64-bit count


class InFlightBoard:
    """One worker's view of the shared table (``worker`` is its row)."""

    def __init__(self, path: Path, workers: int, worker: int) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} outside 0..{workers - 1}")
        self.path, self.workers, self.worker = path, workers, worker
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, workers * SLOTS * _CELL)
        finally:
            os.close(fd)
        self._cells = memoryview(self._map).cast("q")
        self._row = worker * SLOTS

    @staticmethod
    def create(path: Path, workers: int) -> Path:
        """Make a zeroed table for ``workers`` rows at ``path``."""
        with open(path, "wb") as out:
            out.truncate(workers * SLOTS * _CELL)
        return path

    def add(self, slot: int, delta: int) -> None:
        self._cells[self._row + slot] += delta

    def count(self, slot: int) -> int:
        cells = self._cells
        return sum(cells[w * SLOTS + slot] for w in range(self.workers))

    def clear_row(self, worker: int) -> None:
        """Forget a dead worker's leases (its requests died with it)."""
        start = worker * SLOTS
        self._cells[start:start + SLOTS] = memoryview(bytes(SLOTS * _CELL)).cast("q")

    def close(self) -> None:
        self._cells.release()
        self._map.close()


class SlotAllocator:
    """Replica id → slot, reusing a freed slot only after every other one was handed out."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._slots = slots
        self._next = 0
        self._held: dict[str, int] = {}

    def assign(self, replica_ids: list[str]) -> dict[str, int]:
        """Slots for the replicas present now; the absent ones give theirs up."""
        present = set(replica_ids)
        for rid in list(self._held):
            if rid not in present:
                del self._held[rid]
        taken = set(self._held.values())
        for rid in replica_ids:
            if rid in self._held:
                continue
            if len(taken) >= self._slots:
                raise RuntimeError(f"more than {self._slots} replicas")
            while self._next % self._slots in taken:
                self._next += 1
            slot = self._next % self._slots
            self._next += 1
            self._held[rid] = slot
            taken.add(slot)
        return dict(self._held)
