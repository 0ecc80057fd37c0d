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

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import LimitsConfig, ResponseCacheConfig
from .admission import Admission, Rejected
from .auth import ApiKeys
from .cache import (CachedResponse, RedisResponseCache, ResponseCache, StreamCapture,
                    sse_from_completion)
from .errors import error_body, error_response
from .metrics import RouterMetrics, fetch_replica_metrics
from .pool import Replica, ReplicaPool
from .routing import RoutingPolicy, make_policy
from .shape import estimate_tokens
from .upstream import (READ_ERRORS, Broken, Refused, TimedOut, Upstream, UpstreamError, finish,
                       read_all)
from .usage import StreamUsage, total_tokens_of_body

logger = logging.getLogger("qwen_serve.ingress")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
OPENAPI_FILE = Path(__file__).resolve().parent / "openapi.json"
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
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    api_keys: ApiKeys | None = None
    metrics_require_key: bool = False
    model_revision: str = ""
    # The engine's stream interval: the most tokens one streamed event carries.
    tokens_per_event: int = 1


@dataclass
class IngressState:
    settings: IngressSettings
    pool: ReplicaPool
    policy: RoutingPolicy
    metrics: RouterMetrics
    admission: Admission
    cache: ResponseCache | RedisResponseCache | None = None
    upstream: Upstream = field(default_factory=Upstream)
    draining: bool = False
    ready_cache: tuple[float, int, dict] | None = None
    ready_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.pool.replicas)


class NoReplica(Exception):
    pass


class AtCapacity(Exception):
    pass


def _choose(state: IngressState, text: str, exclude: set[str]) -> Replica:
    candidates = [r for r in state.pool.available() if r.replica_id not in exclude]
    if not candidates:
        raise NoReplica
    limits = state.settings.limits
    if limits.max_in_flight is not None and state.in_flight >= limits.max_in_flight:
        raise AtCapacity
    if limits.max_in_flight_per_replica is not None:
        candidates = [r for r in candidates if r.in_flight < limits.max_in_flight_per_replica]
        if not candidates:
            raise AtCapacity
    return state.policy.choose(candidates, text)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _proxy(request: Request, state: IngressState, path: str, route: str) -> Response:
    """Admit one OpenAI request, forward it, stream the engine's answer back unchanged."""
    started = time.perf_counter()
    try:
        admitted = await state.admission.admit(request)
    except Rejected as rej:
        state.metrics.rejected.labels(rej.reason).inc()
        return _finish(state, route, "other", started, rej.response)
    model = admitted.body.get("model") or state.settings.model
    model_label = model if model == state.settings.model else "other"
    body = admitted.body
    key = None
    if state.cache is not None and route in ("chat", "completions"):
        if "no-cache" in request.headers.get("cache-control", "").lower():
            state.metrics.cache.labels("bypass").inc()
        else:
            key = state.cache.key_for(route, body, state.settings.model_revision,
                                      scope=admitted.key_id or "")
            hit = await state.cache.get(key) if key else None
            if hit is not None:
                if body.get("stream") is True:
                    state.metrics.ttfb.labels(route, model_label).observe(time.perf_counter() - started)
                return _finish(state, route, model_label, started, _from_cache(route, body, hit))
    deadline = time.monotonic() + state.settings.request_timeout_s
    forward = _forward(request, state, admitted, path, route, model_label, started, deadline, key)
    if body.get("stream") is True:
        return await forward
    # Non-streaming: vLLM answers only when done, so race the whole exchange against
    # the deadline and the client leaving; cancelling it closes the upstream
    # connection, and vLLM aborts the request when its connection closes.
    work = asyncio.ensure_future(forward)
    leaving = asyncio.ensure_future(_until_disconnect(request))
    finished, _ = await asyncio.wait({work, leaving}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=max(0.0, deadline - time.monotonic()))
    leaving.cancel()
    if work in finished:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    if leaving in finished:
        return _finish(state, route, model_label, started, Response(status_code=499))  # nginx's code
    return _finish(state, route, model_label, started, error_response(
        504, "The request exceeded its deadline.", code="deadline_exceeded"))


