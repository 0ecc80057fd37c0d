"""Slow and silent clients: bounded time to send headers and body, idle sockets closed.

The real ingress app on uvicorn with the protocol the launcher uses
(serving/ingress/http_protocol.py), driven over raw sockets, because the faults are a
client's: headers that trickle in, a body that stops halfway, a connection that never
says anything. No engine is needed: every answer here is given before one is chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
import uvicorn

from serving.ingress.app import IngressSettings, build_app
from serving.ingress.http_protocol import header_bounded
from serving.ingress.pool import ReplicaPool
from serving.ports import bind_reusable

HEADER_TIMEOUT_S = 0.6
BODY_TIMEOUT_S = 0.6
KEEP_ALIVE_S = 1.0


class NoReplicas:
    class snapshot:  # noqa: N801 - the registry actor's method, as called
        @staticmethod
        async def remote(max_age_s: float) -> list[dict]:
            return []


@contextlib.asynccontextmanager
async def ingress():
    app = build_app(IngressSettings(model="m", expected_replicas=1, body_timeout_s=BODY_TIMEOUT_S),
                    ReplicaPool(NoReplicas()))
    sock = bind_reusable("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                                           http=header_bounded(HEADER_TIMEOUT_S)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        yield sock.getsockname()[1], app.state.ingress
    finally:
        server.should_exit = True
        await task


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> tuple[bytes, float]:
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit_s)  # read() returns at EOF
    return data, time.monotonic() - started


def split_response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_headers_that_trickle_in_get_408_and_the_connection_closes():
    async with ingress() as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        await writer.drain()
        raw, waited = await read_until_closed(reader, 10)
        writer.close()
    status, body = split_response(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert waited < HEADER_TIMEOUT_S + 2


async def test_a_body_that_stops_halfway_gets_408_and_the_connection_closes():
    async with ingress() as (port, state):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"model\": ")
        await writer.drain()
        raw, waited = await read_until_closed(reader, 10)
        writer.close()
        rejected = state.metrics.render().decode()
    status, body = split_response(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert b"connection: close" in raw.lower()
    assert waited < BODY_TIMEOUT_S + 2
    assert 'qwen_serve_rejected_requests_total{reason="slow_client"} 1.0' in rejected


async def test_a_connection_that_sends_nothing_is_closed_silently():
    async with ingress() as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw, waited = await read_until_closed(reader, 10)
        writer.close()
    assert raw == b""  # an idle socket is not answered: a pooled client would misread a 408
    assert KEEP_ALIVE_S - 0.2 < waited < KEEP_ALIVE_S + 2


async def test_prompt_clients_keep_their_connection_across_requests():
    async with ingress() as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            first = await client.get("/health")
            await asyncio.sleep(HEADER_TIMEOUT_S + 0.2)  # idle longer than the header bound
            second = await client.get("/health")
            bad = await client.post("/v1/chat/completions", content=b"{", headers={
                "content-type": "application/json"})
    assert first.status_code == second.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("field", ["header_timeout_s", "body_timeout_s"])
def test_the_bounds_are_settings(field):
    from serving.config import ServerConfig

    assert getattr(ServerConfig(**{field: 3}), field) == 3
    with pytest.raises(ValueError):
        ServerConfig(**{field: 0})
