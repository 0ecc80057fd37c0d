"""LoRA adapters loaded while serving: one set, kept on disk, the same on every replica.

vLLM loads and unloads adapters one engine at a time (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); a deployment
has several engines that come and go. So the ingress owns the set: a change is
applied to every replica or to none (a failure unloads it again from those that took
it), a replica that joins later (a restart, a scale-up) gets the whole set before it
is given traffic, and the set is written to the state directory so a restarted
ingress — whose engines start without it — applies it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .upstream import UpstreamError

if TYPE_CHECKING:
    from .pool import Replica
    from .state import IngressState

logger = logging.getLogger("qwen_serve.adapters")

STATE_FILE = "runtime-adapters.json"
# The names a request's "model" may carry and vLLM accepts as an adapter name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENGINE_TIMEOUT_S = 120.0  # loading reads the weights from disk


class AdapterChangeError(Exception):
    """A change that was refused or failed; becomes an OpenAI-style error answer."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class RuntimeAdapters:
    """Adapter name → what vLLM loads (a folder or hub id), persisted at ``path``."""

    path: Path | None
    adapters: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one change at a time

    @classmethod
    def open(cls, path: Path | None) -> "RuntimeAdapters":
        found: dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                found = {str(k): str(v) for k, v in json.loads(path.read_text())["adapters"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # A damaged file must not stop the server; say so, serve the static set.
                logger.error("ignoring runtime adapters file %s: %r", path, exc)
        return cls(path, found)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}-")
        with os.fdopen(fd, "w") as out:
            json.dump({"adapters": dict(sorted(self.adapters.items()))}, out, indent=2)
            out.write("\n")
        os.replace(tmp, self.path)  # a crash leaves the old file or the new one


async def _engine(state: IngressState, replica: Replica, path: str, body: dict) -> str | None:
    """None when the engine did it, else why not (its message, or the transport's)."""
    try:
        status, _, content = await state.upstream.fetch(
            "POST", f"{replica.url}{path}", body=json.dumps(body).encode(),
            headers={"content-type": "application/json"}, timeout_s=ENGINE_TIMEOUT_S)
    except UpstreamError as exc:
        return f"{type(exc).__name__}: {exc}"
    if status == 200:
        return None
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {content[:200].decode(errors='replace')}"


async def _load(state: IngressState, replica: Replica, name: str, source: str) -> str | None:
    return await _engine(state, replica, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": source})


async def _unload(state: IngressState, replica: Replica, name: str) -> str | None:
    return await _engine(state, replica, "/v1/unload_lora_adapter", {"lora_name": name})


async def add(state: IngressState, name: str, source: str) -> int:
    """Load ``name`` on every replica, or on none; returns the replica count."""
    runtime = state.runtime_adapters
    async with runtime.lock:
        if name in runtime.adapters:
            raise AdapterChangeError(409, f"The adapter {name!r} is already loaded; delete it first.",
                                     code="adapter_exists", param="name")
        replicas = state.pool.replicas
        if not replicas:
            raise AdapterChangeError(503, "No engine replica is running; retry shortly.", code="no_replica")
        # In the set first: a replica joining meanwhile is synced with it too.
        runtime.adapters[name] = source
        results = await asyncio.gather(*(_load(state, r, name, source) for r in replicas))
        failed = [(r, why) for r, why in zip(replicas, results) if why is not None]
        if failed:
            del runtime.adapters[name]
            await asyncio.gather(*(_unload(state, r, name) for r in state.pool.replicas))
            replica, why = failed[0]
            raise AdapterChangeError(400, f"Replica {replica.replica_id} could not load {name!r}: {why}",
                                     code="adapter_load_failed", param="source")
        runtime.save()
        logger.info("adapter %s loaded from %s on %d replica(s)", name, source, len(replicas))
        return len(replicas)


async def remove(state: IngressState, name: str) -> None:
    runtime = state.runtime_adapters
    async with runtime.lock:
        if name not in runtime.adapters:
            raise AdapterChangeError(404, f"No runtime adapter {name!r}.", code="adapter_not_found",
                                     param="name")
        del runtime.adapters[name]
        runtime.save()
        results = await asyncio.gather(*(_unload(state, r, name) for r in state.pool.replicas))
        for replica, why in zip(state.pool.replicas, results):
            if why is not None:  # it goes with that engine's next restart at the latest
                logger.warning("replica %s could not unload %s: %s", replica.replica_id, name, why)


async def sync(state: IngressState, replica: Replica) -> bool:
    """Give a replica that just joined every runtime adapter; True when it has them all."""
    ok = True
    for name, source in list(state.runtime_adapters.adapters.items()):
        why = await _load(state, replica, name, source)
        if why is not None and "already been loaded" not in why:
            logger.warning("replica %s could not load adapter %s: %s", replica.replica_id, name, why)
            ok = False
    return ok
