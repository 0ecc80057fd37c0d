"""`python -m serving.ingress.worker`: one of several ingress processes on one port.

Why several: one ingress process relays ~32k SSE events/s on one core
(benchmarks/results/relay-*), and a 4-GPU box streaming one event per token makes
more. The launcher (serving/workers.py) starts ``server.workers`` of these; each
inherits the listening socket (the kernel hands every new connection to one of
them) and serves the same app a lone ingress does. What must be one across workers
comes from the launcher over the control channel (control.py): the replicas, their
slots in the shared in-flight table (board.py), the per-key limits, the word to
drain. The rest is per worker and documented where it lives: the response cache
(in-process, or shared through Redis), the routing policies' memory, the readiness
probe's cache; the metrics are summed over workers at every scrape (metrics.py).

The launcher writes the worker's orders as one JSON object to its stdin (the engines'
key among them: never on a command line, where ``ps`` shows it).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import socket
import sys
from pathlib import Path

from ..config import DeploymentConfig
from .app import build_app
from .auth import ApiKeyError, KeysFile
from .board import InFlightBoard
from .builder import ingress_settings, load_keys, make_limiter
from .control import ControlClient
from .pool import ReplicaPool
from .server import DrainingServer, run_loop, uvicorn_config

logger = logging.getLogger("qwen_serve.worker")


def order(cfg: DeploymentConfig, *, worker: int, workers: int, fd: int, control: Path, board: Path,
          expected_replicas: int, engine_key: str | None) -> bytes:
    """What the launcher tells worker ``worker`` on its stdin."""
    return json.dumps({"config": cfg.model_dump(mode="json"), "worker": worker, "workers": workers,
                       "fd": fd, "control": str(control), "board": str(board),
                       "expected_replicas": expected_replicas, "engine_key": engine_key}).encode()


async def serve(orders: dict) -> int:
    cfg = DeploymentConfig.model_validate(orders["config"])
    worker = int(orders["worker"])
    sock = socket.socket(fileno=int(orders["fd"]))
    board = InFlightBoard(Path(orders["board"]), int(orders["workers"]), worker)
    pool = ReplicaPool(None, board=board)
    try:
        api_keys, admin_keys = load_keys(cfg)
    except ApiKeyError as exc:  # the launcher checked them; the file changed since
        print(f"qwen-serve: ingress worker {worker}: {exc}", file=sys.stderr, flush=True)
        return 1
    settings = ingress_settings(cfg, expected=int(orders["expected_replicas"]),
                                engine_key=orders["engine_key"], api_keys=api_keys,
                                admin_keys=admin_keys)
    server: DrainingServer | None = None

    def launcher_lost() -> None:
        if server is not None:
            server.should_exit = True

    client = ControlClient(Path(orders["control"]), worker, on_replicas=pool.update,
                           on_drain=lambda: server and server.drain(), on_lost=launcher_lost)
    app = build_app(settings, pool, cfg.router.response_cache,
                    limiter=make_limiter(cfg.server.limits, client))
    server = DrainingServer(uvicorn_config(app, cfg.server), app.state.ingress,
                            cfg.server.drain_timeout_s)
    await client.connect()
    loop = asyncio.get_running_loop()
    # The launcher passes SIGHUP on ("re-read the keys"); without keys it is a no-op, not
    # the default action (which would end the worker).
    watched = [k for k in (api_keys, admin_keys) if isinstance(k, KeysFile)]
    loop.add_signal_handler(signal.SIGHUP, lambda: [k.reload() for k in watched])
    gc.collect()
    gc.freeze()  # as the launcher: no full collection over the startup heap under load
    serving = loop.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        client.listening()
    try:
        await serving
    finally:
        await client.close()
        board.close()
    return 0


def main() -> int:
    orders = json.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s ingress worker "
                        f"{orders.get('worker')}: %(name)s: %(message)s")
    return run_loop(serve(orders))


if __name__ == "__main__":
    sys.exit(main())