async def _forward(request: Request, state: IngressState, admitted, path: str, route: str,
                   model_label: str, started: float, deadline: float, key: str | None) -> Response:
    """Choose a replica, send, and pass the engine's answer back (streamed or whole)."""
    headers = {"content-type": "application/json"}
    if rid := request.headers.get("x-request-id"):
        headers["x-request-id"] = rid
    tried: set[str] = set()
    broken_once = False
    while True:
        try:
            replica = _choose(state, admitted.prompt_text, tried)
        except NoReplica:
            state.admission.refund(admitted)  # no engine saw it: the retry is not charged twice
            return _finish(state, route, model_label, started, error_response(
                503, "No engine replica is available; retry shortly.",
                code="no_replica", headers={"Retry-After": "1"}))
        except AtCapacity:
            state.admission.refund(admitted)
            state.metrics.rejected.labels("overloaded").inc()
            return _finish(state, route, model_label, started, error_response(
                429, "The server is at capacity; retry shortly.", code="overloaded",
                headers={"Retry-After": "1"}))
        tried.add(replica.replica_id)
        replica.in_flight += 1
        state.metrics.in_flight.labels(route).inc()
        try:
            resp = await state.upstream.open("POST", f"{replica.url}{path}", body=admitted.raw,
                                             headers=headers,
                                             timeout_s=state.settings.request_timeout_s)
            break
        except BaseException as exc:
            replica.in_flight -= 1
            state.metrics.in_flight.labels(route).dec()
            if isinstance(exc, Refused):
                # Nothing reached the engine, so trying another replica is safe.
                replica.mark_down()
                logger.warning("replica %s refused the connection; trying another", replica.replica_id)
                continue
            if isinstance(exc, Broken) and not broken_once:
                # A stale keep-alive connection, or an engine that died before
                # answering (vLLM sends a plain answer's headers only when done):
                # nothing reached the client and generation has no side effects, so
                # try once more - on another replica when there is one: a dead
                # engine's other pooled connections fail the same way, not with a
                # refused connect (that 502'd 2 requests per killed engine).
                broken_once = True
                if not any(r.replica_id not in tried for r in state.pool.available()):
                    tried.discard(replica.replica_id)  # the only one: try it again
                continue
            if isinstance(exc, TimedOut):
                return _finish(state, route, model_label, started, error_response(
                    504, "The engine did not answer in time.", code="upstream_timeout"))
            if isinstance(exc, Broken):
                replica.mark_down()
                logger.warning("request to %s failed (%r); answering 502", replica.replica_id, exc)
                return _finish(state, route, model_label, started, error_response(
                    502, "The engine connection broke.", code="upstream_broken"))
            raise

    out_headers = {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k))}
    finished = False

    def done(status: int | None) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        replica.in_flight -= 1
        state.metrics.in_flight.labels(route).dec()
        if status is None:  # cancelled: the caller answers and counts it
            return
        state.metrics.requests.labels(route, str(status), model_label).inc()
        state.metrics.duration.labels(route, model_label).observe(time.perf_counter() - started)

    # Rate limits: the admission estimate is replaced by what the answer cost (usage.py).
    settle = None
    if admitted.charged_to is not None and resp.status == 200:
        def settle(used: int) -> None:
            state.admission.settle(admitted, used)

    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        capture = StreamCapture(route) if key and resp.status == 200 else None
        meter = None
        if settle is not None:
            meter = StreamUsage(estimate_tokens(admitted.body, admitted.prompt_text, generates=False),
                                tokens_per_event=state.settings.tokens_per_event)
        return StreamingResponse(_relay(state, resp, replica, route, model_label, started, deadline,
                                        done, capture, key, meter, settle),
                                 status_code=resp.status, headers=out_headers)
    complete = False
    try:
        content = await read_all(resp)
        complete = True
    except Broken as exc:
        logger.warning("answer from %s broke (%r); answering 502", replica.replica_id, exc)
        done(502)
        return error_response(502, "The engine connection broke.", code="upstream_broken")
    except BaseException:
        done(None)  # cancelled: the client left or the deadline passed
        raise
    finally:
        finish(resp, complete)
    done(resp.status)
    if settle is not None and (used := total_tokens_of_body(content)) is not None:
        settle(used)
    if key and resp.status == 200:
        await state.cache.put(key, CachedResponse(200, "application/json", content))
    return Response(content, status_code=resp.status, headers=out_headers)


def _from_cache(route: str, body: dict, hit: CachedResponse) -> Response:
    """Serve a cached answer in the shape asked for (SSE or one JSON body)."""
    headers = {"x-cache": "hit"}
    if body.get("stream") is True:
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return Response(sse_from_completion(route, hit.body, usage), media_type="text/event-stream",
                        headers=headers)
    return Response(hit.body, status_code=hit.status, media_type=hit.content_type, headers=headers)


