"""One OpenAI request through the ingress, from arrival to its last byte.

    admit ─ cache lookup ─ lease a replica (choose, count, retry) ─ answer:
        a stream: relay the engine's bytes, feeding the stream's observers
        a plain answer: read it whole, settle its cost, fill the cache
    ─ release the lease with the request's one final status

Two rules hold for every request that gets here:

- **One deadline** (``Deadline``), armed at admission. What expiry does depends on
  the phase: while the ingress waits for an engine it cancels the wait (504);
  while a stream is relayed it closes the engine's connection (vLLM aborts the
  generation), ends the stream with an error event and frees the replica's slot
  at once, whether or not the client is still reading.
- **One final status**, recorded once: by ``finish`` for answers the ingress gives
  itself, by ``Lease.release`` for answers an engine gave (a stream that broke
  mid-way counts as 502, one cut at the deadline as 504, not as the 200 its
  headers said).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .admission import Admitted, Rejected
from .cache import CachedResponse, StreamCapture, sse_from_completion
from .errors import error_body, error_response
from .pool import Replica
from .shape import estimate_tokens
from .state import IngressState
from .upstream import Broken, Refused, TimedOut, UpstreamResponse, finish as finish_upstream, read_all
from .usage import StreamEvents, StreamUsage, token_counts_of_body

logger = logging.getLogger("qwen_serve.ingress")
# Headers from the engine that describe the body passed through unchanged.
PASS_HEADERS = ("content-type", "retry-after", "x-request-id")


def finish(state: IngressState, route: str, model_label: str, started: float,
           resp: Response) -> Response:
    """Record an answer the ingress gives itself (rejections, cache hits, errors)."""
    record(state, route, model_label, started, resp.status_code)
    return resp


def record(state: IngressState, route: str, model_label: str, started: float, status: int) -> None:
    state.metrics.answered(route, status, model_label, time.perf_counter() - started)


class Deadline:
    """The request's deadline: one timer, whose action the current phase sets."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._action = None
        self._timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._fire)

    def on_expiry(self, action) -> None:
        self._action = action

    def _fire(self) -> None:
        self.expired = True
        if self._action is not None:
            self._action()

    def cancel(self) -> None:
        self._timer.cancel()


@dataclass
class RequestContext:
    """What the pipeline knows of an admitted request."""

    route: str  # metrics label and cache scope: chat, completions, tokenize, detokenize
    path: str  # the engine's route
    admitted: Admitted
    model_label: str
    adapter: str | None  # the LoRA adapter the request names, if any
    started: float  # perf_counter() at arrival
    deadline: Deadline
    cache_key: str | None = None
    engine_headers: dict[str, str] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.admitted.body.get("stream") is True


class Lease:
    """A replica's in-flight slot, held by one request from choice to last byte.

    The in-flight count is what the routing policies and the capacity bounds read,
    so it is taken and given back here only, exactly once.
    """

    def __init__(self, state: IngressState, ctx: RequestContext, replica: Replica) -> None:
        self.state, self.ctx, self.replica = state, ctx, replica
        self._held = True
        replica.lease(1)
        state.metrics.serving(ctx.route, 1)

    def release(self, status: int | None) -> None:
        """Give the slot back; ``status`` None: the caller answers and records it."""
        if not self._held:
            return
        self._held = False
        self.replica.lease(-1)
        self.state.metrics.serving(self.ctx.route, -1)
        if status is not None:
            record(self.state, self.ctx.route, self.ctx.model_label, self.ctx.started, status)


class StreamObserver(Protocol):
    """Sees every relayed chunk (as the network cut it) and the stream's end."""

    def feed(self, chunk: bytes) -> None: ...

    async def close(self, complete: bool) -> None: ...


class NoReplica(Exception):
    pass


class AtCapacity(Exception):
    pass


def choose(state: IngressState, text: str, adapter: str | None, exclude: set[str]) -> Replica:
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
    if state.placement is None:
        return state.policy.choose(candidates, text)
    replica = state.policy.choose(state.placement.candidates(candidates, adapter), text)
    state.placement.served(replica, adapter)
    return replica


