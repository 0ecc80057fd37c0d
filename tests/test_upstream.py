"""The ingress's HTTP client to engines (serving/ingress/upstream.py) against real HTTP
servers on loopback: a stand-in engine in aiohttp.web for well-formed answers, raw
asyncio servers for the faults (a close mid-answer, a refused port, malformed bytes)
that a real vLLM only shows when it dies."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from serving.ingress.upstream import Broken, Refused, TimedOut, Upstream, finish, read_all
from serving.ports import bind_reusable

SEEN = web.AppKey("seen", dict)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str, list]:
    peers: list = []

    @web.middleware
    async def note_peer(request, handler):
        peers.append(request.transport.get_extra_info("peername"))
        return await handler(request)

    app.middlewares.append(note_peer)
    # Like vLLM's server, the stand-in notices a client's close (the handler is cancelled).
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}", peers


def _engine() -> web.Application:
    app = web.Application()
    seen: dict = {}
    app[SEEN] = seen

    async def complete(request: web.Request) -> web.Response:
        seen["body"] = await request.read()
        seen["headers"] = dict(request.headers)
        return web.json_response({"ok": True}, headers={"x-request-id": "r1"})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (3 << 20))

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["slow_aborted"] = True
            raise
        return web.Response(text="late")

    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/stream", stream)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    return app


async def test_answers_headers_and_keep_alive_reuse():
    runner, base, peers = await _serve(_engine())
    up = Upstream(headers={"x-qwen-serve-engine-key": "k"})
    try:
        for _ in range(3):
            status, headers, body = await up.fetch("POST", f"{base}/v1/completions", body=b'{"a":1}',
                                                   headers={"content-type": "application/json"},
                                                   timeout_s=5)
            assert (status, body) == (200, b'{"ok": true}')
            assert headers["x-request-id"] == "r1" and headers["content-type"].startswith("application/json")
        seen = runner.app[SEEN]
        assert seen["body"] == b'{"a":1}'
        assert seen["headers"]["x-qwen-serve-engine-key"] == "k"
        assert len(set(peers)) == 1  # one connection, kept alive across the three
    finally:
        await up.aclose()
        await runner.cleanup()


async def test_a_stream_arrives_as_it_is_written():
    runner, base, _ = await _serve(_engine())
    up = Upstream()
    try:
        resp = await up.open("GET", f"{base}/stream?n=20")
        assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
        reads = []
        async for chunk in resp.iter_chunks():
            reads.append(chunk)
        finish(resp, True)
        text = b"".join(reads).decode()
        assert text == "".join(f"data: {i}\n\n" for i in range(20)) + "data: [DONE]\n\n"
        assert len(reads) > 5  # not collected into one piece at the end
    finally:
        await up.aclose()
        await runner.cleanup()


async def test_a_slow_reader_pauses_the_engine_socket_and_still_gets_every_byte():
    runner, base, _ = await _serve(_engine())
    up = Upstream()
    try:
        resp = await up.open("GET", f"{base}/big")
        await asyncio.sleep(0.3)  # the answer arrives while nobody reads
        assert resp._buffered < (1 << 20)  # reading stopped near the high-water mark
        body = await read_all(resp)
        finish(resp, True)
        assert body == b"x" * (3 << 20)
        # The connection went back to the pool resumed: the next answer comes through it.
        status, _, _ = await up.fetch("GET", f"{base}/stream?n=1", timeout_s=5)
        assert status == 200
    finally:
        await up.aclose()
        await runner.cleanup()


async def test_closing_an_answer_aborts_it_on_the_engine():
    runner, base, _ = await _serve(_engine())
    up = Upstream()
    try:
        opening = asyncio.ensure_future(up.open("GET", f"{base}/slow"))
        await asyncio.sleep(0.2)
        opening.cancel()  # the client left, or the deadline passed
        with pytest.raises(asyncio.CancelledError):
            await opening
        for _ in range(50):
            if runner.app[SEEN].get("slow_aborted"):
                break
            await asyncio.sleep(0.05)
        assert runner.app[SEEN].get("slow_aborted"), "the engine never saw the close"
        with pytest.raises(TimedOut):
            await up.fetch("GET", f"{base}/slow", timeout_s=0.2)
    finally:
        await up.aclose()
        await runner.cleanup()


async def test_a_refused_port_is_refused():
    sock = bind_reusable("127.0.0.1")  # held, not listening: connections are refused
    port = sock.getsockname()[1]
    up = Upstream()
    try:
        with pytest.raises(Refused):
            await up.open("GET", f"http://127.0.0.1:{port}/health")
    finally:
        sock.close()
        await up.aclose()


async def _raw_server(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def test_an_engine_that_dies_mid_answer_is_broken_not_complete():
    async def dies(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # no final chunk: the stream never ends properly

    server, base = await _raw_server(dies)
    up = Upstream()
    try:
        resp = await up.open("POST", f"{base}/v1/chat/completions", body=b"{}")
        got = []
        with pytest.raises(Broken):
            async for chunk in resp.iter_chunks():
                got.append(chunk)
        assert got == [b"data: 1\n"]
        finish(resp, False)
    finally:
        await up.aclose()
        server.close()


async def test_a_connection_closed_before_any_answer_is_broken_and_not_kept():
    calls = []

    async def hangs_up(reader, writer):
        await _read_request(reader)
        calls.append(1)
        writer.close()

    server, base = await _raw_server(hangs_up)
    up = Upstream()
    try:
        for _ in range(2):
            with pytest.raises(Broken):
                await up.open("POST", f"{base}/v1/completions", body=b"{}")
        assert calls == [1, 1]
        assert not any(up._idle.values())
    finally:
        await up.aclose()
        server.close()


async def test_garbage_from_an_engine_is_broken():
    async def garbage(reader, writer):
        await _read_request(reader)
        writer.write(b"SPLAT 9000 what\r\n\r\n")
        await writer.drain()

    server, base = await _raw_server(garbage)
    up = Upstream()
    try:
        with pytest.raises(Broken):
            await up.open("GET", f"{base}/health")
    finally:
        await up.aclose()
        server.close()


async def test_a_connection_the_engine_closed_while_idle_is_not_reused():
    async def once(reader, writer):  # answers one request, then closes (a keep-alive timeout)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server, base = await _raw_server(once)
    up = Upstream()
    try:
        for _ in range(3):
            status, _, body = await up.fetch("GET", f"{base}/health", timeout_s=5)
            assert (status, body) == (200, b"ok")
            await asyncio.sleep(0.2)  # the engine closes the idle connection meanwhile
    finally:
        await up.aclose()
        server.close()


async def test_a_header_value_cannot_smuggle_another_header():
    up = Upstream()
    with pytest.raises(ValueError):
        Upstream(headers={"x-qwen-serve-engine-key": "k\r\nx-evil: 1"})
    runner, base, _ = await _serve(_engine())
    try:
        with pytest.raises(ValueError):
            await up.open("POST", f"{base}/v1/completions", body=b"{}",
                          headers={"x-request-id": "a\r\nx-evil: 1"})
    finally:
        await up.aclose()
        await runner.cleanup()