async def _relay(state, resp, replica, route, model_label, started, deadline, done, capture, key,
                 meter=None, settle=None):
    """Pass SSE bytes through as they arrive; end cleanly on deadline or engine loss.

    The per-chunk work is what the ingress costs per token, so it stays small: one
    read of whatever bytes have arrived, optional capture and metering, one write.
    """
    loop = asyncio.get_running_loop()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        resp.close()  # wakes the read below; vLLM sees the close and aborts

    timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), expire)
    complete = False
    try:
        first = True
        async for chunk in resp.content.iter_any():
            if first:
                state.metrics.ttfb.labels(route, model_label).observe(time.perf_counter() - started)
                first = False
            if capture is not None:
                capture.feed(chunk)
            if meter is not None:
                meter.feed(chunk)
                if b"data: [DONE]" in chunk:
                    # Settle before the client sees the end: its next request may follow at once.
                    settle(meter.total_tokens())
                    meter = None
            yield chunk
        if expired:
            raise Broken("closed at the deadline")
        complete = True
        if meter is not None:
            settle(meter.total_tokens())
        if capture is not None and (full := capture.completion()) is not None:
            await state.cache.put(key, CachedResponse(200, "application/json", full))
    except (*READ_ERRORS, Broken) as exc:
        # Deadline or engine gone mid-stream: finish the SSE with an error event
        # rather than a silently truncated stream.
        if expired:
            err = error_body(504, "The request exceeded its deadline.", code="deadline_exceeded")
        else:
            logger.warning("stream from %s broke: %r", replica.replica_id, exc)
            err = error_body(502, "The engine stopped mid-stream.", code="upstream_broken")
        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
    finally:
        timer.cancel()
        finish(resp, complete)
        done(504 if expired else resp.status)


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
        status, headers, content = await state.upstream.fetch("GET", f"{replica.url}{path}",
                                                              timeout_s=10.0)
    except UpstreamError:
        replica.mark_down()
        return _finish(state, route, "other", started,
                       error_response(502, "The engine did not answer.", code="upstream_broken"))
    out_headers = {k: v for k in _PASS_HEADERS if (v := headers.get(k))}
    return _finish(state, route, "other", started,
                   Response(content, status_code=status, headers=out_headers))


async def _probe(state: IngressState, replica: Replica) -> tuple[bool, str]:
    """A replica is ready when it generates one token within the timeout."""
    probe = json.dumps({"model": state.settings.model, "prompt": "ping", "max_tokens": 1})
    try:
        status, _, _ = await state.upstream.fetch(
            "POST", f"{replica.url}/v1/completions", body=probe.encode(),
            headers={"content-type": "application/json"}, timeout_s=state.settings.ready_timeout_s)
    except UpstreamError as exc:
        return False, type(exc).__name__
    if status != 200:
        return False, f"HTTP {status}"
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
                           "in_flight": r.in_flight, "pid": r.pid})
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


def build_app(settings: IngressSettings, pool: ReplicaPool,
              cache_config: ResponseCacheConfig | None = None) -> Starlette:
    metrics = RouterMetrics()
    state = IngressState(settings=settings, pool=pool, policy=make_policy(settings.policy),
                         metrics=metrics, admission=Admission(settings.limits, settings.api_keys),
                         cache=_make_cache(cache_config, metrics))

    def authorized(request: Request, route: str) -> Response | None:
        try:
            state.admission.authenticate(request)
        except Rejected as rej:
            state.metrics.rejected.labels(rej.reason).inc()
            return _finish(state, route, "other", time.perf_counter(), rej.response)
        return None

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

    def proxied(path: str, route: str):
        @guard(route)
        async def endpoint(request: Request) -> Response:
            return await _proxy(request, state, path, route)
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
        engine = await fetch_replica_metrics(state.upstream, state.pool.replicas)
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

    async def startup() -> None:
        await state.upstream.start()
        pool.start()

    async def shutdown() -> None:
        await pool.stop()
        if state.cache is not None:
            await state.cache.aclose()
        await state.upstream.aclose()

    routes = [
        Route("/v1/chat/completions", proxied("/v1/chat/completions", "chat"), methods=["POST"]),
        Route("/v1/completions", proxied("/v1/completions", "completions"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", proxied("/tokenize", "tokenize"), methods=["POST"]),
        Route("/detokenize", proxied("/detokenize", "detokenize"), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
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


def _make_cache(cfg: ResponseCacheConfig | None, metrics: RouterMetrics):
    if cfg is None or not cfg.enabled:
        return None
    if cfg.backend == "redis":
        return RedisResponseCache(cfg.redis_url, cfg.ttl_s, max_entry_bytes=cfg.max_entry_bytes,
                                  metrics_counter=metrics.cache)
    return ResponseCache(cfg.max_bytes, cfg.ttl_s, metrics.cache)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"No route {request.url.path}.", code="not_found")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path}.",
                          type_="invalid_request_error", code="method_not_allowed")
