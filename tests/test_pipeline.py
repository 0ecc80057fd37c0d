"""The request pipeline (serving/ingress/pipeline.py) against engines that misbehave on cue.

The engine here is a stand-in (aiohttp.web), because the faults are ones a real vLLM
cannot be made to commit at a chosen moment: dying after exactly one event, never
finishing, sending faster than a client reads. What is checked is what users and
operators see: the answer, the status the metrics record, and that every replica's
in-flight slot comes back (a lost slot is capacity lost until restart). The real
engine's versions of these live in test_reliability_stack.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import pytest
import uvicorn
from aiohttp import web

from serving.config import LimitsConfig, ResponseCacheConfig
from serving.ingress.app import IngressSettings, build_app
from serving.ingress.auth import ApiKeys, key_digest
from serving.ingress.pool import FixedRegistry, ReplicaPool
from serving.ports import bind_reusable

BUSY_PROBE_S = 2.0
HEALTH = {"status": 200}  # what the stand-in's /health answers
EVENT = b'data: {"object":"text_completion","choices":[{"index":0,"text":"t"}]}\n\n'


async def engine_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    act = body.get("prompt")
    if not body.get("stream"):
        # The readiness probe's one token waits as if queued behind a full batch.
        await asyncio.sleep(BUSY_PROBE_S if act == "ping" else float(body.get("sleep", 0)))
        return web.json_response({"object": "text_completion", "choices": [{"text": "x"}],
                                  "usage": {"prompt_tokens": 2, "completion_tokens": 1,
                                            "total_tokens": 3}})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    if act == "die":
        await resp.write(EVENT)
        await asyncio.sleep(0.05)
        request.transport.close()  # an engine process dying mid-stream
        return resp
    if act == "flood":  # much faster than a client that stopped reading takes it
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(b"data: " + b"x" * 65536 + b"\n\n")
    count = int(body.get("max_tokens", 3))
    for _ in range(count):
        await resp.write(EVENT)
        await asyncio.sleep(float(body.get("sleep", 0.005)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def engine_health(request: web.Request) -> web.Response:
    return web.Response(status=HEALTH["status"])


@contextlib.asynccontextmanager
async def ingress(replicas: list[str], cache: ResponseCacheConfig | None = None, **settings):
    """The real ingress app in front of ``replicas`` (engine URLs), on a free port."""
    app = build_app(IngressSettings(model="m", expected_replicas=len(replicas), **settings),
                    ReplicaPool(FixedRegistry([{"replica_id": f"r{i}", "url": u, "pid": 0}
                                               for i, u in enumerate(replicas)])), cache)
    sock = bind_reusable("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    state = app.state.ingress
    try:
        while not server.started or len(state.pool.replicas) < len(replicas):
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def engine():
    app = web.Application()
    app.router.add_post("/v1/completions", engine_completions)
    app.router.add_get("/health", engine_health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


def statuses(state) -> dict[str, float]:
    text = state.metrics.render().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("qwen_serve_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + float(value)
    return out


def in_flight(state) -> int:
    return sum(r.in_flight for r in state.pool.replicas)


async def test_answers_and_their_statuses(engine):
    async with ingress([engine], request_timeout_s=1.0) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            ok = await c.post("/v1/completions", json={"prompt": "a", "stream": True, "max_tokens": 4})
            assert ok.text.count("data: {") == 4 and ok.text.endswith("data: [DONE]\n\n")
            plain = await c.post("/v1/completions", json={"prompt": "a"})
            assert plain.json()["usage"]["total_tokens"] == 3
            died = await c.post("/v1/completions", json={"prompt": "die", "stream": True})
            last = [e for e in died.text.split("\n\n") if e.startswith("data: {")][-1]
            assert json.loads(last[6:])["error"]["code"] == "upstream_broken"
            late = await c.post("/v1/completions", json={"prompt": "a", "stream": True,
                                                         "max_tokens": 1000, "sleep": 0.01})
            last = [e for e in late.text.split("\n\n") if e.startswith("data: {")][-1]
            assert json.loads(last[6:])["error"]["code"] == "deadline_exceeded"
            slow = await c.post("/v1/completions", json={"prompt": "a", "sleep": 5})
            assert slow.status_code == 504
        # A stream's headers said 200; what the operator sees is how it ended.
        assert statuses(state) == {"200": 2, "502": 1, "504": 2}
        assert in_flight(state) == 0


async def test_a_client_that_leaves_a_plain_request_aborts_it_on_the_engine(engine):
    """A plain answer sends nothing until it is done; a client that leaves meanwhile has
    its engine request closed (vLLM aborts it) and its slot freed, counted as 499."""
    async with ingress([engine]) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            leaving = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "sleep": 5}))
            await asyncio.sleep(0.2)
            assert in_flight(state) == 1
            leaving.cancel()  # the client goes away (httpx closes its connection)
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
            left = asyncio.get_running_loop().time()
            while in_flight(state) or "499" not in statuses(state):
                assert asyncio.get_running_loop().time() - left < 3, "the engine request was kept"
                await asyncio.sleep(0.05)
            assert statuses(state) == {"499": 1}


def tokens(state) -> dict[tuple[str, str], float]:
    out = {}
    for line in state.metrics.render().decode().splitlines():
        if line.startswith("qwen_serve_tokens_total{"):
            labels, value = line.rsplit(" ", 1)
            model = labels.split('model="')[1].split('"')[0]
            kind = labels.split('kind="')[1].split('"')[0]
            out[(model, kind)] = float(value)
    return out


async def test_tokens_are_counted_per_model_adapters_apart(engine):
    async with ingress([engine, engine], adapters=("note",)) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            for model in ("note", "m"):  # an adapter's stream, the base's plain answer
                stream = model == "note"
                resp = await c.post("/v1/completions", json={
                    "model": model, "prompt": "a" * 40, "stream": stream, "max_tokens": 6})
                assert resp.status_code == 200
        # The adapter: the admission's prompt estimate, one token per event (no usage event);
        # the base: the engine's usage counts.
        counted = tokens(state)
        assert counted[("note", "completion")] == 6 and counted[("note", "prompt")] > 0
        assert counted[("m", "prompt")] == 2 and counted[("m", "completion")] == 1
        # The replica that served the adapter is now the one its next request prefers.
        holders = [r.replica_id for r in state.pool.replicas if "note" in r.recent_adapters]
        assert len(holders) == 1


async def test_a_refused_replica_is_skipped_and_the_request_served(engine):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with ingress([dead, engine], policy="round_robin") as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            for _ in range(4):
                assert (await c.post("/v1/completions", json={"prompt": "a"})).status_code == 200
        assert statuses(state) == {"200": 4} and in_flight(state) == 0


async def test_a_client_that_stops_reading_gives_its_slot_back_at_the_deadline(engine):
    limits = LimitsConfig(max_in_flight_per_replica=1)
    async with ingress([engine], request_timeout_s=1.0, limits=limits) as (base, state):
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "flood", "stream": True}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # headers, then it reads nothing more
        try:
            await asyncio.sleep(0.3)
            assert in_flight(state) == 1
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                busy = await c.post("/v1/completions", json={"prompt": "a"})
                assert busy.status_code == 429
                await asyncio.sleep(1.0)  # past the 1 s deadline
                assert in_flight(state) == 0
                assert (await c.post("/v1/completions", json={"prompt": "a"})).status_code == 200
        finally:
            writer.close()


async def ready_while_streaming(c: httpx.AsyncClient) -> httpx.Response:
    async with c.stream("POST", "/v1/completions", json={
            "prompt": "a", "stream": True, "max_tokens": 40, "sleep": 0.05}) as resp:
        chunks = resp.aiter_bytes()
        await chunks.__anext__()
        await asyncio.sleep(1.1)  # past the 1 s the ready answer is cached
        answer = await c.get("/ready")
        async for _ in chunks:
            pass
    return answer


async def test_a_replica_busy_with_slow_plain_answers_is_ready(engine):
    """A plain answer sends nothing until it is done: a replica that finished one a few
    seconds ago and is working on the next is busy, not stuck, though no byte came
    within the probe's timeout (BUSY_WINDOW_S)."""
    async with ingress([engine], ready_timeout_s=0.5) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            first = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert first.status_code == 200
            slow = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "sleep": 2.0}))
            await asyncio.sleep(1.1)  # no byte for longer than the probe's timeout
            busy = await c.get("/ready")
            assert (await slow).status_code == 200
            assert busy.status_code == 200, busy.text
            assert busy.json()["replicas"][0]["detail"] == "serving"


