"""Where the ingress learns which engine replicas exist and at which address.

Why not Serve handles: the ingress streams HTTP straight to each replica's vLLM
server (no per-token hop through Ray's object store), so it needs addresses, not
handles. Replicas heartbeat into this small named actor; an entry that stops
beating (its replica died) ages out.
"""

from __future__ import annotations

import os
import time

import ray

NAMESPACE = "qwen-serve"
REGISTRY_NAME = "engine-registry"


@ray.remote(num_cpus=0)
class EngineRegistry:
    """Detached: it outlives the ingress that made it, so a restarted ingress finds the
    engines still running (and the replicas, which hold its handle, keep beating into it).
    It also keeps what that ingress must share with the running engines: the fingerprint
    of the config they were deployed with, and their key unless the deployment provides it."""

    def __init__(self) -> None:
        self._entries: dict[str, dict] = {}
        self._engine_key: str | None = None
        self._fingerprint: str | None = None

    def engine_key(self, proposed: str) -> str:
        """The engines' key: the first one proposed, for every later ingress. Used only
        when the deployment does not provide one ($QWEN_SERVE_ENGINE_KEY, e.g. from a
        Secret): kept here, any holder of the cluster's token could read it."""
        if self._engine_key is None:
            self._engine_key = proposed
        return self._engine_key

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def set_fingerprint(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint

    def register(self, replica_id: str, url: str, pid: int, proof: str = "") -> None:
        # Anyone on the cluster can write here; the ingress routes only to entries whose
        # proof the engine key signed (guard.sign_entry).
        self._entries[replica_id] = {"replica_id": replica_id, "url": url, "pid": pid,
                                     "proof": proof, "seen": time.monotonic()}

    def deregister(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def pid(self) -> int:
        """Its own process (tests check which node it runs on)."""
        return os.getpid()

    def snapshot(self, max_age_s: float) -> list[dict]:
        now = time.monotonic()
        self._entries = {k: v for k, v in self._entries.items() if now - v["seen"] <= max_age_s}
        return [dict(v, age_s=now - v["seen"]) for v in self._entries.values()]


# Ray's head node carries this resource: the registry must not live on a worker node that
# the autoscaler may remove (its entries, the engines' key and fingerprint would go too).
HEAD_NODE = {"node:__internal_head__": 0.001}


def create_registry() -> "ray.actor.ActorHandle":
    return EngineRegistry.options(name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True, resources=HEAD_NODE).remote()


def get_registry() -> "ray.actor.ActorHandle":
    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