async def handle(request: Request, state: IngressState, path: str, route: str) -> Response:
    """Admit one OpenAI request and answer it (from the cache or an engine)."""
    started = time.perf_counter()
    try:
        admitted = await state.admission.admit(request)
    except Rejected as rej:
        state.metrics.refused(rej.reason)
        return finish(state, route, "other", started, rej.response)
    model = admitted.body.get("model") or state.settings.model
    model_label = state.model_label(model)
    key = None
    if state.cache is not None and route in ("chat", "completions"):
        if "no-cache" in request.headers.get("cache-control", "").lower():
            state.metrics.cache.labels("bypass").inc()
        else:
            key = state.cache.key_for(route, admitted.body, state.answer_revision(model),
                                      scope=admitted.key_id or "")
            hit = await state.cache.get(key) if key else None
            if hit is not None:
                if admitted.body.get("stream") is True:
                    state.metrics.first_byte(route, model_label, time.perf_counter() - started)
                return finish(state, route, model_label, started,
                              from_cache(route, admitted.body, hit,
                                         state.cache.announces_hit(admitted.key_id or "")))
    headers = {"content-type": "application/json"}
    if rid := request.headers.get("x-request-id"):
        headers["x-request-id"] = rid
    ctx = RequestContext(route, path, admitted, model_label, state.adapter_of(model), started,
                         Deadline(state.settings.request_timeout_s), key, headers)
    # Until an answer starts, the deadline and the client leaving interrupt the wait for
    # the engine: cancelling it closes the engine connection, which aborts the request.
    # The wait runs in this task (a second task per request cost ~5 % of a plain request's
    # CPU); ``waiting`` keeps a late interrupt from reaching what follows the answer.
    task = asyncio.current_task()
    assert task is not None
    waiting, interrupted = True, False

    def interrupt() -> None:
        nonlocal interrupted
        if waiting and not interrupted:
            interrupted = True
            task.cancel()

    ctx.deadline.on_expiry(interrupt)
    client = ClientWatch(request, interrupt)
    try:
        answer = await _answer(state, ctx)
        waiting = False
        return answer
    except asyncio.CancelledError:
        waiting = False
        if not interrupted:
            raise  # the server is stopping: not this request's business
        task.uncancel()
    finally:
        waiting = False
        client.stop()
    ctx.deadline.cancel()
    if client.left and not ctx.deadline.expired:
        return finish(state, route, model_label, started, Response(status_code=499))  # nginx's code
    return finish(state, route, model_label, started, error_response(
        504, "The request exceeded its deadline.", code="deadline_exceeded"))


class ClientWatch:
    """Calls ``on_leave`` when the client disconnects while its answer is awaited.

    Noticing a disconnect takes a task waiting on the ASGI ``receive``. Started at
    once, that task cost ~5 % of a short plain request's CPU; it starts
    ``WATCH_AFTER_S`` in instead, so an answer given sooner (a short generation, a
    tokenization) never pays for it, and a client that left earlier is noticed then:
    uvicorn keeps the disconnect for the first ``receive`` after it.
    """

    WATCH_AFTER_S = 0.5

    def __init__(self, request: Request, on_leave) -> None:
        self._request, self._on_leave = request, on_leave
        self.left = False
        self._task: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self._on_leave()

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def _answer(state: IngressState, ctx: RequestContext) -> Response:
    opened = await _open(state, ctx)
    if isinstance(opened, Response):
        ctx.deadline.cancel()
        return opened
    lease, resp = opened
    out_headers = {k: v for k in PASS_HEADERS if (v := resp.headers.get(k))}
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        def expire() -> None:
            resp.close()  # wakes the relay's read; vLLM sees the close and aborts
            lease.release(504)  # the slot is free now, even if the client stopped reading

        # Set here, not in the relay: a stream whose relay never starts (the client
        # left first) still gives its slot back at the deadline.
        ctx.deadline.on_expiry(expire)
        observers = _observers(state, ctx, resp.status)
        relay = _relay(state, ctx, lease, resp, observers)
        return StreamingResponse(relay, status_code=resp.status, headers=out_headers)
    return await _read_plain(state, ctx, lease, resp, out_headers)


async def _open(state: IngressState, ctx: RequestContext) -> tuple[Lease, UpstreamResponse] | Response:
    """Choose a replica and send; retry where that is safe. An error Response otherwise."""
    admitted, route, label, started = ctx.admitted, ctx.route, ctx.model_label, ctx.started
    tried: set[str] = set()
    broken_once = False
    while True:
        try:
            replica = choose(state, admitted.prompt_text, ctx.adapter, tried)
        except NoReplica:
            state.admission.refund(admitted)  # no engine saw it: the retry is not charged twice
            return finish(state, route, label, started, error_response(
                503, "No engine replica is available; retry shortly.",
                code="no_replica", headers={"Retry-After": "1"}))
        except AtCapacity:
            state.admission.refund(admitted)
            state.metrics.refused("overloaded")
            return finish(state, route, label, started, error_response(
                429, "The server is at capacity; retry shortly.", code="overloaded",
                headers={"Retry-After": "1"}))
        tried.add(replica.replica_id)
        lease = Lease(state, ctx, replica)
        try:
            resp = await state.upstream.open("POST", f"{replica.url}{ctx.path}", body=admitted.raw,
                                             headers=ctx.engine_headers)
            return lease, resp
        except BaseException as exc:
            lease.release(None)
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
                return finish(state, route, label, started, error_response(
                    504, "The engine did not answer in time.", code="upstream_timeout"))
            if isinstance(exc, Broken):
                replica.mark_down()
                logger.warning("request to %s failed (%r); answering 502", replica.replica_id, exc)
                return finish(state, route, label, started, error_response(
                    502, "The engine connection broke.", code="upstream_broken"))
            raise


