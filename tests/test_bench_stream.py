"""Per-request measurement on recorded SSE streams (exact expected values)."""

import json

from benchmarks.stream import RawExchange, parse_exchange


def _data(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj))


def _cmpl(text):
    return _data({"choices": [{"index": 0, "text": text, "finish_reason": None}]})


def _chat(delta, finish=None):
    return _data({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _usage(prompt, completion):
    return _data({"choices": [], "usage": {"prompt_tokens": prompt,
                                           "completion_tokens": completion,
                                           "total_tokens": prompt + completion}})


def test_completions_stream_ttft_itl_e2e_tpot_from_usage():
    raw = RawExchange(start=10.0, status=200, lines=[
        (10.5, _cmpl("A")), (10.75, _cmpl("B")), (11.0, _cmpl("C")), (11.5, _cmpl("")),
        (11.625, _usage(7, 4)), (11.75, _data("[DONE]")),
    ])
    rec = parse_exchange(raw, "completions", index=3)
    assert rec.ok and rec.error_class is None and rec.index == 3
    assert rec.ttft == 0.5
    assert rec.itl == [0.25, 0.25, 0.5]
    assert rec.e2e == 1.5  # the usage chunk and [DONE] do not extend E2E
    assert rec.output_tokens == 4 and rec.prompt_tokens == 7 and rec.usage_reported
    assert rec.tpot == (1.5 - 0.5) / 3
    assert rec.text == "ABC"


def test_chat_role_announcement_and_empty_finish_are_not_tokens():
    raw = RawExchange(start=0.0, status=200, lines=[
        (0.25, _chat({"role": "assistant", "content": ""})),
        (0.5, _chat({"content": "Hi"})),
        (1.0, _chat({"content": " there"})),
        (1.25, _chat({}, finish="stop")),
        (1.5, _usage(31, 2)),
        (1.5, _data("[DONE]")),
    ])
    rec = parse_exchange(raw, "chat")
    assert rec.ttft == 0.5 and rec.itl == [0.5] and rec.e2e == 1.0
    assert rec.tpot == 0.5 and rec.output_tokens == 2 and rec.text == "Hi there"


def test_server_usage_wins_over_chunk_count_when_chunks_bundle_tokens():
    raw = RawExchange(start=0.0, status=200, lines=[
        (0.125, ": keep-alive comment"),
        (0.25, _cmpl("ab")), (0.75, _cmpl("cd")), (1.25, _cmpl("ef")),
        (1.5, _usage(3, 6)),
    ])
    rec = parse_exchange(raw, "completions")
    assert rec.output_tokens == 6
    assert rec.itl == [0.5, 0.5]
    assert rec.tpot == (1.25 - 0.25) / 5


def test_missing_usage_falls_back_to_token_events_and_is_flagged():
    raw = RawExchange(start=1.0, status=200, lines=[(1.5, _cmpl("x")), (2.0, _cmpl("y"))])
    rec = parse_exchange(raw, "completions")
    assert rec.ok and rec.output_tokens == 2 and not rec.usage_reported
    assert rec.prompt_tokens is None and rec.tpot == 0.5


def test_single_token_has_no_tpot():
    raw = RawExchange(start=0.0, status=200, lines=[(0.5, _cmpl("x")), (0.5, _usage(5, 1))])
    rec = parse_exchange(raw, "completions")
    assert rec.ok and rec.tpot is None and rec.itl == [] and rec.e2e == 0.5


def test_http_error_status_is_classified_with_body():
    raw = RawExchange(start=0.0, status=503, body='{"error": "overloaded"}')
    rec = parse_exchange(raw, "chat")
    assert not rec.ok and rec.error_class == "http_503" and "overloaded" in rec.error
    assert rec.output_tokens == 0 and rec.ttft is None


def test_error_event_inside_stream_fails_the_request():
    raw = RawExchange(start=0.0, status=200, lines=[
        (0.5, _cmpl("a")), (0.75, _data({"error": {"message": "engine died", "code": 500}})),
    ])
    rec = parse_exchange(raw, "completions")
    assert not rec.ok and rec.error_class == "stream_error" and "engine died" in rec.error
    assert rec.output_tokens == 0


def test_stream_without_tokens_fails():
    raw = RawExchange(start=0.0, status=200, lines=[(0.5, _usage(4, 0)), (0.5, _data("[DONE]"))])
    rec = parse_exchange(raw, "completions")
    assert not rec.ok and rec.error_class == "no_tokens"


def test_transport_error_class_is_kept():
    raw = RawExchange(start=0.0, status=200, lines=[(0.5, _cmpl("a"))],
                      error_class="read_error", error="ReadError: reset")
    rec = parse_exchange(raw, "completions")
    assert not rec.ok and rec.error_class == "read_error" and rec.ttft == 0.5


def test_a_line_separator_inside_a_token_does_not_split_the_event():
    """SSE lines end only in LF/CR(LF); JSON leaves U+2028 and U+0085 unescaped. A loopback
    server sends a token holding both, its event cut across two writes."""
    import asyncio

    from benchmarks.client import Target, make_client, send
    from benchmarks.workloads import RequestSpec

    token = json.dumps({"choices": [{"index": 0, "text": "a\u2028b\x85c", "finish_reason": None}]},
                       ensure_ascii=False).encode()
    body = b"data: " + token + b"\n\n" + _usage(5, 1).encode() + b"\n\ndata: [DONE]\n\n"
    cut = len(b"data: ") + 20

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        for part in (body[:cut], body[cut:]):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, make_client(1, 10.0) as client:
            return await send(client, RequestSpec(max_tokens=1, prompt="hi"),
                              Target(f"http://127.0.0.1:{port}", "m"))

    rec = parse_exchange(asyncio.run(main()), "completions")
    assert rec.error is None, rec.error
    assert rec.ok and rec.text == "a\u2028b\x85c" and rec.output_tokens == 1
