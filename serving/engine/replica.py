"""The Ray Serve replica: one vLLM OpenAI server process, supervised.

Ray Serve owns placement (GPUs per replica), restarts and scaling; vLLM's own
server owns the OpenAI protocol, validation, tokenization and metrics. This class
is the glue: start the engine on a free loopback port, tell the registry where it
is, and fail Serve's health check the moment the engine dies so Serve replaces it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import httpx
import ray.util
from ray import serve

from .. import ports
from ..engine_args import EngineLaunch
from . import autoscaling, guard, process
from .registry import get_registry

logger = logging.getLogger("ray.serve")
HEARTBEAT_S = 1.0


class EngineReplica:
    def __init__(self, launch: EngineLaunch, host: str, startup_timeout_s: float) -> None:
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        rank = getattr(ctx.rank, "rank", ctx.rank) or 0
        # Held until the engine answers: the engine binds it seconds after it starts,
        # while Ray hands out ephemeral ports to its own workers (see ports.py).
        with ports.reserved_port(host) as self.port:
            # Bound to all interfaces (replicas on several nodes): advertise this node's IP.
            advertise = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
            self.url = f"http://{advertise}:{self.port}"
            self._key = launch.env.get(guard.ENV)
            self._headers = guard.headers(self._key)
            self._probe: httpx.AsyncClient | None = None
            env = {**os.environ, **launch.env_for_replica(rank, ctx.world_size)}
            env = {k: v for k, v in env.items() if v != ""}
            cmd = launch.command(host, self.port)
            logger.info("replica %s starting engine on %s: %s", self.replica_id, self.url, " ".join(cmd))
            # The engine's output goes to this replica's log (Ray forwards it to the driver).
            self.proc = process.spawn(cmd, env, log=sys.stderr,
                                      cpus=launch.cpus_for_replica(rank, ctx.world_size))
            self._stopping = threading.Event()
            self._wait_until_healthy(startup_timeout_s)
        self.engine_pid = process.engine_pid(self.proc)
        self._registry = get_registry()
        self._beat()
        threading.Thread(target=self._heartbeat, name="registry-heartbeat", daemon=True).start()
        logger.info("replica %s engine ready (pid %d)", self.replica_id, self.engine_pid)

    def _wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, headers=self._headers) as client:
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    raise RuntimeError(f"engine exited with code {code} during startup")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        process.stop(self.proc)
        raise TimeoutError(f"engine not healthy after {timeout_s:.0f}s")

    def _beat(self) -> None:
        proof = guard.sign_entry(self._key, self.replica_id, self.url, self.engine_pid) if self._key else ""
        self._registry.register.remote(self.replica_id, self.url, self.engine_pid, proof)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(HEARTBEAT_S):
            if self.proc.poll() is None:
                self._beat()

    def _probe_client(self) -> httpx.AsyncClient:
        """One kept-alive client for Serve's periodic calls, made on their event loop.

        Why not one per call: making an httpx client loads the CA bundle, 37 ms of CPU
        here; at one health check every 2 s that alone was ~2 % of a core per replica.
        """
        if self._probe is None:
            self._probe = httpx.AsyncClient(timeout=5.0, headers=self._headers)
        return self._probe

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising gets us replaced."""
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"engine process exited with code {code}")
        resp = await self._probe_client().get(f"{self.url}/health")
        if resp.status_code != 200:
            raise RuntimeError(f"engine /health answered {resp.status_code}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve polls this for the autoscaling policy (see autoscaling.py)."""
        text = (await self._probe_client().get(f"{self.url}/metrics")).text
        return {autoscaling.METRIC: autoscaling.engine_requests(text)}

    def __del__(self) -> None:
        # Serve calls __del__ on graceful shutdown; stop beating first so the
        # ingress stops routing here, then stop the engine's process group.
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
            try:
                self._registry.deregister.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - Ray may already be shutting down
                pass
        proc = getattr(self, "proc", None)
        if proc is not None:
            process.stop(proc)