async def test_a_replica_busy_streaming_is_ready_though_its_probe_would_time_out(engine):
    async with ingress([engine], ready_timeout_s=0.5) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            idle = await c.get("/ready")
            assert idle.status_code == 503 and idle.json()["replicas"][0]["detail"] == "TimedOut"
            busy = await ready_while_streaming(c)
            assert busy.status_code == 200, busy.text
            assert busy.json()["replicas"][0]["detail"] == "serving"
            HEALTH["status"] = 500  # streaming, but the engine says it is unwell
            try:
                await asyncio.sleep(1.1)
                sick = await ready_while_streaming(c)
            finally:
                HEALTH["status"] = 200
            assert sick.status_code == 503 and sick.json()["replicas"][0]["detail"] == "HTTP 500"


@pytest.mark.parametrize("up, min_ready, code, status", [
    (2, 1, 200, "ready"), (1, 1, 200, "degraded"), (0, 1, 503, "unavailable"),
    (1, 2, 503, "degraded")])
async def test_ready_stays_200_while_enough_replicas_answer(engine, up, min_ready, code, status):
    """One dead engine of two must not take the only ingress out of its Service."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    replicas = [engine] * up + [dead] * (2 - up)
    async with ingress(replicas, min_ready_replicas=min_ready) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            answer = await c.get("/ready")
            metrics = (await c.get("/metrics")).text
    body = answer.json()
    assert (answer.status_code, body["status"], body["ready_replicas"]) == (code, status, up)
    assert sorted(r["ready"] for r in body["replicas"]) == sorted([True] * up + [False] * (2 - up))
    # The degraded replica shows in the metrics too.
    assert f'qwen_serve_replicas{{state="unready"}} {2 - up}.0' in metrics


@pytest.mark.parametrize("keys, hit_header, announced", [
    (False, "per_key", False), (True, "per_key", True), (False, "always", True), (True, "never", False)])
async def test_a_cached_answer_says_so_only_where_the_cache_is_per_key(engine, keys, hit_header, announced):
    """With keys off every client shares one cache: `x-cache: hit` would tell anyone that
    someone else asked the same (unless configured for a single-tenant deployment)."""
    key = "sk-pipeline-test-key"
    settings = {"api_keys": ApiKeys((key_digest(key),))} if keys else {}
    headers = {"authorization": f"Bearer {key}"} if keys else {}
    async with ingress([engine], ResponseCacheConfig(hit_header=hit_header), **settings) as (base, state):
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as c:
            body = {"prompt": "same question", "max_tokens": 4, "temperature": 0}
            first, again = [await c.post("/v1/completions", json=body) for _ in range(2)]
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert "x-cache" not in first.headers
    assert (again.headers.get("x-cache") == "hit") is announced
    assert state.metrics.cache.labels("hit")._value.get() == 1  # served from the cache either way


async def test_the_pool_never_takes_an_entry_its_check_refuses():
    entries = [{"replica_id": "real", "url": "http://127.0.0.1:1", "pid": 1},
               {"replica_id": "decoy", "url": "http://127.0.0.1:2", "pid": 2}]
    pool = ReplicaPool(FixedRegistry(entries), accept=lambda entry: entry["replica_id"] == "real")
    await pool.refresh()
    assert [r.replica_id for r in pool.replicas] == ["real"]
