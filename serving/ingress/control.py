"""The channel between the launcher and its ingress workers (``server.workers`` > 1).

Why a launcher at all: the workers share one port and must act as one ingress. What
can only be known or decided in one place stays in the launcher process, which serves
no HTTP itself: the replica list (it alone talks to Ray and checks each registry
entry's signature), each replica's slot in the shared in-flight table (board.py), the
per-key rate limits (a key's requests land on any worker, and the limit is the key's,
not the worker's), and when to drain. Each worker connects to the launcher's Unix
socket and exchanges newline-delimited JSON messages:

    worker → launcher   {"op": "hello", "worker": W}        then, once serving, {"op": "listening"}
                        {"op": "admit", "id": N, "who": K, "tokens": T}   (rate limits on)
                        {"op": "settle", "who": K, "charged": C, "used": U}
                        {"op": "refund", "who": K, "tokens": T}
    launcher → worker   {"op": "replicas", "entries": [{replica_id, url, pid, slot}, ...]}
                        {"op": "admitted", "id": N, "wait": SECONDS}
                        {"op": "drain"}

A limited request costs its worker one round trip here (tens of µs; nothing when no
limit is set); streamed bytes never cross this channel. A worker whose launcher is
gone (the socket closes) stops.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

from .limits import KeyLimiter

logger = logging.getLogger("qwen_serve.control")

# How long a worker waits for the launcher's answer to an admission before letting the
# request in: a launcher that does not answer is stopping or stuck, and a request
# refused for that would be lost for a bookkeeping reason.
ADMIT_TIMEOUT_S = 2.0


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    """The launcher's end: one connection per worker."""

    def __init__(self, path: Path, limiter: KeyLimiter) -> None:
        self.path = path
        self.limiter = limiter
        self.listening: set[int] = set()  # workers that serve HTTP now
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._replicas: bytes = _line({"op": "replicas", "entries": []})
        self._draining = False
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    @property
    def connected(self) -> set[int]:
        """Workers connected now."""
        return set(self._writers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._handlers:  # each ends once its connection is closed
            await asyncio.wait(self._handlers, timeout=2.0)

    def publish(self, entries: list[dict]) -> None:
        """Tell every worker the replicas to route to (sent only when they changed)."""
        line = _line({"op": "replicas", "entries": entries})
        if line != self._replicas:
            self._replicas = line
            self._broadcast(line)

    def drain(self) -> None:
        self._draining = True
        self._broadcast(_line({"op": "drain"}))

    def _broadcast(self, line: bytes) -> None:
        for writer in list(self._writers.values()):
            if not writer.is_closing():
                writer.write(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        worker: int | None = None
        try:
            hello = json.loads(await reader.readline() or b"{}")
            worker = int(hello["worker"])
            self._writers[worker] = writer
            writer.write(self._replicas)
            if self._draining:
                writer.write(_line({"op": "drain"}))
            while line := await reader.readline():
                self._handle(worker, writer, json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("bad message from ingress worker %s: %r", worker, exc)
        except ConnectionError:
            pass
        finally:
            if worker is not None and self._writers.get(worker) is writer:
                del self._writers[worker]
                self.listening.discard(worker)
            writer.close()

    def _handle(self, worker: int, writer: asyncio.StreamWriter, msg: dict) -> None:
        op = msg["op"]
        if op == "admit":
            wait = self.limiter.admit(msg["who"], int(msg["tokens"]))
            writer.write(_line({"op": "admitted", "id": msg["id"], "wait": wait}))
        elif op == "settle":
            self.limiter.settle(msg["who"], int(msg["charged"]), int(msg["used"]))
        elif op == "refund":
            self.limiter.refund(msg["who"], int(msg["tokens"]))
        elif op == "listening":
            self.listening.add(worker)
        else:
            raise ValueError(f"unknown op {op!r}")


class ControlClient:
    """A worker's end. ``on_replicas(entries)`` and ``on_drain()`` run on the worker's
    loop when the launcher says so; ``on_lost()`` when the launcher is gone."""

    def __init__(self, path: Path, worker: int, *, on_replicas: Callable[[list[dict]], None],
                 on_drain: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self.path, self.worker = path, worker
        self._on_replicas, self._on_drain, self._on_lost = on_replicas, on_drain, on_lost
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        self._send({"op": "hello", "worker": self.worker})
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def listening(self) -> None:
        self._send({"op": "listening"})

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    def _send(self, message: dict) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_line(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                op = msg["op"]
                if op == "replicas":
                    self._on_replicas(msg["entries"])
                elif op == "admitted":
                    if (future := self._waiting.pop(msg["id"], None)) and not future.done():
                        future.set_result(float(msg["wait"]))
                elif op == "drain":
                    self._on_drain()
        except (ConnectionError, ValueError, KeyError) as exc:
            logger.error("control channel to the launcher failed: %r", exc)
        for future in self._waiting.values():
            if not future.done():
                future.set_result(0.0)
        self._waiting.clear()
        self._on_lost()

    async def admit(self, who: str, tokens: int) -> float:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._send({"op": "admit", "id": request_id, "who": who, "tokens": tokens})
        try:
            return await asyncio.wait_for(future, ADMIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("the launcher did not answer an admission within %.0f s; admitted",
                           ADMIT_TIMEOUT_S)
            return 0.0
        finally:
            self._waiting.pop(request_id, None)

    def settle(self, who: str, charged: int, used: int) -> None:
        self._send({"op": "settle", "who": who, "charged": charged, "used": used})

    def refund(self, who: str, tokens: int) -> None:
        self._send({"op": "refund", "who": who, "tokens": tokens})


class RemoteLimiter:
    """The per-key limits of a worker: the launcher's buckets, one for every worker."""

    def __init__(self, client: ControlClient, requests_per_minute: int | None,
                 tokens_per_minute: int | None) -> None:
        self._client = client
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def too_large(self, tokens: int) -> bool:
        return self.tpm is not None and tokens > self.tpm

    async def acquire(self, key: str, tokens: int) -> float:
        return await self._client.admit(key, tokens)

    def settle(self, key: str, charged: int, used: int) -> None:
        if used != charged:
            self._client.settle(key, charged, used)

    def refund(self, key: str, tokens: int) -> None:
        self._client.refund(key, tokens)