class _TokenSeries:
    """Adds a finished stream's tokens to the per-model series, from its meter."""

    def __init__(self, state: IngressState, ctx: RequestContext, meter: StreamUsage | StreamEvents,
                 feeds: bool) -> None:
        self.state, self.ctx, self.meter = state, ctx, meter
        # The limiter's StreamUsage is fed as an observer already; only our own
        # event counter needs the chunks.
        self.feed = meter.feed if feeds else _ignore

    async def close(self, complete: bool) -> None:
        self.state.metrics.count_tokens(self.ctx.model_label, self.meter.counts())


def _ignore(chunk: bytes) -> None:
    pass


def _observers(state: IngressState, ctx: RequestContext, status: int) -> list[StreamObserver]:
    """Who needs to see a stream: the rate limiter (its cost), the token series and the
    cache (its answer)."""
    if status != 200:
        return []
    observers: list[StreamObserver] = []
    admitted = ctx.admitted
    per_event = state.settings.tokens_per_event
    prompt = estimate_tokens(admitted.body, admitted.prompt_text, generates=False)
    if admitted.charged_to is not None:
        usage = StreamUsage(prompt, lambda used: state.admission.settle(admitted, used),
                            tokens_per_event=per_event)
        observers += [usage, _TokenSeries(state, ctx, usage, feeds=False)]
    else:
        observers.append(_TokenSeries(state, ctx, StreamEvents(prompt, tokens_per_event=per_event),
                                      feeds=True))
    if ctx.cache_key is not None:
        key = ctx.cache_key

        async def store(answer: bytes) -> None:
            await state.cache.put(key, CachedResponse(200, "application/json", answer))

        observers.append(StreamCapture(ctx.route, store=store))
    return observers


async def _relay(state: IngressState, ctx: RequestContext, lease: Lease,
                 resp: UpstreamResponse, observers: list[StreamObserver]):
    """Pass SSE bytes through as they arrive; end cleanly at the deadline or engine loss.

    The per-chunk work is what the ingress costs per token, so it stays small: one
    read of whatever bytes have arrived, the observers (usually none), one write.
    """
    complete = False
    status = resp.status
    try:
        first = True
        async for chunk in resp.iter_chunks():
            if first:
                state.metrics.first_byte(ctx.route, ctx.model_label, time.perf_counter() - ctx.started)
                first = False
            lease.replica.answered()
            for observer in observers:
                observer.feed(chunk)
            yield chunk
        if ctx.deadline.expired:
            raise Broken("closed at the deadline")
        complete = True
    except Broken as exc:
        # Finish the SSE with an error event rather than a silently truncated stream.
        if ctx.deadline.expired:
            status = 504
            err = error_body(504, "The request exceeded its deadline.", code="deadline_exceeded")
        else:
            status = 502
            logger.warning("stream from %s broke: %r", lease.replica.replica_id, exc)
            err = error_body(502, "The engine stopped mid-stream.", code="upstream_broken")
        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
    finally:
        ctx.deadline.cancel()
        finish_upstream(resp, complete)
        lease.release(status)
        for observer in observers:
            await observer.close(complete)


async def _read_plain(state: IngressState, ctx: RequestContext, lease: Lease,
                      resp: UpstreamResponse, out_headers: dict[str, str]) -> Response:
    complete = False
    try:
        content = await read_all(resp)
        complete = True
    except Broken as exc:
        logger.warning("answer from %s broke (%r); answering 502", lease.replica.replica_id, exc)
        lease.release(502)
        return error_response(502, "The engine connection broke.", code="upstream_broken")
    except BaseException:
        lease.release(None)  # cancelled: the client left or the deadline passed
        raise
    finally:
        finish_upstream(resp, complete)
    ctx.deadline.cancel()
    lease.replica.answered()
    lease.release(resp.status)
    if resp.status == 200 and ctx.route in ("chat", "completions"):
        admitted = ctx.admitted
        if (counts := token_counts_of_body(content)) is not None:
            state.metrics.count_tokens(ctx.model_label, counts)
            if admitted.charged_to is not None:
                state.admission.settle(admitted, counts.prompt + counts.completion)
        if ctx.cache_key is not None:
            await state.cache.put(ctx.cache_key, CachedResponse(200, "application/json", content))
    return Response(content, status_code=resp.status, headers=out_headers)


def from_cache(route: str, body: dict, hit: CachedResponse, announce: bool) -> Response:
    """Serve a cached answer in the shape asked for (SSE or one JSON body); ``announce``
    adds `x-cache: hit`."""
    headers = {"x-cache": "hit"} if announce else {}
    if body.get("stream") is True:
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return Response(sse_from_completion(route, hit.body, usage), media_type="text/event-stream",
                        headers=headers)
    return Response(hit.body, status_code=hit.status, media_type=hit.content_type, headers=headers)
