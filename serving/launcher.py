"""`qwen-serve serve`: plan → Ray (loopback) → engine replicas → ingress → drain.

Config flows one way: DeploymentConfig → Plan (refuses impossible layouts) →
EngineLaunch (vLLM flags) → Serve application (replicas) → ingress app (HTTP).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn

from . import ports
from .config import DeploymentConfig
from .embedded_model import cache_root
from .engine_args import EngineLaunch, build_engine_launch
from .ingress.http_protocol import header_bounded
from .modelinfo import ModelFacts
from .plan import Plan

logger = logging.getLogger("qwen_serve")


class ServeError(Exception):
    """The stack could not start; the message says why."""


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def _ray_environment(cfg: DeploymentConfig) -> None:
    """Must run before Ray is first imported: Ray reads these at import and start."""
    # Keep Ray and vLLM's side channels on loopback unless replicas span nodes.
    if _loopback(cfg.server.replica_host):
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _start_ray(cfg: DeploymentConfig, plan: Plan, address: str | None) -> None:
    import ray

    from .engine.registry import NAMESPACE

    kwargs: dict = {"namespace": NAMESPACE, "include_dashboard": False,
                    "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    need = plan.replicas * cfg.topology.cpus_per_replica
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
             _node_ip_address="127.0.0.1" if _loopback(cfg.server.replica_host) else None,
             **kwargs)
    if plan.device == "cuda":
        have = int(ray.cluster_resources().get("GPU", 0))
        want = plan.replicas * plan.tensor_parallel_size
        if have < want:
            ray.shutdown()
            raise ServeError(f"the plan needs {want} GPUs ({plan.replicas} × TP"
                             f"{plan.tensor_parallel_size}); Ray sees {have} on this machine")


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains instead of closing at once.

    Draining: /ready turns 503 and new requests get 503 immediately, in-flight
    requests finish (up to the drain timeout), then the server exits with code 0.
    A second Ctrl-C forces the exit.
    """

    def __init__(self, config: uvicorn.Config, on_drain) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:  # runs in the signal handler
        if self._drain_started:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_started = True
        self._on_drain()


def run(cfg: DeploymentConfig, plan: Plan, facts: ModelFacts, *, address: str | None = None) -> int:
    _ray_environment(cfg)
    import ray
    from ray import serve

    from .engine import guard
    from .engine.builder import APP_NAME, build_engine_app, engine_fingerprint
    from .engine.registry import create_registry
    from .ingress.app import IngressSettings, build_app
    from .ingress.auth import ApiKeyError, KeysFile
    from .ingress.pool import ReplicaPool

    launch = build_engine_launch(cfg, facts, plan.device)
    try:  # a bad keys file must fail before anything starts
        keys = KeysFile(cfg.server.api_keys_file) if cfg.server.api_keys_file else None
        admin_keys = KeysFile(cfg.server.admin_keys_file) if cfg.server.admin_keys_file else None
    except ApiKeyError as exc:
        raise ServeError(str(exc)) from None
    # Bound before Ray starts, as vLLM's own server does: a taken port fails in a
    # second instead of after Ray's start, and Ray's workers can't take ours.
    try:
        sock = ports.bind_reusable(cfg.server.host, cfg.server.port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {cfg.server.host}:{cfg.server.port}: "
                         f"{exc.strerror or exc}") from None
    _start_reaper()
    head: list | None = None
    try:
        _start_ray(cfg, plan, address)
        head = None if address else _head_processes()
        serve.start(proxy_location="Disabled")
        registry = create_registry()
        launch, engine_key = _guarded(launch, registry)
        fingerprint = engine_fingerprint(cfg, launch, plan.device)
        # On a cluster of its own (--address), the engines outlive this process: a
        # restarted ingress attaches to engines deployed with the same config.
        attach = address is not None and _engines_running(registry, fingerprint)
        pool = ReplicaPool(registry, accept=lambda entry: guard.entry_signed(engine_key, entry))
        auto = cfg.router.autoscaling
        settings = IngressSettings(
            model=cfg.served_model_name,
            expected_replicas=max(1, auto.min_replicas) if auto else plan.replicas,
            policy=cfg.router.policy,
            request_timeout_s=cfg.server.request_timeout_s,
            body_timeout_s=cfg.server.body_timeout_s,
            ready_timeout_s=cfg.server.ready_timeout_s,
            min_ready_replicas=cfg.server.min_ready_replicas,
            web_ui=cfg.server.web_ui,
            limits=cfg.server.limits,
            api_keys=keys,
            metrics_require_key=cfg.server.metrics_need_key,
            model_revision=cfg.model_revision,
            tokens_per_event=cfg.engine.stream_interval,
            adapters=tuple(sorted(cfg.model.adapters)),
            admin_keys=admin_keys,
            runtime_lora=cfg.engine.runtime_lora,
            max_lora_rank=cfg.engine.max_lora_rank,
            adapter_affinity=cfg.router.adapter_affinity,
            lora_slots=cfg.engine.max_loras,
            state_dir=Path(cfg.server.state_dir) if cfg.server.state_dir else cache_root() / "state",
            engine_key=engine_key,
        )
        app = build_app(settings, pool, cfg.router.response_cache)
        state = app.state.ingress
        engine_app = None if attach else build_engine_app(cfg, launch, plan.device)
        if engine_app is not None:
            ray.get(registry.set_fingerprint.remote(fingerprint))
        return asyncio.run(_serve(cfg, plan, app, state, pool, engine_app, APP_NAME, sock))
    finally:
        sock.close()
        _shutdown_ray(head, keep_engines=address is not None)


