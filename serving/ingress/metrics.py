"""Prometheus metrics: the router's own series plus every replica's vLLM series.

One scrape of the ingress's /metrics gives an operator the whole deployment. The
engine series are vLLM's own (current names, e.g. ``vllm:num_requests_running``),
fetched from each replica and re-labelled with ``replica`` so per-replica panels
work; families are merged by name because the exposition format allows one
TYPE/HELP block per family.
"""

from __future__ import annotations

import asyncio
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .pool import Replica
from .upstream import Upstream, UpstreamError
from .usage import TokenCounts

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0)


# Set for ingress workers (server.workers > 1): each writes its series to files there,
# and a scrape of any worker shows the sums over all of them (prometheus-client's
# multiprocess mode; the launcher makes the folder and clears a dead worker's gauges).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class RouterMetrics:
    """The router's own series. Gauges say how several workers' values combine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("qwen_serve_requests", "Requests answered by the ingress.",
                                ["route", "status", "model"], registry=r)
        self.duration = Histogram("qwen_serve_request_duration_seconds",
                                  "Ingress end-to-end request latency.", ["route", "model"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("qwen_serve_time_to_first_byte_seconds",
                              "Time from request arrival to the first streamed byte.",
                              ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("qwen_serve_requests_in_flight", "Requests being served.",
                               ["route"], registry=r, multiprocess_mode="livesum")
        self.replicas = Gauge("qwen_serve_replicas", "Engine replicas known to the ingress.",
                              ["state"], registry=r, multiprocess_mode="livemostrecent")
        self.replica_up = Gauge("qwen_serve_replica_up",
                                "1 if the replica answered its last readiness probe.",
                                ["replica"], registry=r, multiprocess_mode="livemostrecent")
        self.rejected = Counter("qwen_serve_rejected_requests",
                                "Requests refused by the ingress before reaching an engine.",
                                ["reason"], registry=r)
        self.tokens = Counter("qwen_serve_tokens",
                              "Tokens of requests engines answered, per model (base or adapter): "
                              "the engine's usage where the answer carries it, else estimated "
                              "(prompt: the admission's estimate; completion: one per event).",
                              ["model", "kind"], registry=r)
        self.cache = Counter("qwen_serve_response_cache_requests",
                             "Response-cache lookups.", ["result"], registry=r)

        # Labelled children by their labels: prometheus-client's labels() validates and
        # locks on every call, ~5 % of the ingress's CPU per plain request in a profile.
        # The label sets are few (routes × statuses × served models), so this stays small.
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def answered(self, route: str, status: int, model: str, seconds: float) -> None:
        """One request's final status and latency."""
        self._child(self.requests, route, str(status), model).inc()
        self._child(self.duration, route, model).observe(seconds)

    def first_byte(self, route: str, model: str, seconds: float) -> None:
        self._child(self.ttfb, route, model).observe(seconds)

    def serving(self, route: str, delta: int) -> None:
        """A request of ``route`` took (1) or gave back (-1) its replica."""
        self._child(self.in_flight, route).inc(delta)

    def refused(self, reason: str) -> None:
        self._child(self.rejected, reason).inc()

    def count_tokens(self, model_label: str, counts: TokenCounts) -> None:
        self._child(self.tokens, model_label, "prompt").inc(counts.prompt)
        self._child(self.tokens, model_label, "completion").inc(counts.completion)

    def render(self) -> bytes:
        if folder := os.environ.get(MULTIPROCESS_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged, folder)
            return generate_latest(merged)
        return generate_latest(self.registry)


class _Families:
    """A collector over already-parsed families (rendered by prometheus_client)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


def merge_replica_metrics(texts: dict[str, str]) -> bytes:
    merged: dict[str, Metric] = {}
    for replica_id, text in texts.items():
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for s in family.samples:
                target.samples.append(Sample(s.name, {**s.labels, "replica": replica_id},
                                             s.value, s.timestamp, s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


async def fetch_replica_texts(upstream: Upstream, replicas: list[Replica],
                              timeout_s: float = 3.0) -> dict[str, str]:
    async def one(r: Replica) -> tuple[str, str | None]:
        try:
            status, _, body = await upstream.fetch("GET", f"{r.url}/metrics", timeout_s=timeout_s)
        except UpstreamError:
            return r.replica_id, None
        return r.replica_id, body.decode("utf-8", "replace") if status == 200 else None

    results = await asyncio.gather(*(one(r) for r in replicas))
    return {rid: text for rid, text in results if text}


class EngineMetrics:
    """Every replica's vLLM series, fetched and merged at most once per ``max_age_s``.

    Why: a scrape re-parses a few hundred lines per replica, milliseconds of CPU;
    done on the event loop for every scrape (several Prometheus servers, a
    dashboard's refresh, anyone hitting /metrics in a loop) it stole the relay's
    time. Concurrent scrapes share one fetch, and the parsing runs in a thread.
    """

    def __init__(self, upstream: Upstream, max_age_s: float = 1.0) -> None:
        self.upstream = upstream
        self.max_age_s = max_age_s
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._text = b""

    async def text(self, replicas: list[Replica]) -> bytes:
        async with self._lock:
            if time.monotonic() - self._at >= self.max_age_s:
                texts = await fetch_replica_texts(self.upstream, replicas)
                self._text = await asyncio.to_thread(merge_replica_metrics, texts)
                self._at = time.monotonic()
            return self._text
