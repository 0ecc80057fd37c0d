"""Autoscaling on the engines' own queues.

Serve's default policy counts requests that pass through its handles; ours go
straight from the ingress to each engine over HTTP, so Serve would see zero and
scale to the minimum. Instead every replica reports vLLM's running + waiting
requests (``record_autoscaling_stats``), and this policy sizes the deployment so
each replica carries ``target_ongoing_requests``. Serve applies min/max, the
up/down delays and the smoothing factors around it.
"""

from __future__ import annotations

import math
import re

METRIC = "engine_requests"
_SERIES = re.compile(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\}\s+([0-9.eE+-]+)\s*$",
                     re.MULTILINE)


def engine_requests(metrics_text: str) -> float:
    """Running + waiting requests in one vLLM server's Prometheus text."""
    return sum(float(v) for v in _SERIES.findall(metrics_text))


def engine_queue_policy(ctx) -> tuple[int, dict]:
    per_replica = (ctx.aggregated_metrics or {}).get(METRIC, {})
    if ctx.current_num_replicas == 0 or not per_replica:
        return ctx.target_num_replicas, {}
    target = ctx.config.get_target_ongoing_requests()
    return max(1, math.ceil(sum(per_replica.values()) / target)), {}
