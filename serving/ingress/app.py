"""The ingress ASGI app: OpenAI routes proxied to engine replicas, plus ops routes.

Why a plain Starlette app in the serving process rather than a Serve ingress
deployment: Serve's HTTP proxy and handle streaming add a Ray hop per response
chunk; here each chunk is one socket read and one socket write. Ray Serve still
owns the replicas (placement, health, restarts, scaling) — see engine/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import ResponseCacheConfig
from ..engine import guard as engine_guard
from .adapter_routing import AdapterPlacement
from .adapters import STATE_FILE, RuntimeAdapters
from .adapters import sync as sync_adapters
from .admin import admin_routes
from .admission import Admission, Rejected
from .auth import KeysFile
from .cache import RedisResponseCache, ResponseCache
from .errors import error_response
from .limits import Limiter
from .metrics import EngineMetrics, RouterMetrics
from .pipeline import PASS_HEADERS, finish, handle
from .pool import Replica, ReplicaPool
from .routing import make_policy
from .state import IngressSettings, IngressState
from .upstream import Upstream, UpstreamError

__all__ = ["IngressSettings", "IngressState", "build_app"]

logger = logging.getLogger("qwen_serve.ingress")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
OPENAPI_FILE = Path(__file__).resolve().parent / "openapi.json"
# How often the keys file is checked for changes (a revoked key stops working within it).
KEYS_POLL_S = 1.0
async def _forward_get(state: IngressState, path: str, route: str) -> Response:
    started = time.perf_counter()
    replicas = state.pool.available()
    if not replicas:
        return finish(state, route, "other", started, error_response(
            503, "No engine replica is available; retry shortly.", code="no_replica",
            headers={"Retry-After": "1"}))
    replica = replicas[0]
    try:
        status, headers, content = await state.upstream.fetch("GET", f"{replica.url}{path}",
                                                              timeout_s=10.0)
    except UpstreamError:
        replica.mark_down()
        return finish(state, route, "other", started,
                       error_response(502, "The engine did not answer.", code="upstream_broken"))
    out_headers = {k: v for k in PASS_HEADERS if (v := headers.get(k))}
    if path == "/v1/models" and status == 200:
        content = _without_paths(content)
    return finish(state, route, "other", started,
                   Response(content, status_code=status, headers=out_headers))


def _without_paths(models: bytes) -> bytes:
    """vLLM's model list with each ``root`` (the folder it loaded) replaced by the model's id.

    The folders are the server's file system (a home directory, a volume's mount
    point); a client needs the names it can ask for, which ``id`` and ``parent`` are.
    """
    try:
        doc = json.loads(models)
        for model in doc["data"]:
            if "root" in model:
                model["root"] = model.get("id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return models  # not the shape vLLM sends: pass it on untouched
    return json.dumps(doc).encode()


# A replica with requests in flight that finished one (or sent a streamed byte) this
# recently is busy, not stuck. Longer than the probe's timeout: on a loaded CPU, plain
# answers take tens of seconds each, and none of their bytes arrive before the end.
BUSY_WINDOW_S = 60.0


async def _probe(state: IngressState, replica: Replica) -> tuple[bool, str]:
    """A replica is ready when it generates one token within the timeout.

    A replica answering requests right now gets vLLM's ``/health`` instead (the
    process and its engine core are alive): under load the probe's token would wait
    in the engine's queue behind that work and time out, calling a busy engine
    unready exactly when it is proving otherwise (seen: a surviving replica, loaded
    with a killed one's share, called unready three times in a row on a busy machine).
    A killed engine still fails at once: its port refuses the connection.
    """
    timeout_s = state.settings.ready_timeout_s
    if replica.joining:
        return False, "loading adapters"
    if replica.answering_within(max(timeout_s, BUSY_WINDOW_S)):
        request, ok_detail = ("GET", f"{replica.url}/health", None), "serving"
    else:
        probe = json.dumps({"model": state.settings.model, "prompt": "ping", "max_tokens": 1})
        request, ok_detail = ("POST", f"{replica.url}/v1/completions", probe.encode()), "ok"
    method, url, body = request
    try:
        status, _, _ = await state.upstream.fetch(
            method, url, body=body, headers={"content-type": "application/json"}, timeout_s=timeout_s)
    except UpstreamError as exc:
        return False, type(exc).__name__
    if status != 200:
        return False, f"HTTP {status}"
    return True, ok_detail


async def _readiness(state: IngressState) -> tuple[int, dict]:
    async with state.ready_lock:  # concurrent probes share one round of checks
        cached = state.ready_cache
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1], cached[2]
        replicas = state.pool.replicas
        results = await asyncio.gather(*(_probe(state, r) for r in replicas))
        ready = 0
        detail = []
        for r, (ok, why) in zip(replicas, results):
            ready += ok
            state.metrics.replica_up.labels(r.replica_id).set(1 if ok else 0)
            # No pids: /ready needs no key, and process ids are the host's business.
            detail.append({"replica": r.replica_id, "ready": ok, "detail": why,
                           "in_flight": r.in_flight})
        expected = state.settings.expected_replicas
        enough = min(state.settings.min_ready_replicas, max(expected, 1))
        state.metrics.replicas.labels("ready").set(ready)
        state.metrics.replicas.labels("unready").set(max(len(replicas), expected) - ready)
        if state.draining:
            status_text, code = "draining", 503
        elif ready >= expected and ready == len(replicas):
            status_text, code = "ready", 200
        elif ready > 0:
            # Degraded but serving: stays in its Service while `enough` replicas answer.
            status_text, code = "degraded", 200 if ready >= enough else 503
        else:
            status_text, code = "unavailable", 503
        body = {"status": status_text, "ready_replicas": ready, "expected_replicas": expected,
                "min_ready_replicas": enough, "replicas": detail}
        state.ready_cache = (time.monotonic(), code, body)
        return code, body


def build_app(settings: IngressSettings, pool: ReplicaPool,
              cache_config: ResponseCacheConfig | None = None, *,
              limiter: Limiter | None = None) -> Starlette:
    """The ingress app. ``limiter``: where per-key limits are kept (default: here; an
    ingress worker's are its launcher's)."""
    metrics = RouterMetrics()
    state = IngressState(settings=settings, pool=pool, policy=make_policy(settings.policy),
                         metrics=metrics, admission=Admission(settings.limits, settings.api_keys,
                                                             settings.model, settings.body_timeout_s,
                                                             limiter),
                         cache=_make_cache(cache_config, metrics),
                         upstream=Upstream(headers=engine_guard.headers(settings.engine_key)),
                         runtime_adapters=RuntimeAdapters.open(
                             settings.state_dir / STATE_FILE if settings.state_dir else None),
                         placement=AdapterPlacement(settings.lora_slots)
                         if settings.adapter_affinity else None)
    if settings.runtime_lora:
        pool.on_join = lambda replica: sync_adapters(state, replica)

    def authorized(request: Request, route: str) -> Response | None:
        try:
            state.admission.authenticate(request)
        except Rejected as rej:
            state.metrics.refused(rej.reason)
            return finish(state, route, "other", time.perf_counter(), rej.response)
        return None

    def guard(route: str):
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                if state.draining:
                    state.metrics.refused("draining")
                    return finish(state, route, "other", time.perf_counter(), error_response(
                        503, "The server is shutting down; retry on another instance.",
                        code="draining", headers={"Retry-After": "1", "Connection": "close"}))
                return await handler(request)
            return endpoint
        return wrap

    def proxied(path: str, route: str):
        @guard(route)
        async def endpoint(request: Request) -> Response:
            return await handle(request, state, path, route)
        return endpoint

    @guard("models")
    async def models(request: Request) -> Response:
        return authorized(request, "models") or await _forward_get(state, "/v1/models", "models")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "draining" if state.draining else "ok"})

    async def ready(request: Request) -> Response:
        code, body = await _readiness(state)
        return JSONResponse(body, status_code=code)

    async def metrics(request: Request) -> Response:
        if settings.metrics_require_key and (denied := authorized(request, "metrics")):
            return denied
        engine = await engine_metrics.text(state.pool.replicas)
        return Response(state.metrics.render() + engine,
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(request: Request) -> Response:
        # A static description of the ingress's routes (for clients and fuzzers).
        return FileResponse(OPENAPI_FILE, media_type="application/json")

    async def index(request: Request) -> Response:
        page = WEB_DIR / "index.html"
        if not settings.web_ui or not page.is_file():
            return error_response(404, "The web UI is not enabled.", code="not_found")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    engine_metrics = EngineMetrics(state.upstream)
    keys_watch: list[asyncio.Task] = []

    async def watch_keys(keys: KeysFile) -> None:
        while True:
            await asyncio.sleep(KEYS_POLL_S)
            keys.reload_if_changed()

    async def startup() -> None:
        await state.upstream.start()
        pool.start()
        for keys in (settings.api_keys, settings.admin_keys):
            if isinstance(keys, KeysFile):
                keys_watch.append(asyncio.get_running_loop().create_task(watch_keys(keys)))

    async def shutdown() -> None:
        for task in keys_watch:
            task.cancel()
        await pool.stop()
        if state.cache is not None:
            await state.cache.aclose()
        if (close := getattr(state.admission.limiter, "aclose", None)) is not None:
            await close()  # a Redis connection
        await state.upstream.aclose()

    hot = {("POST", "/v1/chat/completions"): proxied("/v1/chat/completions", "chat"),
           ("POST", "/v1/completions"): proxied("/v1/completions", "completions")}
    routes = [
        *(Route(path, endpoint, methods=[method]) for (method, path), endpoint in hot.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", proxied("/tokenize", "tokenize"), methods=["POST"]),
        Route("/detokenize", proxied("/detokenize", "detokenize"), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    routes += admin_routes(state)
    if WEB_DIR.is_dir():
        routes.append(Mount("/static", app=StaticFiles(directory=WEB_DIR), name="static"))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await startup()
        try:
            yield
        finally:
            await shutdown()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.ingress = state
    return IngressApp(app, hot)


class IngressApp:
    """The ingress's ASGI app: the two generation routes go straight to their endpoint,
    everything else (and the lifespan) through Starlette.

    Why: they are nearly all the traffic, and Starlette's middleware stack and router
    (error middleware, exception middleware, a regex match per route, the request
    wrapper) cost ~10 % of a plain request's CPU in a profile, ~30 µs on this machine's
    core. An exception escaping an endpoint still becomes a 500 (uvicorn's), as it did.
    """

    def __init__(self, app: Starlette, hot: dict[tuple[str, str], object]) -> None:
        self.starlette = app
        self.state = app.state
        self._hot = hot

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            endpoint = self._hot.get((scope["method"], scope["path"]))
            if endpoint is not None:
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def _make_cache(cfg: ResponseCacheConfig | None, metrics: RouterMetrics):
    if cfg is None or not cfg.enabled:
        return None
    if cfg.backend == "redis":
        cache = RedisResponseCache(cfg.redis_url, cfg.ttl_s, max_entry_bytes=cfg.max_entry_bytes,
                                   metrics_counter=metrics.cache)
    else:
        cache = ResponseCache(cfg.max_bytes, cfg.ttl_s, metrics.cache)
    cache.hit_header = cfg.hit_header
    return cache


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"No route {request.url.path}.", code="not_found")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path}.",
                          type_="invalid_request_error", code="method_not_allowed")