async def _serve(cfg, plan, app, state, pool, engine_app, app_name, sock) -> int:
    from ray import serve

    loop = asyncio.get_running_loop()
    srv = cfg.server
    config = uvicorn.Config(app, host=srv.host, port=srv.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=30, backlog=4096,
                            http=header_bounded(srv.header_timeout_s))
    server: _DrainingServer

    def drain() -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(_drain(state, server, srv.drain_timeout_s)))

    server = _DrainingServer(config, drain)
    from .ingress.auth import KeysFile

    watched = [k for k in (state.settings.api_keys, state.settings.admin_keys) if isinstance(k, KeysFile)]
    if watched:
        # The usual "re-read your config" signal; the files are also polled (app.py).
        loop.add_signal_handler(signal.SIGHUP, lambda: [k.reload() for k in watched])
    deploy_error: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(engine_app, name=app_name, route_prefix=None, blocking=False)
        except BaseException as exc:  # noqa: BLE001 - reported to the main loop
            deploy_error.append(exc)

    # Ray and the engine stack leave a large heap of long-lived objects; a full
    # collection over it paused the event loop for 100+ ms under load. Freeze them.
    gc.collect()
    gc.freeze()
    serving = loop.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            raise ServeError(f"could not listen on {srv.host}:{srv.port}")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://{srv.host}:{port}"
    doing = (f"starting {plan.replicas} engine replica(s)" if engine_app is not None
             else "attaching to the engines already running on the cluster")
    print(f"qwen-serve: listening on {base} ({doing}; "
          f"/health is up, /ready turns 200 when they answer)", flush=True)
    if engine_app is not None:
        threading.Thread(target=deploy, name="serve-deploy", daemon=True).start()
    announced = False
    while not serving.done():
        if deploy_error and not state.draining:
            print(f"qwen-serve: engine deployment failed: {deploy_error[0]}", file=sys.stderr, flush=True)
            server.should_exit = True
            await serving
            return 1
        if not announced and len(pool.available()) >= state.settings.expected_replicas:
            announced = True
            print(f"qwen-serve: ready — model {state.settings.model!r} at {base}/v1 "
                  f"(web chat: {base}/ , metrics: {base}/metrics)", flush=True)
        await asyncio.sleep(0.2)
    await serving
    return 0


async def _drain(state, server: uvicorn.Server, timeout_s: float) -> None:
    state.draining = True
    state.ready_cache = None
    print(f"qwen-serve: draining (up to {timeout_s:.0f}s for in-flight requests)", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(r.in_flight for r in state.pool.replicas) == 0:
            break
        await asyncio.sleep(0.1)
    server.should_exit = True


def _guarded(launch: EngineLaunch, registry) -> tuple[EngineLaunch, str]:
    """The launch with the engines' credential (engine/guard.py), and the credential:
    $QWEN_SERVE_ENGINE_KEY when the deployment provides it (never stored on the cluster),
    else the one the cluster's engines already have, else a new one."""
    import dataclasses
    import secrets

    import ray

    from .engine import guard

    key = os.environ.get(guard.ENV) or ray.get(registry.engine_key.remote(secrets.token_urlsafe(32)))
    return dataclasses.replace(launch, argv=[*launch.argv, "--middleware", guard.MIDDLEWARE],
                               env={**launch.env, guard.ENV: key}), key


def _engines_running(registry, fingerprint: str) -> bool:
    """Whether the cluster runs this stack's engines, deployed with the same config."""
    import ray
    from ray import serve

    from .engine.builder import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or app.status not in ("RUNNING", "DEPLOYING", "UNHEALTHY"):
        return False
    return ray.get(registry.fingerprint.remote()) == fingerprint


def _start_reaper() -> None:
    """The watcher that stops this process's descendants if it dies unannounced (reaper.py)."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "serving.reaper", str(os.getpid())],
                     stdin=subprocess.DEVNULL)


def down(address: str) -> int:
    """`qwen-serve down`: stop this stack's engines on a cluster and forget them (the
    registry with their key); what `serve --address` leaves running for the next ingress."""
    import ray
    from ray import serve

    from .engine.builder import APP_NAME
    from .engine.registry import NAMESPACE, REGISTRY_NAME

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    try:
        running = APP_NAME in serve.status().applications
        if running:
            serve.delete(APP_NAME)  # returns once its replicas, and so their engines, stopped
        try:
            ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE))
        except ValueError:  # no registry: nothing was deployed
            pass
    finally:
        ray.shutdown()
    print("qwen-serve: engines stopped" if running else "qwen-serve: no engines were running")
    return 0


def _head_processes() -> list:
    """The processes of the Ray head this process just started (its children but the reaper)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "serving.reaper" not in " ".join(_cmdline(p))]


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _all_running(procs: list) -> bool:
    """Whether none of ``procs`` has exited. A stop signalled to the whole process group
    (systemd, supervisord, CI runners) reaches Ray's head processes too, and some die at
    once: Serve's controller can then no longer answer, and serve.shutdown() waited its
    full 30 s for it (measured: 40 s from SIGTERM to exit)."""
    import psutil

    try:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    except psutil.Error:
        return False


def _shutdown_ray(head: list | None, keep_engines: bool) -> None:
    """Stop Serve (its replicas stop their engines), then leave or stop Ray. ``head``: the
    processes of the Ray head this process started, None when it joined a cluster, where
    the engines are kept (``keep_engines``) for the next ingress: `qwen-serve down` ends them."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if keep_engines:
        print("qwen-serve: the engines keep running on the cluster for the next ingress "
              "(`qwen-serve down --address ADDRESS` stops them)", flush=True)
        ray.shutdown()
        return
    # With the head going down there is nobody to ask: the engines stop on their own when
    # their replica's worker dies (engine/supervise.py), ray.shutdown() and the reaper
    # stop the rest.
    if head is None or _all_running(head):
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            logger.exception("serve shutdown failed")
    ray.shutdown()
