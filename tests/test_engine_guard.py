"""serving/engine/guard.py: the engine middleware refuses callers without the engine key.

A small ASGI app stands in for vLLM's here (the middleware only sees ASGI scopes);
the real engines behind the stack are checked in test_reliability_stack.py.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from serving.engine import guard

KEY = "engine-key-for-tests"


async def ok(request):
    return PlainTextResponse("ok")


async def stream(request):
    async def events():
        for i in range(3):
            yield f"data: {i}\n\n".encode()
    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv(guard.ENV, KEY)
    app = Starlette(routes=[Route("/v1/stream", stream, methods=["POST"]),
                            Route("/{path:path}", ok, methods=["GET", "POST"])])
    app.add_middleware(guard.EngineKeyMiddleware)  # as vLLM's --middleware does
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine")


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/metrics", "/health", "/load"])
@pytest.mark.parametrize("headers", [{}, {guard.HEADER: "wrong"}, {"authorization": f"Bearer {KEY}"}])
async def test_every_route_refuses_a_caller_without_the_key(client, path, headers):
    resp = await client.post(path, headers=headers) if path != "/health" else await client.get(path, headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "engine_key_required"


async def test_the_key_opens_every_route_and_streams_pass(client):
    assert (await client.get("/metrics", headers=guard.headers(KEY))).text == "ok"
    resp = await client.post("/v1/stream", headers=guard.headers(KEY))
    assert resp.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_an_engine_told_to_guard_itself_does_not_start_without_a_key(monkeypatch):
    monkeypatch.delenv(guard.ENV, raising=False)
    with pytest.raises(RuntimeError, match=guard.ENV):
        guard.EngineKeyMiddleware(Starlette())


def test_a_registry_entry_counts_only_when_the_engine_key_signed_it():
    """Anyone with the cluster's token can write to the registry; the ingress routes only
    to entries a holder of the engine key signed."""
    from serving.engine.guard import entry_signed, sign_entry

    entry = {"replica_id": "r1", "url": "http://10.0.0.2:8001", "pid": 42}
    signed = {**entry, "proof": sign_entry("the-key", "r1", entry["url"], 42)}
    assert entry_signed("the-key", signed)
    assert not entry_signed("another-key", signed)
    assert not entry_signed("the-key", {**signed, "url": "http://10.0.0.9:8001"})  # moved elsewhere
    assert not entry_signed("the-key", entry)  # no proof at all
