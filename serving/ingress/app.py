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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .errors import error_response
from .metrics import RouterMetrics, fetch_replica_metrics
from .pool import Replica, ReplicaPool
from .routing import RoutingPolicy, make_policy, routing_text

logger = logging.getLogger("qwen_serve.ingress")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Headers from the engine that describe the body we pass through unchanged.
_PASS_HEADERS = ("content-type", "retry-after", "x-request-id")


@dataclass
class IngressSettings:
    model: str
    expected_replicas: int
    policy: str = "power_of_two"
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 10.0
    web_ui: bool = True


@dataclass
class IngressState:
    settings: IngressSettings
    pool: ReplicaPool
    policy: RoutingPolicy
    metrics: RouterMetrics
    client: httpx.AsyncClient | None = None
    draining: bool = False
    ready_cache: tuple[float, int, dict] | None = None
    ready_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NoReplica(Exception):
    pass


def _choose(state: IngressState, text: str, exclude: set[str]) -> Replica:
    candidates = [r for r in state.pool.available() if r.replica_id not in exclude]
    if not candidates:
        raise NoReplica
    return state.policy.choose(candidates, text)


async def _proxy(request: Request, state: IngressState, path: str, route: str) -> Response:
    """Forward one OpenAI request; stream the engine's answer back unchanged."""
    started = time.perf_counter()
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        body = None
    model = body.get("model") if isinstance(body, dict) else None
    model_label = model if model == state.settings.model else "other"
    if not isinstance(body, dict):
        state.metrics.rejected.labels("invalid").inc()
        return _finish(state, route, model_label, started,
                       error_response(400, "The request body must be a JSON object.", code="invalid_json"))
    text = routing_text(body)
    headers = {"content-type": "application/json"}
    if rid := request.headers.get("x-request-id"):
        headers["x-request-id"] = rid

    tried: set[str] = set()
    state.metrics.in_flight.labels(route).inc()
    replica = None
    try:
        while True:
            try:
                replica = _choose(state, text, tried)
            except NoReplica:
                state.metrics.in_flight.labels(route).dec()
                return _finish(state, route, model_label, started, error_response(
                    503, "No engine replica is available; retry shortly.",
                    code="no_replica", headers={"Retry-After": "1"}))
            tried.add(replica.replica_id)
            replica.in_flight += 1
            upstream = state.client.build_request(
                "POST", f"{replica.url}{path}", content=raw, headers=headers,
                timeout=httpx.Timeout(state.settings.request_timeout_s, connect=2.0))
            try:
                resp = await state.client.send(upstream, stream=True)
                break
            except httpx.ConnectError:
                # Nothing reached the engine, so trying another replica is safe.
                replica.in_flight -= 1
                replica.mark_down()
                logger.warning("replica %s refused the connection; trying another", replica.replica_id)
            except httpx.TimeoutException:
                replica.in_flight -= 1
                state.metrics.in_flight.labels(route).dec()
                return _finish(state, route, model_label, started, error_response(
                    504, "The engine did not answer in time.", code="upstream_timeout"))
    except BaseException:
        state.metrics.in_flight.labels(route).dec()
        raise

    out_headers = {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k))}
    replica.served += 1

    def done(status: int) -> None:
        replica.in_flight -= 1
        state.metrics.in_flight.labels(route).dec()
        elapsed = time.perf_counter() - started
        state.metrics.requests.labels(route, str(status), model_label).inc()
        state.metrics.duration.labels(route, model_label).observe(elapsed)

    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        async def relay():
            first = True
            try:
                async for chunk in resp.aiter_raw():
                    if first:
                        state.metrics.ttfb.labels(route, model_label).observe(time.perf_counter() - started)
                        first = False
                    yield chunk
            except httpx.HTTPError as exc:
                # The engine went away mid-stream: end the SSE with an error event
                # rather than a silently truncated stream.
                logger.warning("stream from %s broke: %s", replica.replica_id, exc)
                err = {"error": {"message": "The engine stopped mid-stream.", "type": "server_error",
                                 "param": None, "code": "upstream_broken"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                await resp.aclose()
                done(resp.status_code)

        return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers)

    try:
        content = await resp.aread()
    except httpx.HTTPError:
        await resp.aclose()
        done(502)
        return error_response(502, "The engine connection broke.", code="upstream_broken")
    await resp.aclose()
    done(resp.status_code)
    return Response(content, status_code=resp.status_code, headers=out_headers)


def _finish(state: IngressState, route: str, model_label: str, started: float, resp: Response) -> Response:
    state.metrics.requests.labels(route, str(resp.status_code), model_label).inc()
    state.metrics.duration.labels(route, model_label).observe(time.perf_counter() - started)
    return resp


async def _forward_get(state: IngressState, path: str, route: str) -> Response:
    started = time.perf_counter()
    replicas = state.pool.available()
    if not replicas:
        return _finish(state, route, "other", started, error_response(
            503, "No engine replica is available; retry shortly.", code="no_replica",
            headers={"Retry-After": "1"}))
    replica = replicas[0]
    try:
        resp = await state.client.get(f"{replica.url}{path}", timeout=10.0)
    except httpx.HTTPError:
        replica.mark_down()
        return _finish(state, route, "other", started,
                       error_response(502, "The engine did not answer.", code="upstream_broken"))
    out_headers = {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k))}
    return _finish(state, route, "other", started,
                   Response(resp.content, status_code=resp.status_code, headers=out_headers))


