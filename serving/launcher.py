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

from . import ports
from .config import DeploymentConfig
from .engine_args import EngineLaunch, build_engine_launch
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


def run(cfg: DeploymentConfig, plan: Plan, facts: ModelFacts, *, address: str | None = None) -> int:
    _ray_environment(cfg)
    import ray
    from ray import serve

    from .engine import guard
    from .engine.builder import APP_NAME, build_engine_app, engine_fingerprint
    from .engine.registry import create_registry
    from .ingress.builder import expected_replicas, ingress_settings
    from .ingress.pool import ReplicaPool

    launch = build_engine_launch(cfg, facts, plan.device)
    keys, admin_keys = _keys(cfg)  # a bad keys file must fail before anything starts
    # Bound before Ray starts, as vLLM's own server does: a taken port fails in a
    # second instead of after Ray's start, and Ray's workers can't take ours.
    sock = _bind(cfg)
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
        settings = ingress_settings(cfg, expected=expected_replicas(cfg, plan.replicas),
                                    engine_key=engine_key, api_keys=keys, admin_keys=admin_keys)
        engine_app = None if attach else build_engine_app(cfg, launch, plan.device)
        if engine_app is not None:
            ray.get(registry.set_fingerprint.remote(fingerprint))
        deployment = _Deployment(engine_app, APP_NAME, f"starting {plan.replicas} engine replica(s)"
                                 if engine_app else "attaching to the engines already running")
        return _run_ingress(cfg, plan.ingress_workers, settings, pool, deployment, sock)
    finally:
        sock.close()
        _shutdown_ray(head, keep_engines=address is not None)


def run_static(cfg: DeploymentConfig, workers: int, engines: list[str]) -> int:
    """`qwen-serve ingress`: the ingress alone, in front of OpenAI servers that already run
    (vLLM servers started by hand, another deployment's engines, the relay benchmark's
    synthetic engine). No Ray: the engines are the ones named, and the ingress neither
    starts nor stops them. Guarded engines take the key in $QWEN_SERVE_ENGINE_KEY."""
    from .engine import guard
    from .ingress.builder import ingress_settings
    from .ingress.pool import FixedRegistry, ReplicaPool

    keys, admin_keys = _keys(cfg)
    sock = _bind(cfg)
    try:
        entries = [{"replica_id": f"engine-{i}", "url": url.rstrip("/"), "pid": 0}
                   for i, url in enumerate(engines)]
        settings = ingress_settings(cfg, expected=len(entries), engine_key=os.environ.get(guard.ENV) or None,
                                    api_keys=keys, admin_keys=admin_keys)
        deployment = _Deployment(None, "", f"in front of {len(entries)} engine(s)")
        return _run_ingress(cfg, workers, settings, ReplicaPool(FixedRegistry(entries)), deployment, sock)
    finally:
        sock.close()


def _keys(cfg: DeploymentConfig):
    from .ingress.auth import ApiKeyError
    from .ingress.builder import load_keys

    try:
        return load_keys(cfg)
    except ApiKeyError as exc:
        raise ServeError(str(exc)) from None


def _bind(cfg: DeploymentConfig):
    try:
        return ports.bind_reusable(cfg.server.host, cfg.server.port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {cfg.server.host}:{cfg.server.port}: "
                         f"{exc.strerror or exc}") from None


def _run_ingress(cfg, workers: int, settings, pool, deployment, sock) -> int:
    from .ingress.server import run_loop

    if workers == 1:
        return run_loop(_serve(cfg, settings, pool, deployment, sock))
    return run_loop(_serve_workers(cfg, workers, settings, pool, deployment, sock))


class _Deployment:
    """The engines' deployment, run in a thread (``serve.run`` blocks on Ray for seconds)
    while the ingress already listens; ``error`` says why it failed. No app: the stack
    attaches to engines already running on its cluster."""

    def __init__(self, engine_app, app_name: str, doing: str) -> None:
        self.engine_app, self.app_name = engine_app, app_name
        self.doing = doing  # for the "listening" line
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.engine_app is not None:
            threading.Thread(target=self._run, name="serve-deploy", daemon=True).start()

    def _run(self) -> None:
        from ray import serve

        try:
            serve.run(self.engine_app, name=self.app_name, route_prefix=None, blocking=False)
        except BaseException as exc:  # noqa: BLE001 - reported to the main loop
            self.error = exc



def _freeze_heap() -> None:
    """Ray and the engine stack leave a large heap of long-lived objects; a full
    collection over it paused the event loop for 100+ ms under load. Freeze them."""
    gc.collect()
    gc.freeze()