async def _probe(state: IngressState, replica: Replica) -> tuple[bool, str]:
    """A replica is ready when it generates one token within the timeout."""
    try:
        resp = await state.client.post(
            f"{replica.url}/v1/completions",
            json={"model": state.settings.model, "prompt": "ping", "max_tokens": 1},
            timeout=state.settings.ready_timeout_s)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}"
    if resp.status_code != 200:
        return False, f"HTTP {resp.status_code}"
    return True, "ok"


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
            detail.append({"replica": r.replica_id, "ready": ok, "detail": why,
                           "in_flight": r.in_flight})
        expected = state.settings.expected_replicas
        state.metrics.replicas.labels("ready").set(ready)
        state.metrics.replicas.labels("unready").set(max(len(replicas), expected) - ready)
        if state.draining:
            status_text, code = "draining", 503
        elif ready >= expected and ready == len(replicas):
            status_text, code = "ready", 200
        elif ready > 0:
            status_text, code = "degraded", 503
        else:
            status_text, code = "unavailable", 503
        body = {"status": status_text, "ready_replicas": ready, "expected_replicas": expected,
                "replicas": detail}
        state.ready_cache = (time.monotonic(), code, body)
        return code, body


def build_app(settings: IngressSettings, pool: ReplicaPool) -> Starlette:
    state = IngressState(settings=settings, pool=pool, policy=make_policy(settings.policy),
                         metrics=RouterMetrics())

    def guard(route: str):
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                if state.draining:
                    state.metrics.rejected.labels("draining").inc()
                    return _finish(state, route, "other", time.perf_counter(), error_response(
                        503, "The server is shutting down; retry on another instance.",
                        code="draining", headers={"Retry-After": "1", "Connection": "close"}))
                return await handler(request)
            return endpoint
        return wrap

    @guard("chat")
    async def chat(request: Request) -> Response:
        return await _proxy(request, state, "/v1/chat/completions", "chat")

    @guard("completions")
    async def completions(request: Request) -> Response:
        return await _proxy(request, state, "/v1/completions", "completions")

    @guard("tokenize")
    async def tokenize(request: Request) -> Response:
        return await _proxy(request, state, "/tokenize", "tokenize")

    @guard("detokenize")
    async def detokenize(request: Request) -> Response:
        return await _proxy(request, state, "/detokenize", "detokenize")

    @guard("models")
    async def models(request: Request) -> Response:
        return await _forward_get(state, "/v1/models", "models")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "draining" if state.draining else "ok"})

    async def ready(request: Request) -> Response:
        code, body = await _readiness(state)
        return JSONResponse(body, status_code=code)

    async def metrics(request: Request) -> Response:
        engine = await fetch_replica_metrics(state.client, state.pool.replicas)
        return Response(state.metrics.render() + engine,
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(request: Request) -> Response:
        page = WEB_DIR / "index.html"
        if not settings.web_ui or not page.is_file():
            return error_response(404, "The web UI is not enabled.", code="not_found")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    async def startup() -> None:
        state.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
            timeout=httpx.Timeout(settings.request_timeout_s, connect=2.0))
        pool.start()

    async def shutdown() -> None:
        await pool.stop()
        if state.client is not None:
            await state.client.aclose()

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
    ]
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
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"No route {request.url.path}.", code="not_found")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path}.",
                          type_="invalid_request_error", code="method_not_allowed")