def _listening(srv, sock, deployment: _Deployment, workers: int) -> str:
    base = f"http://{srv.host}:{sock.getsockname()[1]}"
    by = f", {workers} ingress workers" if workers > 1 else ""
    print(f"qwen-serve: listening on {base} ({deployment.doing}{by}; "
          f"/health is up, /ready turns 200 when they answer)", flush=True)
    return base


def _ready(settings, base: str) -> None:
    print(f"qwen-serve: ready — model {settings.model!r} at {base}/v1 "
          f"(web chat: {base}/ , metrics: {base}/metrics)", flush=True)


def _deploy_failed(deployment: _Deployment) -> None:
    print(f"qwen-serve: engine deployment failed: {deployment.error}", file=sys.stderr, flush=True)


async def _serve(cfg, settings, pool, deployment: _Deployment, sock) -> int:
    """One ingress, in this process."""
    from .ingress.app import build_app
    from .ingress.auth import KeysFile
    from .ingress.builder import make_limiter
    from .ingress.server import DrainingServer, uvicorn_config

    app = build_app(settings, pool, cfg.router.response_cache, limiter=make_limiter(cfg.server.limits))
    state = app.state.ingress
    loop = asyncio.get_running_loop()
    srv = cfg.server
    server = DrainingServer(uvicorn_config(app, srv), state, srv.drain_timeout_s)
    watched = [k for k in (settings.api_keys, settings.admin_keys) if isinstance(k, KeysFile)]
    if watched:
        # The usual "re-read your config" signal; the files are also polled (app.py).
        loop.add_signal_handler(signal.SIGHUP, lambda: [k.reload() for k in watched])
    _freeze_heap()
    serving = loop.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            raise ServeError(f"could not listen on {srv.host}:{srv.port}")
        await asyncio.sleep(0.05)
    base = _listening(srv, sock, deployment, 1)
    deployment.start()
    announced = False
    while not serving.done():
        if deployment.error and not state.draining:
            _deploy_failed(deployment)
            server.should_exit = True
            await serving
            return 1
        if not announced and len(pool.available()) >= settings.expected_replicas:
            announced = True
            _ready(settings, base)
        await asyncio.sleep(0.2)
    await serving
    return 0


async def _serve_workers(cfg, count: int, settings, pool, deployment: _Deployment, sock) -> int:
    """``server.workers`` ingress processes on the one socket; this process keeps what
    they share (ingress/control.py) and starts, replaces and drains them (workers.py)."""
    from .ingress.board import SlotAllocator
    from .ingress.control import ControlServer
    from .ingress.limits import KeyLimiter
    from .workers import IngressWorkers, WorkerError

    loop = asyncio.get_running_loop()
    srv = cfg.server
    workers = IngressWorkers(cfg, count, sock, expected_replicas=settings.expected_replicas,
                             engine_key=settings.engine_key)
    control = ControlServer(workers.control_path, KeyLimiter(srv.limits.requests_per_minute,
                                                             srv.limits.tokens_per_minute))
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        if len(signals) == 1:
            print(f"qwen-serve: draining {count} ingress workers (up to {srv.drain_timeout_s:.0f}s "
                  "for in-flight requests)", flush=True)
            workers.stopping = True
            control.drain()
        else:  # a second Ctrl-C forces the workers' exit, a second SIGTERM hurries it
            workers.signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    handled = [signal.SIGTERM, signal.SIGINT]
    if settings.api_keys is not None or settings.admin_keys is not None:
        # "Re-read your config", as a lone ingress takes it: each worker re-reads the keys.
        loop.add_signal_handler(signal.SIGHUP, workers.signal, signal.SIGHUP)
        handled.append(signal.SIGHUP)
    slots = SlotAllocator()
    rc = 0
    try:
        await control.start()
        pool.start()
        workers.start()
        _freeze_heap()
        deployment.start()
        base: str | None = None
        announced = False
        drain_until: float | None = None
        while True:
            replicas = pool.replicas
            placed = slots.assign([r.replica_id for r in replicas])
            control.publish([{"replica_id": r.replica_id, "url": r.url, "pid": r.pid,
                              "slot": placed[r.replica_id]} for r in replicas if not r.joining])
            workers.replace_dead()
            if signals:
                drain_until = drain_until or time.monotonic() + srv.drain_timeout_s + 10.0
                if workers.running() == 0 or time.monotonic() > drain_until:
                    break
            elif deployment.error:
                _deploy_failed(deployment)
                rc = 1
                break
            if base is None and len(control.listening) == count:
                base = _listening(srv, sock, deployment, count)
            if base and not announced and len(pool.available()) >= settings.expected_replicas:
                announced = True
                _ready(settings, base)
            await asyncio.sleep(0.1)
    except WorkerError as exc:
        print(f"qwen-serve: {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(workers.stop, 5.0)
        await control.close()
        await pool.stop()
        workers.close()
    return rc


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
